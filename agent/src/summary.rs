//! A plain-text account of what a site configuration asks the agent to build,
//! after checking the invariants the datapath relies on.

use std::collections::HashSet;
use std::fmt::Write as _;

use musubi_proto::v1::SiteConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("segment `{segment}` has no {what}")]
    Missing { segment: String, what: &'static str },
    #[error("routing table {table} is used by segments `{first}` and `{second}`")]
    SharedTable { table: u32, first: String, second: String },
    #[error("segment `{segment}`: peer `{peer}` is on `{interface}`, which is not one of the segment's tunnels")]
    UnknownTunnel { segment: String, peer: String, interface: String },
    #[error("segment `{segment}`: route group `{group}` names `{candidate}`, which is not a peer")]
    UnknownCandidate { segment: String, group: String, candidate: String },
}

/// `1 peer`, `2 peers` (the nouns here take an `s`).
fn things(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

/// A protobuf enum value as the intent spells it: `ROLE_ACCESS_POINT` →
/// `access-point`, `LINE_KIND_DARK_FIBER` → `dark-fiber`.
fn spelling(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix).unwrap_or(name).to_ascii_lowercase().replace('_', "-")
}

/// Checks the configuration and describes it.
pub fn summarise(c: &SiteConfig) -> Result<String, ConfigError> {
    let mut out = String::new();
    let (role, region) = (spelling(c.role().as_str_name(), "ROLE_"), spelling(c.region().as_str_name(), "REGION_"));
    let _ = writeln!(out, "site {} (tenant {}, {role}, {region})", c.site, c.tenant);
    for l in &c.lines {
        let kind = spelling(l.kind().as_str_name(), "LINE_KIND_");
        let _ = writeln!(out, "  line {} {kind} priority {} at {}", l.name, l.priority, l.address);
    }
    let mut tables: Vec<(u32, &str)> = Vec::new();
    for s in &c.segments {
        let domain =
            s.domain.as_ref().ok_or(ConfigError::Missing { segment: s.segment.clone(), what: "routing domain" })?;
        if s.tunnels.is_empty() {
            return Err(ConfigError::Missing { segment: s.segment.clone(), what: "WireGuard interface" });
        }
        if let Some((_, first)) = tables.iter().find(|(t, _)| *t == domain.table) {
            return Err(ConfigError::SharedTable {
                table: domain.table,
                first: first.to_string(),
                second: s.segment.clone(),
            });
        }
        tables.push((domain.table, &s.segment));
        let peers: HashSet<&str> = s.peers.iter().map(|p| p.name.as_str()).collect();
        if let Some(p) = s.peers.iter().find(|p| !s.tunnels.iter().any(|t| t.name == p.interface)) {
            return Err(ConfigError::UnknownTunnel {
                segment: s.segment.clone(),
                peer: p.name.clone(),
                interface: p.interface.clone(),
            });
        }
        for g in &s.route_groups {
            if let Some(c) = g.candidates.iter().find(|c| !peers.contains(c.as_str())) {
                return Err(ConfigError::UnknownCandidate {
                    segment: s.segment.clone(),
                    group: g.name.clone(),
                    candidate: c.clone(),
                });
            }
        }
        let keyed = s.peers.iter().filter(|p| !p.public_key.is_empty()).count();
        let _ = writeln!(
            out,
            "  segment {}: vrf {} table {}, {}",
            s.segment,
            domain.vrf,
            domain.table,
            s.tunnels
                .iter()
                .map(|w| format!("{} port {} [{}]", w.name, w.listen_port, w.addresses.join(", ")))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(a) = &s.attachment {
            let _ = writeln!(out, "    lan {} [{}]", a.interface, a.prefixes.join(", "));
        }
        let _ = writeln!(
            out,
            "    {} ({keyed} with keys), {}, {}, {}",
            things(s.peers.len(), "peer"),
            things(s.route_groups.len(), "route group"),
            things(s.policy.len(), "policy rule"),
            things(s.imports.len(), "import")
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use musubi_proto::v1::{Peer, RouteGroup, RoutingDomain, SegmentConfig, WireguardInterface};

    fn segment(name: &str, table: u32) -> SegmentConfig {
        SegmentConfig {
            segment: name.into(),
            domain: Some(RoutingDomain { vrf: format!("mv-{name}"), table }),
            tunnels: vec![WireguardInterface { name: format!("me-{name}"), listen_port: 51820, ..Default::default() }],
            peers: vec![Peer { name: "ap-east".into(), interface: format!("me-{name}"), ..Default::default() }],
            route_groups: vec![RouteGroup { name: name.into(), prefixes: vec![], candidates: vec!["ap-east".into()] }],
            ..Default::default()
        }
    }

    #[test]
    fn refuses_shared_tables_and_unknown_candidates() {
        let mut c = SiteConfig {
            site: "s".into(),
            segments: vec![segment("a", 1000), segment("b", 1000)],
            ..Default::default()
        };
        assert_eq!(summarise(&c), Err(ConfigError::SharedTable { table: 1000, first: "a".into(), second: "b".into() }));
        if let Some(d) = c.segments[1].domain.as_mut() {
            d.table = 1001;
        }
        let text = summarise(&c).expect("valid");
        assert!(text.contains("segment b: vrf mv-b table 1001"), "{text}");
        // Counts in words, the intent's spellings.
        assert!(text.contains("    1 peer (0 with keys), 1 route group, 0 policy rules, 0 imports"), "{text}");
        c.set_role(musubi_proto::v1::Role::AccessPoint);
        c.set_region(musubi_proto::v1::Region::West);
        let text = summarise(&c).expect("valid");
        assert!(text.starts_with("site s (tenant , access-point, west)"), "{text}");
        c.segments[0].route_groups[0].candidates.push("ap-west".into());
        assert!(matches!(summarise(&c), Err(ConfigError::UnknownCandidate { .. })));
        c.segments[0].route_groups[0].candidates.pop();
        c.segments[0].peers[0].interface = "mw-a".into();
        assert!(matches!(summarise(&c), Err(ConfigError::UnknownTunnel { .. })));
    }
}
