//! Which sites a change of intent can touch, from the intent alone (no
//! compilation): the controller recompiles and notifies only these.
//!
//! It may over-approximate (a touched segment touches all of its sites) but
//! must never miss a site whose compiled configuration changes; a property
//! test holds it to that. Unchanged objects shared between the two snapshots
//! compare by pointer, so a small change to a large intent is cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::intent::{Intent, Site};
use crate::sorted::Side;

/// Names present in only one map, or whose objects differ (see
/// [`crate::sorted::differing`]).
pub fn changed<'a, T: Eq>(old: &'a BTreeMap<String, Arc<T>>, new: &'a BTreeMap<String, Arc<T>>) -> Vec<&'a String> {
    crate::sorted::differing(old, new)
        .into_iter()
        .map(|side| match side {
            Side::Left(k, _) | Side::Right(k, _) | Side::Both(k, _, _) => k,
        })
        .collect()
}

/// The member sites a change adds, changes or removes, if that is all it
/// does (no settings, segment, policy or access point changes): such a
/// change reaches an access point only through those members' peers and
/// route groups.
pub fn member_change<'a>(old: &'a Intent, new: &'a Intent) -> Option<Vec<&'a String>> {
    let sites = changed(&old.sites, &new.sites);
    // A migration gateway's change may reach another site's entries on
    // the access points (the site a legacy site is cut over to).
    let gateway = |n: &String| {
        [old.sites.get(n), new.sites.get(n)]
            .into_iter()
            .flatten()
            .any(|s| s.attachments.iter().any(|a| a.legacy.is_some()))
    };
    let member_only = old.settings == new.settings
        && !sites.iter().any(|n| gateway(n))
        && changed(&old.segments, &new.segments).is_empty()
        && changed(&old.policies, &new.policies).is_empty()
        && sites
            .iter()
            .all(|n| ![old.sites.get(*n), new.sites.get(*n)].into_iter().flatten().any(|s| s.is_access_point()));
    member_only.then_some(sites)
}

fn access_points(intent: &Intent) -> Vec<&Site> {
    crate::intent::notable::notable(intent).into_iter().filter(|(_, t)| t.access_point).map(|(s, _)| s).collect()
}

/// Sites whose configuration may differ between `old` and `new`, including
/// sites that appear or disappear.
pub fn affected_sites(old: &Intent, new: &Intent) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if old.settings != new.settings {
        out.extend(old.sites.keys().cloned());
        out.extend(new.sites.keys().cloned());
        return out;
    }
    let aps = [access_points(old), access_points(new)];
    // Segments whose every site must be recompiled.
    let mut segments: BTreeSet<String> = changed(&old.segments, &new.segments).into_iter().cloned().collect();
    for name in changed(&old.policies, &new.policies) {
        for p in [old.policies.get(name), new.policies.get(name)].into_iter().flatten() {
            segments.insert(p.from.clone());
            segments.insert(p.to.clone());
        }
    }
    for name in changed(&old.sites, &new.sites) {
        out.insert(name.clone());
        for site in [old.sites.get(name), new.sites.get(name)].into_iter().flatten() {
            for a in &site.attachments {
                if site.is_access_point() {
                    // Every member's peer list and candidates name the AP.
                    segments.insert(a.segment.clone());
                } else {
                    // The AP pair holds a peer and a route group for the
                    // site, and so do the pairs that aid the segment.
                    out.extend(
                        aps.iter().flatten().filter(|ap| ap.attachment(&a.segment).is_some()).map(|ap| ap.name.clone()),
                    );
                    for intent in [old, new] {
                        out.extend(aid_access_points(intent, &a.segment));
                    }
                }
            }
            if site.is_access_point() {
                for intent in [old, new] {
                    segments.extend(intent.aided_by(name).map(str::to_string));
                }
            }
        }
    }
    if segments.is_empty() {
        return out;
    }
    // A touched segment's prefixes also appear in the route groups and
    // imports of the segments linked to it by a policy.
    let mut linked = BTreeSet::new();
    for intent in [old, new] {
        for p in intent.policies.values() {
            if segments.contains(&p.from) {
                linked.insert(p.to.clone());
            }
            if segments.contains(&p.to) {
                linked.insert(p.from.clone());
            }
        }
    }
    segments.extend(linked);
    for intent in [old, new] {
        for site in intent.sites.values() {
            if site.attachments.iter().any(|a| segments.contains(&a.segment)) {
                out.insert(site.name.clone());
            }
        }
        for segment in &segments {
            out.extend(aid_access_points(intent, segment));
        }
    }
    out
}

/// The access points that aid `segment` in `intent`.
fn aid_access_points(intent: &Intent, segment: &str) -> Vec<String> {
    intent
        .segments
        .get(segment)
        .into_iter()
        .flat_map(|s| &s.aid)
        .flat_map(|a| a.access_points.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(entries: &[(&str, &Arc<u32>)]) -> BTreeMap<String, Arc<u32>> {
        entries.iter().map(|(k, v)| (k.to_string(), Arc::clone(v))).collect()
    }

    #[test]
    fn changed_names_are_found_whether_the_maps_line_up_or_not() {
        let (one, two, three) = (Arc::new(1), Arc::new(2), Arc::new(3));
        let old = map(&[("a", &one), ("b", &two), ("c", &three)]);
        // Same length, same places: one object replaced, one equal copy.
        let new = map(&[("a", &one), ("b", &Arc::new(20)), ("c", &Arc::new(3))]);
        assert_eq!(changed(&old, &new), ["b"]);
        // Same length, one name gone and another come: the merge takes over.
        let new = map(&[("a", &one), ("c", &three), ("d", &two)]);
        assert_eq!(changed(&old, &new), ["b", "d"]);
        // Different lengths.
        let new = map(&[("a", &one), ("c", &three)]);
        assert_eq!(changed(&old, &new), ["b"]);
        assert!(changed(&old, &old.clone()).is_empty());
    }
}
