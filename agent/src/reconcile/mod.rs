//! From a site configuration to the objects the datapath must hold, and the
//! reconcile step: observe → plan → apply.

mod desired;
mod lines;

use std::collections::{BTreeMap, BTreeSet};

use musubi_proto::v1::SiteConfig;

pub use self::desired::{LocalKey, LocalKeys, canonical, desired, desired_with};
pub use self::lines::{active_endpoint, followed_paths, line_address, path, picks_line, pins, probes_lines};
use crate::datapath::{Datapath, DatapathError, Hops, Op, Owned, Pin, Policy};
use crate::failover::Choices;
use crate::state::StateError;
use crate::summary::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the configuration is unusable: {0}")]
    Config(#[from] ConfigError),
    #[error("the configuration is unusable: {0}")]
    Prefix(String),
    /// A segment of the configuration has no local key: the caller makes
    /// the keys (see `StateDir::local_keys`) before building.
    #[error("no local WireGuard key for segment {0}")]
    NoKey(String),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
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
    keys: &LocalKeys,
    choices: &Choices,
    hops: &Hops,
) -> Result<Vec<Op>, ReconcileError> {
    let (want, pins) = wanted(config, keys, choices, hops)?;
    build_wanted(dp, &want, &pins)
}

/// What `config` asks for with `choices`: the objects (with the fence of
/// the lines not in use) and the underlay pins.
pub fn wanted(
    config: &SiteConfig,
    keys: &LocalKeys,
    choices: &Choices,
    hops: &Hops,
) -> Result<(Owned, BTreeSet<Pin>), ReconcileError> {
    let mut want = desired_with(config, keys, choices)?;
    let pins = pins(config, choices, hops);
    fence(&mut want, config, &pins);
    Ok((want, pins))
}

