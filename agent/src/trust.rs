//! How far the agent trusts its controller. A configuration comes over
//! mutual TLS from the controller the site enrolled with, but a controller
//! compromised, buggy or misconfigured must not be able to make the agent
//! write outside its state directory, take over an interface that is not
//! Musubi's, or route in the kernel's own tables. Every configuration is
//! checked whole before anything touches the disk or the kernel; one
//! problem refuses it and the configuration applied before stays.
//!
//! - segment names are plain (they become file and interface names);
//! - every tunnel is `me-|mw-|mm-|mi-` + its segment, the routing domain
//!   `mv-` + its segment, and every peer sits on one of its segment's tunnels;
//! - routing tables (the segments' and their imports') are within the
//!   agent's allowed range (by default 256 to 2³¹−1: never `local`, `main`,
//!   `default` or the unspecified table);
//! - a LAN interface is a plain interface name, none of Musubi's own
//!   prefixes, not an interface the site's lines leave on, and, when the
//!   site lists its LAN interfaces (`--lan-interfaces`), one of them.

use std::collections::BTreeSet;

use musubi_proto::v1 as pb;

use crate::state::{plain_segment, shown};

/// Prefixes of the WireGuard interfaces Musubi makes (east, west, members,
/// interconnect, a mutual aid's east and west) and of its VRFs: a LAN
/// interface never has one.
pub const TUNNEL_PREFIXES: [&str; 6] = ["me-", "mw-", "mm-", "mi-", "ae-", "aw-"];
pub const VRF_PREFIX: &str = "mv-";

/// What this site allows a controller to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Routing tables the segments may use, inclusive.
    pub tables: (u32, u32),
    /// The interfaces a segment may take as its LAN (`None`: any that
    /// passes the other checks).
    pub lan_interfaces: Option<BTreeSet<String>>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { tables: (256, i32::MAX as u32), lan_interfaces: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    #[error("segment name `{0}` refused: lowercase letters, digits and dashes, at most 63")]
    SegmentName(String),
    #[error("segment `{segment}`: interface `{name}` refused: expected {expected}")]
    Interface { segment: String, name: String, expected: String },
    #[error("segment `{segment}`: routing table {table} refused: this site allows {first} to {last} (--tables)")]
    Table { segment: String, table: u32, first: u32, last: u32 },
    #[error("segment `{segment}`: LAN interface `{interface}` refused: {why}")]
    Lan { segment: String, interface: String, why: String },
}

fn plain_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// Checks `config` against `limits`; `line_interfaces` are the interfaces
/// the site's lines leave on (as the datapath resolved them; empty when it
/// cannot tell).
pub fn check(config: &pb::SiteConfig, limits: &Limits, line_interfaces: &BTreeSet<String>) -> Result<(), Untrusted> {
    for seg in &config.segments {
        let segment = shown(&seg.segment);
        if !plain_segment(&seg.segment) {
            return Err(Untrusted::SegmentName(segment));
        }
        let interface = |name: &str, expected: String| Untrusted::Interface {
            segment: segment.clone(),
            name: shown(name),
            expected,
        };
        let tunnels: BTreeSet<&str> = seg.tunnels.iter().map(|t| t.name.as_str()).collect();
        for name in &tunnels {
            if !TUNNEL_PREFIXES.iter().any(|p| name.strip_prefix(p) == Some(seg.segment.as_str())) || name.len() > 15 {
                let expected = TUNNEL_PREFIXES.map(|p| format!("{p}{}", seg.segment)).join(", ");
                return Err(interface(name, format!("one of {expected}, at most 15 bytes")));
            }
        }
        if let Some(peer) = seg.peers.iter().find(|p| !tunnels.contains(p.interface.as_str())) {
            return Err(interface(
                &peer.interface,
                format!("one of the segment's tunnels (peer {})", shown(&peer.name)),
            ));
        }
        let (first, last) = limits.tables;
        if let Some(domain) = &seg.domain {
            let vrf = format!("{VRF_PREFIX}{}", seg.segment);
            if domain.vrf != vrf || vrf.len() > 15 {
                return Err(interface(&domain.vrf, format!("{vrf}, at most 15 bytes")));
            }
        }
        let tables = seg.domain.iter().map(|d| d.table).chain(seg.imports.iter().map(|i| i.table));
        for table in tables {
            if table < first || table > last {
                return Err(Untrusted::Table { segment, table, first, last });
            }
        }
        // The LAN, and a migration gateway's interface to the old network:
        // both are bound to the segment, so both obey the same limits.
        let lan = seg.attachment.as_ref().map(|a| a.interface.as_str());
        let legacy = seg.legacy.as_ref().map(|l| l.interface.as_str());
        for lan in [lan, legacy].into_iter().flatten().filter(|i| !i.is_empty()) {
            let refuse = |why: String| Untrusted::Lan { segment: segment.clone(), interface: shown(lan), why };
            if !plain_ifname(lan) {
                return Err(refuse("not an interface name (1 to 15 of letters, digits, `-_.@`)".into()));
            }
            if TUNNEL_PREFIXES.iter().chain([&VRF_PREFIX]).any(|p| lan.starts_with(p)) {
                return Err(refuse("Musubi's own tunnels and VRFs are never a LAN".into()));
            }
            if line_interfaces.contains(lan) {
                return Err(refuse("one of the site's lines leaves on it".into()));
            }
            if let Some(allowed) = &limits.lan_interfaces
                && !allowed.contains(lan)
            {
                let list: Vec<&str> = allowed.iter().map(String::as_str).collect();
                return Err(refuse(format!("this site's LAN interfaces are {} (--lan-interfaces)", list.join(", "))));
            }
        }
    }
    Ok(())
}

