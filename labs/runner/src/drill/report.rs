//! A drill's report: the JSON others read, the Markdown people read, and
//! an SVG plot of every flow's packets with the steps.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One drill's outcome, as the reports give it.
#[derive(Debug, serde::Serialize)]
pub(super) struct FlowResult {
    pub(super) from: String,
    pub(super) to: String,
    pub(super) segment: String,
    pub(super) rate: u32,
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) lost: u64,
    pub(super) outage_ms: f64,
    /// When the counted outage began, in s since the drill began.
    pub(super) outage_at_s: f64,
    pub(super) longest_gap_ms: f64,
    /// Every counted stretch of 20 ms or more.
    pub(super) gaps: Vec<Gap>,
    pub(super) leaked: u64,
    pub(super) misdelivered: u64,
    pub(super) pass: bool,
    /// Why a TCP stream's connection broke, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) broken: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Gap {
    pub(super) at_s: f64,
    pub(super) ms: f64,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct PathResult {
    pub(super) site: String,
    pub(super) preferred_line: String,
    pub(super) access_point: String,
    pub(super) share: f64,
    pub(super) packets: u64,
    /// Packets by `line → access point`.
    pub(super) seen: BTreeMap<String, u64>,
    pub(super) pass: bool,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Moves {
    pub(super) site: String,
    pub(super) moves: u64,
    pub(super) limit: Option<u64>,
    pub(super) pass: bool,
    /// What the agent's move counters went up by (its metrics).
    pub(super) counted: Option<super::moves::Counters>,
}

#[derive(Debug, serde::Serialize)]
pub(super) struct Report {
    pub(super) drill: String,
    pub(super) description: String,
    pub(super) lab: String,
    /// When the drill's clock (every `_s` figure) started, in seconds since
    /// the Unix epoch: to find a step or a gap in the agents' logs.
    pub(super) started_unix_s: f64,
    pub(super) duration_s: f64,
    pub(super) max_outage_ms: u64,
    pub(super) timeline: Vec<(f64, String)>,
    pub(super) flows: Vec<FlowResult>,
    pub(super) paths: Vec<PathResult>,
    /// Seconds after the drill's last step the paths were last counted
    /// (0: at once; more: a hold-down was still running).
    pub(super) paths_after_s: Option<f64>,
    pub(super) moves: Vec<Moves>,
    pub(super) matrix_checks: Vec<(f64, bool)>,
    pub(super) forwarded_checks: Vec<ForwardedCheck>,
    /// The controller's audit entries written during the drill.
    pub(super) audit: Vec<String>,
    pub(super) pass: bool,
}

/// An `expect: forwarded` step: packets of a segment the routers forwarded.
#[derive(Debug, serde::Serialize)]
pub(super) struct ForwardedCheck {
    pub(super) at_s: f64,
    pub(super) segment: String,
    pub(super) window_s: f64,
    /// Per router's site, packets.
    pub(super) sites: Vec<(String, u64)>,
    pub(super) min: u64,
    pub(super) max: Option<u64>,
    pub(super) pass: bool,
}

pub(super) fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let verdict = if r.pass { "PASS" } else { "FAIL" };
    let _ = writeln!(md, "# Drill `{}` on lab `{}`: {verdict}\n", r.drill, r.lab);
    if !r.description.is_empty() {
        let _ = writeln!(md, "{}\n", r.description);
    }
    let _ = writeln!(md, "| time | step |\n| ---: | --- |");
    for (t, what) in &r.timeline {
        let _ = writeln!(md, "| {t:.2} s | {what} |");
    }
    let _ = writeln!(
        md,
        "\nOutage: the longest time a flow went without packets while a way existed (limit {} ms).\n",
        r.max_outage_ms
    );
    let _ = writeln!(
        md,
        "| flow | segment | rate | sent | received | lost | outage | at | longest gap | leaked | misdelivered | | gaps (at: length) |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
    );
    for f in &r.flows {
        let _ = writeln!(
            md,
            "| {} → {} | {} | {}/s | {} | {} | {} | {:.0} ms | {:.2} s | {:.0} ms | {} | {} | {} | {} |",
            f.from,
            f.to,
            f.segment,
            f.rate,
            f.sent,
            f.received,
            f.lost,
            f.outage_ms,
            f.outage_at_s,
            f.longest_gap_ms,
            f.leaked,
            f.misdelivered,
            if f.pass { "✓" } else { "✗" },
            f.gaps
                .iter()
                .map(|g| format!("{:.1} s: {:.0} ms", g.at_s, g.ms))
                .chain(f.broken.iter().map(|b| format!("connection broke ({b})")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !r.paths.is_empty() {
        let after = r.paths_after_s.unwrap_or(0.0);
        let when = if after < 0.5 { "At the end".to_string() } else { format!("{after:.1} s after the end") };
        let _ = writeln!(md, "\n{when}, outer packets of each source site over one second:\n");
        let _ = writeln!(
            md,
            "| site | preferred line | access point | share | packets | by line → access point | |\n| --- | --- | --- | ---: | ---: | --- | --- |"
        );
        for p in &r.paths {
            let seen: Vec<String> = p.seen.iter().map(|(k, n)| format!("{k} {n}")).collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} % | {} | {} | {} |",
                p.site,
                p.preferred_line,
                p.access_point,
                p.share * 100.0,
                p.packets,
                seen.join(", "),
                if p.pass { "✓" } else { "✗" }
            );
        }
    }
    let _ = writeln!(md, "\nThe most times one of each site's route groups or peer lines moved:\n");
    let _ =
        writeln!(md, "| site | moves | limit | | counted: groups | lines |\n| --- | ---: | ---: | --- | ---: | ---: |");
    for m in &r.moves {
        let limit = m.limit.map_or("–".to_string(), |l| l.to_string());
        let (groups, lines) = m
            .counted
            .map_or(("–".to_string(), "–".to_string()), |c| (c.route_groups.to_string(), c.lines.to_string()));
        let _ = writeln!(
            md,
            "| {} | {} | {limit} | {} | {groups} | {lines} |",
            m.site,
            m.moves,
            if m.pass { "✓" } else { "✗" }
        );
    }
    for (t, ok) in &r.matrix_checks {
        let _ = writeln!(md, "\nMatrix at {t:.1} s: {}", if *ok { "as the intent says ✓" } else { "DIFFERS ✗" });
    }
    if !r.forwarded_checks.is_empty() {
        let _ = writeln!(
            md,
            "\nPackets of a segment forwarded by routers, counted as they enter from its tunnels:\n\n| at | segment | for | routers: packets | expected | |\n| ---: | --- | ---: | --- | --- | --- |"
        );
        for f in &r.forwarded_checks {
            let each: Vec<String> = f.sites.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            let expected = match f.max {
                Some(max) if max == f.min => format!("exactly {max}"),
                Some(max) => format!("{} to {max}", f.min),
                None => format!("at least {}", f.min),
            };
            let _ = writeln!(
                md,
                "| {:.1} s | {} | {:.1} s | {} | {expected} | {} |",
                f.at_s,
                f.segment,
                f.window_s,
                each.join(", "),
                if f.pass { "✓" } else { "✗" }
            );
        }
    }
    if !r.audit.is_empty() {
        let _ = writeln!(md, "\nAudit entries written during the drill:\n\n```");
        for line in &r.audit {
            let _ = writeln!(md, "{line}");
        }
        let _ = writeln!(md, "```");
    }
    md
}

/// The timeline plot: each flow's delivered packets per 50 ms, with the steps.
pub(super) fn svg(r: &Report, plot: &[(String, Vec<u32>)]) -> String {
    const BIN_US: u32 = 50_000;
    let (left, width, row) = (170.0, 760.0, 70.0);
    let top = 30.0 + 14.0 * r.timeline.len() as f64;
    let height = top + row * plot.len() as f64 + 40.0;
    let span = (r.duration_s * 1e6).max(1.0);
    let x = |us: f64| left + width * us / span;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">",
        left + width + 20.0
    );
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"16\" font-size=\"13\">drill {} on lab {}: {}</text>",
        r.drill,
        r.lab,
        if r.pass { "PASS" } else { "FAIL" }
    );
    for (n, (t, what)) in r.timeline.iter().enumerate() {
        let xs = x(t * 1e6);
        let _ = writeln!(
            s,
            "<line x1=\"{xs:.1}\" y1=\"{:.1}\" x2=\"{xs:.1}\" y2=\"{:.1}\" stroke=\"#c33\" stroke-dasharray=\"3,3\"/>",
            top - 6.0,
            height - 30.0
        );
        let _ = writeln!(s, "<text x=\"{xs:.1}\" y=\"{:.1}\" fill=\"#c33\">{}</text>", top - 8.0, n + 1);
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"{:.1}\">{}. {:.2} s {}</text>",
            30.0 + 14.0 * n as f64,
            n + 1,
            t,
            xml(what)
        );
    }
    for (k, (label, arrivals)) in plot.iter().enumerate() {
        let base = top + row * (k as f64 + 1.0) - 10.0;
        // Whole bins only: a last partial one would look like an outage.
        let bins = (span as u32 / BIN_US) as usize;
        let mut counts = vec![0u32; bins];
        for a in arrivals {
            if let Some(c) = counts.get_mut((a / BIN_US) as usize) {
                *c += 1;
            }
        }
        let full = f64::from(r.flows.get(k).map_or(1000, |f| f.rate)) * f64::from(BIN_US) / 1e6;
        let points: Vec<String> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let y = base - (row - 20.0) * (f64::from(*c) / full).min(1.2) / 1.2;
                format!("{:.1},{y:.1}", x(i as f64 * f64::from(BIN_US)))
            })
            .collect();
        let _ = writeln!(s, "<text x=\"10\" y=\"{:.1}\">{}</text>", base - 20.0, xml(label));
        let _ = writeln!(
            s,
            "<line x1=\"{left}\" y1=\"{base:.1}\" x2=\"{:.1}\" y2=\"{base:.1}\" stroke=\"#999\"/>",
            left + width
        );
        let _ = writeln!(s, "<polyline fill=\"none\" stroke=\"#26a\" points=\"{}\"/>", points.join(" "));
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"16\" text-anchor=\"end\" fill=\"#666\">packets delivered per 50 ms</text>",
        left + width
    );
    let axis = height - 15.0;
    let mut t = 0.0;
    while t <= r.duration_s {
        let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{axis:.1}\" text-anchor=\"middle\">{t:.0} s</text>", x(t * 1e6));
        t += if r.duration_s > 60.0 { 10.0 } else { 5.0 };
    }
    s.push_str("</svg>\n");
    s
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
