//! From a site configuration to the objects the datapath must hold, and the
//! reconcile step: observe → plan → apply.

use std::collections::{BTreeMap, BTreeSet};

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::datapath::{
    Allow, Datapath, DatapathError, Domain, Hops, Op, Owned, PeerSpec, Pin, Policy, PolicySpec, Route, Tunnel,
};
use crate::state::{StateDir, StateError};
use crate::summary::{ConfigError, summarise};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the configuration is unusable: {0}")]
    Config(#[from] ConfigError),
    #[error("the configuration is unusable: {0}")]
    Prefix(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

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
pub fn desired(config: &SiteConfig, state: &StateDir) -> Result<Owned, ReconcileError> {
    desired_with(config, state, &first_choices(config, &Hops::new()))
}

/// What the agent has chosen among the alternatives a configuration gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Choices {
    /// Route groups' active candidates, by (segment, group).
    pub groups: BTreeMap<(String, String), String>,
    /// The active path of each peer whose line the agent picks (access
    /// points and the interconnect), by peer name: (local line, remote line).
    pub paths: BTreeMap<String, (String, String)>,
}

/// Whether this router picks the line to `peer`, or follows the peer
/// wherever its packets come from: a site picks its lines to the access
/// points, and each access point follows its member sites. Between the two
/// access points one side must pick (WireGuard roams both ways): the east
/// one.
pub fn picks_line(config: &SiteConfig, peer: &pb::Peer) -> bool {
    match peer.role() {
        pb::PeerRole::AccessPoint => true,
        pb::PeerRole::Interconnect => config.region() == pb::Region::East,
        _ => false,
    }
}

/// Whether this router probes the underlay paths to `peer` (those to an
/// access point: whether a line still answers tells a line failure from the
/// access point's), whichever side picks the line.
pub fn probes_lines(peer: &pb::Peer) -> bool {
    matches!(peer.role(), pb::PeerRole::AccessPoint | pb::PeerRole::Interconnect)
}

/// The best of `items` by `rank` (0 is best), the earlier on a tie.
fn best<T>(items: impl Iterator<Item = T>, rank: impl Fn(&T) -> u8) -> Option<T> {
    items.enumerate().min_by_key(|(i, t)| (rank(t), *i)).map(|(_, t)| t)
}

/// The agent's choices: for each route group, among its candidates with a
/// key, the best by `group_rank(segment, group, peer)`; for each peer whose
/// line it picks, the best of its endpoints (ordered by line priority) by
/// `path_rank(peer, endpoint)`. Ranks are 0 for best; a tie goes to the
/// earlier — nothing is ever left without a way.
pub fn choose(
    config: &SiteConfig,
    group_rank: &dyn Fn(&str, &str, &str) -> u8,
    path_rank: &dyn Fn(&str, &pb::Endpoint) -> u8,
) -> Choices {
    let mut out = Choices::default();
    for seg in &config.segments {
        let keyed: BTreeSet<&str> =
            seg.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| p.name.as_str()).collect();
        for g in &seg.route_groups {
            let candidates = g.candidates.iter().filter(|c| keyed.contains(c.as_str()));
            if let Some(c) = best(candidates, |c| group_rank(&seg.segment, &g.name, c)) {
                out.groups.insert((seg.segment.clone(), g.name.clone()), c.clone());
            }
        }
        for p in seg.peers.iter().filter(|p| picks_line(config, p)) {
            if out.paths.contains_key(&p.name) {
                continue;
            }
            if let Some(e) = best(p.endpoints.iter(), |e| path_rank(&p.name, e)) {
                out.paths.insert(p.name.clone(), (e.local_line.clone(), e.remote_line.clone()));
            }
        }
    }
    out
}

/// The choices before any health is known: every route group's first
/// candidate with a key, every peer's first path the router has a route for.
pub fn first_choices(config: &SiteConfig, hops: &Hops) -> Choices {
    let routed = |e: &pb::Endpoint| path(config, e).is_some_and(|pair| hops.contains_key(&pair));
    choose(config, &|_, _, _| 0, &|_, e| if routed(e) { 0 } else { 1 })
}

