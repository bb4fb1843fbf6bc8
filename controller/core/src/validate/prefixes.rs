//! Address space: prefixes inside one segment must not overlap (across its
//! declaration and all its sites), attachments must lie inside their segment,
//! and Musubi's own tunnel pools must not collide with any segment. Different
//! segments may overlap freely: they are isolated.

use ipnetwork::IpNetwork;

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, net_contains, nets_overlap};

/// First and last address of a network as u128, IPv4 mapped below IPv6.
fn bounds(n: &IpNetwork) -> (u8, u128, u128) {
    match n {
        IpNetwork::V4(v4) => (4, u128::from(u32::from(v4.network())), u128::from(u32::from(v4.broadcast()))),
        IpNetwork::V6(v6) => {
            let start = u128::from(v6.network());
            let host_bits = 128 - u32::from(v6.prefix());
            let end = if host_bits == 128 { u128::MAX } else { start | ((1u128 << host_bits) - 1) };
            (6, start, end)
        }
    }
}

/// Pairs (i, j) of overlapping networks, each later item paired with one
/// earlier one. O(n log n): CIDR blocks are nested or disjoint, so a block
/// overlaps something before it (in start order) iff it starts before the
/// furthest end seen so far.
pub fn overlaps(nets: &[IpNetwork]) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..nets.len()).collect();
    order.sort_by_key(|&i| {
        let (fam, start, end) = bounds(&nets[i]);
        (fam, start, std::cmp::Reverse(end), i)
    });
    let mut out = Vec::new();
    let mut reach: Option<(u8, u128, usize)> = None;
    for i in order {
        let (fam, start, end) = bounds(&nets[i]);
        match reach {
            Some((f, r_end, j)) if f == fam && start <= r_end => {
                out.push((j.min(i), j.max(i)));
                if end > r_end {
                    reach = Some((fam, end, i));
                }
            }
            _ => reach = Some((fam, end, i)),
        }
    }
    out
}

/// Prefix `k` of attachment `i` of a named site.
type PrefixAt<'a> = (IpNetwork, &'a str, usize, usize);

fn prefix_field(i: usize, k: usize) -> String {
    format!("attachments[{i}].prefixes[{k}]")
}

/// `told`'s prefix overlaps `other`'s in `segment`.
fn overlap(sources: &SourceMap, segment: &str, told: PrefixAt<'_>, other: PrefixAt<'_>) -> Diagnostic {
    let ((p, site, i, k), (op, other, oi, ok)) = (told, other);
    Diagnostic::at(
        sources,
        &ObjectRef::new(Kind::Site, site),
        &prefix_field(i, k),
        format!("prefix {p} of site `{site}` overlaps {op} of site `{other}` in segment `{segment}`"),
    )
    .expected("each address of a segment at one site only")
    .related(sources.field(&ObjectRef::new(Kind::Site, other), &prefix_field(oi, ok)), "overlapped prefix")
}

