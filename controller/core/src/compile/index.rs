//! Lookups that compilation needs, built once per intent: each segment's
//! access points and policies now, its member sites on first use (only
//! access points need them, and an incremental recompile of a member site
//! should not pay for indexing 10,000 sites).

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use super::PublicKeys;
use crate::allocate::Allocations;
use crate::intent::{Aid, Intent, Policy, Region, Site};

/// A site's addresses as configurations write them.
#[derive(Debug)]
pub(super) struct SiteText {
    /// Its tunnel addresses as host prefixes (`/32`, `/128`).
    pub host: Vec<String>,
    /// Its lines' underlay addresses, in the order of its lines.
    pub lines: Vec<String>,
}

/// A mutual aid with its aiding pair: (aid, east, west).
pub type AidPair<'a> = (&'a Aid, Option<&'a Site>, Option<&'a Site>);

#[derive(Debug)]
pub struct Index<'a> {
    pub(super) intent: &'a Intent,
    pub(super) alloc: &'a Allocations,
    pub(super) keys: &'a PublicKeys,
    east: HashMap<&'a str, &'a Site>,
    west: HashMap<&'a str, &'a Site>,
    members: OnceLock<HashMap<&'a str, Vec<&'a str>>>,
    /// Each site's addresses written out once, when many sites are
    /// compiled together (see [`Index::write_out_addresses`]).
    text: OnceLock<HashMap<&'a str, SiteText>>,
    policies: HashMap<&'a str, Vec<&'a Policy>>,
    /// Each segment's mutual aids.
    aids: HashMap<&'a str, Vec<AidPair<'a>>>,
    /// The segments each access point aids (carries without being attached).
    aiding: HashMap<&'a str, Vec<&'a str>>,
    /// Prefixes of sites being cut over from the old network: (site,
    /// segment) → the prefixes that still go through the gateway.
    cutting_over: HashMap<&'a str, HashMap<&'a str, Vec<&'a ipnetwork::IpNetwork>>>,
}

impl<'a> Index<'a> {
    pub fn new(intent: &'a Intent, alloc: &'a Allocations, keys: &'a PublicKeys) -> Self {
        let mut ix = Index {
            intent,
            alloc,
            keys,
            east: HashMap::new(),
            west: HashMap::new(),
            members: OnceLock::new(),
            text: OnceLock::new(),
            policies: HashMap::new(),
            aids: HashMap::new(),
            aiding: HashMap::new(),
            cutting_over: HashMap::new(),
        };
        // Access points and migration gateways, without reading every
        // site's attachments (see `notable`).
        let notable = crate::intent::notable::notable(intent);
        for (site, _) in notable.iter().filter(|(_, t)| t.gateway) {
            for a in &site.attachments {
                for l in a.legacy.iter().flat_map(|l| &l.sites) {
                    if let Some(to) = &l.cutover_to {
                        let by_segment = ix.cutting_over.entry(to.as_str()).or_default();
                        by_segment.entry(a.segment.as_str()).or_default().extend(&l.prefixes);
                    }
                }
            }
        }
        for seg in intent.segments.values().filter(|s| !s.aid.is_empty()) {
            for aid in &seg.aid {
                let aps: Vec<&Site> =
                    aid.access_points.iter().filter_map(|n| intent.sites.get(n)).map(|s| &**s).collect();
                let region = |r: Region| aps.iter().copied().find(|s| s.is_access_point() && s.region == r);
                let (east, west) = (region(Region::East), region(Region::West));
                for ap in [east, west].into_iter().flatten() {
                    let aided = ix.aiding.entry(ap.name.as_str()).or_default();
                    if !aided.contains(&seg.name.as_str()) && ap.attachment(&seg.name).is_none() {
                        aided.push(seg.name.as_str());
                    }
                }
                ix.aids.entry(seg.name.as_str()).or_default().push((aid, east, west));
            }
        }
        for (site, _) in notable.iter().filter(|(_, t)| t.access_point) {
            let map = if site.region == Region::East { &mut ix.east } else { &mut ix.west };
            for a in &site.attachments {
                map.entry(a.segment.as_str()).or_insert(site);
            }
        }
        for p in intent.policies.values() {
            ix.policies.entry(p.from.as_str()).or_default().push(p);
            if p.to != p.from {
                ix.policies.entry(p.to.as_str()).or_default().push(p);
            }
        }
        ix
    }

    /// The (east, west) access points of a segment.
    pub fn access_points(&self, segment: &str) -> (Option<&'a Site>, Option<&'a Site>) {
        (self.east.get(segment).copied(), self.west.get(segment).copied())
    }

