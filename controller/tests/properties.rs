//! Properties of the pure core over randomly built intents: determinism,
//! sticky allocations, segment isolation, tenant independence and the
//! soundness of `affected_sites`.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use ipnetwork::IpNetwork;
use musubi_controller::store::apply::plan_between;
use musubi_controller::store::layout::Stored;
use musubi_core::allocate::{Allocations, allocate};
use musubi_core::compile::incremental::recompile;
use musubi_core::compile::{PublicKeys, compile};
use musubi_core::intent::export::to_yaml;
use musubi_core::intent::parse::parse_str;
use musubi_core::intent::source::SourceMap;
use musubi_core::intent::*;
use musubi_core::plan::{affected_sites, diff};
use musubi_core::validate::{validate, validate_change};
use musubi_proto::v1::SiteConfig;
use proptest::prelude::*;
use prost::Message;

/// splitmix64: the generator's choices come from the proptest-chosen seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

fn net(s: &str) -> IpNetwork {
    s.parse().expect("network")
}

fn line(name: &str, priority: u32, k: usize) -> Line {
    Line {
        name: name.into(),
        kind: if priority == 1 { LineKind::DarkFiber } else { LineKind::Mobile },
        priority,
        address: format!("198.18.{}.{}", k / 250, k % 250 + 1).parse().expect("addr"),
        probe: ProbeOverride::default(),
    }
}

/// A valid prefecture-like intent: tenant `t0` owns shared segments and the
/// two access points; every tenant has private segments that all reuse
/// 192.168.0.0/16 (legal: segments are isolated).
fn build(seed: u64, tenants: usize, shared: usize, private: usize, sites_per_tenant: usize) -> Intent {
    let mut rng = Rng(seed);
    let mut intent = Intent::default();
    let mut k = 0;
    for t in 0..tenants {
        let name = format!("t{t}");
        intent
            .tenants
            .insert(name.clone(), Arc::new(Tenant { name, national: false, description: format!("自治体{t}") }));
    }
    let all_tenants: Vec<String> = (1..tenants).map(|t| format!("t{t}")).collect();
    for s in 0..shared {
        let name = format!("sh{s}");
        intent.segments.insert(
            name.clone(),
            Arc::new(Segment {
                name,
                tenant: "t0".into(),
                prefixes: vec![net(&format!("10.{s}.0.0/16"))],
                shared_with: all_tenants.clone(),
                description: String::new(),
                aid: vec![],
            }),
        );
    }
    for t in 0..tenants {
        for p in 0..private {
            let name = format!("p{t}-{p}");
            intent.segments.insert(
                name.clone(),
                Arc::new(Segment {
                    name,
                    tenant: format!("t{t}"),
                    prefixes: vec![net("192.168.0.0/16")],
                    shared_with: vec![],
                    description: String::new(),
                    aid: vec![],
                }),
            );
        }
    }
    let segment_names: Vec<String> = intent.segments.keys().cloned().collect();
    for (region, name) in [(Region::East, "ap-e"), (Region::West, "ap-w")] {
        intent.sites.insert(
            name.into(),
            Arc::new(Site {
                name: name.into(),
                tenant: "t0".into(),
                role: Role::AccessPoint,
                region,
                lines: vec![line("fiber", 1, k), line("lte", 2, k + 1)],
                attachments: segment_names
                    .iter()
                    .map(|s| Attachment { segment: s.clone(), interface: None, prefixes: vec![], legacy: None })
                    .collect(),
                description: String::new(),
            }),
        );
        k += 2;
    }
    // Sometimes the east access point has a LAN of its own in `sh0`.
    if rng.coin() {
        let ap = Arc::make_mut(intent.sites.get_mut("ap-e").expect("ap"));
        let a = ap.attachments.iter_mut().find(|a| a.segment == "sh0").expect("sh0");
        a.interface = Some("lan0".into());
        a.prefixes = vec![net("10.0.250.0/24")];
    }
    let mut site_no = 0;
    for t in 0..tenants {
        for _ in 0..sites_per_tenant {
            add_site(&mut intent, &mut rng, t, site_no, &mut k);
            site_no += 1;
        }
    }
    // Sometimes the first member of each private segment is its migration
    // gateway to a legacy site (phased migration).
    if rng.coin() {
        add_legacy(&mut intent);
    }
    // Sometimes a second pair, carrying no segment of its own, aids the
    // first private segment (mutual aid: on its members and on the pair).
    if let Some(aided) = intent.segments.keys().find(|s| s.starts_with('p')).cloned()
        && rng.coin()
    {
        let nation = Tenant { name: "nation".into(), national: true, description: String::new() };
        intent.tenants.insert("nation".into(), Arc::new(nation));
        intent.segments.insert(
            "nat0".into(),
            Arc::new(Segment {
                name: "nat0".into(),
                tenant: "nation".into(),
                prefixes: vec![net("172.16.0.0/16")],
                ..Default::default()
            }),
        );
        for (region, name) in [(Region::East, "aid-e"), (Region::West, "aid-w")] {
            intent.sites.insert(
                name.into(),
                Arc::new(Site {
                    name: name.into(),
                    tenant: "nation".into(),
                    role: Role::AccessPoint,
                    region,
                    lines: vec![line("fiber", 1, k)],
                    attachments: vec![Attachment {
                        segment: "nat0".into(),
                        interface: None,
                        prefixes: vec![],
                        legacy: None,
                    }],
                    description: String::new(),
                }),
            );
            k += 1;
        }
        Arc::make_mut(intent.segments.get_mut(&aided).expect("segment")).aid = vec![Aid {
            name: "aid0".into(),
            access_points: vec!["aid-e".into(), "aid-w".into()],
            activation: if rng.coin() { Activation::Automatic } else { Activation::Manual },
            max_duration_s: 3600,
            description: String::new(),
        }];
    }
    if shared >= 2 && rng.coin() {
        intent.policies.insert(
            "pol0".into(),
            Arc::new(Policy {
                name: "pol0".into(),
                tenant: "t0".into(),
                from: "sh0".into(),
                to: "sh1".into(),
                protocol: Protocol::Tcp,
                ports: vec![NumRange::new(22, 22)],
                description: String::new(),
            }),
        );
    }
    intent
}

