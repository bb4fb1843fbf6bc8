//! The objects a site configuration asks the datapath to hold: pure, from
//! the configuration, the interfaces' local keys and the agent's choices.
//! The keys are made and read by the caller; nothing here touches a file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use musubi_proto::v1::{self as pb, SiteConfig};

use super::ReconcileError;
use super::lines::{active_endpoint, picks_line};
use crate::datapath::{Allow, Domain, Hops, Owned, PeerSpec, Policy, PolicySpec, Route, Sources, Tunnel};
use crate::failover::{Choices, first_choices};
use crate::summary::summarise;

/// A segment interface's WireGuard key, as the state directory holds it:
/// its public half, and the file the private half stays in (the datapath
/// hands the file's contents to the kernel; the key never leaves the site).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalKey {
    pub public_key: String,
    pub file: PathBuf,
}

/// The local keys by segment.
pub type LocalKeys = BTreeMap<String, LocalKey>;

fn endpoint(e: &pb::Endpoint) -> String {
    match e.address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{}", e.port),
        _ => format!("{}:{}", e.address, e.port),
    }
}

/// A prefix in the one spelling the kernel reads back (network address,
/// compressed IPv6).
pub fn canonical(prefix: &str) -> Result<String, ReconcileError> {
    parsed(prefix).map(|(_, text)| text)
}

/// `prefix` parsed, and in the kernel's spelling ([`canonical`]). An IPv4
/// network already spelled that way (as the controller writes them: an
/// access point's configuration holds tens of thousands) is copied rather
/// than written out again.
fn parsed(prefix: &str) -> Result<(ipnetwork::IpNetwork, String), ReconcileError> {
    let net: ipnetwork::IpNetwork =
        prefix.parse().map_err(|e| ReconcileError::Prefix(format!("`{prefix}` is not a prefix: {e}")))?;
    if net.is_ipv4() && net.ip() == net.network() && plain_v4_length(prefix) {
        return Ok((net, prefix.to_string()));
    }
    let network = ipnetwork::IpNetwork::new(net.network(), net.prefix()).unwrap_or(net);
    Ok((network, format!("{}/{}", net.network(), net.prefix())))
}

/// Whether a parsed IPv4 `prefix` has a length in decimal without a
/// leading zero (not a netmask, not missing): the address before it is
/// then as the kernel writes it, since the standard library's parser
/// takes only dotted decimal without leading zeros.
fn plain_v4_length(prefix: &str) -> bool {
    let Some((_, length)) = prefix.split_once('/') else { return false };
    let digits = length.bytes().all(|b| b.is_ascii_digit());
    digits && (1..=2).contains(&length.len()) && (length == "0" || !length.starts_with('0'))
}

/// An interface address (`address/length`) in the kernel's spelling.
fn interface_address(text: &str) -> Result<String, ReconcileError> {
    let net: ipnetwork::IpNetwork =
        text.parse().map_err(|e| ReconcileError::Prefix(format!("`{text}` is not an address: {e}")))?;
    Ok(format!("{}/{}", net.ip(), net.prefix()))
}

fn protocol(p: pb::Protocol) -> &'static str {
    match p {
        pb::Protocol::Tcp => "tcp",
        pb::Protocol::Udp => "udp",
        pb::Protocol::Icmp => "icmp",
        pb::Protocol::Any | pb::Protocol::Unspecified => "any",
    }
}

/// The objects `config` asks for.
///
/// WireGuard authenticates, routing chooses. Each of a segment's tunnels
/// holds its peers (a site's tunnel to an access point, one peer; an
/// access point's tunnel to its member sites, one peer each; its
/// interconnect, the other access point). A peer that is the only one on
/// its tunnel (an access point, the interconnect) is allowed every address:
/// whatever it sends is accepted whichever of them the routes point at, so
/// a site and an access point that choose differently for a while drop
/// nothing. A member site is allowed its tunnel address and its LAN
/// prefixes, which never overlap another member's. Every route group's
/// prefixes are routed in the segment's table into the tunnel of its first
/// candidate that has a key (probing and failover choose among the others);
/// peers' tunnel addresses into their own tunnels. A LAN attachment binds
/// its interface to the segment's domain, with its prefixes in the
/// segment's table. Imports (access points) put the routes another segment
/// has for its prefixes into this segment's table too; the policy lets
/// through only the flows the intent allows, drops inner sources a
/// segment's tunnels must not carry, and never sends back over an
/// interconnect what came over it.
pub fn desired(config: &SiteConfig, keys: &LocalKeys) -> Result<Owned, ReconcileError> {
    desired_with(config, keys, &first_choices(config, &Hops::new()))
}

