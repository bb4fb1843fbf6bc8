//! Semantic checks of a parsed intent. Every rule runs, and every problem is
//! reported with its object, field and position: an operator fixes a file in
//! one round, not one error at a time.

mod aid;
mod capacity;
mod legacy;
mod names;
mod operators;
mod prefixes;
mod references;
mod sites;

pub use names::object_name_ok;

use crate::diagnostic::Diagnostic;
use crate::intent::Intent;
use crate::intent::parse::Parsed;
use crate::intent::source::SourceMap;

/// A rule over a whole intent.
type Rule = fn(&Intent, &SourceMap, &mut Vec<Diagnostic>);

/// Every rule, in the order their unlocated problems are reported. Capacity
/// counts the whole intent, so a change-only check runs it on all of it.
const RULES: [Rule; 7] =
    [names::check, references::check, sites::check, prefixes::check, operators::check, aid::check, legacy::check];
const WHOLE_INTENT_RULES: [Rule; 1] = [capacity::check];

fn run(rules: &[Rule], intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    for rule in rules {
        rule(intent, sources, out);
    }
}

/// Every semantic problem of an intent, in source order.
pub fn validate(intent: &Intent, sources: &SourceMap) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    run(&RULES, intent, sources, &mut out);
    run(&WHOLE_INTENT_RULES, intent, sources, &mut out);
    sort(&mut out);
    out
}

/// More changed sites than this and [`validate_change`] checks everything.
const FEW_SITES: usize = 64;

/// Every problem of `new`, an intent made from `old` — which was valid — by
/// a change. A change of a few member sites (the everyday change at
/// national scale) is checked without visiting the unchanged ones beyond
/// their lines and prefixes: every rule runs on the intent without them
/// (access points, tenants, segments, policies and settings are all there),
/// then the changed sites' new underlay addresses and prefixes (those the
/// same site did not have in `old`) are compared with theirs — the only
/// rules that relate one member site to another. Any
/// other change checks the whole of `new`, as [`validate`] does.
pub fn validate_change(old: &Intent, new: &Intent, sources: &SourceMap) -> Vec<Diagnostic> {
    // Tenants matter to validation (who may use a segment), not to compiling.
    let few_members = crate::plan::affected::member_change(old, new)
        .filter(|sites| sites.len() <= FEW_SITES && old.tenants == new.tenants);
    let Some(sites) = few_members else {
        return validate(new, sources);
    };
    let changed: std::collections::BTreeSet<&str> = sites.iter().map(|n| n.as_str()).collect();
    let mut small = Intent {
        settings: new.settings.clone(),
        tenants: new.tenants.clone(),
        segments: new.segments.clone(),
        policies: new.policies.clone(),
        operators: new.operators.clone(),
        sites: Default::default(),
    };
    // Access points, and migration gateways, whose legacy prefixes are
    // checked against the changed sites' (the legacy rule sees the sites
    // in `small`): found without reading every site (see `notable`).
    for (site, _) in crate::intent::notable::notable(new) {
        if let Some((name, site)) = new.sites.get_key_value(&site.name) {
            small.sites.insert(name.clone(), site.clone());
        }
    }
    for name in &changed {
        if let Some((name, site)) = new.sites.get_key_value(*name) {
            small.sites.insert(name.clone(), site.clone());
        }
    }
    let mut out = Vec::new();
    run(&RULES, &small, sources, &mut out);
    run(&WHOLE_INTENT_RULES, new, sources, &mut out);
    let others = new.sites.iter().filter(|(n, s)| !s.is_access_point() && !changed.contains(n.as_str()));
    let fresh: Vec<(&String, &crate::intent::Site)> =
        changed.iter().filter_map(|n| new.sites.get_key_value(*n)).map(|(n, s)| (n, &**s)).collect();
    sites::check_underlay_against(&fresh, old, others.clone(), sources, &mut out);
    prefixes::check_against(&fresh, old, others, sources, &mut out);
    sort(&mut out);
    out
}

/// Parse problems and semantic problems together; an intent is usable only
/// when this is empty. Semantic checks still run on a partly unreadable intent,
/// so one round shows everything.
pub fn check(parsed: &Parsed) -> Vec<Diagnostic> {
    check_parts(parsed, validate(&parsed.intent, &parsed.sources))
}

/// Like [`check`], for `new` — the documents alone, or merged into `old` —
/// made from `old` (a valid intent): see [`validate_change`].
pub fn check_change(parsed: &Parsed, old: &Intent, new: &Intent) -> Vec<Diagnostic> {
    check_parts(parsed, validate_change(old, new, &parsed.sources))
}

fn check_parts(parsed: &Parsed, semantic: Vec<Diagnostic>) -> Vec<Diagnostic> {
    let mut all = parsed.diagnostics.clone();
    all.extend(semantic);
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
