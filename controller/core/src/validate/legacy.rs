//! Phased migration: a migration gateway's legacy sites. Their prefixes lie
//! inside the segment and overlap nothing else of it (no Musubi site's, no
//! other legacy site's); the old network is on an interface of its own; a
//! legacy site's name is unique among sites and legacy sites; an access
//! point is no migration gateway (it has no LAN).

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, net_contains, nets_overlap};

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let gateways: Vec<_> =
        intent.sites.iter().filter(|(_, s)| s.attachments.iter().any(|a| a.legacy.is_some())).collect();
    if gateways.is_empty() {
        return;
    }
    // Every prefix of each segment a gateway serves, with whose it is
    // (named only for a clash).
    let mut taken: BTreeMap<&str, Vec<(IpNetwork, Owner<'_>)>> = BTreeMap::new();
    for (_, g) in &gateways {
        for a in g.attachments.iter().filter(|a| a.legacy.is_some()) {
            taken.entry(a.segment.as_str()).or_default();
        }
    }
    for (name, site) in &intent.sites {
        for a in &site.attachments {
            if let Some(list) = taken.get_mut(a.segment.as_str()) {
                list.extend(a.prefixes.iter().map(|p| (*p, Owner::Site(name))));
                for l in a.legacy.iter().flat_map(|l| &l.sites) {
                    list.extend(l.prefixes.iter().map(|p| (*p, Owner::Legacy(&l.name))));
                }
            }
        }
    }
    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, site) in gateways {
        let obj = ObjectRef::new(Kind::Site, name);
        for (i, a) in site.attachments.iter().enumerate() {
            let Some(legacy) = &a.legacy else { continue };
            let at = |field: &str| format!("attachments[{i}].legacy.{field}");
            if site.is_access_point() {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &format!("attachments[{i}].legacy"),
                        "an access point cannot be a migration gateway",
                    )
                    .expected("a site with a LAN in the segment (role: site)"),
                );
            }
            let reused = site.attachments.iter().any(|b| b.interface.as_deref() == Some(legacy.interface.as_str()))
                || site
                    .attachments
                    .iter()
                    .enumerate()
                    .any(|(j, b)| j != i && b.legacy.as_ref().is_some_and(|l| l.interface == legacy.interface));
            if reused {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &at("interface"),
                        format!("interface `{}` is also one of the site's LANs", legacy.interface),
                    )
                    .expected("an interface of its own towards the old network"),
                );
            }
            let segment = intent.segments.get(&a.segment);
            for (j, l) in legacy.sites.iter().enumerate() {
                let field = |rest: &str| at(&format!("sites[{j}].{rest}"));
                if intent.sites.contains_key(&l.name) {
                    out.push(
                        Diagnostic::at(sources, &obj, &field("name"), format!("`{}` is a Musubi site too", l.name))
                            .expected("a site either on the old network or on Musubi (a cutover removes it here)"),
                    );
                } else if let Some(first) = names.insert(&l.name, name) {
                    out.push(
                        Diagnostic::at(
                            sources,
                            &obj,
                            &field("name"),
                            format!("legacy site `{}` is declared twice", l.name),
                        )
                        .expected(format!("one gateway per legacy site (also behind `{first}`)")),
                    );
                }
                for (k, p) in l.prefixes.iter().enumerate() {
                    let pf = field(&format!("prefixes[{k}]"));
                    if let Some(seg) = segment
                        && !seg.prefixes.iter().any(|sp| net_contains(sp, p))
                    {
                        let list: Vec<String> = seg.prefixes.iter().map(ToString::to_string).collect();
                        out.push(
                            Diagnostic::at(
                                sources,
                                &obj,
                                &pf,
                                format!("prefix {p} is outside segment `{}`", a.segment),
                            )
                            .expected(format!("a prefix inside {}", list.join(" or "))),
                        );
                    }
                    let own = Owner::Legacy(&l.name);
                    // The site it is being cut over to holds the same prefixes.
                    let successor = l.cutover_to.as_deref().map(Owner::Site);
                    let clash = taken.get(a.segment.as_str()).into_iter().flatten().find(|(q, whose)| {
                        nets_overlap(p, q) && !(*whose == own && q == p) && successor != Some(*whose)
                    });
                    if let Some((q, whose)) = clash {
                        out.push(
                            Diagnostic::at(
                                sources,
                                &obj,
                                &pf,
                                format!(
                                    "prefix {p} of legacy site `{}` overlaps {q} of {whose} in segment `{}`",
                                    l.name, a.segment
                                ),
                            )
                            .expected("each address of a segment at one site only"),
                        );
                    }
                }
                if let Some(to) = &l.cutover_to {
                    let target = intent.sites.get(to);
                    let fits = target.is_some_and(|t| {
                        !t.is_access_point()
                            && t.attachment(&a.segment)
                                .is_some_and(|ta| l.prefixes.iter().all(|p| ta.prefixes.contains(p)))
                    });
                    if !fits {
                        out.push(
                            Diagnostic::at(
                                sources,
                                &obj,
                                &field("cutover_to"),
                                format!("`{to}` is not a site of segment `{}` holding {}'s prefixes", a.segment, l.name),
                            )
                            .expected("the Musubi site the legacy site becomes, attached to the segment with the same prefixes"),
                        );
                    }
                }
                if l.prefixes.is_empty() {
                    out.push(
                        Diagnostic::at(
                            sources,
                            &obj,
                            &field("name"),
                            format!("legacy site `{}` has no prefixes", l.name),
                        )
                        .expected("the prefixes the old network reaches it at"),
                    );
                }
            }
        }
    }
}

/// Whose a prefix of a segment is: a Musubi site's or a legacy site's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner<'a> {
    Site(&'a str),
    Legacy(&'a str),
}

impl std::fmt::Display for Owner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Site(name) => write!(f, "site `{name}`"),
            Owner::Legacy(name) => write!(f, "legacy site `{name}`"),
        }
    }
}
