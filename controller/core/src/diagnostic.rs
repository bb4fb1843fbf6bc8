//! Diagnostics: what is wrong, where (file, line, column, object, field) and
//! what was expected, rendered like a compiler error with the source line and
//! a caret under the culprit.

use codespan_reporting::diagnostic::{Diagnostic as CsDiagnostic, Label};
use codespan_reporting::files::SimpleFiles;
use codespan_reporting::term::{self, Config, termcolor};

use crate::intent::source::{Loc, ObjectRef, SourceMap};

/// One problem in an intent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub object: Option<ObjectRef>,
    /// Field path inside the object, e.g. `lines[1].priority`.
    pub field: Option<String>,
    pub message: String,
    pub expected: Option<String>,
    pub loc: Option<Loc>,
    /// Other places that explain the problem (the first definition of a
    /// duplicate, the prefix it overlaps…).
    pub related: Vec<(Loc, String)>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>) -> Self {
        Self { object: None, field: None, message: message.into(), expected: None, loc: None, related: Vec::new() }
    }

    /// A problem with one field of one object, located through the source map.
    pub fn at(sources: &SourceMap, object: &ObjectRef, field: &str, message: impl Into<String>) -> Self {
        let loc = if field.is_empty() { sources.object(object) } else { sources.field(object, field) };
        Self {
            object: Some(object.clone()),
            field: (!field.is_empty()).then(|| field.to_string()),
            message: message.into(),
            expected: None,
            loc,
            related: Vec::new(),
        }
    }

    pub fn expected(mut self, expected: impl Into<String>) -> Self {
        self.expected = Some(expected.into());
        self
    }

    pub fn with_loc(mut self, loc: Loc) -> Self {
        self.loc = Some(loc);
        self
    }

    pub fn related(mut self, loc: Option<Loc>, note: impl Into<String>) -> Self {
        if let Some(loc) = loc {
            self.related.push((loc, note.into()));
        }
        self
    }

    /// One line: `file:line:col: site `x` field `f`: message; expected …`.
    pub fn short(&self, sources: &SourceMap) -> String {
        let mut s = String::new();
        if let Some(loc) = &self.loc {
            s.push_str(&sources.describe(loc));
            s.push_str(": ");
        }
        s.push_str(&self.headline());
        s
    }

    /// Object, field, message and expectation, without the location.
    pub fn headline(&self) -> String {
        let mut s = String::new();
        if let Some(o) = &self.object {
            s.push_str(&o.to_string());
            if let Some(f) = &self.field {
                s.push_str(&format!(", field `{f}`"));
            }
            s.push_str(": ");
        }
        s.push_str(&self.message);
        if let Some(e) = &self.expected {
            s.push_str("; expected ");
            s.push_str(e);
        }
        s
    }
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.headline())
    }
}

/// Renders diagnostics with their source lines and carets, optionally in ANSI
/// colour, followed by a one-line count.
pub fn render(diags: &[Diagnostic], sources: &SourceMap, color: bool) -> String {
    let mut files = SimpleFiles::new();
    for f in &sources.files {
        files.add(f.name.clone(), f.text.clone());
    }
    let config = Config::default();
    let mut buffer = if color { termcolor::Buffer::ansi() } else { termcolor::Buffer::no_color() };
    // A line longer than this is not quoted (a value of a megabyte on one
    // line would be printed whole); the note still says where.
    const QUOTED_LINE: usize = 400;
    let quotable = |loc: &Loc| {
        let Some(text) = sources.files.get(loc.file).map(|f| f.text.as_str()) else { return false };
        let (start, end) = (loc.range.start.min(text.len()), loc.range.end.min(text.len()));
        let from = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let to = text[end..].find('\n').map_or(text.len(), |i| end + i);
        to - from <= QUOTED_LINE && text.is_char_boundary(start) && text.is_char_boundary(end)
    };
    for d in diags {
        let mut labels = Vec::new();
        if let Some(loc) = d.loc.as_ref().filter(|l| quotable(l)) {
            let label = Label::primary(loc.file, loc.range.clone());
            labels.push(match &d.expected {
                Some(e) => label.with_message(format!("expected {e}")),
                None => label,
            });
        }
        for (loc, note) in d.related.iter().filter(|(l, _)| quotable(l)) {
            labels.push(Label::secondary(loc.file, loc.range.clone()).with_message(note.clone()));
        }
        let mut notes = Vec::new();
        if let Some(loc) = &d.loc {
            notes.push(format!("at {}", sources.describe(loc)));
        }
        let cs = CsDiagnostic::error().with_message(d.headline()).with_labels(labels).with_notes(notes);
        // Writing to an in-memory buffer only fails on a bad file id, which
        // the source map cannot produce; fall back to the short form anyway.
        if term::emit_to_write_style(&mut buffer, &config, &files, &cs).is_err() {
            return diags.iter().map(|d| d.short(sources)).collect::<Vec<_>>().join("\n");
        }
    }
    let mut out = String::from_utf8_lossy(buffer.as_slice()).into_owned();
    let n = diags.len();
    out.push_str(&format!("{n} error{} found\n", if n == 1 { "" } else { "s" }));
    out
}

#[cfg(test)]
mod tests {
    use super::render;
    use crate::intent::parse::parse_str;

    #[test]
    fn a_long_line_is_not_quoted_whole_and_escapes_stay_escaped() {
        // A description that is a list holding a string of 100,000 bytes,
        // in a tenant whose name carries a terminal escape.
        let long = "x".repeat(100_000);
        let text = format!("kind: Tenant\nname: \"t\\e[2J\"\ndescription: [\"{long}\"]\n");
        let parsed = parse_str("t.yaml", &text);
        let out = render(&parsed.diagnostics, &parsed.sources, false);
        assert!(out.contains("t.yaml:3:"), "the place is still given: {out:.600}");
        assert!(out.len() < 2_000, "{} bytes rendered: {out:.600}", out.len());
        assert!(!out.contains('\u{1b}') && out.contains("tenant `t\\u{1b}[2J`"), "{out:.600}");
    }
}