/// Every address of both families: what a tunnel with one peer allows it.
const EVERY_ADDRESS: [&str; 2] = ["0.0.0.0/0", "::/0"];

/// [`desired`] with the agent's choices: a route group without an active
/// candidate is not routed; a peer whose line the agent picks goes to the
/// endpoint of its active path.
pub fn desired_with(config: &SiteConfig, keys: &LocalKeys, choices: &Choices) -> Result<Owned, ReconcileError> {
    let active = &choices.groups;
    summarise(config)?;
    let mut owned = Owned::default();
    let mut spec = PolicySpec::default();
    // Each segment's routes (prefix, interface), for the imports (kept
    // only when a segment imports).
    let imports = config.segments.iter().any(|s| !s.imports.is_empty());
    let mut routed: BTreeMap<&str, Vec<(String, String)>> = BTreeMap::new();
    for seg in &config.segments {
        let Some(domain) = &seg.domain else { continue };
        let table = domain.table;
        owned.domains.insert(domain.vrf.clone(), Domain { name: domain.vrf.clone(), table });
        let key = keys.get(&seg.segment).ok_or_else(|| ReconcileError::NoKey(seg.segment.clone()))?;
        let keyed: BTreeMap<&str, &pb::Peer> =
            seg.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| (p.name.as_str(), p)).collect();
        let mut allowed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let routes = routed.entry(seg.segment.as_str()).or_default();
        let mut route = |prefix: &str, interface: &str| -> Result<String, ReconcileError> {
            let prefix = canonical(prefix)?;
            if imports {
                routes.push((prefix.clone(), interface.to_string()));
            }
            owned.routes.insert(Route {
                table,
                prefix: prefix.clone(),
                interface: interface.to_string(),
                via: String::new(),
            });
            Ok(prefix)
        };
        // What the segment's tunnels may carry as inner sources: its sites'
        // and linked segments' prefixes, its peers' tunnel addresses.
        let mut sources: Vec<(ipnetwork::IpNetwork, String)> = Vec::new();
        for (name, peer) in &keyed {
            let set = allowed.entry(name).or_default();
            for p in &peer.allowed_prefixes {
                set.insert(route(p, &peer.interface)?);
            }
        }
        for p in seg.peers.iter().flat_map(|p| &p.allowed_prefixes) {
            sources.push(parsed(p)?);
        }
        for g in &seg.route_groups {
            let mut prefixes = Vec::with_capacity(g.prefixes.len());
            for p in &g.prefixes {
                let (net, prefix) = parsed(p)?;
                sources.push((net, prefix.clone()));
                prefixes.push(prefix);
            }
            if let Some(member) = keyed.get(g.name.as_str()).filter(|p| p.role() == pb::PeerRole::Site) {
                allowed.entry(member.name.as_str()).or_default().extend(prefixes.iter().cloned());
            }
            let chosen = active
                .get(&(seg.segment.clone(), g.name.clone()))
                .filter(|c| g.candidates.contains(c))
                .and_then(|c| keyed.get(c.as_str()));
            if let Some(peer) = chosen {
                for p in &prefixes {
                    route(p, &peer.interface)?;
                }
            }
        }
        for import in &seg.imports {
            for p in &import.prefixes {
                sources.push(parsed(p)?);
            }
        }
        for (name, peer) in &keyed {
            if peer.role() != pb::PeerRole::Site {
                allowed.insert(name, EVERY_ADDRESS.iter().map(|a| a.to_string()).collect());
            }
        }
        // With VRFs the forward hook sees a packet's input as the VRF device
        // (the kernel moves it to the master on receive), not the tunnel or
        // LAN it came in on: the VRF's name belongs to the segment's set.
        // In table mode no such device exists and the name matches nothing.
        let mut interfaces = BTreeSet::from([domain.vrf.clone()]);
        if let Some(lan) = &seg.attachment {
            owned.lans.insert(lan.interface.clone(), domain.vrf.clone());
            interfaces.insert(lan.interface.clone());
            for p in &lan.prefixes {
                route(p, &lan.interface)?;
            }
        }
        // A migration gateway: the old network's interface is bound to the
        // segment like a LAN, and the legacy sites' prefixes go through the
        // old network's router on it (and nowhere else).
        if let Some(legacy) = &seg.legacy {
            owned.lans.insert(legacy.interface.clone(), domain.vrf.clone());
            interfaces.insert(legacy.interface.clone());
            let via: std::net::IpAddr = legacy
                .via
                .parse()
                .map_err(|_| ReconcileError::Prefix(format!("`{}` is not a next hop", legacy.via)))?;
            for p in &legacy.prefixes {
                let (net, prefix) = parsed(p)?;
                sources.push((net, prefix.clone()));
                owned.routes.insert(Route {
                    table,
                    prefix: prefix.clone(),
                    interface: legacy.interface.clone(),
                    via: via.to_string(),
                });
                if imports {
                    routes.push((prefix, legacy.interface.clone()));
                }
            }
        }
        for wg in &seg.tunnels {
            interfaces.insert(wg.name.clone());
            if wg.faces() == pb::PeerRole::Interconnect {
                spec.interconnects.insert(wg.name.clone());
            }
            let mut peers = BTreeMap::new();
            for (name, p) in keyed.iter().filter(|(_, p)| p.interface == wg.name) {
                let spec = PeerSpec {
                    name: name.to_string(),
                    endpoint: active_endpoint(p, choices).map(endpoint).unwrap_or_default(),
                    allowed_ips: allowed.remove(name).unwrap_or_default(),
                    roams: !picks_line(config, p),
                };
                // A peer rotating its keys: its next key beside, allowed
                // nothing, so that its first handshake with that key is
                // accepted the moment it switches (make before break).
                if !p.next_public_key.is_empty() && p.next_public_key != p.public_key {
                    let next =
                        PeerSpec { name: format!("{name} (next key)"), allowed_ips: BTreeSet::new(), ..spec.clone() };
                    peers.insert(p.next_public_key.clone(), next);
                }
                peers.insert(p.public_key.clone(), spec);
            }
            owned.tunnels.insert(
                wg.name.clone(),
                Tunnel {
                    name: wg.name.clone(),
                    domain: domain.vrf.clone(),
                    listen_port: wg.listen_port,
                    public_key: key.public_key.clone(),
                    key_file: key.file.clone(),
                    addresses: wg.addresses.iter().map(|a| interface_address(a)).collect::<Result<_, _>>()?,
                    peers,
                },
            );
        }
        spec.sources.insert(
            seg.segment.clone(),
            Sources { tunnels: seg.tunnels.iter().map(|t| t.name.clone()).collect(), prefixes: outermost(sources) },
        );
        spec.segments.insert(seg.segment.clone(), interfaces);
        for rule in &seg.policy {
            spec.allow.push(Allow {
                name: rule.name.clone(),
                from_segment: rule.from_segment.clone(),
                to_segment: rule.to_segment.clone(),
                from_prefixes: rule.from_prefixes.iter().map(|p| canonical(p)).collect::<Result<_, _>>()?,
                to_prefixes: rule.to_prefixes.iter().map(|p| canonical(p)).collect::<Result<_, _>>()?,
                protocol: protocol(rule.protocol()).to_string(),
                ports: rule.ports.iter().map(|r| (r.first as u16, r.last as u16)).collect(),
            });
        }
    }
    // An import routes the other segment's prefixes the way that segment
    // routes them, in this segment's table (only a segment this router
    // carries can be routed into).
    for seg in &config.segments {
        let Some(domain) = &seg.domain else { continue };
        for import in &seg.imports {
            let within = import.prefixes.iter().filter_map(|p| p.parse().ok()).collect::<Vec<ipnetwork::IpNetwork>>();
            for (prefix, interface) in routed.get(import.segment.as_str()).into_iter().flatten() {
                if inside(prefix, &within) {
                    owned.routes.insert(Route {
                        table: domain.table,
                        prefix: prefix.clone(),
                        interface: interface.clone(),
                        via: String::new(),
                    });
                }
            }
        }
    }
    if !owned.domains.is_empty() {
        owned.policy = Some(Policy::new(spec));
    }
    Ok(owned)
}