/// A legacy site per private segment, behind the segment's first member.
fn add_legacy(intent: &mut Intent) {
    let segments: Vec<String> = intent.segments.keys().filter(|s| s.starts_with('p')).cloned().collect();
    for seg in segments {
        let gateway = intent.sites.values().find(|s| !s.is_access_point() && s.attachment(&seg).is_some());
        let Some(gateway) = gateway.map(|g| g.name.clone()) else { continue };
        let site = Arc::make_mut(intent.sites.get_mut(&gateway).expect("gateway"));
        let i = site.attachments.iter().position(|a| a.segment == seg).expect("attached");
        site.attachments[i].legacy = Some(Legacy {
            interface: format!("old{i}"),
            via: "172.30.0.1".parse().expect("addr"),
            sites: vec![LegacySite {
                name: format!("old-{seg}"),
                prefixes: vec![net(LEGACY_PREFIX)],
                cutover_to: None,
            }],
        });
    }
}

/// Every legacy site's prefix (in its private segment, no site's).
const LEGACY_PREFIX: &str = "192.168.255.0/24";

/// One step of a cutover in tenant `t`: a legacy site gets its Musubi site
/// (`cutover_to`), or one being cut over loses its legacy entry.
fn cutover_step(intent: &mut Intent, rng: &mut Rng, t: usize) -> bool {
    let tenant = format!("t{t}");
    let gateways: Vec<(String, usize)> = intent
        .sites
        .values()
        .filter(|s| s.tenant == tenant)
        .flat_map(|s| {
            s.attachments.iter().enumerate().filter(|(_, a)| a.legacy.is_some()).map(|(i, _)| (s.name.clone(), i))
        })
        .collect();
    if gateways.is_empty() {
        return false;
    }
    let (gateway, i) = gateways[rng.below(gateways.len())].clone();
    let site = Arc::make_mut(intent.sites.get_mut(&gateway).expect("gateway"));
    let segment = site.attachments[i].segment.clone();
    let legacy = site.attachments[i].legacy.as_mut().expect("legacy");
    if legacy.sites[0].cutover_to.is_some() {
        // Complete: the entry goes.
        site.attachments[i].legacy = None;
        return true;
    }
    let start = rng.below(50);
    let Some(n) = (0..50).map(|i| 200 + (start + i) % 50).find(|n| !intent.sites.contains_key(&format!("c{n}"))) else {
        return false;
    };
    let name = format!("c{n}");
    let site = Arc::make_mut(intent.sites.get_mut(&gateway).expect("gateway"));
    let legacy = site.attachments[i].legacy.as_mut().expect("legacy");
    legacy.sites[0].cutover_to = Some(name.clone());
    intent.sites.insert(
        name.clone(),
        Arc::new(Site {
            name,
            tenant,
            role: Role::Site,
            region: if rng.coin() { Region::East } else { Region::West },
            lines: vec![line("fiber", 1, 55_000 + n * 2)],
            attachments: vec![Attachment {
                segment,
                interface: Some("lan0".into()),
                prefixes: vec![net(LEGACY_PREFIX)],
                legacy: None,
            }],
            description: String::new(),
        }),
    );
    true
}

