//! Sites and access points: lines, attachments and the east/west pair that
//! every segment needs.

use std::collections::{BTreeMap, HashMap};

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, Line, Region};

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    for (name, site) in &intent.sites {
        // A site's lines and attachments are few: duplicates are found by
        // scanning the earlier ones (10,000 sites on every apply).
        let obj = ObjectRef::new(Kind::Site, name);
        if site.lines.is_empty() && !sources.is_unreadable(&obj, "lines") {
            out.push(Diagnostic::at(sources, &obj, "lines", "site has no lines").expected("at least one line"));
        }
        for (i, line) in site.lines.iter().enumerate() {
            let earlier = &site.lines[..i];
            if let Some(j) = earlier.iter().position(|l| l.name == line.name) {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &format!("lines[{i}].name"),
                        format!("duplicate line name `{}`", line.name),
                    )
                    .expected("distinct line names within a site")
                    .related(sources.field(&obj, &format!("lines[{j}].name")), "first used here"),
                );
            }
            if let Some(j) = earlier.iter().position(|l| l.priority == line.priority) {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &format!("lines[{i}].priority"),
                        format!("lines `{}` and `{}` share priority {}", site.lines[j].name, line.name, line.priority),
                    )
                    .expected("distinct priorities, 1 for the first choice")
                    .related(sources.field(&obj, &format!("lines[{j}].priority")), "first used here"),
                );
            }
        }
        if site.attachments.is_empty() && !sources.is_unreadable(&obj, "attachments") {
            out.push(
                Diagnostic::at(sources, &obj, "attachments", "site has no attachments")
                    .expected("at least one attached segment"),
            );
        }
        for (i, a) in site.attachments.iter().enumerate() {
            let earlier = &site.attachments[..i];
            if let Some(j) = earlier.iter().position(|e| e.segment == a.segment) {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &format!("attachments[{i}].segment"),
                        format!("segment `{}` is attached twice", a.segment),
                    )
                    .expected("one attachment per segment")
                    .related(sources.field(&obj, &format!("attachments[{j}].segment")), "first attached here"),
                );
            }
            match &a.interface {
                Some(ifname) => {
                    if let Some(j) = earlier.iter().position(|e| e.interface.as_ref() == Some(ifname)) {
                        out.push(
                            Diagnostic::at(
                                sources,
                                &obj,
                                &format!("attachments[{i}].interface"),
                                format!(
                                    "LAN interface `{ifname}` is used by segments `{}` and `{}`",
                                    site.attachments[j].segment, a.segment
                                ),
                            )
                            .expected("one LAN interface per segment (an interface belongs to one VRF)"),
                        );
                    }
                }
                None if !site.is_access_point() => out.push(
                    Diagnostic::at(sources, &obj, &format!("attachments[{i}]"), "attachment has no `interface`")
                        .expected("the LAN interface of the segment at this site"),
                ),
                None => {}
            }
            if a.prefixes.is_empty()
                && !site.is_access_point()
                && !sources.is_unreadable(&obj, &format!("attachments[{i}]"))
            {
                out.push(
                    Diagnostic::at(sources, &obj, &format!("attachments[{i}]"), "attachment has no `prefixes`")
                        .expected("the LAN prefixes of the segment at this site"),
                );
            }
        }
    }
    check_access_points(intent, sources, out);
    check_reachability(intent, sources, out);
    check_underlay(intent, sources, out);
}

/// Two lines with one underlay address would receive each other's tunnels.
fn check_underlay(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let mut seen: HashMap<std::net::IpAddr, LineAt<'_>> = HashMap::new();
    for (name, site) in &intent.sites {
        for (i, line) in site.lines.iter().enumerate() {
            match seen.get(&line.address) {
                Some(&first) => out.push(address_in_use(sources, (name, i, line), first)),
                None => {
                    seen.insert(line.address, (name, i, line));
                }
            }
        }
    }
}

