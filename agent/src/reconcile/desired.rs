//! The objects a site configuration asks the datapath to hold: pure, from
//! the configuration, the interfaces' local keys and the agent's choices.
//! The keys are made and read by the caller; nothing here touches a file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use musubi_proto::v1::{self as pb, SiteConfig};

use super::ReconcileError;
use super::lines::{active_endpoint, picks_line};
use crate::datapath::{Allow, Domain, Hops, Owned, PeerSpec, Policy, PolicySpec, Route, Tunnel};
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
    let net: ipnetwork::IpNetwork =
        prefix.parse().map_err(|e| ReconcileError::Prefix(format!("`{prefix}` is not a prefix: {e}")))?;
    Ok(format!("{}/{}", net.network(), net.prefix()))
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
/// Every route group's prefixes go to its first candidate that has a key
/// (probing and failover choose among the others): they are routed into
/// the segment's tunnel and belong to that peer's allowed IPs, as WireGuard
/// routes by allowed IPs. Peers' tunnel addresses are routed too; a peer
/// goes to its first endpoint (the best line pair), and a member site seen
/// from an access point is followed wherever it roams. A LAN attachment binds
/// its interface to the segment's domain, with its prefixes in the
/// segment's table. Imports (access points) route another segment's
/// prefixes into that segment's tunnel; the policy lets through only the
/// flows the intent allows.
pub fn desired(config: &SiteConfig, keys: &LocalKeys) -> Result<Owned, ReconcileError> {
    desired_with(config, keys, &first_choices(config, &Hops::new()))
}

/// [`desired`] with the agent's choices: a route group without an active
/// candidate is not routed; a peer whose line the agent picks goes to the
/// endpoint of its active path.
pub fn desired_with(config: &SiteConfig, keys: &LocalKeys, choices: &Choices) -> Result<Owned, ReconcileError> {
    let active = &choices.groups;
    summarise(config)?;
    let mut owned = Owned::default();
    let mut spec = PolicySpec::default();
    let tunnel_of: BTreeMap<&str, &str> = config
        .segments
        .iter()
        .filter_map(|s| s.wireguard.as_ref().map(|w| (s.segment.as_str(), w.name.as_str())))
        .collect();
    for seg in &config.segments {
        let (Some(domain), Some(wg)) = (&seg.domain, &seg.wireguard) else { continue };
        let table = domain.table;
        owned.domains.insert(domain.vrf.clone(), Domain { name: domain.vrf.clone(), table });
        let key = keys.get(&seg.segment).ok_or_else(|| ReconcileError::NoKey(seg.segment.clone()))?;
        let keyed: BTreeMap<&str, &pb::Peer> =
            seg.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| (p.name.as_str(), p)).collect();
        let mut allowed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let mut route = |prefix: &str, interface: &str| -> Result<String, ReconcileError> {
            let prefix = canonical(prefix)?;
            owned.routes.insert(Route { table, prefix: prefix.clone(), interface: interface.to_string() });
            Ok(prefix)
        };
        for (name, peer) in &keyed {
            let set = allowed.entry(name).or_default();
            for p in &peer.allowed_prefixes {
                set.insert(route(p, &wg.name)?);
            }
        }
        for g in &seg.route_groups {
            let chosen = active
                .get(&(seg.segment.clone(), g.name.clone()))
                .filter(|c| keyed.contains_key(c.as_str()) && g.candidates.contains(c));
            if let Some(active) = chosen {
                for p in &g.prefixes {
                    let p = route(p, &wg.name)?;
                    allowed.entry(active.as_str()).or_default().insert(p);
                }
            }
        }
        // Traffic a policy lets across segments may reach this access point
        // from the other one over this segment's interconnect with a source
        // in the linked segment: the interconnect peer accepts those sources
        // (no route follows: they are routed in their own segment's table).
        for peer in seg.peers.iter().filter(|p| p.role() == pb::PeerRole::Interconnect) {
            if let Some(set) = allowed.get_mut(peer.name.as_str()) {
                for import in &seg.imports {
                    for p in &import.prefixes {
                        set.insert(canonical(p)?);
                    }
                }
            }
        }
        // With VRFs the forward hook sees a packet's input as the VRF device
        // (the kernel moves it to the master on receive), not the tunnel or
        // LAN it came in on: the VRF's name belongs to the segment's set.
        // In table mode no such device exists and the name matches nothing.
        let mut interfaces = BTreeSet::from([wg.name.clone(), domain.vrf.clone()]);
        if let Some(lan) = &seg.attachment {
            owned.lans.insert(lan.interface.clone(), domain.vrf.clone());
            interfaces.insert(lan.interface.clone());
            for p in &lan.prefixes {
                route(p, &lan.interface)?;
            }
        }
        for import in &seg.imports {
            // Only a segment this router carries can be routed into.
            let Some(into) = tunnel_of.get(import.segment.as_str()) else { continue };
            for p in &import.prefixes {
                route(p, into)?;
            }
        }
        let peers = keyed
            .iter()
            .map(|(name, p)| {
                let spec = PeerSpec {
                    name: name.to_string(),
                    endpoint: active_endpoint(p, choices).map(endpoint).unwrap_or_default(),
                    allowed_ips: allowed.remove(name).unwrap_or_default(),
                    roams: !picks_line(config, p),
                };
                (p.public_key.clone(), spec)
            })
            .collect();
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
    if !owned.domains.is_empty() {
        owned.policy = Some(Policy::new(spec));
    }
    Ok(owned)
}
