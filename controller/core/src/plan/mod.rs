//! Plans: what changes on each site between two compilations, as data.
//! "No change" is an empty plan. [`render`] prints it for people.

pub mod affected;
mod render;

pub use affected::affected_sites;
pub use render::render;

use std::collections::BTreeMap;

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::sorted::{Side, merge};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Remove,
    Change,
}

impl Action {
    pub fn sign(self) -> char {
        match self {
            Action::Add => '+',
            Action::Remove => '-',
            Action::Change => '~',
        }
    }
}

/// One added, removed or changed thing, with what changed inside it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    pub action: Action,
    /// `site`, `segment`, `peer`, `route group`, `policy`, `import`, `lines`…
    pub kind: &'static str,
    pub name: String,
    /// `field: old → new` lines for changed leaves.
    pub details: Vec<String>,
    pub children: Vec<Change>,
}

impl Change {
    fn new(action: Action, kind: &'static str, name: impl Into<String>) -> Self {
        Change { action, kind, name: name.into(), details: Vec::new(), children: Vec::new() }
    }
}

/// Per-site changes, sorted by site name; empty when nothing changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Plan {
    pub sites: Vec<Change>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Names of the sites that must receive a new configuration (or be torn down).
    pub fn affected(&self) -> Vec<&str> {
        self.sites.iter().map(|c| c.name.as_str()).collect()
    }

    pub fn count(&self, action: Action) -> usize {
        self.sites.iter().filter(|c| c.action == action).count()
    }
}

/// The plan that takes every site from `old` to `new`.
pub fn diff(old: &BTreeMap<String, SiteConfig>, new: &BTreeMap<String, SiteConfig>) -> Plan {
    let sides: Vec<_> = merge(old, new).collect();
    // A change of settings reaches every site: 10,000 diffs, on every core.
    let sites = crate::par::map(&sides, |side| match side {
        Side::Right(name, n) => {
            let mut c = Change::new(Action::Add, "site", (*name).clone());
            c.children = n.segments.iter().map(added_segment).collect();
            Some(c)
        }
        Side::Left(name, o) => {
            let mut c = Change::new(Action::Remove, "site", (*name).clone());
            c.children = o.segments.iter().map(|s| Change::new(Action::Remove, "segment", s.segment.clone())).collect();
            Some(c)
        }
        Side::Both(_, o, n) if o != n => Some(diff_site(o, n)),
        Side::Both(..) => None,
    });
    Plan { sites: sites.into_iter().flatten().collect() }
}

/// A WireGuard interface as a plan shows it.
fn tunnel(w: &pb::WireguardInterface) -> String {
    format!("{} port {} [{}]", w.name, w.listen_port, w.addresses.join(", "))
}

/// A new segment, with what it will be given.
fn added_segment(s: &pb::SegmentConfig) -> Change {
    let mut c = Change::new(Action::Add, "segment", s.segment.clone());
    if let Some(d) = &s.domain {
        c.details.push(format!("{} table {}", d.vrf, d.table));
    }
    for w in &s.tunnels {
        c.details.push(tunnel(w));
    }
    if let Some(l) = &s.legacy {
        c.details.push(format!("legacy network {}", legacy(l)));
    }
    for a in &s.aids {
        c.details.push(format!("mutual aid {}", aid(a)));
    }
    c.details.push(format!(
        "{}, {}, {}",
        crate::words::count(s.peers.len(), "peer"),
        crate::words::count(s.route_groups.len(), "route group"),
        crate::words::count(s.policy.len(), "policy rule")
    ));
    c
}

fn legacy(l: &pb::LegacyNetwork) -> String {
    format!("{} via {} [{}]", l.interface, l.via, l.prefixes.join(", "))
}

fn aid(a: &pb::AidConfig) -> String {
    format!(
        "{} through {} ({}{})",
        a.name,
        a.access_points.join(" and "),
        if a.automatic { "automatic" } else { "manual" },
        if a.active { ", activated" } else { "" }
    )
}

fn field<T: PartialEq + std::fmt::Debug>(
    details: &mut Vec<String>,
    name: &str,
    old: &T,
    new: &T,
    show: impl Fn(&T) -> String,
) {
    if old != new {
        details.push(format!("{name}: {} → {}", show(old), show(new)));
    }
}

/// A changed list as its removed and added items (or its new order).
fn list_field(details: &mut Vec<String>, name: &str, old: &[String], new: &[String]) {
    if old == new {
        return;
    }
    let removed: Vec<&String> = old.iter().filter(|x| !new.contains(x)).collect();
    let added: Vec<&String> = new.iter().filter(|x| !old.contains(x)).collect();
    if removed.is_empty() && added.is_empty() {
        details.push(format!("{name} order: {} → {}", list(old), list(new)));
        return;
    }
    let mut parts: Vec<String> = removed.iter().map(|x| format!("-{x}")).collect();
    parts.extend(added.iter().map(|x| format!("+{x}")));
    details.push(format!("{name}: {}", parts.join(" ")));
}

