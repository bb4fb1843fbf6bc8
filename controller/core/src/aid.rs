//! Mutual aid's operational state: operators' activations, kept beside the
//! WireGuard keys (they change configurations the way keys do, and one
//! reload of the fan-out sees both), under the reserved name
//! [`ACTIVATIONS`] in place of a site: `…/keys/+aid/<aid>` holds
//! `<until unix ms> <reason>`.

use std::collections::BTreeMap;

/// The entry of [`crate::compile::PublicKeys`] that holds activations
/// (no site name starts with `+`).
pub const ACTIVATIONS: &str = "+aid";

/// An operator's activation of an aid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub until_unix_ms: u64,
    pub reason: String,
}

impl Activation {
    pub fn text(&self) -> String {
        format!("{} {}", self.until_unix_ms, self.reason)
    }

    pub fn parse(text: &str) -> Option<Activation> {
        let (until, reason) = text.split_once(' ').unwrap_or((text, ""));
        Some(Activation { until_unix_ms: until.parse().ok()?, reason: reason.to_string() })
    }

    /// Whether it has expired at `now_unix_ms`.
    pub fn expired(&self, now_unix_ms: u64) -> bool {
        now_unix_ms >= self.until_unix_ms
    }
}

/// Every activation, by aid name.
pub fn activations(keys: &crate::compile::PublicKeys) -> BTreeMap<&str, Activation> {
    keys.get(ACTIVATIONS)
        .into_iter()
        .flatten()
        .filter_map(|(name, text)| Some((name.as_str(), Activation::parse(text)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::{Allocations, allocate};
    use crate::compile::{PublicKeys, compile};
    use musubi_proto::v1::PeerRole;

    /// labs/mutual-aid: pref-lan (own pair loc-east/loc-west) is aided by
    /// the national pair nat-east/nat-west.
    #[test]
    fn an_aid_is_pre_staged_on_the_segments_sites_and_on_the_aiding_pair() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../labs/mutual-aid/intent.yaml");
        let parsed = crate::intent::parse::parse_str("intent.yaml", &std::fs::read_to_string(path).expect("lab"));
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let intent = parsed.intent;
        let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
        let sa = alloc.segments["pref-lan"];
        assert!(sa.aid_ports.iter().all(|p| *p != 0) && sa.aid_ports[0] != sa.aid_ports[1], "{sa:?}");
        assert_eq!(alloc.segments["lgwan"].aid_ports, [0, 0], "a segment without aid has no aid ports");
        let mut keys = PublicKeys::new();
        let configs = compile(&intent, &alloc, &keys).expect("compile");

        // A member: its own pair first, then the aid's, each on a tunnel of its own.
        let office = configs["office-a"].segments.iter().find(|s| s.segment == "pref-lan").expect("pref-lan");
        let group = &office.route_groups[0];
        assert_eq!(group.candidates, ["loc-east", "loc-west", "nat-east", "nat-west"]);
        let tunnel = |peer: &str| office.peers.iter().find(|p| p.name == peer).map(|p| p.interface.clone());
        assert_eq!(tunnel("nat-east").as_deref(), Some("ae-pref-lan"));
        assert_eq!(tunnel("nat-west").as_deref(), Some("aw-pref-lan"));
        assert_eq!(tunnel("loc-east").as_deref(), Some("me-pref-lan"));
        let port = |name: &str| office.tunnels.iter().find(|t| t.name == name).map(|t| t.listen_port);
        assert_eq!(
            (port("ae-pref-lan"), port("aw-pref-lan")),
            (Some(u32::from(sa.aid_ports[0])), Some(u32::from(sa.aid_ports[1])))
        );
        assert_eq!(office.aids.len(), 1);
        let aid = &office.aids[0];
        assert!(aid.automatic && !aid.active && aid.max_duration_ms == 72 * 3_600_000, "{aid:?}");
        assert_eq!(aid.access_points, ["nat-east", "nat-west"]);
        // lgwan, which has no aid, is as before.
        let lgwan = configs["office-a"].segments.iter().find(|s| s.segment == "lgwan").expect("lgwan");
        assert!(lgwan.aids.is_empty() && lgwan.tunnels.len() == 2);

        // The aiding pair: the segment in a table of its own, its members
        // as peers (reached on the aid's ports), the interconnect, no policy.
        for (ap, other, port) in [("nat-east", "nat-west", sa.aid_ports[0]), ("nat-west", "nat-east", sa.aid_ports[1])]
        {
            let seg = configs[ap].segments.iter().find(|s| s.segment == "pref-lan").expect("aided segment");
            assert_eq!(seg.domain.as_ref().map(|d| d.table), Some(sa.table));
            let members: Vec<&str> =
                seg.peers.iter().filter(|p| p.role() == PeerRole::Site).map(|p| p.name.as_str()).collect();
            assert_eq!(members, ["office-a", "office-b"], "{ap}");
            assert!(
                seg.peers
                    .iter()
                    .filter(|p| p.role() == PeerRole::Site)
                    .all(|p| p.endpoints.iter().all(|e| e.port == u32::from(port)))
            );
            assert!(seg.peers.iter().any(|p| p.name == other && p.role() == PeerRole::Interconnect), "{ap}");
            assert!(seg.policy.is_empty() && seg.imports.is_empty() && seg.attachment.is_none());
        }
        // The segment's own pair is unchanged by the aid.
        assert!(configs["loc-east"].segments.iter().all(|s| s.segment == "pref-lan"));
        assert!(crate::verify::isolation(&intent, &configs).is_empty());

        // An operator's activation: on the members' aid, and nowhere else.
        keys.entry(ACTIVATIONS.into()).or_default().insert("pref-via-national".into(), "1 drill".into());
        let active = compile(&intent, &alloc, &keys).expect("compile");
        for (name, config) in &active {
            let changed = config != &configs[name];
            assert_eq!(changed, name.starts_with("office-"), "{name}");
        }
        let office = active["office-b"].segments.iter().find(|s| s.segment == "pref-lan").expect("pref-lan");
        assert!(office.aids[0].active);
    }

    #[test]
    fn an_activation_reads_back_and_expires_at_its_time() {
        let a = Activation { until_unix_ms: 1_000, reason: "both local access points flooded".into() };
        assert_eq!(Activation::parse(&a.text()), Some(a.clone()));
        assert!(!a.expired(999) && a.expired(1_000));
        assert_eq!(Activation::parse("soon"), None);
        let mut keys = crate::compile::PublicKeys::new();
        keys.entry(ACTIVATIONS.into()).or_default().insert("pref-aid".into(), a.text());
        keys.entry(ACTIVATIONS.into()).or_default().insert("broken".into(), "x".into());
        assert_eq!(activations(&keys).keys().copied().collect::<Vec<_>>(), ["pref-aid"]);
    }
}