/// [`build`] from what [`wanted`] gave.
pub fn build_wanted(dp: &mut dyn Datapath, want: &Owned, pins: &BTreeSet<Pin>) -> Result<Vec<Op>, ReconcileError> {
    let moved = dp.pin(pins)?;
    // The plan puts the policy (the fence of lines not in use) before the
    // peers whose endpoints a line switch moves: see `datapath::plan`.
    let mut ops = dp.diff(want)?;
    if !ops.is_empty() {
        tracing::debug!(?ops, "writing");
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

/// Makes a rotating peer's next key its key (no switch left to wait for);
/// returns the key it replaced.
pub fn take_next_key(peer: &mut musubi_proto::v1::Peer) -> String {
    peer.switch_at_unix_ms = 0;
    std::mem::replace(&mut peer.public_key, std::mem::take(&mut peer.next_public_key))
}

/// A key switch's first step, prepared before the switch comes: for every
/// peer of `config` holding a next key (a rotating peer's, see
/// `client::switch`), by its tunnel and next key, what takes it — the peer
/// set whole under its next key (its addresses move with it), then its
/// current key removed. Written without observing (one UAPI `set` per
/// tunnel) when the switch comes; the full build follows. A roaming peer
/// keeps the endpoint WireGuard learnt.
pub fn switch_ops(
    config: &SiteConfig,
    keys: &LocalKeys,
    choices: &Choices,
) -> Result<BTreeMap<(String, String), [Op; 2]>, ReconcileError> {
    let mut switched = config.clone();
    let mut pairs = Vec::new();
    for p in switched.segments.iter_mut().flat_map(|s| s.peers.iter_mut()).filter(|p| !p.next_public_key.is_empty()) {
        let old = take_next_key(p);
        pairs.push((p.interface.clone(), old, p.public_key.clone()));
    }
    if pairs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let want = desired_with(&switched, keys, choices)?.tunnels;
    let mut out = BTreeMap::new();
    for (tunnel, old, new) in pairs {
        let Some(peer) = want.get(&tunnel).and_then(|t| t.peers.get(&new)) else { continue };
        let mut peer = peer.clone();
        if peer.roams {
            peer.endpoint.clear();
        }
        let set = Op::SetPeer { tunnel: tunnel.clone(), public_key: new.clone(), peer };
        let remove = Op::RemovePeer { tunnel: tunnel.clone(), public_key: old };
        out.insert((tunnel, new), [set, remove]);
    }
    Ok(out)
}

/// A failover's first step when route groups move: each route the groups
/// moved now go through is written in place of the one it replaces (one
/// netlink request each, no observation, no moment without a route). Only a
/// prefix that `after` routes through one interface is replaced; the full
/// build that follows deletes what is left and checks everything.
pub fn move_groups(
    dp: &mut dyn Datapath,
    config: &SiteConfig,
    keys: &LocalKeys,
    before: &Choices,
    after: &Choices,
) -> Result<Vec<Op>, ReconcileError> {
    let old = desired_with(config, keys, before)?.routes;
    let new = desired_with(config, keys, after)?.routes;
    let mut ways: BTreeMap<(u32, &str), usize> = BTreeMap::new();
    for r in &new {
        *ways.entry((r.table, r.prefix.as_str())).or_default() += 1;
    }
    let ops: Vec<Op> = new
        .iter()
        .filter(|r| !old.contains(*r) && ways.get(&(r.table, r.prefix.as_str())) == Some(&1))
        .map(|r| Op::ReplaceRoute(r.clone()))
        .collect();
    if !ops.is_empty() {
        dp.apply(&ops)?;
    }
    Ok(ops)
}

/// The first step of a line switch whose line in use failed: the underlay
/// pins, the policy's fence (it moves to the old line and lets the new
/// line's answers in: two sets rewritten through the datapath's kept nft
/// session, under a millisecond, not the whole table), then the endpoints of
/// `peers` (set again, whole, from `choices`: the outer packets leave over
/// the new line from here on) — written without observing first (setting a
/// peer is idempotent, the fence is replaced whole), which saves the
/// observation that a line's link going down forces (42 ms of 126 ms in a
/// debug build). The fence is sent first ([`Datapath::fence_ahead`]), as
/// [`build`] puts it first: the access point answers over the new line as
/// soon as the first packet from it arrives, and a fence written after the
/// endpoints dropped those answers for as long as its write took (an nft
/// process: 35–54 ms of every line cut, towards the site only). Its answer
/// is read after the endpoints: nft writes it while the pins and endpoints
/// are written, instead of before them.
pub fn move_lines(
    dp: &mut dyn Datapath,
    config: &SiteConfig,
    keys: &LocalKeys,
    choices: &Choices,
    hops: &Hops,
    peers: &BTreeSet<String>,
) -> Result<Vec<Op>, ReconcileError> {
    let started = std::time::Instant::now();
    let (want, pins) = wanted(config, keys, choices, hops)?;
    let planned = started.elapsed();
    // nft writes the fence while the pins and the endpoints are written;
    // its answer is read last (it took as long as the pins, 9–10 ms of a
    // lab line cut's 27 ms after the decision, when it was awaited first).
    let fence = want.policy.as_ref().map(|p| p.fence.clone());
    if let Some(f) = &fence {
        dp.fence_ahead(f);
    }
    dp.pin_ahead(&pins)?;
    let pinned = started.elapsed();
    let moved = want.tunnels.values().flat_map(|t| {
        t.peers
            .iter()
            .filter(|(_, p)| peers.contains(&p.name) && !p.roams && !p.endpoint.is_empty())
            .map(|(key, p)| Op::SetPeer { tunnel: t.name.clone(), public_key: key.clone(), peer: p.clone() })
    });
    let ops: Vec<Op> = moved.chain(fence.map(Op::SetFence)).collect();
    if !ops.is_empty() {
        dp.apply(&ops)?;
    }
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let (planned_ms, pinned_ms, written_ms) = (ms(planned), ms(pinned - planned), ms(started.elapsed() - pinned));
    // A few milliseconds; longer means the router's kernel held the writes.
    if started.elapsed() > crate::datapath::SLOW {
        tracing::warn!(planned_ms, pinned_ms, written_ms, "a failed line's first step was slow");
    } else {
        tracing::debug!(planned_ms, pinned_ms, written_ms, "a failed line's first step");
    }
    Ok(ops)
}

/// Adds to `want`'s policy the line addresses of the peers whose line the
/// agent picks that are not in use (see [`PolicySpec::unused_lines`]).
fn fence(want: &mut Owned, config: &SiteConfig, pins: &BTreeSet<Pin>) {
    let used: BTreeSet<std::net::IpAddr> = pins.iter().filter(|p| !p.follow).map(|p| p.destination).collect();
    if used.is_empty() {
        return;
    }
    let mut spec = match want.policy.take() {
        Some(Policy { spec: Some(spec), .. }) => spec,
        kept => {
            want.policy = kept;
            return;
        }
    };
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
    /// The keys of every segment of `c`, made in `state`.
    fn keys(state: &crate::state::StateDir, c: &SiteConfig) -> LocalKeys {
        state.local_keys(c.segments.iter().map(|s| s.segment.as_str())).expect("keys").0
    }

    use std::collections::BTreeMap;

    use musubi_proto::v1 as pb;

    use super::*;
    use crate::datapath::fake::Fake;
    use crate::datapath::{Domain, Hop, PolicySpec, Route, plan, step};
    use crate::failover::{choose, first_choices};
    use crate::state::StateDir;

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
                    // One tunnel per peer: `m0-<segment>`, `m1-<segment>`, …
                    tunnels: (0..peers.len() as u32)
                        .map(|i| pb::WireguardInterface {
                            name: format!("m{i}-{name}"),
                            listen_port: 51800 + table + 100 * i,
                            addresses: vec![format!("10.{table}.0.1/32")],
                            faces: pb::PeerRole::AccessPoint.into(),
                        })
                        .collect(),
                    peers: peers
                        .iter()
                        .enumerate()
                        .map(|(i, (peer, key))| pb::Peer {
                            name: peer.to_string(),
                            interface: format!("m{i}-{name}"),
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

    /// In VRF mode the forward hook names a packet's input by its VRF
    /// device: the policy's set of a segment's interfaces holds it, beside
    /// the tunnel (and the LAN), or every packet between two sites of one
    /// segment is dropped as crossing segments — found in the kernel lab.
    #[test]
    fn a_segments_policy_interfaces_include_its_vrf_device() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = config(&[("juki", 100, &[("ap-east", "K1")]), ("lgwan", 101, &[("ap-east", "K3")])]);
        let want = desired(&c, &keys(&state, &c)).expect("desired");
        let spec = want.policy.and_then(|p| p.spec).expect("a policy");
        assert_eq!(spec.segments["juki"], BTreeSet::from(["m0-juki".to_string(), "mv-juki".to_string()]));
        assert!(!spec.segments["lgwan"].contains("mv-juki"), "a VRF belongs to its own segment only");
    }

    #[test]
    fn reconcile_converges_and_then_writes_nothing() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let state = StateDir::new(dir.path());
        let mut dp = Fake::new();
        let a =
            config(&[("juki", 100, &[("ap-east", "K1"), ("ap-westx", "K2")]), ("lgwan", 101, &[("ap-east", "K3")])]);
        let ops = reconcile(&mut dp, &desired(&a, &keys(&state, &a))?)?;
        assert!(!ops.is_empty());
        assert_eq!(dp.owned(), &desired(&a, &keys(&state, &a))?);
        let before = dp.writes();
        assert!(reconcile(&mut dp, &desired(&a, &keys(&state, &a))?)?.is_empty());
        assert_eq!(dp.writes(), before, "a second apply writes nothing");

        // Drop a segment, change a peer's key, move a table: only what differs.
        let b = config(&[("juki", 102, &[("ap-east", "K9"), ("ap-westx", "K2")])]);
        reconcile(&mut dp, &desired(&b, &keys(&state, &b))?)?;
        assert_eq!(dp.owned(), &desired(&b, &keys(&state, &b))?);
        assert!(!dp.owned().tunnels.contains_key("m0-lgwan") && !dp.owned().domains.contains_key("mv-lgwan"));
        // A peer without a key is left out, with its routes; its tunnel stays.
        let c = config(&[("juki", 102, &[("ap-east", ""), ("ap-westx", "K2")])]);
        let want = desired(&c, &keys(&state, &c))?;
        assert!(want.tunnels["m0-juki"].peers.is_empty());
        assert_eq!(want.tunnels["m1-juki"].peers.len(), 1);
        assert_eq!(
            want.routes.iter().map(|r| (r.prefix.as_str(), r.interface.as_str())).collect::<Vec<_>>(),
            vec![("10.102.8.0/24", "m1-juki")],
            "the keyless peer's prefixes are not routed; the other's go into its own tunnel"
        );
        assert_eq!(
            want.tunnels["m1-juki"].peers["K2"].allowed_ips,
            BTreeSet::from(["0.0.0.0/0".to_string(), "::/0".to_string()]),
            "a peer alone on its tunnel is allowed every source: the routes choose"
        );
        Ok(())
    }

    /// An access point of `office` (a member, the interconnect) that also
    /// carries `other`, into which a policy imports office's prefixes.
    fn access_point() -> SiteConfig {
        let tunnel = |name: &str, port: u32, faces: pb::PeerRole, extra: &[&str]| pb::WireguardInterface {
            name: name.into(),
            listen_port: port,
            addresses: std::iter::once("100.64.0.1/32").chain(extra.iter().copied()).map(String::from).collect(),
            faces: faces.into(),
        };
        let peer = |name: &str, role: pb::PeerRole, interface: &str, allowed: &[&str], key: &str| pb::Peer {
            name: name.into(),
            role: role.into(),
            interface: interface.into(),
            public_key: key.into(),
            allowed_prefixes: allowed.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        let office = pb::SegmentConfig {
            segment: "office".into(),
            domain: Some(pb::RoutingDomain { vrf: "mv-office".into(), table: 1000 }),
            tunnels: vec![
                tunnel("mi-office", 51821, pb::PeerRole::Interconnect, &["100.127.0.0/32"]),
                tunnel("mm-office", 51820, pb::PeerRole::Site, &[]),
            ],
            peers: vec![
                peer("ap-west", pb::PeerRole::Interconnect, "mi-office", &["100.64.0.2/32", "100.127.0.1/32"], "KW"),
                peer("office-a", pb::PeerRole::Site, "mm-office", &["100.64.0.3/32"], "KA"),
            ],
            route_groups: vec![pb::RouteGroup {
                name: "office-a".into(),
                prefixes: vec!["10.10.1.0/24".into()],
                candidates: vec!["office-a".into(), "ap-west".into()],
            }],
            ..Default::default()
        };
        let other = pb::SegmentConfig {
            segment: "other".into(),
            domain: Some(pb::RoutingDomain { vrf: "mv-other".into(), table: 1001 }),
            tunnels: vec![tunnel("mm-other", 51822, pb::PeerRole::Site, &[])],
            imports: vec![pb::SegmentImport {
                segment: "office".into(),
                table: 1000,
                prefixes: vec!["10.10.0.0/16".into()],
            }],
            ..Default::default()
        };
        SiteConfig {
            site: "ap-east".into(),
            role: pb::Role::AccessPoint.into(),
            segments: vec![office, other],
            ..Default::default()
        }
    }

    /// Routing chooses, WireGuard only authenticates: wherever the access
    /// point routes a member, the member stays allowed its own prefixes
    /// (its packets are accepted directly while the other access point
    /// carries its traffic), the interconnect is allowed every address, and
    /// an import follows the route the other segment has.
    #[test]
    fn an_access_point_routes_a_member_directly_or_over_the_interconnect_and_accepts_it_either_way() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = access_point();
        let keys = keys(&state, &c);
        let route = |owned: &Owned, table: u32| {
            owned.routes.iter().find(|r| r.table == table && r.prefix == "10.10.1.0/24").map(|r| r.interface.clone())
        };
        for (via, interface) in [("office-a", "mm-office"), ("ap-west", "mi-office")] {
            let mut choices = first_choices(&c, &BTreeMap::new());
            choices.groups.insert(("office".into(), "office-a".into()), via.into());
            let want = desired_with(&c, &keys, &choices).expect("desired");
            assert_eq!(route(&want, 1000).as_deref(), Some(interface), "office-a via {via}");
            assert_eq!(route(&want, 1001).as_deref(), Some(interface), "the import follows it");
            assert_eq!(
                want.tunnels["mm-office"].peers["KA"].allowed_ips,
                BTreeSet::from(["10.10.1.0/24".to_string(), "100.64.0.3/32".to_string()]),
            );
            assert_eq!(
                want.tunnels["mi-office"].peers["KW"].allowed_ips,
                BTreeSet::from(["0.0.0.0/0".to_string(), "::/0".to_string()])
            );
            let spec = want.policy.and_then(|p| p.spec).expect("policy");
            assert_eq!(spec.interconnects, BTreeSet::from(["mi-office".to_string()]));
            let sources = &spec.sources["office"];
            assert_eq!(sources.tunnels, BTreeSet::from(["mi-office".to_string(), "mm-office".to_string()]));
            assert!(
                sources.prefixes.contains("10.10.1.0/24") && sources.prefixes.contains("100.127.0.1/32"),
                "{sources:?}"
            );
            assert!(spec.sources["other"].prefixes.contains("10.10.0.0/16"), "the linked segment's sources");
        }
    }

    /// A member rotating its keys: its next key is held beside the current
    /// one on the same tunnel, at the same endpoint, allowed nothing (its
    /// first handshake with it is accepted; no packet of its is taken by
    /// it) — and not at all once it is the current key.
    #[test]
    fn a_peers_next_key_is_held_beside_its_key_allowed_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let mut c = access_point();
        c.segments[0].peers[1].next_public_key = "KA2".into();
        let keys = keys(&state, &c);
        let want = desired(&c, &keys).expect("desired");
        let peers = &want.tunnels["mm-office"].peers;
        assert_eq!(peers["KA2"].allowed_ips, BTreeSet::new());
        assert_eq!(peers["KA2"].endpoint, peers["KA"].endpoint);
        assert!(peers["KA"].allowed_ips.contains("100.64.0.3/32"), "the current key keeps the addresses");
        assert!(!want.tunnels["mi-office"].peers.contains_key("KA2"), "only on the member's tunnel");
        c.segments[0].peers[1].public_key = "KA2".into();
        let switched = desired(&c, &keys).expect("desired");
        assert_eq!(switched.tunnels["mm-office"].peers.len(), 1);
        assert!(switched.tunnels["mm-office"].peers["KA2"].allowed_ips.contains("100.64.0.3/32"));
    }

    /// A switch's first step, prepared: the switching peer's next key set
    /// with its addresses, then its old key removed; what it leaves is what
    /// the full build wants (nothing more to write).
    #[test]
    fn a_switch_moves_the_addresses_to_the_next_key_and_removes_the_old_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let mut before = access_point();
        before.segments[0].peers[1].next_public_key = "KA2".into();
        let keys = keys(&state, &before);
        let mut dp = Fake::new();
        let choices = Choices::default();
        reconcile(&mut dp, &desired_with(&before, &keys, &choices).expect("desired")).expect("first");
        let prepared = switch_ops(&before, &keys, &choices).expect("switch");
        assert_eq!(prepared.len(), 1, "{prepared:?}");
        let ops = &prepared[&("mm-office".to_string(), "KA2".to_string())];
        match &ops[0] {
            Op::SetPeer { tunnel, public_key, peer } => {
                assert_eq!((tunnel.as_str(), public_key.as_str()), ("mm-office", "KA2"));
                assert!(peer.allowed_ips.contains("100.64.0.3/32"), "{peer:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(ops[1], Op::RemovePeer { tunnel: "mm-office".into(), public_key: "KA".into() });
        dp.apply(ops).expect("apply");
        let mut after = before.clone();
        after.segments[0].peers[1].public_key = "KA2".into();
        after.segments[0].peers[1].next_public_key.clear();
        let want = desired_with(&after, &keys, &choices).expect("desired");
        assert!(dp.diff(&want).expect("diff").is_empty(), "the full build has nothing left to write");
        assert!(switch_ops(&after, &keys, &choices).expect("none").is_empty());
    }

    #[test]
    fn the_fake_refuses_illegal_operations() {
        let mut owned = Owned::default();
        let route = Route { table: 1, prefix: "10.0.0.0/8".into(), interface: "mw-x".into(), via: String::new() };
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
        let ap = |name: &str, n: u8, role: pb::PeerRole, interface: &str| pb::Peer {
            name: name.into(),
            interface: interface.into(),
            role: role.into(),
            public_key: format!("K{n}"),
            next_public_key: String::new(),
            switch_at_unix_ms: 0,
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
            ap("ap-east", 1, pb::PeerRole::AccessPoint, "me-office"),
            ap("ap-west", 2, pb::PeerRole::Interconnect, "mi-office"),
            ap("member", 3, pb::PeerRole::Site, "mm-office"),
        ];
        c.segments[0].tunnels = [
            ("me-office", 51900, pb::PeerRole::AccessPoint),
            ("mi-office", 51901, pb::PeerRole::Interconnect),
            ("mm-office", 51902, pb::PeerRole::Site),
        ]
        .into_iter()
        .map(|(name, port, faces)| pb::WireguardInterface {
            name: name.into(),
            listen_port: port,
            addresses: vec!["100.64.0.11/32".into()],
            faces: faces.into(),
        })
        .collect();
        c
    }

    /// The router of [`two_lines`] has routes for fiber→fiber (eth2) and
    /// lte→inet (eth3) only.
    fn fibre_and_lte_hops() -> BTreeMap<(std::net::IpAddr, std::net::IpAddr), Hop> {
        let ip = |a: &str| a.parse::<std::net::IpAddr>().expect("ip");
        let hop = |i: &str| Hop { interface: i.into(), gateway: None };
        (1..=3u8)
            .flat_map(|n| {
                [
                    ((ip("192.0.2.11"), ip(&format!("192.0.2.{n}"))), hop("eth2")),
                    ((ip("198.51.100.11"), ip(&format!("198.51.100.{n}"))), hop("eth3")),
                ]
            })
            .collect()
    }

    /// The choices once the fibre fails: every path over it is judged down,
    /// lte→inet is the best one that answers.
    fn fibre_down(c: &SiteConfig) -> Choices {
        choose(
            c,
            &|_, _, _| 0,
            &|_, e| if e.local_line == "fiber" { 2 } else { u8::from(e.remote_line != "inet") },
            &|_, _| None,
            &Default::default(),
        )
    }

    #[test]
    fn lines_are_picked_pinned_and_fenced() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = two_lines(pb::Region::East);
        let ip = |a: &str| a.parse::<std::net::IpAddr>().expect("ip");
        let hops = fibre_and_lte_hops();
        let first = first_choices(&c, &hops);
        assert_eq!(first.paths["ap-east"], ("fiber".to_string(), "fiber".to_string()));
        assert!(!first.paths.contains_key("member"), "a member site is followed, not picked");
        assert!(first.paths.contains_key("ap-west"), "the east access point picks the interconnect's line");
        assert!(
            !first_choices(&two_lines(pb::Region::West), &hops).paths.contains_key("ap-west"),
            "the west one follows it"
        );

        // The fibre fails: lte→inet is the best path that answers.
        let moved = fibre_down(&c);
        assert_eq!(moved.paths["ap-east"], ("lte".to_string(), "inet".to_string()));
        let want = desired_with(&c, &keys(&state, &c), &moved).expect("desired");
        let tunnel = |name: &str| &want.tunnels[name].peers;
        assert_eq!(tunnel("me-office")["K1"].endpoint, "198.51.100.1:51820");
        assert!(tunnel("mm-office")["K3"].roams && !tunnel("me-office")["K1"].roams);
        let pins = pins(&c, &moved, &hops);
        let of = |follow: bool| {
            pins.iter()
                .filter(|p| p.follow == follow)
                .map(|p| (p.destination, p.source, p.hop.interface.as_str()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            of(false),
            vec![(ip("198.51.100.1"), ip("198.51.100.11"), "eth3"), (ip("198.51.100.2"), ip("198.51.100.11"), "eth3")],
            "outer packets to both access points leave on the mobile line"
        );
        assert_eq!(
            of(true),
            vec![(ip("192.0.2.3"), ip("192.0.2.11"), "eth2"), (ip("198.51.100.3"), ip("198.51.100.11"), "eth3")],
            "the member is followed: its every path with a hop is pinned by its source, whatever line it uses"
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
        assert_eq!(spec.tunnel_ports, BTreeSet::from([51900, 51901, 51902]));
    }

    /// A datapath that notes the order of the calls a line switch makes.
    #[derive(Default)]
    struct Noting {
        inner: Fake,
        calls: Vec<String>,
    }

    impl Datapath for Noting {
        fn observe(&mut self) -> Result<Owned, crate::datapath::DatapathError> {
            self.inner.observe()
        }
        fn apply(&mut self, ops: &[Op]) -> Result<(), crate::datapath::DatapathError> {
            self.calls.extend(ops.iter().map(|o| match o {
                Op::SetFence(f) => format!("fence {}", f.len()),
                Op::SetPeer { .. } => "peer".to_string(),
                _ => "other".to_string(),
            }));
            self.inner.apply(ops)
        }
        fn writes(&self) -> u64 {
            self.inner.writes()
        }
        fn fence_ahead(&mut self, fence: &BTreeSet<std::net::IpAddr>) {
            self.calls.push(format!("fence ahead {}", fence.len()));
        }
        fn pin(&mut self, pins: &BTreeSet<Pin>) -> Result<BTreeSet<std::net::IpAddr>, crate::datapath::DatapathError> {
            self.calls.push("pin".into());
            self.inner.pin(pins)
        }
        fn pin_ahead(&mut self, pins: &BTreeSet<Pin>) -> Result<(), crate::datapath::DatapathError> {
            self.calls.push("pin ahead".into());
            self.inner.pin_ahead(pins)
        }
    }

    /// A failed line's first step sends the policy's new fence ahead, then
    /// pins, sets the moved peers' endpoints and reads the fence's answer;
    /// the full build after it finds the peers already there, and nothing
    /// else moved.
    #[test]
    fn a_failed_lines_first_step_moves_the_fence_then_its_peers() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = two_lines(pb::Region::East);
        let hops = fibre_and_lte_hops();
        let keys = keys(&state, &c);
        let mut noting = Noting::default();
        let first = first_choices(&c, &hops);
        build(&mut noting, &c, &keys, &first, &hops).expect("first build");
        noting.calls.clear();
        let moved = fibre_down(&c);
        let peers = BTreeSet::from(["ap-east".to_string()]);
        let ops = move_lines(&mut noting, &c, &keys, &moved, &hops, &peers).expect("first step");
        let fenced = ops.iter().find_map(|o| if let Op::SetFence(f) = o { Some(f.len()) } else { None });
        let fenced = fenced.expect("a fence");
        assert_eq!(
            noting.calls,
            [format!("fence ahead {fenced}"), "pin ahead".into(), "peer".into(), format!("fence {fenced}")],
            "the fence sent before the new pins, its answer read after the endpoints"
        );
        let mut dp = noting.inner;
        let set: Vec<(&str, &str)> = ops
            .iter()
            .filter_map(|o| match o {
                Op::SetPeer { public_key, peer, .. } => Some((public_key.as_str(), peer.endpoint.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(set, vec![("K1", "198.51.100.1:51820")], "only the moved peer, on its new line: {ops:?}");
        let rest = build(&mut dp, &c, &keys, &moved, &hops).expect("full build");
        assert!(
            !rest.iter().any(|o| matches!(o, Op::SetPeer { public_key, .. } if public_key == "K1")),
            "the full build finds ap-east moved: {rest:?}"
        );
        let want = wanted(&c, &keys, &moved, &hops).expect("wanted").0;
        assert!(dp.diff(&want).expect("diff").is_empty(), "everything as wanted");
    }

    /// A failover's groups go first, alone: one route replaced per prefix
    /// (no deletion, no moment without a route), nothing else written; the
    /// full build after it has nothing left to do.
    #[test]
    fn moved_groups_replace_their_routes_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let mut c = two_lines(pb::Region::East);
        c.segments[0].route_groups = vec![pb::RouteGroup {
            name: "all".into(),
            prefixes: vec!["10.0.0.0/8".into(), "172.16.0.0/12".into()],
            candidates: vec!["ap-east".into(), "ap-west".into()],
        }];
        let hops = fibre_and_lte_hops();
        let keys = keys(&state, &c);
        let mut dp = Fake::new();
        let before = first_choices(&c, &hops);
        build(&mut dp, &c, &keys, &before, &hops).expect("first build");
        let group = ("office".to_string(), "all".to_string());
        assert_eq!(before.groups[&group], "ap-east");
        let mut after = before.clone();
        after.groups.insert(group, "ap-west".into());
        let ops = move_groups(&mut dp, &c, &keys, &before, &after).expect("groups");
        let routed: Vec<(&str, &str)> = ops
            .iter()
            .map(|o| match o {
                Op::ReplaceRoute(r) => (r.prefix.as_str(), r.interface.as_str()),
                other => panic!("only routes replaced: {other:?}"),
            })
            .collect();
        assert_eq!(routed, vec![("10.0.0.0/8", "mi-office"), ("172.16.0.0/12", "mi-office")]);
        let via = |prefix: &str| -> Vec<String> {
            dp.owned().routes.iter().filter(|r| r.prefix == prefix).map(|r| r.interface.clone()).collect()
        };
        assert_eq!(via("10.0.0.0/8"), vec!["mi-office".to_string()], "the old route replaced, not beside it");
        let want = wanted(&c, &keys, &after, &hops).expect("wanted").0;
        assert!(dp.diff(&want).expect("diff").is_empty(), "the full build finds nothing to do");
        assert!(move_groups(&mut dp, &c, &keys, &after, &after).expect("again").is_empty(), "nothing moved");
    }

    #[test]
    fn a_roaming_peer_keeps_the_endpoint_wireguard_learnt() {
        let dir = tempfile::tempdir().expect("tmp");
        let state = StateDir::new(dir.path());
        let c = two_lines(pb::Region::East);
        let mut dp = Fake::new();
        reconcile(&mut dp, &desired(&c, &keys(&state, &c)).expect("desired")).expect("first");
        // WireGuard followed the member site to its mobile line.
        let mut roamed = dp.owned().clone();
        roamed.tunnels.get_mut("mm-office").expect("tunnel").peers.get_mut("K3").expect("member").endpoint =
            "198.51.100.3:51820".into();
        let mut dp = Fake::new();
        dp.apply(&plan(&Owned::default(), &roamed)).expect("roamed state");
        assert!(dp.diff(&desired(&c, &keys(&state, &c)).expect("desired")).expect("diff").is_empty(), "not reset");
        // A change of its allowed IPs keeps the learnt endpoint.
        let mut c2 = c.clone();
        c2.segments[0].peers[2].allowed_prefixes.push("10.9.0.0/24".into());
        reconcile(&mut dp, &desired(&c2, &keys(&state, &c2)).expect("desired")).expect("second");
        assert_eq!(dp.owned().tunnels["mm-office"].peers["K3"].endpoint, "198.51.100.3:51820");
        // A peer whose line this router picks is put back on its endpoint.
        let mut moved = dp.owned().clone();
        moved.tunnels.get_mut("me-office").expect("tunnel").peers.get_mut("K1").expect("ap").endpoint =
            "198.51.100.1:51820".into();
        let ops = plan(&moved, &desired(&c2, &keys(&state, &c2)).expect("desired"));
        assert!(
            ops.iter().any(|o| matches!(o, Op::SetPeer { public_key, peer, .. } if public_key == "K1" && peer.endpoint == "192.0.2.1:51820")),
            "{ops:?}"
        );
    }
}
