//! One reader per kind of object.

use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};

use super::reader::{Reader, join};
use crate::intent::tree::Node;
use crate::intent::*;

pub(super) fn read_tenant(r: &mut Reader<'_>, doc: &Node, name: String) {
    let Some(f) = r.map(doc, "", &["kind", "name", "national", "description"]) else {
        return;
    };
    let national = r.opt_bool(&f, "", "national").unwrap_or_default();
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent.tenants.insert(name.clone(), Arc::new(Tenant { name, national, description }));
}

pub(super) fn read_operator(r: &mut Reader<'_>, doc: &Node, name: String) {
    let Some(f) = r.map(doc, "", &["kind", "name", "roles", "tenants", "description"]) else {
        return;
    };
    let mut roles = Vec::new();
    match Reader::get(&f, "roles") {
        Some(n) => {
            for (path, item) in r.list(n, "roles", "roles") {
                roles.extend(r.choice(item, &path, &OperatorRole::options()));
            }
        }
        None => r.missing(doc, "", "roles", "a list of roles: admin, operator, viewer, auditor"),
    }
    let tenants = r.string_list(&f, "", "tenants");
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent.operators.insert(name.clone(), Arc::new(Operator { name, roles, tenants, description }));
}

pub(super) fn read_segment(r: &mut Reader<'_>, doc: &Node, name: String) {
    let Some(f) = r.map(doc, "", &["kind", "name", "tenant", "prefixes", "shared_with", "description", "aid"]) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let prefixes = r.networks(&f, "", "prefixes");
    let shared_with = r.string_list(&f, "", "shared_with");
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    let mut aid = Vec::new();
    if let Some(n) = Reader::get(&f, "aid") {
        for (path, item) in r.list(n, "aid", "aid") {
            aid.extend(read_aid(r, item, &path));
        }
    }
    r.p.intent
        .segments
        .insert(name.clone(), Arc::new(Segment { name, tenant, prefixes, shared_with, description, aid }));
}

