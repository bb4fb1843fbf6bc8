//! Semantic checks of a parsed intent. Every rule runs, and every problem is
//! reported with its object, field and position: an operator fixes a file in
//! one round, not one error at a time.

mod capacity;
mod names;
mod prefixes;
mod references;
mod sites;

use crate::diagnostic::Diagnostic;
use crate::intent::Intent;
use crate::intent::parse::Parsed;
use crate::intent::source::SourceMap;

/// Every semantic problem of an intent, in source order.
pub fn validate(intent: &Intent, sources: &SourceMap) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    names::check(intent, sources, &mut out);
    references::check(intent, sources, &mut out);
    sites::check(intent, sources, &mut out);
    prefixes::check(intent, sources, &mut out);
    capacity::check(intent, sources, &mut out);
    sort(&mut out);
    out
}

/// Parse problems and semantic problems together; an intent is usable only
/// when this is empty. Semantic checks still run on a partly unreadable intent,
/// so one round shows everything.
pub fn check(parsed: &Parsed) -> Vec<Diagnostic> {
    check_intent(parsed, &parsed.intent)
}

/// Like [`check`], for an intent made from the parsed documents and others
/// (a merge): the documents' problems, then the whole intent's, located in
/// the documents where the documents declare the object.
pub fn check_intent(parsed: &Parsed, intent: &Intent) -> Vec<Diagnostic> {
    let mut all = parsed.diagnostics.clone();
    all.extend(validate(intent, &parsed.sources));
    sort(&mut all);
    all.dedup();
    all
}

fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        let key = |d: &Diagnostic| d.loc.as_ref().map(|l| (l.file, l.range.start));
        // Located first, in file order; unlocated last, in rule order.
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        }
    });
}
