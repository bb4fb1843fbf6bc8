//! Every name an object mentions must exist, and a tenant may only use the
//! segments it owns or that are shared with it.

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, Region, nets_overlap};

fn dangling(sources: &SourceMap, obj: &ObjectRef, field: &str, kind: Kind, name: &str) -> Diagnostic {
    let name = crate::words::quoted(name);
    Diagnostic::at(sources, obj, field, format!("{} `{name}` is not declared", kind.word()))
        .expected(format!("the name of a declared {}", kind.word()))
}

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let tenant_exists = |t: &str| intent.tenants.contains_key(t);

    for (name, seg) in &intent.segments {
        let obj = ObjectRef::new(Kind::Segment, name);
        if !tenant_exists(&seg.tenant) && !sources.is_unreadable(&obj, "tenant") {
            out.push(dangling(sources, &obj, "tenant", Kind::Tenant, &seg.tenant));
        }
        for (i, t) in seg.shared_with.iter().enumerate() {
            if !tenant_exists(t) {
                out.push(dangling(sources, &obj, &format!("shared_with[{i}]"), Kind::Tenant, t));
            }
        }
    }

    for (name, site) in &intent.sites {
        // Spelt out only for a problem (10,000 sites on every apply).
        let obj = || ObjectRef::new(Kind::Site, name);
        let tenant_known = tenant_exists(&site.tenant);
        if !tenant_known && !sources.is_unreadable(&obj(), "tenant") {
            out.push(dangling(sources, &obj(), "tenant", Kind::Tenant, &site.tenant));
        }
        for (i, a) in site.attachments.iter().enumerate() {
            let field = || format!("attachments[{i}].segment");
            match intent.segments.get(&a.segment) {
                None => out.push(dangling(sources, &obj(), &field(), Kind::Segment, &a.segment)),
                // Access points carry segments for everyone; they are the shared hubs.
                Some(seg) if tenant_known && !site.is_access_point() && !seg.usable_by(&site.tenant) => out.push(
                    Diagnostic::at(
                        sources,
                        &obj(),
                        &field(),
                        format!(
                            "tenant `{}` may not use segment `{}` (owned by `{}`, not shared with it)",
                            site.tenant, a.segment, seg.tenant
                        ),
                    )
                    .expected("a segment owned by the site's tenant or listed in its shared_with")
                    .related(
                        sources.field(&ObjectRef::new(Kind::Segment, &a.segment), "name"),
                        "segment declared here",
                    ),
                ),
                Some(_) => {}
            }
        }
    }

    for (name, policy) in &intent.policies {
        let obj = ObjectRef::new(Kind::Policy, name);
        if !tenant_exists(&policy.tenant) && !sources.is_unreadable(&obj, "tenant") {
            out.push(dangling(sources, &obj, "tenant", Kind::Tenant, &policy.tenant));
        }
        let mut ends = Vec::new();
        for (field, seg_name) in [("from", &policy.from), ("to", &policy.to)] {
            match intent.segments.get(seg_name) {
                None if sources.is_unreadable(&obj, field) => {}
                None => out.push(dangling(sources, &obj, field, Kind::Segment, seg_name)),
                Some(seg) => {
                    if tenant_exists(&policy.tenant) && !seg.usable_by(&policy.tenant) {
                        out.push(
                            Diagnostic::at(
                                sources,
                                &obj,
                                field,
                                format!(
                                    "tenant `{}` may not use segment `{seg_name}` (owned by `{}`, not shared with it)",
                                    policy.tenant, seg.tenant
                                ),
                            )
                            .expected("a segment the policy's tenant owns or that is shared with it"),
                        );
                    }
                    ends.push(seg);
                }
            }
        }
        if policy.from == policy.to {
            out.push(
                Diagnostic::at(sources, &obj, "to", format!("policy connects segment `{}` to itself", policy.to))
                    .expected("two different segments (traffic inside a segment is always allowed)"),
            );
        } else if let [from, to] = ends[..] {
            // Policy traffic crosses from one segment's table to the other's
            // at the access points, so both must be served by the same pair.
            let served = |seg: &str, region| {
                intent
                    .sites
                    .values()
                    .find(|s| s.is_access_point() && s.region == region && s.attachment(seg).is_some())
                    .map(|s| s.name.as_str())
            };
            for region in [Region::East, Region::West] {
                let (a, b) = (served(&from.name, region), served(&to.name, region));
                if let (Some(a), Some(b)) = (a, b)
                    && a != b
                {
                    out.push(
                        Diagnostic::at(sources, &obj, "to", format!(
                            "segments `{}` and `{}` use different access points ({a} and {b}), so no access point can enforce this policy",
                            from.name, to.name
                        ))
                        .expected("segments served by the same access points"),
                    );
                }
            }
            // Policy traffic is routed between the two segments' tables at the
            // access points: an address must mean one host.
            for a in &from.prefixes {
                if let Some(b) = to.prefixes.iter().find(|b| nets_overlap(a, b)) {
                    out.push(
                        Diagnostic::at(sources, &obj, "to", format!(
                            "segments `{}` and `{}` overlap ({a} and {b}), so traffic between them cannot be routed",
                            from.name, to.name
                        ))
                        .expected("segments with disjoint prefixes"),
                    );
                }
            }
        }
        if !policy.protocol.has_ports() && !policy.ports.is_empty() {
            out.push(
                Diagnostic::at(sources, &obj, "ports", format!("{:?} has no ports", policy.protocol).to_lowercase())
                    .expected("no ports, or protocol tcp or udp"),
            );
        }
    }
}