fn add_site(intent: &mut Intent, rng: &mut Rng, tenant: usize, n: usize, k: &mut usize) {
    let tenant_name = format!("t{tenant}");
    let usable: Vec<String> =
        intent.segments.values().filter(|s| s.usable_by(&tenant_name)).map(|s| s.name.clone()).collect();
    let mut attachments = Vec::new();
    for (i, seg) in usable.iter().enumerate() {
        if rng.coin() || (i + 1 == usable.len() && attachments.is_empty()) {
            let prefix = if seg.starts_with("sh") {
                let base = intent.segments[seg].prefixes[0].ip().to_string();
                let octets: Vec<&str> = base.split('.').collect();
                format!("10.{}.{}.0/24", octets[1], n)
            } else {
                format!("192.168.{n}.0/24")
            };
            attachments.push(Attachment {
                segment: seg.clone(),
                interface: Some(format!("lan{i}")),
                prefixes: vec![net(&prefix)],
                legacy: None,
            });
        }
    }
    let name = format!("s{n}");
    let lines =
        if rng.coin() { vec![line("fiber", 1, *k)] } else { vec![line("fiber", 1, *k), line("lte", 2, *k + 1)] };
    *k += 2;
    intent.sites.insert(
        name.clone(),
        Arc::new(Site {
            name,
            tenant: tenant_name,
            role: Role::Site,
            region: if rng.coin() { Region::East } else { Region::West },
            lines,
            attachments,
            description: String::new(),
        }),
    );
}

fn valid(intent: &Intent) {
    let diags = validate(intent, &SourceMap::default());
    assert!(
        diags.is_empty(),
        "generated intent is invalid: {:#?}",
        diags.iter().map(ToString::to_string).collect::<Vec<_>>()
    );
}

fn compiled(intent: &Intent, alloc: &Allocations) -> BTreeMap<String, SiteConfig> {
    compile(intent, alloc, &PublicKeys::new()).expect("compile")
}

/// A change to one object of tenant `t` (never an access point).
fn mutate(intent: &mut Intent, rng: &mut Rng, t: usize) {
    let tenant = format!("t{t}");
    let own_sites: Vec<String> =
        intent.sites.values().filter(|s| s.tenant == tenant && !s.is_access_point()).map(|s| s.name.clone()).collect();
    if rng.below(5) == 0 && cutover_step(intent, rng, t) {
        return;
    }
    match rng.below(4) {
        0 => {
            // Underlay addresses follow from the site number, so they stay unique.
            let n = 200 + rng.below(50);
            let mut k = 50_000 + n * 2;
            add_site(intent, rng, t, n, &mut k);
        }
        1 if !own_sites.is_empty() => {
            let victim = &own_sites[rng.below(own_sites.len())];
            intent.sites.remove(victim);
            // A site being cut over to goes with its legacy entry's pointer.
            for site in intent.sites.values_mut() {
                if site.attachments.iter().any(|a| {
                    a.legacy.as_ref().is_some_and(|l| l.sites.iter().any(|l| l.cutover_to.as_ref() == Some(victim)))
                }) {
                    for a in &mut Arc::make_mut(site).attachments {
                        for l in a.legacy.iter_mut().flat_map(|l| l.sites.iter_mut()) {
                            if l.cutover_to.as_ref() == Some(victim) {
                                l.cutover_to = None;
                            }
                        }
                    }
                }
            }
        }
        2 if !own_sites.is_empty() => {
            let s = Arc::make_mut(intent.sites.get_mut(&own_sites[rng.below(own_sites.len())]).expect("site"));
            // The third octet is the site's number: no two sites collide.
            let n: usize = s.name[1..].parse().expect("s<number>");
            s.lines[0].address = format!("172.31.{n}.{}", 1 + rng.below(250)).parse().expect("addr");
        }
        _ => {
            let own_private: Vec<String> = intent
                .segments
                .values()
                .filter(|s| s.tenant == tenant && s.name.starts_with('p'))
                .map(|s| s.name.clone())
                .collect();
            if let Some(seg) = own_private.first() {
                Arc::make_mut(intent.segments.get_mut(seg).expect("seg")).description = "変更".into();
                Arc::make_mut(intent.segments.get_mut(seg).expect("seg")).prefixes = vec![net("192.168.0.0/15")];
            }
        }
    }
}