/// The endpoint of `peer` on the chosen path, else its first.
pub fn active_endpoint<'a>(peer: &'a pb::Peer, choices: &Choices) -> Option<&'a pb::Endpoint> {
    let chosen = choices.paths.get(&peer.name);
    chosen
        .and_then(|(l, r)| peer.endpoints.iter().find(|e| &e.local_line == l && &e.remote_line == r))
        .or_else(|| peer.endpoints.first())
}

/// A line's underlay address by name.
pub fn line_address(config: &SiteConfig, line: &str) -> Option<std::net::IpAddr> {
    config.lines.iter().find(|l| l.name == line).and_then(|l| l.address.parse().ok())
}

/// The underlay path of an endpoint: (local line address, peer line address).
pub fn path(config: &SiteConfig, e: &pb::Endpoint) -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    Some((line_address(config, &e.local_line)?, e.address.parse().ok()?))
}

/// The underlay routes that send each peer's outer packets over its active
/// path (where the path's hop is known).
pub fn pins(config: &SiteConfig, choices: &Choices, hops: &Hops) -> BTreeSet<Pin> {
    let mut out = BTreeSet::new();
    for seg in &config.segments {
        for p in seg.peers.iter().filter(|p| picks_line(config, p)) {
            let Some((source, destination)) = active_endpoint(p, choices).and_then(|e| path(config, e)) else {
                continue;
            };
            if let Some(hop) = hops.get(&(source, destination)) {
                out.insert(Pin { destination, source, hop: hop.clone() });
            }
        }
    }
    out
}

/// [`desired`] with the agent's choices: a route group without an active
/// candidate is not routed; a peer whose line the agent picks goes to the
/// endpoint of its active path.
pub fn desired_with(config: &SiteConfig, state: &StateDir, choices: &Choices) -> Result<Owned, ReconcileError> {
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
        let (public_key, _) = state.ensure_key(&seg.segment)?;
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
        let mut interfaces = BTreeSet::from([wg.name.clone()]);
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
                public_key,
                key_file: state.key_file(&seg.segment),
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

/// Brings the datapath to what `config` asks for with `choices`, the outer
/// packets of each peer on its chosen line; returns the operations applied.
///
/// The underlay routes go first, so a peer's new endpoint is reached over
/// its new line from the first packet. A peer whose line changed under the
/// same endpoint address has its endpoint set again: WireGuard keeps the
/// source address it last used for an endpoint (sticky), and setting it
/// anew makes the next packet take the new route and its source.
pub fn build(
    dp: &mut dyn Datapath,
    config: &SiteConfig,
    state: &StateDir,
    choices: &Choices,
    hops: &Hops,
) -> Result<Vec<Op>, ReconcileError> {
    let (want, pins) = wanted(config, state, choices, hops)?;
    build_wanted(dp, &want, &pins)
}

/// What `config` asks for with `choices`: the objects (with the fence of
/// the lines not in use) and the underlay pins.
pub fn wanted(
    config: &SiteConfig,
    state: &StateDir,
    choices: &Choices,
    hops: &Hops,
) -> Result<(Owned, BTreeSet<Pin>), ReconcileError> {
    let mut want = desired_with(config, state, choices)?;
    let pins = pins(config, choices, hops);
    fence(&mut want, config, &pins);
    Ok((want, pins))
}

/// [`build`] from what [`wanted`] gave.
pub fn build_wanted(dp: &mut dyn Datapath, want: &Owned, pins: &BTreeSet<Pin>) -> Result<Vec<Op>, ReconcileError> {
    let moved = dp.pin(pins)?;
    let mut ops = dp.diff(want)?;
    // A line switch changes peers' endpoints and the fence of lines not in
    // use: the fence goes first, so nothing still on its way over the old
    // line makes WireGuard follow it back. (Otherwise the policy goes last,
    // after the interfaces it names.)
    let only_peers = ops.iter().all(|o| matches!(o, Op::SetPeer { .. } | Op::SetPolicy(_)));
    if only_peers && let Some(i) = ops.iter().position(|o| matches!(o, Op::SetPolicy(_))) {
        let policy = ops.remove(i);
        ops.insert(0, policy);
    }
    if !ops.is_empty() {
        dp.apply(&ops)?;
    }
    if !moved.is_empty() {
        let mut again = Vec::new();
        for t in want.tunnels.values() {
            for (key, peer) in &t.peers {
                let Ok(at) = peer.endpoint.parse::<std::net::SocketAddr>() else { continue };
                let done = ops.iter().any(
                    |o| matches!(o, Op::SetPeer { tunnel, public_key, .. } if *tunnel == t.name && key == public_key),
                );
                if moved.contains(&at.ip()) && !peer.roams && !done {
                    again.push(Op::SetPeer { tunnel: t.name.clone(), public_key: key.clone(), peer: peer.clone() });
                }
            }
        }
        dp.apply(&again)?;
        ops.extend(again);
    }
    Ok(ops)
}

/// Adds to `want`'s policy the line addresses of the peers whose line the
/// agent picks that are not in use (see [`PolicySpec::unused_lines`]).
fn fence(want: &mut Owned, config: &SiteConfig, pins: &BTreeSet<Pin>) {
    let Some(mut spec) = want.policy.as_ref().and_then(|p| p.spec.clone()) else { return };
    if pins.is_empty() {
        return;
    }
    let used: BTreeSet<std::net::IpAddr> = pins.iter().map(|p| p.destination).collect();
    spec.unused_lines = config
        .segments
        .iter()
        .flat_map(|s| s.peers.iter().filter(|p| picks_line(config, p)))
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| e.address.parse().ok())
        .filter(|a| !used.contains(a))
        .collect();
    spec.tunnel_ports = want.tunnels.values().filter_map(|t| u16::try_from(t.listen_port).ok()).collect();
    want.policy = Some(Policy::new(spec));
}

