//! Counts in words, as operators read them: `1 tenant`, `2 policies`, and
//! the one-line summary of an applied change (`3 sites changed, 1 policy
//! added`).

use std::collections::BTreeMap;

/// `noun` for `n` things: `1 site`, `0 sites`, `2 policies`, `10,010 sites`.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{} {}", number(n), plural(noun)) }
}

/// `n` with its thousands separated by commas: `10,010`.
pub fn number(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The plural of an English noun of Musubi's vocabulary (the last word of
/// `noun` is the one that changes: `route group` → `route groups`).
pub fn plural(noun: &str) -> String {
    let consonant_y = noun.len() > 1
        && noun.ends_with('y')
        && !matches!(noun.as_bytes()[noun.len() - 2], b'a' | b'e' | b'i' | b'o' | b'u');
    if consonant_y {
        format!("{}ies", &noun[..noun.len() - 1])
    } else if ["s", "x", "ch", "sh"].iter().any(|e| noun.ends_with(e)) {
        format!("{noun}es")
    } else {
        format!("{noun}s")
    }
}

/// The counts of an audit summary's clauses ([`crate::audit::summarise`]:
/// `+site a, ~site b, -policy p, ~settings`), by kind and what happened:
/// `1 site added, 1 site changed, 1 policy removed, settings changed`.
/// Kinds in the summary's order; `no change` stays as it is.
pub fn change_counts(summary: &str) -> String {
    let mut kinds: Vec<&str> = Vec::new();
    let mut counts: BTreeMap<(&str, usize), usize> = BTreeMap::new();
    let mut settings = false;
    for clause in summary.split(", ") {
        if clause == "~settings" {
            settings = true;
            continue;
        }
        if clause.is_empty() {
            continue;
        }
        let Some((at, kind)) = parse_clause(clause) else { return summary.to_string() };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
        *counts.entry((kind, at)).or_default() += 1;
    }
    if kinds.is_empty() && !settings {
        return summary.to_string();
    }
    let mut out: Vec<String> = Vec::new();
    if settings {
        out.push("settings changed".into());
    }
    for kind in kinds {
        for (at, verb) in VERBS.iter().enumerate() {
            if let Some(n) = counts.get(&(kind, at)) {
                out.push(format!("{} {verb}", count(*n, kind)));
            }
        }
    }
    out.join(", ")
}

/// What happened to an object, by the index [`parse_clause`] gives.
const VERBS: [&str; 3] = ["added", "changed", "removed"];

/// A clause of an audit summary, `+site a`: what happened to it (an index
/// into [`VERBS`]) and its kind; `None` for a clause of another form.
fn parse_clause(clause: &str) -> Option<(usize, &str)> {
    let at = match clause.chars().next()? {
        '+' => 0,
        '~' => 1,
        '-' => 2,
        _ => return None,
    };
    Some((at, clause[1..].split(' ').next().unwrap_or_default()))
}

/// An audit summary ([`crate::audit::summarise`]) for a terminal: at
/// most `shown` clauses of each kind and what happened to it, the others
/// counted — `+site a, +site b and 9998 more sites added` rather than
/// 10,000 clauses on one line (a first import's). A summary of another
/// form is returned as it is.
pub fn condensed(summary: &str, shown: usize) -> String {
    let mut groups: Vec<((usize, &str), Vec<&str>)> = Vec::new();
    for clause in summary.split(", ") {
        let Some(group) = parse_clause(clause) else { return summary.to_string() };
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, clauses)) => clauses.push(clause),
            None => groups.push((group, vec![clause])),
        }
    }
    let mut out: Vec<String> = Vec::new();
    for ((at, kind), clauses) in groups {
        // Naming one more is as short as counting it.
        if clauses.len() <= shown + 1 {
            out.extend(clauses.iter().map(|c| c.to_string()));
            continue;
        }
        let more = count(clauses.len() - shown, &format!("more {kind}"));
        out.push(format!("{} and {more} {}", clauses[..shown].join(", "), VERBS[at]));
    }
    out.join(", ")
}

/// How much of a value a diagnostic quotes.
pub const QUOTED_BYTES: usize = 120;