/// One change to a member site, often one that makes the intent invalid.
fn break_or_change_a_member(intent: &mut Intent, rng: &mut Rng) {
    let members: Vec<String> = intent.sites.values().filter(|s| !s.is_access_point()).map(|s| s.name.clone()).collect();
    let all: Vec<Arc<Site>> = intent.sites.values().cloned().collect();
    let other = &all[rng.below(all.len())];
    if members.is_empty() {
        return;
    }
    let name = members[rng.below(members.len())].clone();
    if rng.below(8) == 0 {
        intent.sites.remove(&name);
        return;
    }
    let mut site = (*intent.sites[&name]).clone();
    let new_name = format!("n{}", rng.below(1000));
    match rng.below(9) {
        // Another site's (or its own other) line address.
        0 => site.lines[0].address = other.lines[rng.below(other.lines.len())].address,
        // Another site's prefix in a segment both have, or a wide one.
        1 => {
            if let Some(a) = other.attachments.iter().find(|a| !a.prefixes.is_empty())
                && let Some(mine) = site.attachments.iter_mut().find(|m| m.segment == a.segment)
            {
                mine.prefixes = vec![a.prefixes[0]];
            } else if let Some(mine) = site.attachments.first_mut() {
                mine.prefixes = vec![net("10.0.0.0/8")];
            }
        }
        2 => site.attachments[0].interface = Some("bad/name".into()),
        3 => site.attachments[0].segment = "nowhere".into(),
        4 => site.tenant = "nobody".into(),
        5 => site.lines.push(Line { priority: 9, ..site.lines[0].clone() }),
        // A new site copying this one: every address and prefix clashes.
        6 => site.name.clone_from(&new_name),
        // Harmless: a fresh address, a new LAN interface, a description.
        7 => site.lines[0].address = format!("100.64.{}.{}", rng.below(250), 1 + rng.below(250)).parse().expect("addr"),
        _ => site.description = "変更".into(),
    }
    let key = site.name.clone();
    intent.sites.insert(key, Arc::new(site));
}

/// 64 cases by default; `PROPTEST_CASES=5000` for a longer hunt.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64)
}

