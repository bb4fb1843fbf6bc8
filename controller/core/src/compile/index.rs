//! Lookups that compilation needs, built once per intent: each segment's
//! access points and policies now, its member sites on first use (only
//! access points need them, and an incremental recompile of a member site
//! should not pay for indexing 10,000 sites).

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use super::PublicKeys;
use crate::allocate::Allocations;
use crate::intent::{Intent, Policy, Region, Site};

#[derive(Debug)]
pub struct Index<'a> {
    pub(super) intent: &'a Intent,
    pub(super) alloc: &'a Allocations,
    pub(super) keys: &'a PublicKeys,
    east: HashMap<&'a str, &'a Site>,
    west: HashMap<&'a str, &'a Site>,
    members: OnceLock<HashMap<&'a str, Vec<&'a str>>>,
    policies: HashMap<&'a str, Vec<&'a Policy>>,
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
            policies: HashMap::new(),
        };
        for site in intent.sites.values().filter(|s| s.is_access_point()) {
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