/// [`check_underlay`] between a few changed sites and the other member
/// sites (each side already free of duplicates on its own): the later site
/// in name order is the one told, as the whole check tells it.
pub(super) fn check_underlay_against<'a>(
    fresh: &[(&'a String, &'a crate::intent::Site)],
    old: &Intent,
    others: impl Iterator<Item = (&'a String, &'a std::sync::Arc<crate::intent::Site>)>,
    sources: &SourceMap,
    out: &mut Vec<Diagnostic>,
) {
    // The changed sites' new addresses (one the site had before was checked
    // against the unchanged sites then), sorted: looked up for each line of
    // 10,000 sites, by comparison, not by hashing. None new: nothing to walk.
    let had = |name: &str, address: std::net::IpAddr| {
        old.sites.get(name).is_some_and(|s| s.lines.iter().any(|l| l.address == address))
    };
    let mut wanted: Vec<(std::net::IpAddr, LineAt<'a>)> = fresh
        .iter()
        .flat_map(|(name, site)| site.lines.iter().enumerate().map(|(i, l)| (l.address, (name.as_str(), i, l))))
        .filter(|(address, (name, ..))| !had(name, *address))
        .collect();
    if wanted.is_empty() {
        return;
    }
    wanted.sort_by_key(|(address, _)| *address);
    for (other, site) in others {
        for (j, line) in site.lines.iter().enumerate() {
            let Ok(at) = wanted.binary_search_by_key(&line.address, |(address, _)| *address) else { continue };
            let mine = wanted[at].1;
            let theirs = (other.as_str(), j, line);
            let (later, first) = if mine.0 > theirs.0 { (mine, theirs) } else { (theirs, mine) };
            out.push(address_in_use(sources, later, first));
        }
    }
}

/// Line `i` of a named site.
type LineAt<'a> = (&'a str, usize, &'a Line);

/// `later`'s line uses the underlay address `first`'s line has.
fn address_in_use(sources: &SourceMap, later: LineAt<'_>, first: LineAt<'_>) -> Diagnostic {
    let ((site, i, line), (other, j, first_line)) = (later, first);
    Diagnostic::at(
        sources,
        &ObjectRef::new(Kind::Site, site),
        &format!("lines[{i}].address"),
        format!("underlay address {} is already used by line `{}` of site `{other}`", line.address, first_line.name),
    )
    .expected("a distinct underlay address for every line")
    .related(sources.field(&ObjectRef::new(Kind::Site, other), &format!("lines[{j}].address")), "first used here")
}

/// A site must share an address family with each access point of each of its
/// segments, or no tunnel can be built between them.
fn check_reachability(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let families = |s: &crate::intent::Site| -> (bool, bool) {
        (s.lines.iter().any(|l| l.address.is_ipv4()), s.lines.iter().any(|l| l.address.is_ipv6()))
    };
    let mut aps: HashMap<&str, Vec<&crate::intent::Site>> = HashMap::new();
    for ap in intent.sites.values().filter(|s| s.is_access_point()) {
        for a in &ap.attachments {
            aps.entry(a.segment.as_str()).or_default().push(ap);
        }
    }
    for (name, site) in &intent.sites {
        if site.lines.is_empty() {
            continue;
        }
        let (v4, v6) = families(site);
        let obj = ObjectRef::new(Kind::Site, name);
        for (i, a) in site.attachments.iter().enumerate() {
            let unreachable: Vec<String> = aps
                .get(a.segment.as_str())
                .into_iter()
                .flatten()
                .filter(|ap| ap.name != site.name && !ap.lines.is_empty())
                .filter(|ap| {
                    let (a4, a6) = families(ap);
                    !((v4 && a4) || (v6 && a6))
                })
                .map(|ap| format!("`{}`", ap.name))
                .collect();
            if !unreachable.is_empty() {
                out.push(
                    Diagnostic::at(sources, &obj, &format!("attachments[{i}].segment"), format!(
                        "site `{name}` cannot reach access point{} {} of segment `{}`: their lines share no address family",
                        if unreachable.len() > 1 { "s" } else { "" },
                        unreachable.join(" and "),
                        a.segment
                    ))
                    .expected("a line of the same address family (IPv4 or IPv6) as one of each access point's lines"),
                );
            }
        }
    }
}

/// Every segment needs exactly one access point in each region.
fn check_access_points(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let mut aps: BTreeMap<(&str, Region), Vec<&str>> = BTreeMap::new();
    for site in intent.sites.values().filter(|s| s.is_access_point()) {
        for a in &site.attachments {
            aps.entry((a.segment.as_str(), site.region)).or_default().push(&site.name);
        }
    }
    for name in intent.segments.keys() {
        let obj = ObjectRef::new(Kind::Segment, name);
        for region in [Region::East, Region::West] {
            let word = if region == Region::East { "east" } else { "west" };
            match aps.get(&(name.as_str(), region)).map(Vec::as_slice) {
                None | Some([]) => out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        "name",
                        format!("segment `{name}` has no access point in region {word}"),
                    )
                    .expected(format!("an access-point site in region {word} attached to `{name}`")),
                ),
                Some([_]) => {}
                Some(many) => out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        "name",
                        format!(
                            "segment `{name}` has {} access points in region {word}: {}",
                            many.len(),
                            many.join(", ")
                        ),
                    )
                    .expected(format!("exactly one access point per region for `{name}`")),
                ),
            }
        }
    }
}
