//! Reads YAML documents into an [`Intent`], keeping each object's tree for
//! positions, and reporting every problem it meets rather than stopping at
//! the first one.
//!
//! The tree comes from [`tree`] (saphyr-parser events with byte ranges); it
//! is read by hand so that unknown fields, wrong types and missing fields all
//! become located diagnostics in one pass.

mod objects;
mod reader;

use super::source::{Loc, ObjectRef, SourceFile, SourceMap};
use super::tree::{self, Node, Value};
use super::{Intent, Kind, YamlName};
use crate::diagnostic::Diagnostic;
use objects::{read_operator, read_policy, read_segment, read_settings, read_site, read_tenant};
use reader::Reader;

/// The result of reading YAML: the intent (possibly partial), where it came
/// from, and every problem found while reading.
#[derive(Debug, Default)]
pub struct Parsed {
    pub intent: Intent,
    pub sources: SourceMap,
    pub diagnostics: Vec<Diagnostic>,
}

/// Reads every document of every file into one intent.
pub fn parse_files(files: Vec<SourceFile>) -> Parsed {
    let mut p = Parsed::default();
    let mut settings_seen = false;
    for file in files {
        let id = p.sources.add_file(file);
        let (docs, problems) = match tree::documents(&p.sources.files[id]) {
            Ok(parsed) => parsed,
            Err(e) => {
                let file = &p.sources.files[id];
                let d = match tab_in_indentation(&file.text, e.range.start).filter(|_| e.message.contains("tab")) {
                    // The parser notices a tab where a token ends, often a
                    // line above: point at the tab itself.
                    Some(at) => Diagnostic::new(format!("{} is not valid YAML: a tab in the indentation", file.name))
                        .expected("indentation with spaces (YAML does not allow tabs there)")
                        .with_loc(Loc { file: id, range: at..at + 1 }),
                    None => Diagnostic::new(format!("{} is not valid YAML: {}", file.name, e.message))
                        .expected("well-formed YAML")
                        .with_loc(Loc { file: id, range: e.range }),
                };
                p.diagnostics.push(d);
                continue;
            }
        };
        for e in problems {
            p.diagnostics.push(
                Diagnostic::new(e.message)
                    .expected("plain YAML: each key once, no aliases")
                    .with_loc(Loc { file: id, range: e.range }),
            );
        }
        for (index, doc) in docs.into_iter().enumerate() {
            if matches!(doc.value, Value::Null) {
                continue; // empty document, e.g. a trailing `---`
            }
            read_document(&mut p, id, index + 1, doc, &mut settings_seen);
        }
    }
    p
}

/// The byte offset of the first tab in a line's indentation, on the line
/// of `from` or the two after it.
fn tab_in_indentation(text: &str, from: usize) -> Option<usize> {
    let start = text[..from.min(text.len())].rfind('\n').map_or(0, |i| i + 1);
    let mut offset = start;
    for line in text[start..].split_inclusive('\n').take(3) {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        if let Some(i) = line[..indent].find('\t') {
            return Some(offset + i);
        }
        offset += line.len();
    }
    None
}

/// Convenience for tests and the API: one in-memory file.
pub fn parse_str(name: &str, text: &str) -> Parsed {
    parse_files(vec![SourceFile::new(name, text)])
}
fn read_document(p: &mut Parsed, file: usize, index: usize, doc: Node, settings_seen: &mut bool) {
    if let Some(obj) = read_object(p, file, index, &doc, settings_seen) {
        p.sources.set_object(obj, file, doc);
    }
}

