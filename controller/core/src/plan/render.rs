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

fn write(out: &mut String, c: &Change, depth: usize, color: bool) {
    let indent = "    ".repeat(depth);
    let (on, off) = if color { (colour(c.action), RESET) } else { ("", "") };
    out.push_str(&format!("{indent}{on}{} {} {}{off}\n", c.action.sign(), c.kind, c.name));
    for d in &c.details {
        out.push_str(&format!("{indent}      {d}\n"));
    }
    for child in &c.children {
        write(out, child, depth + 1, color);
    }
}

/// The whole plan, ending with a summary and the affected sites.
pub fn render(plan: &Plan, color: bool) -> String {
    if plan.is_empty() {
        return "No changes. Every site's configuration is up to date.\n".into();
    }
    let mut out = String::new();
    for c in &plan.sites {
        write(&mut out, c, 0, color);
        out.push('\n');
    }
    let bold = |s: String| {
        if color { format!("\x1b[1m{s}{RESET}") } else { s }
    };
    out.push_str(&bold(format!(
        "Plan: {} to add, {} to change, {} to remove.",
        crate::words::count(plan.count(Action::Add), "site"),
        plan.count(Action::Change),
        plan.count(Action::Remove)
    )));
    out.push('\n');
    let affected = plan.affected();
    let shown: Vec<&str> = affected.iter().take(AFFECTED_SHOWN).copied().collect();
    let more = affected.len().saturating_sub(AFFECTED_SHOWN);
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    out.push_str(&format!("Affected sites ({}): {}{more}\n", affected.len(), shown.join(", ")));
    out
}