fn intents() -> impl Strategy<Value = (u64, usize, usize, usize, usize)> {
    (any::<u64>(), 1usize..4, 1usize..4, 0usize..3, 1usize..5)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn compilation_is_deterministic((seed, t, sh, p, s) in intents()) {
        let intent = build(seed, t, sh, p, s);
        valid(&intent);
        let a1 = allocate(&intent, &Allocations::default()).expect("alloc");
        let a2 = allocate(&intent.clone(), &Allocations::default()).expect("alloc");
        prop_assert_eq!(&a1, &a2);
        let c1 = compiled(&intent, &a1);
        let c2 = compiled(&intent.clone(), &a2);
        for (site, cfg) in &c1 {
            prop_assert_eq!(cfg.encode_to_vec(), c2[site].encode_to_vec(), "site {}", site);
        }
    }

    #[test]
    fn allocations_survive_unrelated_changes((seed, t, sh, p, s) in intents(), steps in 1usize..6) {
        let mut intent = build(seed, t, sh, p, s);
        let mut alloc = allocate(&intent, &Allocations::default()).expect("alloc");
        let mut rng = Rng(seed ^ 0xA5A5);
        for _ in 0..steps {
            let before = alloc.clone();
            let who = rng.below(t);
            mutate(&mut intent, &mut rng, who);
            valid(&intent);
            alloc = allocate(&intent, &before).expect("alloc");
            for (name, a) in alloc.segments.iter() {
                if let Some(old) = before.segments.get(name) { prop_assert_eq!(a, old, "segment {} renumbered", name); }
            }
            for (name, a) in alloc.sites.iter() {
                if let Some(old) = before.sites.get(name) { prop_assert_eq!(a, old, "site {} renumbered", name); }
            }
            prop_assert_eq!(alloc.sites.len(), intent.sites.len());
            prop_assert_eq!(alloc.segments.len(), intent.segments.len());
            let tables: HashSet<u32> = alloc.segments.values().map(|a| a.table).collect();
            let ports: HashSet<u16> = alloc.segments.values().map(|a| a.port).collect();
            let tunnels: HashSet<_> = alloc.sites.values().map(|a| a.tunnel_ipv4).collect();
            prop_assert_eq!(tables.len(), alloc.segments.len(), "tables unique");
            prop_assert_eq!(ports.len(), alloc.segments.len(), "ports unique");
            prop_assert_eq!(tunnels.len(), alloc.sites.len(), "tunnel addresses unique");
        }
    }

    /// The everyday check of a few changed member sites, against a valid
    /// intent, finds a problem exactly when checking the whole intent does:
    /// changes that break the underlay (a line on another site's address),
    /// the address plan (a prefix on another site's, or covering it), names,
    /// references, or nothing at all.
    #[test]
    fn checking_a_change_agrees_with_checking_everything((seed, t, sh, p, s) in intents(), edits in 1usize..4) {
        let old = build(seed, t, sh, p, s);
        valid(&old);
        let mut new = old.clone();
        let mut rng = Rng(seed ^ 0x5EED);
        for _ in 0..edits {
            break_or_change_a_member(&mut new, &mut rng);
        }
        let empty = SourceMap::default();
        let full = validate(&new, &empty);
        let quick = validate_change(&old, &new, &empty);
        prop_assert_eq!(
            full.is_empty(),
            quick.is_empty(),
            "whole: {:#?}\nchange: {:#?}",
            full.iter().map(ToString::to_string).collect::<Vec<_>>(),
            quick.iter().map(ToString::to_string).collect::<Vec<_>>()
        );
    }

    /// An apply's plan — access points as slices holding only the changed
    /// members' entries when only member sites change — equals diffing
    /// every site's whole configuration before and after.
    #[test]
    fn planning_a_change_equals_diffing_whole_configurations((seed, t, sh, p, s) in intents(), steps in 1usize..4) {
        let old = build(seed, t, sh, p, s);
        let old_alloc = allocate(&old, &Allocations::default()).expect("alloc");
        let mut new = old.clone();
        let mut rng = Rng(seed ^ 0xC0FFEE);
        for _ in 0..steps {
            let who = rng.below(t);
            mutate(&mut new, &mut rng, who);
        }
        valid(&new);
        let alloc = allocate(&new, &old_alloc).expect("alloc");
        let stored = Stored { intent: old.clone(), allocations: old_alloc.clone(), ..Stored::default() };
        let plan = plan_between(&stored, &new, &alloc, &PublicKeys::new(), None).expect("plan").plan;
        let whole = diff(&compiled(&old, &old_alloc), &compiled(&new, &alloc));
        prop_assert_eq!(plan, whole);
    }

    #[test]
    fn sites_see_only_their_own_segments((seed, t, sh, p, s) in intents()) {
        let intent = build(seed, t, sh, p, s);
        let alloc = allocate(&intent, &Allocations::default()).expect("alloc");
        for (name, cfg) in compiled(&intent, &alloc) {
            let site = &intent.sites[&name];
            // An access point also holds the segments whose aid names it.
            let attached: BTreeSet<&str> =
                site.attachments.iter().map(|a| a.segment.as_str()).chain(intent.aided_by(&name)).collect();
            let aids = |seg: &str, peer: &str| intent.segments[seg].aid.iter().any(|a| a.access_points.iter().any(|p| p == peer));
            let mut tables = HashSet::new();
            let mut vrfs = HashSet::new();
            for seg in &cfg.segments {
                prop_assert!(attached.contains(seg.segment.as_str()), "{} holds unattached segment {}", name, seg.segment);
                let domain = seg.domain.as_ref().expect("domain");
                prop_assert!(tables.insert(domain.table), "{}: table {} shared by two segments", name, domain.table);
                prop_assert!(vrfs.insert(domain.vrf.clone()));
                // Every peer is a site attached to this very segment (or
                // an access point of its aid).
                for peer in &seg.peers {
                    let other = &intent.sites[&peer.name];
                    prop_assert!(other.attachment(&seg.segment).is_some() || aids(&seg.segment, &peer.name), "{}: peer {} is not in segment {}", name, peer.name, seg.segment);
                }
                // Routed prefixes belong to this segment or to one linked by a policy.
                let mut allowed: Vec<IpNetwork> = intent.segments[&seg.segment].prefixes.clone();
                for pol in intent.policies.values() {
                    if pol.from == seg.segment { allowed.extend(intent.segments[&pol.to].prefixes.iter().copied()); }
                    if pol.to == seg.segment { allowed.extend(intent.segments[&pol.from].prefixes.iter().copied()); }
                }
                for g in &seg.route_groups {
                    for pfx in &g.prefixes {
                        let pfx: IpNetwork = pfx.parse().expect("prefix");
                        prop_assert!(allowed.iter().any(|a| net_contains(a, &pfx)), "{}: route {} leaks into segment {}", name, pfx, seg.segment);
                    }
                    for c in &g.candidates {
                        prop_assert!(seg.peers.iter().any(|p| &p.name == c), "{}: candidate {} is not a peer", name, c);
                    }
                }
                if let Some(a) = &seg.attachment {
                    for pfx in &a.prefixes {
                        let pfx: IpNetwork = pfx.parse().expect("prefix");
                        prop_assert!(intent.segments[&seg.segment].prefixes.iter().any(|s| net_contains(s, &pfx)));
                    }
                }
                for rule in &seg.policy {
                    prop_assert_eq!(&rule.from_segment, &seg.segment);
                }
            }
        }
    }

    #[test]
    fn other_tenants_are_untouched_and_affected_sites_is_sound((seed, t, sh, p, s) in intents(), who in 0usize..4) {
        let old = build(seed, t, sh, p, s);
        let old_alloc = allocate(&old, &Allocations::default()).expect("alloc");
        let before = compiled(&old, &old_alloc);
        let mut new = old.clone();
        let who = who % t;
        mutate(&mut new, &mut Rng(seed.rotate_left(7)), who);
        valid(&new);
        let new_alloc = allocate(&new, &old_alloc).expect("alloc");
        let after = compiled(&new, &new_alloc);
        let affected = affected_sites(&old, &new);
        let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        for name in names {
            let differs = before.get(name) != after.get(name);
            if differs {
                prop_assert!(affected.contains(name), "site {} changed but affected_sites missed it", name);
            }
            let site = new.sites.get(name).or_else(|| old.sites.get(name)).expect("site");
            if differs && site.tenant != format!("t{who}") && !site.is_access_point() {
                prop_assert!(false, "a change by tenant t{} changed site {} of tenant {}", who, name, site.tenant);
            }
        }
    }

    #[test]
    fn incremental_recompile_equals_full_compile((seed, t, sh, p, s) in intents(), steps in 1usize..5, ap_change: bool) {
        let mut intent = build(seed, t, sh, p, s);
        let keys = PublicKeys::new();
        let mut alloc = allocate(&intent, &Allocations::default()).expect("alloc");
        let mut configs: BTreeMap<String, Arc<SiteConfig>> =
            compiled(&intent, &alloc).into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        let mut rng = Rng(seed ^ 0x5A5A);
        for step in 0..steps {
            let old = intent.clone();
            let before = configs.clone();
            let who = rng.below(t);
            mutate(&mut intent, &mut rng, who);
            if ap_change && step == 0 {
                // An access point change takes the general path.
                Arc::make_mut(intent.sites.get_mut("ap-e").expect("ap")).lines[0].priority = 7;
            }
            alloc = allocate(&intent, &alloc).expect("alloc");
            let touched = recompile(&old, &intent, &alloc, &keys, &mut configs).expect("recompile");
            let full = compiled(&intent, &alloc);
            prop_assert_eq!(configs.len(), full.len());
            for (name, cfg) in &full {
                prop_assert_eq!(&**configs.get(name).expect("site compiled"), cfg, "site {} differs from a full compile", name);
            }
            let names: BTreeSet<&String> = before.keys().chain(full.keys()).collect();
            for name in names {
                let differs = before.get(name).map(|c| &**c) != full.get(name);
                prop_assert_eq!(differs, touched.contains(name), "site {}: changed={} reported={}", name, differs, touched.contains(name));
            }
        }
    }

    #[test]
    fn export_reads_back_as_the_same_intent((seed, t, sh, p, s) in intents(), interval in proptest::option::of(10u32..5000)) {
        let mut intent = build(seed, t, sh, p, s);
        // Partial probe overrides, on a line and on a line kind.
        let first = intent.sites.keys().find(|n| n.starts_with('s')).expect("a site").clone();
        Arc::make_mut(intent.sites.get_mut(&first).expect("site")).lines[0].probe = ProbeOverride { interval_ms: interval, multiplier: None };
        intent.settings.line_kind_probe.insert(LineKind::Satellite, ProbeOverride { interval_ms: None, multiplier: Some(5) });
        let text = to_yaml(&intent).expect("export");
        let parsed = parse_str("export.yaml", &text);
        prop_assert!(parsed.diagnostics.is_empty(), "{:?}\n{}", parsed.diagnostics, text);
        prop_assert_eq!(parsed.intent, intent);
    }
}

