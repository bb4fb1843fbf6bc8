//! Human-readable plans, in the style of `terraform plan`.

use super::{Action, Change, Plan};

const RESET: &str = "\x1b[0m";

/// Affected sites named at the end of a plan; the rest are counted (each
/// one's change is listed above).
const AFFECTED_SHOWN: usize = 20;

fn colour(a: Action) -> &'static str {
    match a {
        Action::Add => "\x1b[32m",
        Action::Remove => "\x1b[31m",
        Action::Change => "\x1b[33m",
    }
}

/// The same change to this many sites, or to this many peers or route
/// groups of one segment, is written once, with the others named after it:
/// a change of the settings reaches every peer of every site, and a plan
/// of 10,000 sites written out whole is half a million lines.
const ALIKE_FROM: usize = 4;
/// Names listed beside a change written once for many.
const ALIKE_NAMED: usize = 3;

/// Kinds named after another site: their changes compare without the name.
fn named_after_sites(kind: &str) -> bool {
    kind == "peer" || kind == "route group"
}

/// What a change does, as text that two changes share when they are
/// alike: its own name left out; its children's kept but for peers and
/// route groups that change in place (added or removed, which one it is
/// is the change).
fn shape(c: &Change, out: &mut String) {
    out.push(c.action.sign());
    out.push_str(c.kind);
    for d in &c.details {
        out.push('\x1f');
        out.push_str(d);
    }
    for child in &c.children {
        out.push('\x1e');
        if !(named_after_sites(child.kind) && child.action == Action::Change) {
            out.push_str(&child.name);
        }
        shape(child, out);
    }
    out.push('\x1d');
}

/// Indices of `changes` in groups of alike ones, each group in the order
/// of its first member, the groups in the order of their first members.
/// Only changes that `groupable` lets in are grouped; the others, and
/// groups smaller than [`ALIKE_FROM`], stay one per group.
fn alike(changes: &[Change], groupable: impl Fn(&Change) -> bool) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_shape: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, c) in changes.iter().enumerate() {
        if !groupable(c) {
            groups.push(vec![i]);
            continue;
        }
        let mut key = String::new();
        shape(c, &mut key);
        match by_shape.get(&key) {
            Some(&g) => groups[g].push(i),
            None => {
                by_shape.insert(key, groups.len());
                groups.push(vec![i]);
            }
        }
    }
    groups
        .into_iter()
        .flat_map(|g| if g.len() >= ALIKE_FROM { vec![g] } else { g.into_iter().map(|i| vec![i]).collect() })
        .map(|g| (g[0], g))
        .collect::<std::collections::BTreeMap<usize, Vec<usize>>>()
        .into_values()
        .collect()
}

/// The first names of a group and how many more.
fn named(changes: &[Change], group: &[usize]) -> String {
    let names: Vec<&str> = group.iter().take(ALIKE_NAMED).map(|&i| changes[i].name.as_str()).collect();
    let more = group.len().saturating_sub(ALIKE_NAMED);
    if more > 0 { format!("{} and {more} more", names.join(", ")) } else { names.join(", ") }
}

fn write(out: &mut String, c: &Change, depth: usize, color: bool) {
    write_as(out, c, &format!("{} {}", c.kind, c.name), depth, color);
}

fn write_as(out: &mut String, c: &Change, title: &str, depth: usize, color: bool) {
    let indent = "    ".repeat(depth);
    let (on, off) = if color { (colour(c.action), RESET) } else { ("", "") };
    out.push_str(&format!("{indent}{on}{} {title}{off}\n", c.action.sign()));
    for d in &c.details {
        out.push_str(&format!("{indent}      {d}\n"));
    }
    for group in alike(&c.children, |child| named_after_sites(child.kind)) {
        let first = &c.children[group[0]];
        if group.len() == 1 {
            write(out, first, depth + 1, color);
        } else {
            let kinds = crate::words::count(group.len(), first.kind);
            let title = format!("{kinds} alike: {}", named(&c.children, &group));
            write_as(out, first, &title, depth + 1, color);
        }
    }
}