/// Reads one document (the `index`th of its file, from 1) into the intent;
/// the object it declared, if any.
fn read_object(p: &mut Parsed, file: usize, index: usize, doc: &Node, settings_seen: &mut bool) -> Option<ObjectRef> {
    let placeholder = ObjectRef::new(Kind::Settings, "?");
    // Until its kind is known, a document's problems are its own (not the
    // settings', nor any object's).
    let document = Some(format!("document {index} of {}", p.sources.files[file].name));
    let mut r = Reader { p, file, obj: placeholder, document };
    let Value::Map(entries) = &doc.value else {
        r.error(doc, "", format!("a document holds {}", doc.describe()), "a mapping with `kind` and `name`");
        return None;
    };
    let lookup =
        |key: &str| entries.iter().find(|(k, _)| matches!(&k.value, Value::Str(s) if s == key)).map(|(_, v)| v);
    let kinds = Kind::options();
    let Some(kind_node) = lookup("kind") else {
        r.error(doc, "kind", "missing field `kind`", "one of Tenant, Segment, Site, Policy, Settings, Operator");
        return None;
    };
    let kind = r.choice(kind_node, "kind", &kinds)?;
    r.document = None;
    let name = if kind == Kind::Settings {
        Some("settings".to_string())
    } else {
        match lookup("name") {
            Some(n) => r.string(n, "name"),
            None => {
                r.obj = ObjectRef::new(kind, "?");
                r.error(doc, "name", "missing field `name`", "a name");
                None
            }
        }
    };
    let name = name?;
    let obj = ObjectRef::new(kind, name.clone());
    r.obj = obj.clone();

    // A second definition is reported against the first and not read.
    let first = r.p.sources.object(&obj);
    let duplicate = first.is_some() || (kind == Kind::Settings && *settings_seen);
    if duplicate {
        let at = lookup("name").unwrap_or(kind_node);
        let what = if kind == Kind::Settings {
            "a second Settings document".to_string()
        } else {
            format!("duplicate {} name `{name}`", kind.word())
        };
        let d = Diagnostic {
            object: Some(obj.clone()),
            field: Some("name".into()),
            message: what,
            expected: Some(format!("each {} declared once", kind.word())),
            loc: Some(r.loc(at)),
            related: Vec::new(),
        }
        .related(r.p.sources.field(&obj, "name"), "first declared here");
        r.p.diagnostics.push(d);
        return None;
    }
    match kind {
        Kind::Tenant => read_tenant(&mut r, doc, name),
        Kind::Segment => read_segment(&mut r, doc, name),
        Kind::Site => read_site(&mut r, doc, name),
        Kind::Policy => read_policy(&mut r, doc, name),
        Kind::Operator => read_operator(&mut r, doc, name),
        Kind::Settings => {
            *settings_seen = true;
            read_settings(&mut r, doc);
        }
    }
    Some(obj)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_kind_and_records_field_positions() {
        let text = "kind: Tenant\nname: city-a\ndescription: 市役所\n---\nkind: Segment\nname: lgwan\ntenant: city-a\nprefixes: [10.0.0.0/16, \"fd00::/48\"]\n";
        let p = parse_str("t.yaml", text);
        assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
        assert_eq!(p.intent.tenants["city-a"].description, "市役所");
        assert_eq!(p.intent.segments["lgwan"].prefixes.len(), 2);
        let obj = ObjectRef::new(Kind::Segment, "lgwan");
        let loc = p.sources.field(&obj, "prefixes[1]").expect("located");
        assert_eq!(p.sources.describe(&loc), "t.yaml:8:25");
    }

    #[test]
    fn reports_every_problem_of_a_document() {
        let text = "kind: Site\nname: s1\ntenant: t\nregion: north\ncolour: blue\nlines:\n  - {name: f, kind: fiber, priority: 0, address: 1.2.3}\n";
        let p = parse_str("t.yaml", text);
        let msgs: Vec<String> = p.diagnostics.iter().map(|d| d.short(&p.sources)).collect();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
        assert!(
            msgs.iter().any(|m| m.starts_with("t.yaml:4:9: site `s1`, field `region`: unknown value \"north\"")),
            "{msgs:#?}"
        );
        assert!(
            msgs.iter().any(|m| m.starts_with("t.yaml:5:1: site `s1`, field `colour`: unknown field")),
            "{msgs:#?}"
        );
        assert!(msgs.iter().any(|m| m.contains("lines[0].kind") && m.contains("\"fiber\"")));
        assert!(msgs.iter().any(|m| m.contains("lines[0].priority") && m.contains("0 is out of range")));
        assert!(msgs.iter().any(|m| m.contains("lines[0].address") && m.contains("not an IP address")));
    }

    #[test]
    fn broken_yaml_is_located() {
        let p = parse_str("b.yaml", "kind: Tenant\nname: [unclosed\n");
        assert_eq!(p.diagnostics.len(), 1);
        assert!(p.diagnostics[0].short(&p.sources).starts_with("b.yaml:"), "{:?}", p.diagnostics);
    }
}
