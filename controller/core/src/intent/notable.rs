//! The few sites that walks over a whole intent look for: access points and
//! migration gateways (sites with a legacy attachment).
//!
//! Telling them apart reads every site's attachments, about a millisecond at
//! 10,000 sites, and a one-site change used to pay it several times (the
//! plan's two compile indexes, the fan-out's, the change's validation).
//! What a site is does not change while its object does not: the answers
//! of the last few walks are kept with the objects they were read from
//! (weakly), and a walk over an intent sharing those objects reads only the
//! sites that changed.

use std::sync::{Arc, Mutex, Weak};

use super::{Intent, Site};

/// What a site is, as far as the walks care.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Traits {
    pub access_point: bool,
    pub gateway: bool,
}

impl Traits {
    pub fn of(site: &Site) -> Traits {
        Traits { access_point: site.is_access_point(), gateway: site.attachments.iter().any(|a| a.legacy.is_some()) }
    }

    fn notable(self) -> bool {
        self.access_point || self.gateway
    }
}

/// One walk's answers, in name order: the site objects it met and their
/// traits. The objects are held weakly: their content goes with the last
/// intent holding them (the cache never frees a site's content on an
/// operator's time), but their memory stays allocated while the cache
/// holds them, so no other object takes their address.
struct Walk {
    sites: Vec<Weak<Site>>,
    traits: Vec<Traits>,
    used: u64,
}

struct Cache {
    walks: Vec<Walk>,
    clock: u64,
}

/// Intents walked in turn: a change's before and after, the fan-out's copy
/// (read back from the store: other objects, same content).
const WALKS: usize = 4;

static CACHE: Mutex<Cache> = Mutex::new(Cache { walks: Vec::new(), clock: 0 });

/// Below this many sites the walk reads them directly.
const CACHED_FROM: usize = 256;

/// The access points and migration gateways of `intent`, in name order,
/// with their traits.
///
/// The intent's sites are compared in order with those of an earlier walk
/// of an intent sharing them (same count, same first and last objects):
/// where the object is the same its traits are taken without reading it —
/// a comparison of two pointers read in sequence, where reading 10,000
/// sites' attachments meant a cache miss or more per site. A site that
/// changed is read and its place updated.
pub fn notable(intent: &Intent) -> Vec<(&Site, Traits)> {
    let n = intent.sites.len();
    if n < CACHED_FROM {
        return intent.sites.values().map(|s| (&**s, Traits::of(s))).filter(|(_, t)| t.notable()).collect();
    }
    let (Some((_, first)), Some((_, last))) = (intent.sites.first_key_value(), intent.sites.last_key_value()) else {
        return Vec::new();
    };
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache.clock += 1;
    let clock = cache.clock;
    let lines_up = |w: &Walk| w.sites.len() == n && same(&w.sites[0], first) && same(&w.sites[n - 1], last);
    let at = match cache.walks.iter().position(lines_up) {
        Some(i) => i,
        None if cache.walks.len() < WALKS => {
            cache.walks.push(Walk { sites: Vec::new(), traits: Vec::new(), used: 0 });
            cache.walks.len() - 1
        }
        None => cache.walks.iter().enumerate().min_by_key(|(_, w)| w.used).map_or(0, |(i, _)| i),
    };
    let walk = &mut cache.walks[at];
    walk.used = clock;
    if walk.sites.len() != n {
        let sites = intent.sites.values().map(Arc::downgrade).collect();
        // The last hold on objects gone from every intent: freed off the
        // caller's path.
        crate::par::free(std::mem::replace(&mut walk.sites, sites), n);
        walk.traits = intent.sites.values().map(|s| Traits::of(s)).collect();
    }
    let mut out = Vec::new();
    for (i, site) in intent.sites.values().enumerate() {
        if !same(&walk.sites[i], site) {
            walk.sites[i] = Arc::downgrade(site);
            walk.traits[i] = Traits::of(site);
        }
        if walk.traits[i].notable() {
            out.push((&**site, walk.traits[i]));
        }
    }
    out
}

/// Whether the cache's `seen` is the object `site` (its memory is held,
/// so an equal address is the same object).
fn same(seen: &Weak<Site>, site: &Arc<Site>) -> bool {
    std::ptr::eq(seen.as_ptr(), Arc::as_ptr(site))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::generate;

    fn names(list: &[(&Site, Traits)]) -> Vec<String> {
        list.iter()
            .map(|(s, t)| {
                format!("{}{}{}", s.name, if t.access_point { " ap" } else { "" }, if t.gateway { " gw" } else { "" })
            })
            .collect()
    }

    fn direct(intent: &Intent) -> Vec<String> {
        let list: Vec<(&Site, Traits)> =
            intent.sites.values().map(|s| (&**s, Traits::of(s))).filter(|(_, t)| t.notable()).collect();
        names(&list)
    }

    #[test]
    fn remembered_traits_follow_changed_site_objects() {
        let mut intent = crate::intent::parse::parse_str("gen.yaml", &generate(600, 3)).intent;
        assert_eq!(names(&notable(&intent)), direct(&intent));
        let before = intent.clone();
        // A member site becomes a migration gateway: a new object, read afresh.
        let name = intent.sites.keys().find(|n| n.starts_with("site-")).cloned().expect("a member site");
        let site = Arc::make_mut(intent.sites.get_mut(&name).expect("site"));
        site.attachments[0].legacy = Some(crate::intent::Legacy {
            interface: "old0".into(),
            via: "192.0.2.1".parse().expect("address"),
            sites: Vec::new(),
        });
        let after = names(&notable(&intent));
        assert!(after.contains(&format!("{name} gw")), "{after:?}");
        assert_eq!(after, direct(&intent));
        // One site gone and another come (same count, places shifted).
        let mut shifted = intent.clone();
        let gone = shifted.sites.keys().filter(|n| n.starts_with("site-")).nth(5).cloned().expect("a sixth site");
        let mut moved = (*shifted.sites.remove(&gone).expect("site")).clone();
        moved.name = format!("{gone}-moved");
        moved.role = crate::intent::Role::AccessPoint;
        shifted.sites.insert(moved.name.clone(), Arc::new(moved));
        assert_eq!(names(&notable(&shifted)), direct(&shifted));
        assert!(names(&notable(&shifted)).contains(&format!("{gone}-moved ap")));
        // The old intent, walked again, still has its own answer.
        assert_eq!(names(&notable(&before)), direct(&before));
        assert!(!names(&notable(&before)).contains(&format!("{name} gw")));
    }
}