/// Enough sites that compiling them all runs on several threads: the
/// result is the one site-by-site compilation gives, and an incremental
/// recompile of a change that reaches every site agrees with both.
#[test]
fn compiling_on_every_core_equals_compiling_one_site_at_a_time() {
    let parsed = parse_str("generated.yaml", &musubi_core::generate::generate(600, 3));
    assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
    let intent = parsed.intent;
    let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
    let keys = PublicKeys::new();
    let all = compile(&intent, &alloc, &keys).expect("compile");
    let index = musubi_core::compile::Index::new(&intent, &alloc, &keys);
    assert_eq!(all.len(), intent.sites.len());
    for (name, config) in &all {
        assert_eq!(*config, index.site(name).expect("site"), "{name}");
    }

    let mut changed = intent.clone();
    changed.settings.probe.interval_ms += 10;
    let mut configs: BTreeMap<String, Arc<SiteConfig>> = all.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    let out = recompile(&intent, &changed, &alloc, &keys, &mut configs).expect("recompile");
    assert_eq!(out.len(), intent.sites.len(), "a probe interval reaches every site");
    let fresh = compile(&changed, &alloc, &keys).expect("compile");
    for (name, config) in &fresh {
        assert_eq!(**configs.get(name).expect("kept"), *config, "{name}");
    }
}

