//! Links, addresses, routes and rules over rtnetlink: reading what the
//! kernel holds, and the single writes the datapath makes.

use std::net::IpAddr;

use futures::TryStreamExt;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVrf, LinkAttribute, LinkFlags, LinkInfo};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::{Handle, IpVersion, LinkUnspec, LinkVrf, RouteMessageBuilder};

use super::{PROTOCOL, ROUTE_METRIC, RULE_PRIORITY, UNREACHABLE_METRIC};
use crate::datapath::DatapathError;

fn nl(what: &str, e: rtnetlink::Error) -> DatapathError {
    DatapathError::netlink(what, e)
}

/// A link as the datapath needs to know it.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<String>,
    pub up: bool,
    /// The VRF (or other master) it is enslaved to.
    pub controller: Option<u32>,
    /// A VRF's table.
    pub vrf_table: Option<u32>,
}

pub async fn links(handle: &Handle) -> Result<Vec<Link>, DatapathError> {
    let mut stream = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing links", e))? {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            controller: None,
            vrf_table: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Controller(c) => link.controller = Some(*c),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(k) => link.kind = Some(kind_name(k)),
                            LinkInfo::Data(InfoData::Vrf(vrf)) => {
                                for v in vrf {
                                    if let InfoVrf::TableId(t) = v {
                                        link.vrf_table = Some(*t);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

fn kind_name(k: &InfoKind) -> String {
    match k {
        InfoKind::Vrf => "vrf".into(),
        InfoKind::Wireguard => "wireguard".into(),
        InfoKind::Tun => "tun".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Addresses by interface index, as `address/length`; IPv6 link-local
/// addresses (the kernel's own) are left out.
pub async fn addresses(handle: &Handle) -> Result<Vec<(u32, String)>, DatapathError> {
    let mut stream = handle.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing addresses", e))? {
        let address = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        let Some(ip) = address else { continue };
        if let IpAddr::V6(v6) = ip
            && v6.segments()[0] & 0xffc0 == 0xfe80
        {
            continue;
        }
        out.push((msg.header.index, format!("{ip}/{}", msg.header.prefix_len)));
    }
    Ok(out)
}

pub async fn add_address(handle: &Handle, index: u32, address: &str) -> Result<(), DatapathError> {
    let (ip, len) = split(address)?;
    handle.address().add(index, ip, len).execute().await.map_err(|e| nl(&format!("adding {address}"), e))
}

pub async fn del_address(handle: &Handle, index: u32, address: &str) -> Result<(), DatapathError> {
    let (ip, len) = split(address)?;
    let mut stream = handle.address().get().set_link_index_filter(index).execute();
    while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing addresses", e))? {
        let found = msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(a) if *a == ip));
        if found && msg.header.prefix_len == len {
            return handle.address().del(msg).execute().await.map_err(|e| nl(&format!("removing {address}"), e));
        }
    }
    Err(DatapathError::missing(format!("{address} on interface {index}")))
}

pub fn split(prefix: &str) -> Result<(IpAddr, u8), DatapathError> {
    let invalid = |e: &dyn std::fmt::Display| DatapathError::Invalid(format!("`{prefix}`: {e}"));
    let (ip, len) = prefix.split_once('/').ok_or_else(|| invalid(&"no length"))?;
    let ip: IpAddr = ip.parse().map_err(|e| invalid(&e))?;
    let len: u8 = len.parse().map_err(|e| invalid(&e))?;
    Ok((ip, len))
}

pub async fn set_up(handle: &Handle, index: u32) -> Result<(), DatapathError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl(&format!("setting interface {index} up"), e))
}

pub async fn delete_link(handle: &Handle, index: u32) -> Result<(), DatapathError> {
    handle.link().del(index).execute().await.map_err(|e| nl(&format!("deleting interface {index}"), e))
}

pub async fn add_vrf(handle: &Handle, name: &str, table: u32) -> Result<(), DatapathError> {
    handle
        .link()
        .add(LinkVrf::new(name, table).up().build())
        .execute()
        .await
        .map_err(|e| nl(&format!("creating VRF {name}"), e))
}

pub async fn add_wireguard(handle: &Handle, name: &str) -> Result<(), DatapathError> {
    handle
        .link()
        .add(rtnetlink::LinkWireguard::new(name).build())
        .execute()
        .await
        .map_err(|e| nl(&format!("creating WireGuard interface {name}"), e))
}

/// Enslaves `index` to `controller`, or releases it (`None`).
pub async fn set_controller(handle: &Handle, index: u32, controller: Option<u32>) -> Result<(), DatapathError> {
    let msg = LinkUnspec::new_with_index(index);
    let msg = match controller {
        Some(c) => msg.controller(c),
        None => msg.nocontroller(),
    };
    handle.link().set(msg.build()).execute().await.map_err(|e| nl(&format!("binding interface {index}"), e))
}

/// One of the agent's routes, as read back.
#[derive(Debug, Clone)]
pub struct OwnedRoute {
    pub table: u32,
    pub prefix: String,
    /// `None` for the unreachable default that closes a segment's table.
    pub oif: Option<u32>,
    /// The next hop, if any (empty: none).
    pub via: String,
    pub message: RouteMessage,
}

fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

/// Every route of both families, in every table.
async fn all_routes(handle: &Handle) -> Result<Vec<RouteMessage>, DatapathError> {
    let mut out = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let query = match version {
            IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().table_id(0).build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().table_id(0).build(),
        };
        let mut stream = handle.route().get(query).execute();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing routes", e))? {
            out.push(msg);
        }
    }
    Ok(out)
}

/// Every route the agent owns (its protocol number), in every table.
pub async fn owned_routes(handle: &Handle) -> Result<Vec<OwnedRoute>, DatapathError> {
    let mut out = Vec::new();
    for msg in all_routes(handle).await? {
        if msg.header.protocol != RouteProtocol::Other(PROTOCOL) {
            continue;
        }
        let dest = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(d) => address(d),
            _ => None,
        });
        let dest = dest.unwrap_or(match msg.header.address_family {
            AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        });
        let oif = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        let oif = if msg.header.kind == RouteType::Unreachable { None } else { oif };
        let via = msg.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => address(g),
            _ => None,
        });
        out.push(OwnedRoute {
            table: table_of(&msg),
            prefix: format!("{dest}/{}", msg.header.destination_prefix_length),
            oif,
            via: via.map(|a| a.to_string()).unwrap_or_default(),
            message: msg,
        });
    }
    Ok(out)
}

fn route_message(
    table: u32,
    prefix: &str,
    oif: Option<u32>,
    via: Option<IpAddr>,
) -> Result<RouteMessage, DatapathError> {
    let (ip, len) = split(prefix)?;
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, len)
        .map_err(|e| DatapathError::Invalid(format!("{prefix}: {e}")))?
        .table_id(table)
        .protocol(RouteProtocol::Other(PROTOCOL));
    if let Some(via) = via {
        builder = builder.gateway(via).map_err(|e| DatapathError::Invalid(format!("{prefix} via {via}: {e}")))?;
    }
    Ok(match oif {
        Some(i) => builder.output_interface(i).priority(ROUTE_METRIC).build(),
        None => builder.kind(RouteType::Unreachable).priority(UNREACHABLE_METRIC).build(),
    })
}

/// Adds a route; with `replace`, in place of the one to the same prefix
/// (NLM_F_REPLACE: the kernel swaps it in one step).
pub async fn add_route(
    handle: &Handle,
    table: u32,
    prefix: &str,
    oif: Option<u32>,
    via: Option<IpAddr>,
    replace: bool,
) -> Result<(), DatapathError> {
    let msg = route_message(table, prefix, oif, via)?;
    let request = handle.route().add(msg);
    let request = if replace { request.replace() } else { request };
    request.execute().await.map_err(|e| nl(&format!("adding route {prefix} in table {table}"), e))
}

pub async fn del_route(handle: &Handle, msg: RouteMessage) -> Result<(), DatapathError> {
    let what = format!("deleting a route in table {}", table_of(&msg));
    handle.route().del(msg).execute().await.map_err(|e| nl(&what, e))
}

/// One of the agent's rules (table mode), as read back.
#[derive(Debug, Clone)]
pub struct OwnedRule {
    pub table: u32,
    pub iif: Option<String>,
    pub oif: Option<String>,
    /// `from` (the source pins' rules).
    pub source: Option<IpAddr>,
    pub v6: bool,
    pub message: RuleMessage,
}

/// The rules in the agent's priority that carry its protocol number.
pub async fn owned_rules(handle: &Handle) -> Result<Vec<OwnedRule>, DatapathError> {
    rules_in(handle, RULE_PRIORITY).await
}

/// The agent's source rules ([`super::LINE_RULE_PRIORITY`]), both families.
pub async fn source_rules(handle: &Handle) -> Result<Vec<OwnedRule>, DatapathError> {
    rules_in(handle, super::LINE_RULE_PRIORITY).await
}

/// The rules in `priority` that carry the agent's protocol number.
async fn rules_in(handle: &Handle, wanted: u32) -> Result<Vec<OwnedRule>, DatapathError> {
    let mut out = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let v6 = matches!(version, IpVersion::V6);
        let mut stream = handle.rule().get(version).execute();
        while let Some(msg) = stream.try_next().await.map_err(|e| nl("listing rules", e))? {
            let mut rule = OwnedRule {
                table: u32::from(msg.header.table),
                iif: None,
                oif: None,
                source: None,
                v6,
                message: msg.clone(),
            };
            let (mut priority, mut ours) = (0, false);
            for a in &msg.attributes {
                match a {
                    RuleAttribute::Priority(p) => priority = *p,
                    RuleAttribute::Protocol(p) => ours = *p == RouteProtocol::Other(PROTOCOL),
                    RuleAttribute::Table(t) => rule.table = *t,
                    RuleAttribute::Iifname(n) => rule.iif = Some(n.clone()),
                    RuleAttribute::Oifname(n) => rule.oif = Some(n.clone()),
                    RuleAttribute::Source(a) => rule.source = Some(*a),
                    _ => {}
                }
            }
            if ours && priority == wanted {
                out.push(rule);
            }
        }
    }
    Ok(out)
}