/// Brings the datapath to `want`; returns the operations applied (none when
/// it already matches).
pub fn reconcile(dp: &mut dyn Datapath, want: &Owned) -> Result<Vec<Op>, ReconcileError> {
    let ops = dp.diff(want)?;
    if !ops.is_empty() {
        dp.apply(&ops)?;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::Fake;
    use crate::datapath::{Hop, plan, step};

    /// (segment, table, [(peer, public key)]).
    type Segment<'a> = (&'a str, u32, &'a [(&'a str, &'a str)]);

    fn config(segments: &[Segment<'_>]) -> SiteConfig {
        SiteConfig {
            site: "s".into(),
            segments: segments
                .iter()
                .map(|(name, table, peers)| pb::SegmentConfig {
                    segment: name.to_string(),
                    domain: Some(pb::RoutingDomain { vrf: format!("mv-{name}"), table: *table }),
                    wireguard: Some(pb::WireguardInterface {
                        name: format!("mw-{name}"),
                        listen_port: 51800 + table,
                        addresses: vec![format!("10.{table}.0.1/32")],
                    }),
                    peers: peers
                        .iter()
                        .map(|(peer, key)| pb::Peer {
                            name: peer.to_string(),
                            public_key: key.to_string(),
                            endpoints: vec![pb::Endpoint {
                                address: "192.0.2.1".into(),
                                port: 51820,
                                ..Default::default()
                            }],
                            allowed_prefixes: vec![format!("10.{table}.{}.0/24", peer.len())],
                            ..Default::default()
                        })
                        .collect(),
                    route_groups: peers
                        .iter()
                        .map(|(peer, _)| pb::RouteGroup {
                            name: peer.to_string(),
                            prefixes: vec![format!("10.{table}.{}.0/24", peer.len())],
                            candidates: vec![peer.to_string()],
                        })
                        .collect(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn reconcile_converges_and_then_writes_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::new(dir.path());
        let mut dp = Fake::new();
        let a =
            config(&[("juki", 100, &[("ap-east", "K1"), ("ap-westx", "K2")]), ("lgwan", 101, &[("ap-east", "K3")])]);
        let ops = reconcile(&mut dp, &desired(&a, &state)?)?;
        assert!(!ops.is_empty());
        assert_eq!(dp.owned(), &desired(&a, &state)?);
        let before = dp.writes();
        assert!(reconcile(&mut dp, &desired(&a, &state)?)?.is_empty());
        assert_eq!(dp.writes(), before, "a second apply writes nothing");

        // Drop a segment, change a peer's key, move a table: only what differs.
        let b = config(&[("juki", 102, &[("ap-east", "K9"), ("ap-westx", "K2")])]);
        reconcile(&mut dp, &desired(&b, &state)?)?;
        assert_eq!(dp.owned(), &desired(&b, &state)?);
        assert!(!dp.owned().tunnels.contains_key("mw-lgwan") && !dp.owned().domains.contains_key("mv-lgwan"));
        // A peer without a key is left out, with its routes.
        let c = config(&[("juki", 102, &[("ap-east", ""), ("ap-westx", "K2")])]);
        let want = desired(&c, &state)?;
        assert_eq!(want.tunnels["mw-juki"].peers.len(), 1);
        assert_eq!(want.routes.len(), 1, "the keyless peer's prefixes are not routed");
        assert_eq!(
            want.tunnels["mw-juki"].peers["K2"].allowed_ips,
            BTreeSet::from(["10.102.8.0/24".to_string()]),
            "the group's prefixes belong to its active peer"
        );
        Ok(())
    }

    #[test]
    fn the_fake_refuses_illegal_operations() {
        let mut owned = Owned::default();
        let route = Route { table: 1, prefix: "10.0.0.0/8".into(), interface: "mw-x".into() };
        assert!(step(&mut owned, &Op::DeleteDomain { name: "mv-x".into() }).is_err());
        assert!(step(&mut owned, &Op::AddRoute(route.clone())).is_err(), "route through a missing tunnel");
        let tunnel = Op::CreateTunnel {
            name: "mw-x".into(),
            domain: "mv-x".into(),
            listen_port: 1,
            public_key: "P".into(),
            key_file: "k".into(),
        };
        assert!(step(&mut owned, &tunnel).is_err(), "tunnel before its domain");
        assert!(step(&mut owned, &Op::CreateDomain(Domain { name: "mv-x".into(), table: 1 })).is_ok());
        assert!(step(&mut owned, &Op::CreateDomain(Domain { name: "mv-y".into(), table: 1 })).is_err(), "shared table");
        assert!(step(&mut owned, &tunnel).is_ok());
        assert!(step(&mut owned, &Op::DeleteDomain { name: "mv-x".into() }).is_err(), "domain still in use");
        assert!(step(&mut owned, &Op::AddRoute(route.clone())).is_ok());
        assert!(step(&mut owned, &Op::AddRoute(route)).is_err(), "route twice");
    }

    /// A site with lines fiber (192.0.2.11) and lte (198.51.100.11) and one
    /// segment whose two access points each have a fibre and an internet
    /// address; and an access point of `region` whose member site roams.
    fn two_lines(region: pb::Region) -> SiteConfig {
        let endpoint = |local: &str, remote: &str, address: &str| pb::Endpoint {
            local_line: local.into(),
            remote_line: remote.into(),
            address: address.into(),
            port: 51820,
            ..Default::default()
        };
        let ap = |name: &str, n: u8, role: pb::PeerRole| pb::Peer {
            name: name.into(),
            role: role.into(),
            public_key: format!("K{n}"),
            endpoints: vec![
                endpoint("fiber", "fiber", &format!("192.0.2.{n}")),
                endpoint("fiber", "inet", &format!("198.51.100.{n}")),
                endpoint("lte", "fiber", &format!("192.0.2.{n}")),
                endpoint("lte", "inet", &format!("198.51.100.{n}")),
            ],
            allowed_prefixes: vec![format!("100.64.0.{n}/32")],
        };
        let mut c = config(&[("office", 100, &[])]);
        c.region = region.into();
        c.lines = vec![
            pb::Line { name: "fiber".into(), address: "192.0.2.11".into(), priority: 1, ..Default::default() },
            pb::Line { name: "lte".into(), address: "198.51.100.11".into(), priority: 2, ..Default::default() },
        ];
        c.segments[0].peers = vec![
            ap("ap-east", 1, pb::PeerRole::AccessPoint),
            ap("ap-west", 2, pb::PeerRole::Interconnect),
            ap("member", 3, pb::PeerRole::Site),
        ];
        c
    }

    #[test]
    fn lines_are_picked_pinned_and_fenced() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = two_lines(pb::Region::East);
        let ip = |a: &str| a.parse::<std::net::IpAddr>().expect("ip");
        let hop = |i: &str| Hop { interface: i.into(), gateway: None };
        // The router has routes for fiber→fiber and lte→inet only.
        let hops: BTreeMap<_, _> = (1..=3u8)
            .flat_map(|n| {
                [
                    ((ip("192.0.2.11"), ip(&format!("192.0.2.{n}"))), hop("eth2")),
                    ((ip("198.51.100.11"), ip(&format!("198.51.100.{n}"))), hop("eth3")),
                ]
            })
            .collect();
        let first = first_choices(&c, &hops);
        assert_eq!(first.paths["ap-east"], ("fiber".to_string(), "fiber".to_string()));
        assert!(!first.paths.contains_key("member"), "a member site is followed, not picked");
        assert!(first.paths.contains_key("ap-west"), "the east access point picks the interconnect's line");
        assert!(
            !first_choices(&two_lines(pb::Region::West), &hops).paths.contains_key("ap-west"),
            "the west one follows it"
        );

        // The fibre fails: lte→inet is the best path that answers.
        let down = |e: &pb::Endpoint| e.local_line == "fiber";
        let moved = choose(&c, &|_, _, _| 0, &|_, e| if down(e) { 2 } else { u8::from(e.remote_line != "inet") });
        assert_eq!(moved.paths["ap-east"], ("lte".to_string(), "inet".to_string()));
        let want = desired_with(&c, &state, &moved).expect("desired");
        let peers = &want.tunnels["mw-office"].peers;
        assert_eq!(peers["K1"].endpoint, "198.51.100.1:51820");
        assert!(peers["K3"].roams && !peers["K1"].roams);
        let pins = pins(&c, &moved, &hops);
        assert_eq!(
            pins.iter().map(|p| (p.destination, p.source, p.hop.interface.as_str())).collect::<Vec<_>>(),
            vec![(ip("198.51.100.1"), ip("198.51.100.11"), "eth3"), (ip("198.51.100.2"), ip("198.51.100.11"), "eth3")],
            "outer packets to both access points leave on the mobile line"
        );
        let mut fenced = want.clone();
        fenced.policy = Some(Policy::new(PolicySpec::default()));
        fence(&mut fenced, &c, &pins);
        let spec = fenced.policy.and_then(|p| p.spec).expect("spec");
        assert_eq!(
            spec.unused_lines,
            BTreeSet::from([ip("192.0.2.1"), ip("192.0.2.2")]),
            "tunnel packets from the fibre addresses are dropped while the mobile line is used"
        );
        assert_eq!(spec.tunnel_ports, BTreeSet::from([51900]));
    }

    #[test]
    fn a_roaming_peer_keeps_the_endpoint_wireguard_learnt() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = two_lines(pb::Region::East);
        let mut dp = Fake::new();
        reconcile(&mut dp, &desired(&c, &state).expect("desired")).expect("first");
        // WireGuard followed the member site to its mobile line.
        let mut roamed = dp.owned().clone();
        roamed.tunnels.get_mut("mw-office").expect("tunnel").peers.get_mut("K3").expect("member").endpoint =
            "198.51.100.3:51820".into();
        let mut dp = Fake::new();
        dp.apply(&plan(&Owned::default(), &roamed)).expect("roamed state");
        assert!(dp.diff(&desired(&c, &state).expect("desired")).expect("diff").is_empty(), "not reset");
        // A change of its allowed IPs keeps the learnt endpoint.
        let mut c2 = c.clone();
        c2.segments[0].peers[2].allowed_prefixes.push("10.9.0.0/24".into());
        reconcile(&mut dp, &desired(&c2, &state).expect("desired")).expect("second");
        assert_eq!(dp.owned().tunnels["mw-office"].peers["K3"].endpoint, "198.51.100.3:51820");
        // A peer whose line this router picks is put back on its endpoint.
        let mut moved = dp.owned().clone();
        moved.tunnels.get_mut("mw-office").expect("tunnel").peers.get_mut("K1").expect("ap").endpoint =
            "198.51.100.1:51820".into();
        let ops = plan(&moved, &desired(&c2, &state).expect("desired"));
        assert!(
            ops.iter().any(|o| matches!(o, Op::SetPeer { public_key, peer, .. } if public_key == "K1" && peer.endpoint == "192.0.2.1:51820")),
            "{ops:?}"
        );
    }
}