/// Every site's keys, one per attached segment, named after both.
fn keys_of(intent: &Intent) -> PublicKeys {
    intent
        .sites
        .values()
        .map(|s| {
            (
                s.name.clone(),
                s.attachments.iter().map(|a| (a.segment.clone(), format!("{}/{}", s.name, a.segment))).collect(),
            )
        })
        .collect()
}

/// A key rotation as the public keys record it: a member's and an access
/// point's next keys appear beside their keys on every peer that holds
/// them (and nowhere else), each site's own phase in its configuration;
/// the incremental rekey of those entries gives what compiling everything
/// does, at every phase.
#[test]
fn a_rotations_next_keys_reach_exactly_the_peers_and_rekeying_them_equals_compiling() {
    use musubi_core::compile::incremental::rekey;
    use musubi_core::rotation::{NEXT, ROTATION, SINCE, next_entry};
    let parsed = parse_str("generated.yaml", &musubi_core::generate::generate(60, 3));
    assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
    let intent = parsed.intent;
    let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
    let before = keys_of(&intent);
    let member = intent.sites.values().find(|s| !s.is_access_point()).expect("a member").name.clone();
    let ap = intent.sites.values().find(|s| s.is_access_point()).expect("an access point").name.clone();
    let mut configs: BTreeMap<String, Arc<SiteConfig>> =
        compile(&intent, &alloc, &before).expect("compile").into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    let mut keys = before.clone();
    let mut changed = BTreeSet::new();
    for site in [&member, &ap] {
        let segments: Vec<String> = intent.sites[site].attachments.iter().map(|a| a.segment.clone()).collect();
        let k = keys.get_mut(site).expect("keys");
        for seg in &segments {
            k.insert(next_entry(seg), format!("{site}/{seg}/next"));
            changed.insert((site.clone(), next_entry(seg)));
        }
        k.insert(ROTATION.into(), "42 prepare".into());
        k.insert(SINCE.into(), "1".into());
        changed.insert((site.clone(), ROTATION.to_string()));
        changed.insert((site.clone(), SINCE.to_string()));
    }
    let touched = rekey(&intent, &alloc, &keys, &changed, &mut configs, &mut |_| None).expect("rekey");
    let fresh = compile(&intent, &alloc, &keys).expect("compile");
    for (name, config) in &fresh {
        assert_eq!(**configs.get(name).expect("kept"), *config, "{name}");
        let holds_next = config.segments.iter().flat_map(|s| &s.peers).filter(|p| !p.next_public_key.is_empty());
        for p in holds_next {
            assert!(p.name == member || p.name == ap, "{name} holds a next key of {}", p.name);
            assert!(p.next_public_key.starts_with(&p.name) && p.next_public_key.ends_with("/next"));
        }
        let rotating = config.key_rotation.as_ref().map(|r| (r.id, r.phase()));
        let expect = (name == &member || name == &ap).then_some((42, musubi_proto::v1::KeyPhase::Prepare));
        assert_eq!(rotating, expect, "{name}");
    }
    let peers_of = |site: &str| {
        fresh.values().filter(|c| c.segments.iter().any(|s| s.peers.iter().any(|p| p.name == site))).count()
    };
    assert!(peers_of(&ap) > 10, "an access point's next key reaches every member");
    assert!(touched.contains(&member) && touched.contains(&ap) && touched.len() >= peers_of(&ap));
    // The switch: only the rotation's entry changes, naming the instant;
    // every peer holding a next key is told the instant, and so is the site.
    let mut switching = keys.clone();
    let mut changed = BTreeSet::new();
    for site in [&member, &ap] {
        switching.get_mut(site).expect("keys").insert(ROTATION.into(), "42 switch 5000".into());
        changed.insert((site.clone(), ROTATION.to_string()));
    }
    rekey(&intent, &alloc, &switching, &changed, &mut configs, &mut |_| None).expect("rekey");
    let fresh = compile(&intent, &alloc, &switching).expect("compile");
    for (name, config) in &fresh {
        assert_eq!(**configs.get(name).expect("kept"), *config, "{name}");
        for p in config.segments.iter().flat_map(|s| &s.peers) {
            let expect = if p.next_public_key.is_empty() { 0 } else { 5000 };
            assert_eq!(p.switch_at_unix_ms, expect, "{name}: peer {}", p.name);
        }
        if name == &member || name == &ap {
            let r = config.key_rotation.as_ref().expect("rotation");
            assert_eq!((r.phase(), r.switch_at_unix_ms), (musubi_proto::v1::KeyPhase::Switch, 5000), "{name}");
        }
    }
    assert!(
        fresh[&member].segments.iter().flat_map(|s| &s.peers).any(|p| p.name == ap && p.switch_at_unix_ms == 5000),
        "a member is told its access point's instant"
    );
    // Done: the next keys become the keys, the entries go.
    let mut switched = switching.clone();
    let mut changed = BTreeSet::new();
    for site in [&member, &ap] {
        let k = switched.get_mut(site).expect("keys");
        let next: Vec<(String, String)> =
            k.iter().filter(|(e, _)| e.starts_with(NEXT)).map(|(e, v)| (e.clone(), v.clone())).collect();
        for (entry, key) in next {
            let seg = entry[NEXT.len()..].to_string();
            k.remove(&entry);
            k.insert(seg.clone(), key);
            changed.insert((site.clone(), seg));
            changed.insert((site.clone(), entry));
        }
        k.remove(ROTATION);
        changed.insert((site.clone(), ROTATION.to_string()));
    }
    rekey(&intent, &alloc, &switched, &changed, &mut configs, &mut |_| None).expect("rekey");
    let fresh = compile(&intent, &alloc, &switched).expect("compile");
    for (name, config) in &fresh {
        assert_eq!(**configs.get(name).expect("kept"), *config, "{name}");
        assert!(
            config
                .segments
                .iter()
                .flat_map(|s| &s.peers)
                .all(|p| p.next_public_key.is_empty() && p.switch_at_unix_ms == 0),
            "{name}"
        );
        assert!(config.key_rotation.is_none(), "{name}");
    }
}