/// `iif NAME lookup TABLE` or `oif NAME lookup TABLE` in the agent's priority.
pub async fn add_rule(
    handle: &Handle,
    table: u32,
    interface: &str,
    input: bool,
    v6: bool,
) -> Result<(), DatapathError> {
    let request = handle.rule().add().table_id(table).priority(RULE_PRIORITY).action(RuleAction::ToTable);
    let request = if input { request.input_interface(interface) } else { request.output_interface(interface) };
    let what = format!("adding the rule {} {interface} → table {table}", if input { "iif" } else { "oif" });
    if v6 {
        let mut r = request.v6();
        r.message_mut().attributes.push(RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL)));
        r.execute().await.map_err(|e| nl(&what, e))
    } else {
        let mut r = request.v4();
        r.message_mut().attributes.push(RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL)));
        r.execute().await.map_err(|e| nl(&what, e))
    }
}

pub async fn del_rule(handle: &Handle, msg: RuleMessage) -> Result<(), DatapathError> {
    handle.rule().del(msg).execute().await.map_err(|e| nl("deleting a rule", e))
}

/// The main table (`ip route show table main`).
pub const MAIN_TABLE: u32 = 254;

/// A route of the main table or of a line's table, as the underlay's hops
/// and pins need it.
#[derive(Debug, Clone)]
pub struct MainRoute {
    pub table: u32,
    pub destination: IpAddr,
    pub length: u8,
    pub oif: Option<u32>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    pub metric: u32,
    /// Carries the agent's protocol number: one of its pinned routes.
    pub ours: bool,
    pub message: RouteMessage,
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The unicast routes of the main table and of the lines' tables
/// ([`super::LINE_TABLES`]), both families.
pub async fn main_routes(handle: &Handle) -> Result<Vec<MainRoute>, DatapathError> {
    let mut out = Vec::new();
    for msg in all_routes(handle).await? {
        let table = table_of(&msg);
        if !(table == MAIN_TABLE || super::is_line_table(table)) || msg.header.kind != RouteType::Unicast {
            continue;
        }
        let mut route = MainRoute {
            table,
            destination: match msg.header.address_family {
                AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            },
            length: msg.header.destination_prefix_length,
            oif: None,
            gateway: None,
            source: None,
            metric: 0,
            ours: msg.header.protocol == RouteProtocol::Other(PROTOCOL),
            message: msg.clone(),
        };
        for a in &msg.attributes {
            match a {
                RouteAttribute::Destination(d) => route.destination = address(d).unwrap_or(route.destination),
                RouteAttribute::Oif(i) => route.oif = Some(*i),
                RouteAttribute::Gateway(g) => route.gateway = address(g),
                RouteAttribute::PrefSource(s) => route.source = address(s),
                RouteAttribute::Priority(m) => route.metric = *m,
                _ => {}
            }
        }
        out.push(route);
    }
    Ok(out)
}

/// Pins `destination` (a host route in `table`, the agent's protocol) to
/// interface `oif`, through `gateway`, from `source`.
pub async fn add_pin(
    handle: &Handle,
    table: u32,
    destination: IpAddr,
    source: IpAddr,
    oif: u32,
    gateway: Option<IpAddr>,
) -> Result<(), DatapathError> {
    let what = format!("pinning {destination} to interface {oif} in table {table}");
    let full = if destination.is_ipv4() { 32 } else { 128 };
    let mut builder = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(destination, full)
        .map_err(|e| DatapathError::Invalid(format!("{what}: {e}")))?
        .table_id(table)
        .protocol(RouteProtocol::Other(PROTOCOL))
        .output_interface(oif)
        .pref_source(source)
        .map_err(|e| DatapathError::Invalid(format!("{what}: {e}")))?;
    if let Some(g) = gateway {
        builder = builder.gateway(g).map_err(|e| DatapathError::Invalid(format!("{what}: {e}")))?;
    }
    handle.route().add(builder.build()).replace().execute().await.map_err(|e| nl(&what, e))
}

/// `from SOURCE lookup TABLE` in [`super::LINE_RULE_PRIORITY`], the agent's protocol.
pub async fn add_source_rule(handle: &Handle, source: IpAddr, table: u32) -> Result<(), DatapathError> {
    let request = handle.rule().add().table_id(table).priority(super::LINE_RULE_PRIORITY).action(RuleAction::ToTable);
    let what = format!("adding the rule from {source} → table {table}");
    let protocol = RuleAttribute::Protocol(RouteProtocol::Other(PROTOCOL));
    match source {
        IpAddr::V4(a) => {
            let mut r = request.v4().source_prefix(a, 32);
            r.message_mut().attributes.push(protocol);
            r.execute().await.map_err(|e| nl(&what, e))
        }
        IpAddr::V6(a) => {
            let mut r = request.v6().source_prefix(a, 128);
            r.message_mut().attributes.push(protocol);
            r.execute().await.map_err(|e| nl(&what, e))
        }
    }
}