    /// The prefixes of `site` in `segment` that still go through a
    /// migration gateway (it is being cut over to).
    pub fn cutting_over(&self, site: &str, segment: &str) -> &[&'a ipnetwork::IpNetwork] {
        self.cutting_over.get(site).and_then(|s| s.get(segment)).map_or(&[], Vec::as_slice)
    }

    /// A segment's mutual aids, in declaration order.
    pub fn aids(&self, segment: &str) -> &[AidPair<'a>] {
        self.aids.get(segment).map_or(&[], Vec::as_slice)
    }

    /// The segments an access point aids.
    pub fn aided(&self, ap: &str) -> &[&'a str] {
        self.aiding.get(ap).map_or(&[], Vec::as_slice)
    }

    /// The (east, west) pair `ap` belongs to for `segment`: the segment's
    /// own, or the aid's pair when `ap` aids it.
    pub fn pair_of(&self, ap: &Site, segment: &str) -> (Option<&'a Site>, Option<&'a Site>) {
        if ap.attachment(segment).is_some() {
            return self.access_points(segment);
        }
        self.aids(segment)
            .iter()
            .find(|(_, e, w)| [e, w].into_iter().flatten().any(|s| s.name == ap.name))
            .map_or((None, None), |(_, e, w)| (*e, *w))
    }

    /// Every access point that holds `segment`'s member sites as peers:
    /// its own pair and the pairs that aid it.
    pub fn serving(&self, segment: &str) -> Vec<&'a Site> {
        let (east, west) = self.access_points(segment);
        let mut out: Vec<&'a Site> = [east, west].into_iter().flatten().collect();
        for (_, e, w) in self.aids(segment) {
            for s in [e, w].into_iter().flatten() {
                if !out.iter().any(|o| o.name == s.name) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// The segments `site` carries: its attachments, and on an access point
    /// the segments it aids.
    pub fn carried<'s>(&'s self, site: &'s Site) -> Vec<&'s str> {
        let mut out: Vec<&'s str> = site.attachments.iter().map(|a| a.segment.as_str()).collect();
        if site.is_access_point() {
            for s in self.aided(&site.name) {
                if !out.contains(s) {
                    out.push(s);
                }
            }
        }
        out
    }

    /// Non-AP sites attached to a segment, by name.
    pub fn members(&self, segment: &str) -> &[&'a str] {
        let members = self.members.get_or_init(|| {
            let mut m: HashMap<&'a str, Vec<&'a str>> = HashMap::new();
            // Sites are visited in name order, so member lists come out sorted.
            for site in self.intent.sites.values().filter(|s| !s.is_access_point()) {
                for a in &site.attachments {
                    m.entry(a.segment.as_str()).or_default().push(site.name.as_str());
                }
            }
            m
        });
        members.get(segment).map_or(&[], Vec::as_slice)
    }

    /// Writes out every site's tunnel host prefixes and line addresses
    /// once. Compiling every site otherwise writes an access point's out
    /// again in each of its members' configurations (10,000 of them), and
    /// each member's in each of its access points' segments: hundreds of
    /// thousands of addresses formatted where 40,000 differ. Compiling one
    /// site does not pay for the 10,000.
    pub fn write_out_addresses(&self) {
        self.text.get_or_init(|| {
            self.intent
                .sites
                .values()
                .filter_map(|site| {
                    let t = self.alloc.sites.get(&site.name)?;
                    let host = super::host_prefixes(t);
                    let lines = site.lines.iter().map(|l| l.address.to_string()).collect();
                    Some((site.name.as_str(), SiteText { host, lines }))
                })
                .collect()
        });
    }

    /// A site's addresses written out, if [`Index::write_out_addresses`] was called.
    pub(super) fn text(&self, site: &str) -> Option<&SiteText> {
        self.text.get()?.get(site)
    }

    /// Policies from or to a segment.
    pub fn policies(&self, segment: &str) -> &[&'a Policy] {
        self.policies.get(segment).map_or(&[], Vec::as_slice)
    }

    /// Segments reachable from this one through a policy in either direction
    /// (replies need a route back too).
    pub fn linked_segments(&self, segment: &str) -> BTreeSet<&'a str> {
        self.policies(segment)
            .iter()
            .map(|p| if p.from == segment { p.to.as_str() } else { p.from.as_str() })
            .filter(|s| *s != segment && self.intent.segments.contains_key(*s))
            .collect()
    }
}