fn read_aid(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Aid> {
    let f = r.map(n, path, &["name", "access_points", "activation", "max_duration", "description"])?;
    let name = r.req_string(&f, n, path, "name");
    let access_points = r.string_list(&f, path, "access_points");
    if Reader::get(&f, "access_points").is_none() {
        r.missing(n, path, "access_points", "the aiding pair: an east and a west access point");
    }
    let activation = Reader::get(&f, "activation")
        .and_then(|v| r.choice(v, &join(path, "activation"), &Activation::options()))
        .unwrap_or_default();
    let max_duration_s = match Reader::get(&f, "max_duration") {
        Some(v) => {
            let p = join(path, "max_duration");
            r.string(v, &p).and_then(|s| match crate::words::duration(&s) {
                Ok(d) if d.as_secs() > 0 => Some(d.as_secs()),
                Ok(_) => {
                    r.error(v, &p, "an aid must last some time", "a duration like 6h or 3d");
                    None
                }
                Err(why) => {
                    r.error(v, &p, why, "a duration like 6h or 3d");
                    None
                }
            })
        }
        None => {
            r.missing(n, path, "max_duration", "how long one activation lasts at most, like 72h");
            None
        }
    };
    let description = r.opt_string(&f, path, "description").unwrap_or_default();
    Some(Aid { name: name?, access_points, activation, max_duration_s: max_duration_s?, description })
}

pub(super) fn read_site(r: &mut Reader<'_>, doc: &Node, name: String) {
    let allowed = ["kind", "name", "tenant", "role", "region", "lines", "attachments", "description"];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let role = Reader::get(&f, "role").and_then(|n| r.choice(n, "role", &Role::options())).unwrap_or_default();
    let region = match Reader::get(&f, "region") {
        Some(n) => r.choice(n, "region", &Region::options()).unwrap_or_default(),
        None => {
            r.missing(doc, "", "region", "east or west");
            Region::East
        }
    };
    let mut lines = Vec::new();
    if let Some(n) = Reader::get(&f, "lines") {
        for (path, item) in r.list(n, "lines", "lines") {
            if let Some(line) = read_line(r, item, &path) {
                lines.push(line);
            }
        }
    }
    let mut attachments = Vec::new();
    if let Some(n) = Reader::get(&f, "attachments") {
        for (path, item) in r.list(n, "attachments", "attachments") {
            if let Some(a) = read_attachment(r, item, &path) {
                attachments.push(a);
            }
        }
    }
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent
        .sites
        .insert(name.clone(), Arc::new(Site { name, tenant, role, region, lines, attachments, description }));
}

fn read_line(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Line> {
    let f = r.map(n, path, &["name", "kind", "priority", "address", "probe"])?;
    let name = r.req_string(&f, n, path, "name");
    let kind = match Reader::get(&f, "kind") {
        Some(v) => r.choice(v, &join(path, "kind"), &LineKind::options()),
        None => {
            r.missing(n, path, "kind", "a line kind");
            None
        }
    };
    let priority = match Reader::get(&f, "priority") {
        Some(v) => r.int(v, &join(path, "priority"), 1, 1000),
        None => {
            r.missing(n, path, "priority", "an integer, 1 for the first choice");
            None
        }
    };
    let address = match Reader::get(&f, "address") {
        Some(v) => {
            let p = join(path, "address");
            r.address(v, &p, "an IPv4 or IPv6 address").and_then(|a| match unreachable_kind(&a) {
                Some(why) => {
                    r.error(v, &p, format!("{a} is {why}: no other site could reach it"), LINE_ADDRESS);
                    None
                }
                None => Some(a),
            })
        }
        None => {
            r.missing(n, path, "address", "the line's underlay IP address");
            None
        }
    };
    let probe = Reader::get(&f, "probe").map(|v| r.probe(v, &join(path, "probe"))).unwrap_or_default();
    Some(Line { name: name?, kind: kind?, priority: priority?, address: address?, probe })
}

const LINE_ADDRESS: &str = "the line's own unicast address (not unspecified, loopback, multicast or broadcast)";

/// Why an underlay address cannot be a line's: what kind of address it is.
fn unreachable_kind(a: &IpAddr) -> Option<&'static str> {
    match a {
        _ if a.is_unspecified() => Some("the unspecified address"),
        _ if a.is_loopback() => Some("a loopback address"),
        _ if a.is_multicast() => Some("a multicast address"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address"),
        _ => None,
    }
}

fn read_attachment(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Attachment> {
    let f = r.map(n, path, &["segment", "interface", "prefixes", "legacy"])?;
    let segment = r.req_string(&f, n, path, "segment");
    let interface = r.opt_string(&f, path, "interface");
    let prefixes = r.networks(&f, path, "prefixes");
    let legacy = Reader::get(&f, "legacy").and_then(|v| read_legacy(r, v, &join(path, "legacy")));
    Some(Attachment { segment: segment?, interface, prefixes, legacy })
}

fn read_legacy(r: &mut Reader<'_>, n: &Node, path: &str) -> Option<Legacy> {
    let f = r.map(n, path, &["interface", "via", "sites"])?;
    let interface = r.req_string(&f, n, path, "interface");
    let via = match Reader::get(&f, "via") {
        Some(v) => r.address(v, &join(path, "via"), "the old network's router on that interface"),
        None => {
            r.missing(n, path, "via", "the old network's router on that interface");
            None
        }
    };
    let mut sites = Vec::new();
    match Reader::get(&f, "sites") {
        Some(v) => {
            for (p, item) in r.list(v, &join(path, "sites"), "legacy sites") {
                let Some(sf) = r.map(item, &p, &["name", "prefixes", "cutover_to"]) else { continue };
                let name = r.req_string(&sf, item, &p, "name");
                let prefixes = r.networks(&sf, &p, "prefixes");
                let cutover_to = r.opt_string(&sf, &p, "cutover_to");
                if let Some(name) = name {
                    sites.push(LegacySite { name, prefixes, cutover_to });
                }
            }
        }
        None => r.missing(n, path, "sites", "the sites still on the old network, with their prefixes"),
    }
    Some(Legacy { interface: interface?, via: via?, sites })
}

pub(super) fn read_policy(r: &mut Reader<'_>, doc: &Node, name: String) {
    let allowed = ["kind", "name", "tenant", "from", "to", "protocol", "ports", "description"];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let tenant = r.req_string(&f, doc, "", "tenant").unwrap_or_default();
    let from = r.req_string(&f, doc, "", "from").unwrap_or_default();
    let to = r.req_string(&f, doc, "", "to").unwrap_or_default();
    let protocol =
        Reader::get(&f, "protocol").and_then(|n| r.choice(n, "protocol", &Protocol::options())).unwrap_or_default();
    let mut ports = Vec::new();
    if let Some(n) = Reader::get(&f, "ports") {
        for (path, item) in r.list(n, "ports", "ports") {
            ports.extend(r.port_range(item, &path));
        }
    }
    let description = r.opt_string(&f, "", "description").unwrap_or_default();
    r.p.intent.policies.insert(name.clone(), Arc::new(Policy { name, tenant, from, to, protocol, ports, description }));
}

pub(super) fn read_settings(r: &mut Reader<'_>, doc: &Node) {
    let allowed = [
        "kind",
        "probe",
        "line_kinds",
        "wireguard_ports",
        "routing_tables",
        "tunnel_addresses",
        "interconnect_addresses",
    ];
    let Some(f) = r.map(doc, "", &allowed) else {
        return;
    };
    let mut s = Settings::default();
    if let Some(n) = Reader::get(&f, "probe") {
        s.probe = s.probe.with(r.probe(n, "probe"));
    }
    if let Some(n) = Reader::get(&f, "line_kinds") {
        let kinds: Vec<&str> = LineKind::ALL.iter().map(|k| k.yaml()).collect();
        if let Some(kf) = r.map(n, "line_kinds", &kinds) {
            for (key, _, v) in kf {
                if let Some(kind) = LineKind::ALL.iter().find(|k| k.yaml() == key) {
                    let o = r.probe(v, &join("line_kinds", key));
                    s.line_kind_probe.insert(*kind, o);
                }
            }
        }
    }
    if let Some(n) = Reader::get(&f, "wireguard_ports") {
        s.wireguard_ports = r.range(n, "wireguard_ports", 1, 65535).unwrap_or(s.wireguard_ports);
    }
    if let Some(n) = Reader::get(&f, "routing_tables") {
        // 253-255 are the kernel's default, main and local tables.
        s.routing_tables = r.range(n, "routing_tables", 256, u32::MAX - 1).unwrap_or(s.routing_tables);
    }
    if let Some(n) = Reader::get(&f, "tunnel_addresses") {
        let (v4, v6) = read_pools(r, n, "tunnel_addresses");
        s.tunnel_ipv4 = v4.unwrap_or(s.tunnel_ipv4);
        s.tunnel_ipv6 = v6.unwrap_or(s.tunnel_ipv6);
    }
    if let Some(n) = Reader::get(&f, "interconnect_addresses") {
        let (v4, v6) = read_pools(r, n, "interconnect_addresses");
        s.interconnect_ipv4 = v4.unwrap_or(s.interconnect_ipv4);
        s.interconnect_ipv6 = v6.unwrap_or(s.interconnect_ipv6);
    }
    r.p.intent.settings = s;
}

fn read_pools(r: &mut Reader<'_>, n: &Node, path: &str) -> (Option<Ipv4Network>, Option<Ipv6Network>) {
    let Some(f) = r.map(n, path, &["ipv4", "ipv6"]) else {
        return (None, None);
    };
    let v4 = Reader::get(&f, "ipv4").and_then(|v| {
        let p = join(path, "ipv4");
        match r.network(v, &p)? {
            IpNetwork::V4(net) => Some(net),
            IpNetwork::V6(_) => {
                r.error(v, &p, "found an IPv6 prefix", "an IPv4 prefix");
                None
            }
        }
    });
    let v6 = Reader::get(&f, "ipv6").and_then(|v| {
        let p = join(path, "ipv6");
        match r.network(v, &p)? {
            IpNetwork::V6(net) => Some(net),
            IpNetwork::V4(_) => {
                r.error(v, &p, "found an IPv4 prefix", "an IPv6 prefix");
                None
            }
        }
    });
    (v4, v6)
}