/// The generator's cutover is a valid one at each step (legacy, being cut
/// over, on Musubi), and the access points route the legacy prefix to the
/// gateway until the cutover completes, then to the new site.
#[test]
fn a_generated_cutover_is_valid_at_every_step() {
    let legacy = LEGACY_PREFIX.to_string();
    // The route groups of `segment` at the east access point holding the prefix.
    let routed_to = |intent: &Intent, segment: &str| -> Vec<String> {
        let alloc = allocate(intent, &Allocations::default()).expect("alloc");
        let configs = compiled(intent, &alloc);
        configs["ap-e"]
            .segments
            .iter()
            .filter(|s| s.segment == segment)
            .flat_map(|s| s.route_groups.iter())
            .filter(|g| g.prefixes.contains(&legacy))
            .map(|g| g.name.clone())
            .collect()
    };
    let mut completed = 0;
    for seed in 0..40u64 {
        let mut intent = build(seed, 2, 1, 1, 3);
        add_legacy(&mut intent);
        valid(&intent);
        let mut rng = Rng(seed);
        // Tenant t0's gateway and segment, if it has one.
        let Some((gateway, segment)) = intent.sites.values().filter(|s| s.tenant == "t0").find_map(|s| {
            s.attachments.iter().find(|a| a.legacy.is_some()).map(|a| (s.name.clone(), a.segment.clone()))
        }) else {
            continue;
        };
        assert_eq!(routed_to(&intent, &segment), std::slice::from_ref(&gateway), "legacy");
        assert!(cutover_step(&mut intent, &mut rng, 0));
        valid(&intent);
        let new = intent.sites.keys().find(|n| n.starts_with('c')).cloned().expect("the new site");
        assert_eq!(routed_to(&intent, &segment), std::slice::from_ref(&gateway), "cutting over to {new}");
        assert!(cutover_step(&mut intent, &mut rng, 0));
        valid(&intent);
        assert_eq!(routed_to(&intent, &segment), [new], "cut over");
        completed += 1;
    }
    assert!(completed >= 10, "the generator cut over too rarely: {completed}");
}
