//! Incremental recompilation: bring a set of compiled configurations from
//! one intent to the next, touching only what the change reaches.
//!
//! The common change at national scale is one member site (a line, a LAN
//! prefix, a new office). Its own configuration is recompiled; on its access
//! points only the peer and route group of that site are replaced in place,
//! instead of rebuilding configurations with thousands of peers. Any other
//! change (segments, policies, access points, settings) recompiles the sites
//! that [`affected_sites`] names.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use musubi_proto::v1::{Peer, RouteGroup, SiteConfig};

use super::{CompileError, Index, PublicKeys};
use crate::allocate::Allocations;
use crate::intent::{Intent, Site};
use crate::plan::affected::member_change;
use crate::plan::affected_sites;

/// Updates `configs` (compiled from `old`) to match `new` and returns the
/// sites whose configuration was added, removed or changed.
///
/// `alloc` must be `allocate(new, previous)` where `previous` produced the
/// configurations, and the public keys must be those they were compiled with.
pub fn recompile(
    old: &Intent,
    new: &Intent,
    alloc: &Allocations,
    keys: &PublicKeys,
    configs: &mut BTreeMap<String, Arc<SiteConfig>>,
) -> Result<BTreeSet<String>, CompileError> {
    recompile_with(old, new, alloc, keys, configs, None, &mut nothing)
}

/// Gives the configuration of an access point that `configs` does not
/// hold, for a member's entries to be spliced into (a caller that keeps
/// some only encoded decodes it here); `None`: nothing is spliced into it.
pub type Load<'a> = &'a mut dyn FnMut(&str) -> Option<SiteConfig>;

/// A [`Load`] that has nothing.
fn nothing(_: &str) -> Option<SiteConfig> {
    None
}

/// [`recompile`], taking the configurations a change that is not a member
/// change reaches from `compiled` when it holds every one of them — an
/// apply's plan compiled them from the same intent, allocations and keys —
/// so that nothing is compiled twice; and asking `load` for the access
/// points a member's change is spliced into that `configs` does not hold.
pub fn recompile_with(
    old: &Intent,
    new: &Intent,
    alloc: &Allocations,
    keys: &PublicKeys,
    configs: &mut BTreeMap<String, Arc<SiteConfig>>,
    compiled: Option<BTreeMap<String, SiteConfig>>,
    load: Load<'_>,
) -> Result<BTreeSet<String>, CompileError> {
    let index = Index::new(new, alloc, keys);
    let mut out = BTreeSet::new();
    let Some(sites) = member_change(old, new) else {
        let affected = affected_sites(old, new);
        let (present, gone): (Vec<&str>, Vec<&str>) =
            affected.iter().map(String::as_str).partition(|n| new.sites.contains_key(*n));
        let fresh = match compiled {
            Some(mut c) if present.iter().all(|n| c.contains_key(*n)) => {
                present.iter().filter_map(|n| c.remove_entry(*n)).collect()
            }
            _ => index.sites(&present)?,
        };
        for (name, fresh) in fresh {
            keep(name, fresh, configs, &mut out);
        }
        for name in gone {
            update(&index, name, configs, &mut out)?;
        }
        return Ok(out);
    };
    for name in sites {
        update(&index, name, configs, &mut out)?;
        let member = new.sites.get(name).map(|s| &**s);
        for ap in access_points_of(&index, old, new, &[name]) {
            if splice(&index, &new.sites[ap], name, member, configs, load)? {
                out.insert(ap.to_string());
            }
        }
    }
    Ok(out)
}

/// The access points serving any segment of these members, before or after.
pub fn access_points_of<'a>(
    index: &Index<'a>,
    old: &'a Intent,
    new: &'a Intent,
    members: &[&str],
) -> BTreeSet<&'a str> {
    let mut aps = BTreeSet::new();
    for name in members {
        for site in [old.sites.get(*name), new.sites.get(*name)].into_iter().flatten() {
            for a in &site.attachments {
                aps.extend(index.serving(&a.segment).into_iter().map(|ap| ap.name.as_str()));
            }
        }
    }
    aps
}

/// What an access point's configuration holds of some members — their peer
/// and route group on each of its segments, and nothing else — as a
/// configuration: two slices diff as the whole configurations would when
/// only those members changed, without compiling thousands of peers.
pub fn slice(index: &Index<'_>, ap: &Site, members: &[&str]) -> Result<SiteConfig, CompileError> {
    let mut config = SiteConfig { site: ap.name.clone(), ..Default::default() };
    let mut members: Vec<&Site> = members.iter().filter_map(|m| index.intent.sites.get(*m)).map(|m| &**m).collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    for segment in index.carried(ap) {
        let mut seg = musubi_proto::v1::SegmentConfig { segment: segment.to_string(), ..Default::default() };
        for m in &members {
            if let (Some(peer), group) = entries(index, ap, segment, Some(m))? {
                seg.peers.push(peer);
                seg.route_groups.extend(group);
            }
        }
        config.segments.push(seg);
    }
    Ok(config)
}

/// A member's peer and route group on one segment of an access point, if it
/// has them there.
fn entries(
    index: &Index<'_>,
    ap: &Site,
    segment: &str,
    member: Option<&Site>,
) -> Result<(Option<Peer>, Option<RouteGroup>), CompileError> {
    Ok(match member {
        Some(m) if !m.is_access_point() && m.attachment(segment).is_some() => {
            let (peer, group) = index.member_entries(ap, m, segment)?;
            (Some(peer), group)
        }
        _ => (None, None),
    })
}