/// The whole plan, ending with a summary and the affected sites.
pub fn render(plan: &Plan, color: bool) -> String {
    if plan.is_empty() {
        return "No changes. Every site's configuration is up to date.\n".into();
    }
    let mut out = String::new();
    for group in alike(&plan.sites, |_| true) {
        let first = &plan.sites[group[0]];
        write(&mut out, first, 0, color);
        if let [_, others @ ..] = group.as_slice()
            && !others.is_empty()
        {
            out.push_str(&format!(
                "  and {} changing alike: {}\n",
                crate::words::count(others.len(), "more site"),
                named(&plan.sites, others)
            ));
        }
        out.push('\n');
    }
    let bold = |s: String| {
        if color { format!("\x1b[1m{s}{RESET}") } else { s }
    };
    out.push_str(&bold(format!(
        "Plan: {} to add, {} to change, {} to remove.",
        crate::words::count(plan.count(Action::Add), "site"),
        crate::words::number(plan.count(Action::Change)),
        crate::words::number(plan.count(Action::Remove))
    )));
    out.push('\n');
    let affected = plan.affected();
    let shown: Vec<&str> = affected.iter().take(AFFECTED_SHOWN).copied().collect();
    let more = affected.len().saturating_sub(AFFECTED_SHOWN);
    let more = if more > 0 { format!(" and {} more", crate::words::number(more)) } else { String::new() };
    out.push_str(&format!("Affected sites ({}): {}{more}\n", crate::words::number(affected.len()), shown.join(", ")));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(action: Action, kind: &'static str, name: &str, details: &[&str], children: Vec<Change>) -> Change {
        Change { action, kind, name: name.into(), details: details.iter().map(|d| d.to_string()).collect(), children }
    }

    /// A member whose probe changed, its peers' timing with it.
    fn member(name: &str, aps: [&str; 2]) -> Change {
        let peers = aps.iter().map(|ap| change(Action::Change, "peer", ap, &["endpoint probe timing changed"], vec![]));
        let segment = change(Action::Change, "segment", "lgwan", &[], peers.collect());
        change(Action::Change, "site", name, &["probe: 1000 ms × 3 → 1050 ms × 3"], vec![segment])
    }

    /// The same change to many sites, or to many peers of one segment, is
    /// written once and the others named; fewer than four, or changes that
    /// differ, are written each.
    #[test]
    fn alike_changes_are_written_once() {
        let mut sites: Vec<Change> = ["b", "c", "d", "e", "f"].iter().map(|s| member(s, ["ap-e", "ap-w"])).collect();
        // Another pair of access points: alike all the same (peers compare without their names).
        sites.push(member("g", ["ap-e2", "ap-w2"]));
        // A line's address: not alike.
        let mut moved = member("h", ["ap-e", "ap-w"]);
        moved.details.push("address: 192.0.2.1 → 192.0.2.9".into());
        sites.push(moved);
        let mut ap_peers: Vec<Change> = (0..5)
            .map(|i| change(Action::Change, "peer", &format!("m{i}"), &["endpoint probe timing changed"], vec![]))
            .collect();
        ap_peers.insert(2, change(Action::Add, "peer", "new", &[], vec![]));
        let ap =
            change(Action::Change, "site", "a", &[], vec![change(Action::Change, "segment", "lgwan", &[], ap_peers)]);
        sites.insert(0, ap);
        let text = render(&Plan { sites }, false);
        // The added peer is not one of the alike: its own line, in its place.
        let expected = "\
~ site a
    ~ segment lgwan
        ~ 5 peers alike: m0, m1, m2 and 2 more
              endpoint probe timing changed
        + peer new

~ site b
      probe: 1000 ms × 3 → 1050 ms × 3
    ~ segment lgwan
        ~ peer ap-e
              endpoint probe timing changed
        ~ peer ap-w
              endpoint probe timing changed
  and 5 more sites changing alike: c, d, e and 2 more

~ site h
      probe: 1000 ms × 3 → 1050 ms × 3
      address: 192.0.2.1 → 192.0.2.9
";
        assert!(text.starts_with(expected), "{text}");
        assert!(text.contains("Plan: 0 sites to add, 8 to change, 0 to remove."), "{text}");

        // Access points each gaining another member: not alike.
        let gaining: Vec<Change> = (0..4)
            .map(|i| {
                let peer = change(Action::Add, "peer", &format!("new-{i}"), &[], vec![]);
                let segment = change(Action::Change, "segment", "lgwan", &[], vec![peer]);
                change(Action::Change, "site", &format!("ap-{i}"), &[], vec![segment])
            })
            .collect();
        let text = render(&Plan { sites: gaining }, false);
        for i in 0..4 {
            assert!(text.contains(&format!("~ site ap-{i}\n    ~ segment lgwan\n        + peer new-{i}\n")), "{text}");
        }
        assert!(!text.contains("alike"), "{text}");

        // Three alike: each written.
        let few: Vec<Change> = ["b", "c", "d"].iter().map(|s| member(s, ["ap-e", "ap-w"])).collect();
        let text = render(&Plan { sites: few }, false);
        for s in ["b", "c", "d"] {
            assert!(text.contains(&format!("~ site {s}\n")), "{text}");
        }
        assert!(!text.contains("alike"), "{text}");
    }
}
