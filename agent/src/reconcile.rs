//! From a site configuration to the objects the datapath must hold, and the
//! reconcile step: observe → plan → apply.

use std::collections::{BTreeMap, BTreeSet};

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::datapath::{Datapath, DatapathError, Domain, Op, Owned, PeerSpec, Route, Tunnel, plan};
use crate::state::StateDir;
use crate::summary::{ConfigError, summarise};

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("the configuration is unusable: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

fn endpoint(e: &pb::Endpoint) -> String {
    match e.address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(a)) => format!("[{a}]:{}", e.port),
        _ => format!("{}:{}", e.address, e.port),
    }
}

/// The objects `config` asks for. Peers go to their first endpoint (the
/// best line pair); routes go through each group's first candidate.
pub fn desired(config: &SiteConfig, state: &StateDir) -> Result<Owned, ReconcileError> {
    summarise(config)?;
    let mut owned = Owned::default();
    for seg in &config.segments {
        let (Some(domain), Some(wg)) = (&seg.domain, &seg.wireguard) else { continue };
        owned.domains.insert(domain.vrf.clone(), Domain { name: domain.vrf.clone(), table: domain.table });
        let peers: BTreeMap<String, PeerSpec> = seg
            .peers
            .iter()
            .filter(|p| !p.public_key.is_empty())
            .map(|p| {
                let spec = PeerSpec {
                    name: p.name.clone(),
                    endpoint: p.endpoints.first().map(endpoint).unwrap_or_default(),
                    allowed_ips: p.allowed_prefixes.iter().cloned().collect(),
                };
                (p.public_key.clone(), spec)
            })
            .collect();
        let with_key: BTreeSet<&str> =
            seg.peers.iter().filter(|p| !p.public_key.is_empty()).map(|p| p.name.as_str()).collect();
        owned.tunnels.insert(
            wg.name.clone(),
            Tunnel {
                name: wg.name.clone(),
                domain: domain.vrf.clone(),
                listen_port: wg.listen_port,
                key_file: state.key_file(&seg.segment),
                addresses: wg.addresses.iter().cloned().collect(),
                peers,
            },
        );
        for g in &seg.route_groups {
            if g.candidates.iter().any(|c| with_key.contains(c.as_str())) {
                for prefix in &g.prefixes {
                    owned.routes.insert(Route {
                        table: domain.table,
                        prefix: prefix.clone(),
                        interface: wg.name.clone(),
                    });
                }
            }
        }
    }
    Ok(owned)
}

/// Brings the datapath to `want`; returns the operations applied (none when
/// it already matches).
pub fn reconcile(dp: &mut dyn Datapath, want: &Owned) -> Result<Vec<Op>, ReconcileError> {
    let actual = dp.observe()?;
    let ops = plan(&actual, want);
    if !ops.is_empty() {
        dp.apply(&ops)?;
    }
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::fake::Fake;
    use crate::datapath::step;

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
        assert_eq!(want.routes.len(), 1);
        Ok(())
    }

    #[test]
    fn the_fake_refuses_illegal_operations() {
        let mut owned = Owned::default();
        let route = Route { table: 1, prefix: "10.0.0.0/8".into(), interface: "mw-x".into() };
        assert!(step(&mut owned, &Op::DeleteDomain { name: "mv-x".into() }).is_err());
        assert!(step(&mut owned, &Op::AddRoute(route.clone())).is_err(), "route through a missing tunnel");
        let tunnel =
            Op::CreateTunnel { name: "mw-x".into(), domain: "mv-x".into(), listen_port: 1, key_file: "k".into() };
        assert!(step(&mut owned, &tunnel).is_err(), "tunnel before its domain");
        assert!(step(&mut owned, &Op::CreateDomain(Domain { name: "mv-x".into(), table: 1 })).is_ok());
        assert!(step(&mut owned, &Op::CreateDomain(Domain { name: "mv-y".into(), table: 1 })).is_err(), "shared table");
        assert!(step(&mut owned, &tunnel).is_ok());
        assert!(step(&mut owned, &Op::DeleteDomain { name: "mv-x".into() }).is_err(), "domain still in use");
        assert!(step(&mut owned, &Op::AddRoute(route.clone())).is_ok());
        assert!(step(&mut owned, &Op::AddRoute(route)).is_err(), "route twice");
    }
}