fn list(v: &[String]) -> String {
    if v.is_empty() { "(none)".into() } else { v.join(", ") }
}

fn diff_site(o: &SiteConfig, n: &SiteConfig) -> Change {
    let mut c = Change::new(Action::Change, "site", n.site.clone());
    field(&mut c.details, "tenant", &o.tenant, &n.tenant, Clone::clone);
    field(&mut c.details, "role", &o.role(), &n.role(), |r| format!("{r:?}").to_lowercase());
    field(&mut c.details, "region", &o.region(), &n.region(), |r| format!("{r:?}").to_lowercase());
    field(&mut c.details, "probe", &o.probe, &n.probe, |p| probe(p.as_ref()));
    c.children.extend(diff_named(
        &o.lines,
        &n.lines,
        "line",
        |l| &l.name,
        |a, b| {
            let mut d = Vec::new();
            field(&mut d, "kind", &a.kind(), &b.kind(), |k| format!("{k:?}"));
            field(&mut d, "priority", &a.priority, &b.priority, ToString::to_string);
            field(&mut d, "address", &a.address, &b.address, Clone::clone);
            field(&mut d, "probe", &a.probe, &b.probe, |p| probe(p.as_ref()));
            (d, Vec::new())
        },
    ));
    c.children.extend(diff_named_with(
        &o.segments,
        &n.segments,
        "segment",
        |s| &s.segment,
        diff_segment,
        |s| added_segment(s).details,
    ));
    c
}

fn probe(p: Option<&pb::ProbeSettings>) -> String {
    p.map_or("(none)".into(), |p| format!("{} ms × {}", p.interval_ms, p.multiplier))
}

fn diff_segment(o: &pb::SegmentConfig, n: &pb::SegmentConfig) -> (Vec<String>, Vec<Change>) {
    let mut d = Vec::new();
    field(&mut d, "owner", &o.owner, &n.owner, Clone::clone);
    field(&mut d, "routing domain", &o.domain, &n.domain, |x| {
        x.as_ref().map_or("(none)".into(), |x| format!("{} table {}", x.vrf, x.table))
    });
    field(&mut d, "tunnels", &o.tunnels, &n.tunnels, |x| {
        if x.is_empty() { "(none)".into() } else { x.iter().map(tunnel).collect::<Vec<_>>().join("; ") }
    });
    field(&mut d, "attachment", &o.attachment, &n.attachment, |x| {
        x.as_ref().map_or("(none)".into(), |x| format!("{} [{}]", x.interface, x.prefixes.join(", ")))
    });
    match (&o.legacy, &n.legacy) {
        (Some(a), Some(b)) if a.interface == b.interface && a.via == b.via => {
            list_field(
                &mut d,
                &format!("legacy network on {} via {}: prefixes", b.interface, b.via),
                &a.prefixes,
                &b.prefixes,
            );
        }
        _ => field(&mut d, "legacy network", &o.legacy, &n.legacy, |x| x.as_ref().map_or("(none)".into(), legacy)),
    }
    field(&mut d, "mutual aid", &o.aids, &n.aids, |x| {
        if x.is_empty() { "(none)".into() } else { x.iter().map(aid).collect::<Vec<_>>().join("; ") }
    });
    let mut children = diff_named(
        &o.peers,
        &n.peers,
        "peer",
        |p| &p.name,
        |a, b| {
            let mut d = Vec::new();
            field(&mut d, "role", &a.role(), &b.role(), |r| format!("{r:?}").to_lowercase());
            field(&mut d, "public key", &a.public_key, &b.public_key, |k| {
                if k.is_empty() { "(not yet known)".into() } else { k.clone() }
            });
            // Written out only when they differ: a change of the probe
            // timing alone reaches every peer of every site.
            fn place(e: &pb::Endpoint) -> (&str, &str, u32) {
                (&e.local_line, &e.address, e.port)
            }
            if a.endpoints.iter().map(place).ne(b.endpoints.iter().map(place)) {
                let endpoints = |p: &pb::Peer| -> Vec<String> {
                    p.endpoints.iter().map(|e| format!("{}→{}:{}", e.local_line, e.address, e.port)).collect()
                };
                list_field(&mut d, "endpoints", &endpoints(a), &endpoints(b));
            }
            if a.endpoints.iter().map(|e| &e.probe).ne(b.endpoints.iter().map(|e| &e.probe)) {
                d.push("endpoint probe timing changed".into());
            }
            list_field(&mut d, "allowed prefixes", &a.allowed_prefixes, &b.allowed_prefixes);
            (d, Vec::new())
        },
    );
    children.extend(diff_named(
        &o.route_groups,
        &n.route_groups,
        "route group",
        |g| &g.name,
        |a, b| {
            let mut d = Vec::new();
            list_field(&mut d, "prefixes", &a.prefixes, &b.prefixes);
            list_field(&mut d, "candidates", &a.candidates, &b.candidates);
            (d, Vec::new())
        },
    ));
    children.extend(diff_named(
        &o.policy,
        &n.policy,
        "policy",
        |p| &p.name,
        |a, b| {
            let mut d = Vec::new();
            field(&mut d, "to", &a.to_segment, &b.to_segment, Clone::clone);
            list_field(&mut d, "from prefixes", &a.from_prefixes, &b.from_prefixes);
            list_field(&mut d, "to prefixes", &a.to_prefixes, &b.to_prefixes);
            field(&mut d, "protocol", &a.protocol(), &b.protocol(), |p| format!("{p:?}").to_lowercase());
            field(&mut d, "ports", &a.ports, &b.ports, |v| {
                list(
                    &v.iter()
                        .map(
                            |r| {
                                if r.first == r.last { r.first.to_string() } else { format!("{}-{}", r.first, r.last) }
                            },
                        )
                        .collect::<Vec<_>>(),
                )
            });
            (d, Vec::new())
        },
    ));
    children.extend(diff_named(
        &o.imports,
        &n.imports,
        "import",
        |i| &i.segment,
        |a, b| {
            let mut d = Vec::new();
            field(&mut d, "table", &a.table, &b.table, ToString::to_string);
            list_field(&mut d, "prefixes", &a.prefixes, &b.prefixes);
            (d, Vec::new())
        },
    ));
    (d, children)
}

