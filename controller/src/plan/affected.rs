//! Which sites a change of intent can touch, from the intent alone (no
//! compilation): the controller recompiles and notifies only these.
//!
//! It may over-approximate (a touched segment touches all of its sites) but
//! must never miss a site whose compiled configuration changes; a property
//! test holds it to that.

use std::collections::BTreeSet;

use crate::intent::Intent;

fn changed<'a, T: PartialEq>(
    old: &'a std::collections::BTreeMap<String, T>,
    new: &'a std::collections::BTreeMap<String, T>,
) -> BTreeSet<&'a String> {
    old.keys().chain(new.keys()).filter(|k| old.get(*k) != new.get(*k)).collect()
}

/// Sites attached to a segment (members and access points) in an intent.
fn attached<'a>(intent: &'a Intent, segment: &str, out: &mut BTreeSet<String>) {
    for site in intent.sites.values() {
        if site.attachment(segment).is_some() {
            out.insert(site.name.clone());
        }
    }
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
                    // The AP pair holds a peer and a route group for the site.
                    for intent in [old, new] {
                        out.extend(
                            intent.sites.values().filter(|s| s.is_access_point() && s.attachment(&a.segment).is_some()).map(|s| s.name.clone()),
                        );
                    }
                }
            }
        }
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
        for seg in &segments {
            attached(intent, seg, &mut out);
        }
    }
    out
}