/// Whether `prefix` lies in one of `nets`.
fn inside(prefix: &str, nets: &[ipnetwork::IpNetwork]) -> bool {
    let Ok(p) = prefix.parse::<ipnetwork::IpNetwork>() else { return false };
    nets.iter().any(|n| n.is_ipv4() == p.is_ipv4() && n.prefix() <= p.prefix() && n.contains(p.network()))
}

/// The prefixes of `nets` (parsed, in the kernel's spelling; repeats
/// allowed) that no other one of them contains (an nftables set of
/// intervals refuses overlaps). In order of family, network and length, a
/// prefix inside another one is inside the last one kept (the kept ones
/// never overlap): one pass after a sort, where comparing every pair cost
/// an access point of 2,000 members a third of a simulated fleet's CPU
/// (every member's enrolment rebuilds it).
fn outermost(mut nets: Vec<(ipnetwork::IpNetwork, String)>) -> BTreeSet<String> {
    let start = |n: &ipnetwork::IpNetwork| match n.network() {
        std::net::IpAddr::V4(a) => (false, u128::from(u32::from(a))),
        std::net::IpAddr::V6(a) => (true, u128::from(a)),
    };
    nets.sort_by_key(|(n, _)| (start(n), n.prefix()));
    let mut kept: BTreeSet<String> = BTreeSet::new();
    let mut last: Option<ipnetwork::IpNetwork> = None;
    for (n, text) in nets {
        let inside =
            last.is_some_and(|o| o.is_ipv4() == n.is_ipv4() && o.prefix() < n.prefix() && o.contains(n.network()));
        if !inside {
            kept.insert(text);
            last = Some(n);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `set` parsed, each prefix twice (repeats are allowed).
    fn nets(set: &BTreeSet<String>) -> Vec<(ipnetwork::IpNetwork, String)> {
        set.iter().chain(set).map(|p| parsed(p).expect("prefix")).collect()
    }

    /// The spelling of [`canonical`] written out in full, every time.
    fn written_out(prefix: &str) -> Option<String> {
        let net: ipnetwork::IpNetwork = prefix.parse().ok()?;
        Some(format!("{}/{}", net.network(), net.prefix()))
    }

    /// Prefixes kept as written only when that is the kernel's spelling.
    #[test]
    fn a_prefix_is_kept_as_written_only_when_the_kernel_spells_it_so() {
        for p in [
            "10.1.2.0/24",
            "0.0.0.0/0",
            "10.1.2.3/32",
            "10.1.2.3/24",
            "10.1.2.0/024",
            "10.1.2.0/00",
            "010.1.2.0/24",
            "10.1.2.0",
            "10.1.2.0/255.255.255.0",
            "10.1.2.0/+24",
            "10.1.2.0/33",
            "fd00:0:0::/48",
            "FD00::/8",
            "::/0",
            "10.1.2.0/24 ",
            "",
        ] {
            assert_eq!(canonical(p).ok(), written_out(p), "{p:?}");
        }
        assert_eq!(canonical("10.1.2.3/24").expect("prefix"), "10.1.2.0/24");
        assert_eq!(canonical("10.1.2.0/024").expect("prefix"), "10.1.2.0/24");
    }

    proptest! {
        /// The same spelling as written out in full, on random text near prefixes.
        #[test]
        fn canonical_spells_as_written_out(a in 0u16..300, b in 0u8..=255, zero in any::<bool>(), len in 0u8..40, lead in any::<bool>()) {
            let p = format!("{}{a}.{b}.0.{}/{}{len}", if zero { "0" } else { "" }, b / 3, if lead { "0" } else { "" });
            prop_assert_eq!(canonical(&p).ok(), written_out(&p));
        }
    }

    /// Every pair compared: what [`outermost`] must agree with.
    fn outermost_by_pairs(set: &BTreeSet<String>) -> BTreeSet<String> {
        let nets: Vec<ipnetwork::IpNetwork> = set.iter().filter_map(|p| p.parse().ok()).collect();
        set.iter()
            .filter(|p| {
                let Ok(n) = p.parse::<ipnetwork::IpNetwork>() else { return false };
                !nets.iter().any(|o| {
                    *o != n && o.is_ipv4() == n.is_ipv4() && o.prefix() < n.prefix() && o.contains(n.network())
                })
            })
            .cloned()
            .collect()
    }

    #[test]
    fn outermost_keeps_what_nothing_else_contains() {
        let set: BTreeSet<String> = [
            "10.0.0.0/8",
            "10.1.0.0/16",
            "10.1.2.0/24",
            "11.0.0.0/24",
            "10.2.0.0/16",
            "fd00::/8",
            "fd00:1::/32",
            "::/0",
        ]
        .map(String::from)
        .into();
        let want: BTreeSet<String> = ["10.0.0.0/8", "11.0.0.0/24", "::/0"].map(String::from).into();
        assert_eq!(outermost(nets(&set)), want);
    }

    proptest! {
        /// The same as comparing every pair, on random nested prefixes of both families.
        #[test]
        fn outermost_agrees_with_every_pair(prefixes in proptest::collection::vec((any::<bool>(), 0u8..4, 0u8..4, 8u8..=28), 0..40)) {
            let set: BTreeSet<String> = prefixes
                .iter()
                .map(|(v6, a, b, len)| {
                    if *v6 {
                        canonical(&format!("fd{a:02x}:{b:x}::/{}", u32::from(*len) + 4)).expect("prefix")
                    } else {
                        canonical(&format!("10.{a}.{b}.0/{len}")).expect("prefix")
                    }
                })
                .collect();
            prop_assert_eq!(outermost(nets(&set)), outermost_by_pairs(&set));
        }
    }
}