/// A value as a diagnostic quotes it: [`printable`], at most [`QUOTED_BYTES`].
pub fn quoted(text: &str) -> std::borrow::Cow<'_, str> {
    printable(text, QUOTED_BYTES)
}

/// `text` as it may be printed to a terminal: control characters (escape
/// sequences, bells, carriage returns, C1 controls, bidirectional
/// overrides) written as `\u{…}` escapes, and at most `max_bytes` of the
/// text kept, with how long it was. For anything a site, a YAML file or a
/// client sent that reaches an operator's screen or a log line.
pub fn printable(text: &str, max_bytes: usize) -> std::borrow::Cow<'_, str> {
    let hostile = |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if text.len() <= max_bytes && !text.chars().any(hostile) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::new();
    for c in text.chars() {
        if out.len() >= max_bytes {
            out.push_str(&format!("… ({} bytes)", text.len()));
            break;
        }
        if hostile(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A duration as operators write one: `90s`, `30m`, `1h`, `2d` (a bare
/// number is seconds).
pub fn duration(s: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("`{s}` is not a duration (like 90s, 30m, 1h, 2d)"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n.saturating_mul(factor)))
}

/// Seconds as [`duration`] reads them, in the largest unit that is exact.
pub fn duration_text(secs: u64) -> String {
    match secs {
        0 => "0s".to_string(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_is_singular_and_the_rest_plural() {
        assert_eq!(count(10_010, "site"), "10,010 sites");
        assert_eq!(count(999, "peer"), "999 peers");
        assert_eq!(number(0), "0");
        assert_eq!(number(1_000), "1,000");
        assert_eq!(number(1_234_567), "1,234,567");
        assert_eq!(count(1, "tenant"), "1 tenant");
        assert_eq!(count(0, "tenant"), "0 tenants");
        assert_eq!(count(2, "policy"), "2 policies");
        assert_eq!(count(1, "policy"), "1 policy");
        assert_eq!(count(3, "address"), "3 addresses");
        assert_eq!(count(2, "gateway"), "2 gateways");
        assert_eq!(count(5, "route group"), "5 route groups");
        assert_eq!(count(2, "match"), "2 matches");
    }

    #[test]
    fn a_summary_becomes_counts_by_kind() {
        assert_eq!(
            change_counts("+site a, ~site b, ~site c, -policy p, ~settings"),
            "settings changed, 1 site added, 2 sites changed, 1 policy removed"
        );
        assert_eq!(change_counts("+tenant t"), "1 tenant added");
        assert_eq!(change_counts("no change"), "no change");
        // Something else is shown as it is, never miscounted.
        assert_eq!(change_counts("rolled back to 7"), "rolled back to 7");
    }

    #[test]
    fn a_long_summary_names_a_few_of_each_kind_and_counts_the_rest() {
        let sites: Vec<String> = (0..10).map(|i| format!("+site s{i}")).collect();
        let summary =
            format!("~settings, +tenant t, {}, ~site x, -policy p, -policy q, -policy r, -policy s", sites.join(", "));
        assert_eq!(
            condensed(&summary, 2),
            "~settings, +tenant t, +site s0, +site s1 and 8 more sites added, ~site x, \
             -policy p, -policy q and 2 more policies removed"
        );
        // Three of a kind with two shown: the third is named, not counted.
        assert_eq!(condensed("+site a, +site b, +site c", 2), "+site a, +site b, +site c");
        assert_eq!(condensed(&summary, 20), summary);
        assert_eq!(condensed("no change", 2), "no change");
        assert_eq!(condensed("rolled back to 7", 2), "rolled back to 7");
    }

    #[test]
    fn control_characters_are_escaped_and_long_text_cut() {
        assert_eq!(printable("office-a", 64), "office-a");
        assert_eq!(printable("a\u{1b}[2Jb\r\u{9b}c\u{202e}", 64), "a\\u{1b}[2Jb\\u{d}\\u{9b}c\\u{202e}");
        let long = "é".repeat(100);
        assert_eq!(printable(&long, 11), format!("{}… (200 bytes)", "é".repeat(6)));
    }
}