/// The overlap rule of [`check`] between a few changed member sites and
/// the other member sites (each side already free of overlaps on its own),
/// told to the changed site.
pub(super) fn check_against<'a>(
    fresh: &[(&String, &crate::intent::Site)],
    old: &Intent,
    others: impl Iterator<Item = (&'a String, &'a std::sync::Arc<crate::intent::Site>)>,
    sources: &SourceMap,
    out: &mut Vec<Diagnostic>,
) {
    // segment → the changed sites' new prefixes there (a prefix the site
    // had in that segment before was checked against the unchanged sites
    // then), sorted by segment: looked up for each attachment of 10,000
    // sites, by comparison, not by hashing. None new: nothing to walk.
    let had = |name: &str, segment: &str, p: &ipnetwork::IpNetwork| {
        old.sites
            .get(name)
            .is_some_and(|s| s.attachments.iter().any(|a| a.segment == segment && a.prefixes.contains(p)))
    };
    let mut wanted: Vec<(&str, Vec<PrefixAt<'_>>)> = Vec::new();
    for (name, site) in fresh {
        for (i, a) in site.attachments.iter().enumerate() {
            for (k, p) in a.prefixes.iter().enumerate().filter(|(_, p)| !had(name, &a.segment, p)) {
                let at = match wanted.binary_search_by(|(s, _)| (*s).cmp(a.segment.as_str())) {
                    Ok(at) => at,
                    Err(at) => {
                        wanted.insert(at, (a.segment.as_str(), Vec::new()));
                        at
                    }
                };
                wanted[at].1.push((*p, name.as_str(), i, k));
            }
        }
    }
    if wanted.is_empty() {
        return;
    }
    for (other, site) in others {
        for (oi, a) in site.attachments.iter().enumerate() {
            let Ok(at) = wanted.binary_search_by(|(s, _)| (*s).cmp(a.segment.as_str())) else { continue };
            let mine = &wanted[at].1;
            for (ok, op) in a.prefixes.iter().enumerate() {
                for &told in mine.iter().filter(|(p, ..)| nets_overlap(p, op)) {
                    out.push(overlap(sources, &a.segment, told, (*op, other, oi, ok)));
                }
            }
        }
    }
}

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    for (name, seg) in &intent.segments {
        let obj = ObjectRef::new(Kind::Segment, name);
        if seg.prefixes.is_empty() && !sources.is_unreadable(&obj, "prefixes") {
            out.push(
                Diagnostic::at(sources, &obj, "prefixes", "segment has no prefixes").expected("at least one prefix"),
            );
        }
        for (i, j) in overlaps(&seg.prefixes) {
            out.push(
                Diagnostic::at(
                    sources,
                    &obj,
                    &format!("prefixes[{j}]"),
                    format!("prefix {} overlaps {} in the same segment", seg.prefixes[j], seg.prefixes[i]),
                )
                .expected("disjoint prefixes within one segment")
                .related(sources.field(&obj, &format!("prefixes[{i}]")), "overlapped prefix"),
            );
        }
    }

    // Attachment prefixes, grouped by segment, remembering who declared each
    // (the field is spelt out only for a problem: 50,000 prefixes at
    // national scale, on every apply).
    let mut by_segment: std::collections::BTreeMap<&str, Vec<PrefixAt<'_>>> = Default::default();
    for (site_name, site) in &intent.sites {
        for (i, a) in site.attachments.iter().enumerate() {
            let seg = intent.segments.get(&a.segment);
            for (k, p) in a.prefixes.iter().enumerate() {
                // A segment prefix that could not be read was reported
                // already; "outside" would be a second, untrue error.
                if let Some(seg) = seg
                    && !seg.prefixes.iter().any(|sp| net_contains(sp, p))
                    && !sources.is_unreadable(&ObjectRef::new(Kind::Segment, &a.segment), "prefixes")
                {
                    let list: Vec<String> = seg.prefixes.iter().map(ToString::to_string).collect();
                    let obj = ObjectRef::new(Kind::Site, site_name);
                    out.push(
                        Diagnostic::at(
                            sources,
                            &obj,
                            &prefix_field(i, k),
                            format!("prefix {p} is outside segment `{}`", a.segment),
                        )
                        .expected(format!(
                            "a prefix inside {}",
                            if list.is_empty() { "the segment".into() } else { list.join(" or ") }
                        )),
                    );
                }
                by_segment.entry(&a.segment).or_default().push((*p, site_name, i, k));
            }
        }
    }
    for (segment, entries) in &by_segment {
        let nets: Vec<IpNetwork> = entries.iter().map(|e| e.0).collect();
        for (i, j) in overlaps(&nets) {
            // Reported on the later one, unless only the earlier one is in
            // the files at hand (a merge): the error goes where the change is.
            let declared = |k: usize| sources.object(&ObjectRef::new(Kind::Site, entries[k].1)).is_some();
            let (i, j) = if !declared(j) && declared(i) { (j, i) } else { (i, j) };
            out.push(overlap(sources, segment, entries[j], entries[i]));
        }
    }

    // Musubi's own pools live inside every segment's routing domain.
    let s = &intent.settings;
    let settings = ObjectRef::new(Kind::Settings, "settings");
    let pools = [
        ("tunnel_addresses.ipv4", IpNetwork::V4(s.tunnel_ipv4)),
        ("tunnel_addresses.ipv6", IpNetwork::V6(s.tunnel_ipv6)),
        ("interconnect_addresses.ipv4", IpNetwork::V4(s.interconnect_ipv4)),
        ("interconnect_addresses.ipv6", IpNetwork::V6(s.interconnect_ipv6)),
    ];
    for (a, (fa, na)) in pools.iter().enumerate() {
        for (fb, nb) in &pools[a + 1..] {
            if nets_overlap(na, nb) {
                out.push(
                    Diagnostic::at(sources, &settings, fb, format!("{fb} {nb} overlaps {fa} {na}"))
                        .expected("disjoint tunnel and interconnect pools"),
                );
            }
        }
        for (name, seg) in &intent.segments {
            if let Some((i, p)) = seg.prefixes.iter().enumerate().find(|(_, p)| nets_overlap(p, na)) {
                let obj = ObjectRef::new(Kind::Segment, name);
                // At the prefix itself (its index is the file's while every
                // prefix was read).
                let field =
                    if sources.is_unreadable(&obj, "prefixes") { "prefixes".into() } else { format!("prefixes[{i}]") };
                out.push(
                    Diagnostic::at(sources, &obj, &field, format!("prefix {p} overlaps Musubi's {fa} pool {na}"))
                        .expected(format!("segment prefixes outside {na} (or move the pool in Settings)")),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNetwork> {
        v.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn finds_nested_and_equal_but_not_adjacent() {
        assert_eq!(overlaps(&nets(&["10.0.0.0/24", "10.0.1.0/24"])), vec![]);
        assert_eq!(overlaps(&nets(&["10.0.0.0/16", "10.0.5.0/24"])), vec![(0, 1)]);
        assert_eq!(overlaps(&nets(&["10.0.5.0/24", "10.0.0.0/16"])), vec![(0, 1)]);
        assert_eq!(overlaps(&nets(&["10.0.0.0/24", "10.0.0.0/24"])), vec![(0, 1)]);
        assert_eq!(overlaps(&nets(&["10.0.0.0/8", "::/0"])), vec![]);
        assert_eq!(overlaps(&nets(&["fd00::/48", "fd00:0:0:1::/64", "fd01::/48"])), vec![(0, 1)]);
    }
}