/// Added, removed and changed items of two lists keyed by name.
fn diff_named<T: PartialEq>(
    old: &[T],
    new: &[T],
    kind: &'static str,
    name: impl Fn(&T) -> &String,
    inner: impl Fn(&T, &T) -> (Vec<String>, Vec<Change>),
) -> Vec<Change> {
    diff_named_with(old, new, kind, name, inner, |_| Vec::new())
}

/// [`diff_named`], describing added items with `added`.
fn diff_named_with<T: PartialEq>(
    old: &[T],
    new: &[T],
    kind: &'static str,
    name: impl Fn(&T) -> &String,
    inner: impl Fn(&T, &T) -> (Vec<String>, Vec<Change>),
    added: impl Fn(&T) -> Vec<String>,
) -> Vec<Change> {
    let one = |n: &String, o: Option<&T>, x: Option<&T>| match (o, x) {
        (None, Some(x)) => {
            let mut c = Change::new(Action::Add, kind, n.clone());
            c.details = added(x);
            Some(c)
        }
        (Some(_), None) => Some(Change::new(Action::Remove, kind, n.clone())),
        (Some(a), Some(b)) if a != b => {
            let mut c = Change::new(Action::Change, kind, n.clone());
            (c.details, c.children) = inner(a, b);
            if c.details.is_empty() && c.children.is_empty() {
                c.details.push("order changed".into());
            }
            Some(c)
        }
        _ => None,
    };
    let mut out = Vec::new();
    // Compiled lists come sorted by name: walked side by side, without
    // indexing either (an access point's segment holds 2,000 peers).
    let sorted = |v: &[T]| v.windows(2).all(|w| name(&w[0]) < name(&w[1]));
    if sorted(old) && sorted(new) {
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            let order = match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) => name(a).cmp(name(b)),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            out.extend(match order {
                std::cmp::Ordering::Less => {
                    i += 1;
                    one(name(&old[i - 1]), Some(&old[i - 1]), None)
                }
                std::cmp::Ordering::Greater => {
                    j += 1;
                    one(name(&new[j - 1]), None, Some(&new[j - 1]))
                }
                std::cmp::Ordering::Equal => {
                    (i, j) = (i + 1, j + 1);
                    one(name(&new[j - 1]), Some(&old[i - 1]), Some(&new[j - 1]))
                }
            });
        }
        return out;
    }
    let old_by: BTreeMap<&String, &T> = old.iter().map(|x| (name(x), x)).collect();
    let new_by: BTreeMap<&String, &T> = new.iter().map(|x| (name(x), x)).collect();
    let names: std::collections::BTreeSet<&&String> = old_by.keys().chain(new_by.keys()).collect();
    for n in names {
        out.extend(one(n, old_by.get(*n).copied(), new_by.get(*n).copied()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway(legacy: Option<pb::LegacyNetwork>, aids: Vec<pb::AidConfig>) -> BTreeMap<String, SiteConfig> {
        let segment = pb::SegmentConfig { segment: "office".into(), legacy, aids, ..Default::default() };
        BTreeMap::from([(
            "hq".to_string(),
            SiteConfig { site: "hq".into(), segments: vec![segment], ..Default::default() },
        )])
    }

    fn details(plan: &Plan) -> Vec<String> {
        plan.sites.iter().flat_map(|s| &s.children).flat_map(|c| c.details.clone()).collect()
    }

    /// A change of a migration gateway's legacy network or of a segment's
    /// mutual aid says what changed (it read "order changed").
    #[test]
    fn legacy_networks_and_aids_are_shown() {
        let old_net = pb::LegacyNetwork {
            interface: "eth4".into(),
            via: "172.16.9.1".into(),
            prefixes: vec!["10.10.9.0/24".into()],
        };
        let more =
            pb::LegacyNetwork { prefixes: vec!["10.10.9.0/24".into(), "10.10.8.0/24".into()], ..old_net.clone() };
        let plan = diff(&gateway(Some(old_net.clone()), vec![]), &gateway(Some(more), vec![]));
        assert_eq!(details(&plan), ["legacy network on eth4 via 172.16.9.1: prefixes: +10.10.8.0/24"]);
        let plan = diff(&gateway(Some(old_net.clone()), vec![]), &gateway(None, vec![]));
        assert_eq!(details(&plan), ["legacy network: eth4 via 172.16.9.1 [10.10.9.0/24] → (none)"]);
        let aid = pb::AidConfig {
            name: "via-national".into(),
            access_points: vec!["nat-east".into(), "nat-west".into()],
            automatic: false,
            active: true,
            max_duration_ms: 3_600_000,
        };
        let plan = diff(&gateway(None, vec![]), &gateway(None, vec![aid]));
        assert_eq!(
            details(&plan),
            ["mutual aid: (none) → via-national through nat-east and nat-west (manual, activated)"]
        );
    }

    fn hub(peers: Vec<pb::Peer>) -> BTreeMap<String, SiteConfig> {
        let segment = pb::SegmentConfig { segment: "office".into(), peers, ..Default::default() };
        BTreeMap::from([(
            "ap-east".to_string(),
            SiteConfig { site: "ap-east".into(), segments: vec![segment], ..Default::default() },
        )])
    }

    fn peer(name: &str, address: &str, interval_ms: u32) -> pb::Peer {
        pb::Peer {
            name: name.into(),
            endpoints: vec![pb::Endpoint {
                local_line: "fiber".into(),
                address: address.into(),
                port: 51820,
                probe: Some(pb::ProbeSettings { interval_ms, multiplier: 3 }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// Peers compiled in name order are walked side by side, others looked
    /// up by name: the same plan either way, in name order.
    #[test]
    fn peers_in_any_order_make_one_plan() {
        let old = vec![peer("a", "192.0.2.1", 1000), peer("b", "192.0.2.2", 1000), peer("c", "192.0.2.3", 1000)];
        let new = vec![peer("b", "192.0.2.2", 1000), peer("c", "192.0.2.9", 1000), peer("d", "192.0.2.4", 1000)];
        let sorted = diff(&hub(old.clone()), &hub(new.clone()));
        let shuffled =
            diff(&hub(old.iter().rev().cloned().collect()), &hub(vec![new[2].clone(), new[0].clone(), new[1].clone()]));
        let peers = |plan: &Plan| -> Vec<(Action, String, Vec<String>)> {
            plan.sites[0].children[0].children.iter().map(|c| (c.action, c.name.clone(), c.details.clone())).collect()
        };
        let expected = vec![
            (Action::Remove, "a".to_string(), vec![]),
            (
                Action::Change,
                "c".to_string(),
                vec!["endpoints: -fiber→192.0.2.3:51820 +fiber→192.0.2.9:51820".to_string()],
            ),
            (Action::Add, "d".to_string(), vec![]),
        ];
        assert_eq!(peers(&sorted), expected);
        assert_eq!(peers(&shuffled), expected);
        // The probe timing alone: no endpoint written out.
        let slower = diff(&hub(vec![peer("a", "192.0.2.1", 1000)]), &hub(vec![peer("a", "192.0.2.1", 1500)]));
        assert_eq!(details(&slower), Vec::<String>::new());
        assert_eq!(slower.sites[0].children[0].children[0].details, ["endpoint probe timing changed"]);
    }
}