/// Recompiles (or drops) one whole site, recording it if it changed.
fn update(
    index: &Index<'_>,
    name: &str,
    configs: &mut BTreeMap<String, Arc<SiteConfig>>,
    out: &mut BTreeSet<String>,
) -> Result<(), CompileError> {
    if !index.intent.sites.contains_key(name) {
        if configs.remove(name).is_some() {
            out.insert(name.to_string());
        }
        return Ok(());
    }
    keep(name.to_string(), index.site(name)?, configs, out);
    Ok(())
}

/// Takes a freshly compiled configuration, recording the site if it changed.
fn keep(name: String, fresh: SiteConfig, configs: &mut BTreeMap<String, Arc<SiteConfig>>, out: &mut BTreeSet<String>) {
    if configs.get(&name).is_none_or(|c| **c != fresh) {
        configs.insert(name.clone(), Arc::new(fresh));
        out.insert(name);
    }
}

/// Replaces, inserts or removes one member's entries in an access point's
/// configuration (asking `load` for it if `configs` lacks it). Copies the
/// configuration only when something differs.
fn splice(
    index: &Index<'_>,
    ap: &Site,
    member_name: &str,
    member: Option<&Site>,
    configs: &mut BTreeMap<String, Arc<SiteConfig>>,
    load: Load<'_>,
) -> Result<bool, CompileError> {
    if !configs.contains_key(&ap.name) {
        let Some(loaded) = load(&ap.name) else { return Ok(false) };
        configs.insert(ap.name.clone(), Arc::new(loaded));
    }
    let Some(config) = configs.get_mut(&ap.name) else { return Ok(false) };
    let mut wanted = Vec::with_capacity(config.segments.len());
    for seg in &config.segments {
        wanted.push(entries(index, ap, &seg.segment, member)?);
    }
    let differs = config.segments.iter().zip(&wanted).any(|(seg, (peer, group))| {
        find(&seg.peers, member_name, |p| &p.name) != peer.as_ref()
            || find(&seg.route_groups, member_name, |g| &g.name) != group.as_ref()
    });
    if !differs {
        return Ok(false);
    }
    let config = Arc::make_mut(config);
    for (seg, (peer, group)) in config.segments.iter_mut().zip(wanted) {
        put(&mut seg.peers, member_name, peer, |p| &p.name);
        put(&mut seg.route_groups, member_name, group, |g| &g.name);
    }
    Ok(true)
}

fn find<'v, T>(v: &'v [T], name: &str, key: impl Fn(&T) -> &String) -> Option<&'v T> {
    v.binary_search_by(|x| key(x).as_str().cmp(name)).ok().map(|i| &v[i])
}

/// Sets the entry called `name` of a name-sorted list (or removes it).
fn put<T>(v: &mut Vec<T>, name: &str, value: Option<T>, key: impl Fn(&T) -> &String) {
    match (v.binary_search_by(|x| key(x).as_str().cmp(name)), value) {
        (Ok(i), Some(x)) => v[i] = x,
        (Ok(i), None) => {
            v.remove(i);
        }
        (Err(i), Some(x)) => v.insert(i, x),
        (Err(_), None) => {}
    }
}

/// Updates `configs` after agents reported new public keys for the
/// `(site, segment)` pairs in `changed`, and returns the sites whose
/// configuration changed. A member's key appears only on its segment's
/// access points (its peer is replaced in place); an access point's key
/// appears on every member of the segment and on the other access point.
/// `load` is asked for the access points a member's key is spliced into
/// that `configs` does not hold.
pub fn rekey(
    intent: &Intent,
    alloc: &Allocations,
    keys: &PublicKeys,
    changed: &BTreeSet<(String, String)>,
    configs: &mut BTreeMap<String, Arc<SiteConfig>>,
    load: Load<'_>,
) -> Result<BTreeSet<String>, CompileError> {
    let index = Index::new(intent, alloc, keys);
    let mut out = BTreeSet::new();
    let mut whole: BTreeSet<&str> = BTreeSet::new();
    for (name, entry) in changed {
        if name == crate::aid::ACTIVATIONS {
            // An operator's activation is in the configurations of the
            // aided segment's members.
            if let Some((segment, _)) = intent.aid(entry) {
                whole.extend(index.members(&segment.name).iter().copied());
            }
            continue;
        }
        let Some(site) = intent.sites.get(name) else { continue };
        // A rotation's phase is in the site's own configuration and, with
        // its switch's instant, on every peer of its segments; a next key
        // is on the same peers as the segment's key; `+since` on none.
        let segments: Vec<&str> = match entry.strip_prefix(crate::rotation::NEXT) {
            Some(segment) => vec![segment],
            None if entry == crate::rotation::ROTATION => {
                whole.insert(site.name.as_str());
                keys.get(name)
                    .into_iter()
                    .flat_map(|k| k.keys())
                    .filter(|e| crate::rotation::is_segment_key(e))
                    .map(String::as_str)
                    .collect()
            }
            None if !crate::rotation::is_segment_key(entry) => continue,
            None => vec![entry.as_str()],
        };
        let mut spliced = BTreeSet::new();
        for segment in segments {
            let aps = index.serving(segment).into_iter().filter(|ap| ap.name != *name);
            if site.is_access_point() {
                whole.extend(index.members(segment).iter().copied());
                whole.extend(aps.map(|ap| ap.name.as_str()));
                continue;
            }
            // A splice renders the member's peer in every segment of the
            // access point's configuration: once per access point.
            for ap in aps.filter(|ap| spliced.insert(ap.name.as_str())) {
                if splice(&index, ap, name, Some(site), configs, load)? {
                    out.insert(ap.name.clone());
                }
            }
        }
    }
    for name in whole {
        update(&index, name, configs, &mut out)?;
    }
    Ok(out)
}
