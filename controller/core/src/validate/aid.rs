//! Mutual aid: each aid names a real pair of another network's access
//! points (one east, one west) that does not carry the segment already, and
//! its name is unique (operators activate it by name); a segment has one.

use std::collections::BTreeMap;

use crate::diagnostic::Diagnostic;
use crate::intent::source::{ObjectRef, SourceMap};
use crate::intent::{Intent, Kind, Region};
use crate::words::quoted;

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, seg) in intent.segments.iter().filter(|(_, s)| !s.aid.is_empty()) {
        let obj = ObjectRef::new(Kind::Segment, name);
        if seg.aid.len() > 1 {
            out.push(
                Diagnostic::at(sources, &obj, "aid[1]", format!("segment `{name}` declares {} aids", seg.aid.len()))
                    .expected("one aid per segment (its sites hold one tunnel to each aiding access point)"),
            );
        }
        for (i, aid) in seg.aid.iter().enumerate() {
            let at = |field: &str| format!("aid[{i}].{field}");
            if !super::object_name_ok(&aid.name) {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &at("name"),
                        format!("\"{}\" is not a valid name", quoted(&aid.name)),
                    )
                    .expected("lowercase letters, digits and dashes, starting with a letter"),
                );
            } else if let Some(first) = seen.insert(&aid.name, name) {
                out.push(
                    Diagnostic::at(sources, &obj, &at("name"), format!("aid `{}` is declared twice", aid.name))
                        .expected("a name no other aid has")
                        .related(sources.field(&ObjectRef::new(Kind::Segment, first), "name"), "first declared here"),
                );
            }
            if aid.access_points.len() != 2 {
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &at("access_points"),
                        format!("{} access points named", aid.access_points.len()),
                    )
                    .expected("the aiding pair: one east and one west access point"),
                );
            }
            let mut regions = Vec::new();
            for (j, ap) in aid.access_points.iter().enumerate() {
                let field = at(&format!("access_points[{j}]"));
                match intent.sites.get(ap) {
                    None => out.push(
                        Diagnostic::at(sources, &obj, &field, format!("site `{}` is not declared", quoted(ap)))
                            .expected("the name of a declared access point"),
                    ),
                    Some(site) if !site.is_access_point() => out.push(
                        Diagnostic::at(sources, &obj, &field, format!("site `{ap}` is not an access point"))
                            .expected("a site with role: access-point"),
                    ),
                    Some(site) if site.attachment(name).is_some() => out.push(
                        Diagnostic::at(
                            sources,
                            &obj,
                            &field,
                            format!("access point `{ap}` carries segment `{name}` already"),
                        )
                        .expected("another network's access point (aid is for when the segment's own are lost)"),
                    ),
                    Some(site) => regions.push(site.region),
                }
            }
            if regions.len() == 2 && regions[0] == regions[1] {
                let region = if regions[0] == Region::East { "east" } else { "west" };
                out.push(
                    Diagnostic::at(
                        sources,
                        &obj,
                        &at("access_points"),
                        format!("both access points are in the {region}"),
                    )
                    .expected("one east and one west access point"),
                );
            }
        }
    }
}