/// `--tables FIRST-LAST`.
pub fn parse_tables(text: &str) -> Result<(u32, u32), String> {
    let (a, b) = text.split_once('-').ok_or("expected FIRST-LAST, e.g. 1000-1999")?;
    let first: u32 = a.trim().parse().map_err(|_| format!("`{a}` is not a table number"))?;
    let last: u32 = b.trim().parse().map_err(|_| format!("`{b}` is not a table number"))?;
    if first < 256 || first > last {
        return Err("tables from 256 up (0 and 253-255 are the kernel's), FIRST ≤ LAST".into());
    }
    Ok((first, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> pb::SiteConfig {
        let tunnel = |name: &str| pb::WireguardInterface { name: name.into(), ..Default::default() };
        pb::SiteConfig {
            site: "kita-hall".into(),
            segments: vec![pb::SegmentConfig {
                segment: "lgwan".into(),
                domain: Some(pb::RoutingDomain { vrf: "mv-lgwan".into(), table: 1000 }),
                tunnels: vec![tunnel("me-lgwan"), tunnel("mw-lgwan")],
                peers: vec![pb::Peer { name: "ap-east".into(), interface: "me-lgwan".into(), ..Default::default() }],
                attachment: Some(pb::Attachment { interface: "eth2".into(), prefixes: vec![] }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn with(f: impl FnOnce(&mut pb::SegmentConfig)) -> pb::SiteConfig {
        let mut c = config();
        f(&mut c.segments[0]);
        c
    }

    #[test]
    fn a_configuration_reaching_outside_musubis_own_is_refused() {
        let limits = Limits::default();
        let none = BTreeSet::new();
        assert_eq!(check(&config(), &limits, &none), Ok(()));
        let refused = |c: &pb::SiteConfig, lines: &BTreeSet<String>, limits: &Limits| {
            check(c, limits, lines).expect_err("refused").to_string()
        };
        let bad = [
            (with(|s| s.segment = "../etc".into()), "segment name `../etc` refused"),
            (with(|s| s.tunnels[0].name = "eth0".into()), "interface `eth0` refused"),
            (with(|s| s.tunnels[0].name = "me-other".into()), "interface `me-other` refused"),
            (with(|s| s.peers[0].interface = "eth0".into()), "interface `eth0` refused"),
            (with(|s| s.domain.as_mut().expect("domain").vrf = "eth0".into()), "interface `eth0` refused"),
            (with(|s| s.domain.as_mut().expect("domain").table = 254), "routing table 254 refused"),
            (with(|s| s.imports.push(pb::SegmentImport { table: 255, ..Default::default() })), "routing table 255"),
            (with(|s| s.attachment.as_mut().expect("lan").interface = "mw-x".into()), "Musubi's own"),
            (with(|s| s.attachment.as_mut().expect("lan").interface = "eth2/../x".into()), "not an interface name"),
        ];
        for (c, want) in &bad {
            let got = refused(c, &none, &limits);
            assert!(got.contains(want), "{got} lacks {want}");
        }
        // The interface a line leaves on is never a LAN.
        let lines: BTreeSet<String> = ["eth2".to_string()].into();
        assert!(refused(&config(), &lines, &limits).contains("one of the site's lines leaves on it"));
        // A site's own list of LAN interfaces, and its own table range.
        let listed = Limits { lan_interfaces: Some(["eth3".to_string()].into()), ..Limits::default() };
        assert!(refused(&config(), &none, &listed).contains("this site's LAN interfaces are eth3"));
        let narrow = Limits { tables: (2000, 2999), ..Limits::default() };
        assert!(refused(&config(), &none, &narrow).contains("allows 2000 to 2999"));
        assert_eq!(parse_tables("1000-1999"), Ok((1000, 1999)));
        assert!(parse_tables("0-1999").is_err() && parse_tables("2000-1000").is_err());
    }
}
