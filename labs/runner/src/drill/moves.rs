//! How often each site's agent moved traffic during a drill: a route group
//! to another access point, or a peer to another line. Read from the
//! agents' logs, from where each log was when the drill began, and from
//! their metrics' move counters, scraped before and after.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::world::World;
use crate::netns;

/// The agents' logs, read from where they were when the drill began, and
/// their move counters then: how often each site's agent moved traffic.
pub(super) struct Logs(BTreeMap<String, (PathBuf, u64, Option<Counters>)>);

/// An agent's move counters (`musubi_agent_route_group_moves_total`,
/// `musubi_agent_line_moves_total`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub(super) struct Counters {
    pub(super) route_groups: u64,
    pub(super) lines: u64,
}

impl Counters {
    /// The counters of the agent of router `node`, scraped (`None` if its
    /// metrics cannot be read).
    fn scrape(w: &World, node: &str) -> Option<Counters> {
        let text = netns::http_get(&w.lab.ns(node), crate::up::AGENT_METRICS, "/metrics")
            .map_err(|e| eprintln!("metrics of {node}: {}", musubi_process::error_text(&e)))
            .ok()?;
        let count = |name| netns::sample(&text, name).map(|v| v as u64);
        Some(Counters {
            route_groups: count("musubi_agent_route_group_moves_total")?,
            lines: count("musubi_agent_line_moves_total")?,
        })
    }
}

/// What one site's agent moved during a drill.
pub(super) struct Moved {
    /// The most times any one thing moved, from the log.
    pub(super) most: u64,
    /// How many moves its counters went up by (`None` if they could not be
    /// read both times, or went back: the agent restarted).
    pub(super) counted: Option<Counters>,
}

impl Logs {
    pub(super) fn mark(w: &World) -> Logs {
        Logs(
            w.router
                .iter()
                .map(|(site, node)| {
                    let path = w.lab.node_dir(node).join("agent.log");
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    (site.clone(), (path, len, Counters::scrape(w, node)))
                })
                .collect(),
        )
    }

    pub(super) fn moves(&self, w: &World) -> BTreeMap<String, Moved> {
        use std::io::{Read as _, Seek as _};
        let mut out = BTreeMap::new();
        for (site, (path, from, before)) in &self.0 {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                // A restarted agent starts a new log.
                let _ = f.seek(std::io::SeekFrom::Start(if len < *from { 0 } else { *from }));
                let _ = f.read_to_string(&mut text);
            }
            let after = w.router.get(site).and_then(|node| Counters::scrape(w, node));
            let counted = before.zip(after).and_then(|(b, a)| {
                Some(Counters {
                    route_groups: a.route_groups.checked_sub(b.route_groups)?,
                    lines: a.lines.checked_sub(b.lines)?,
                })
            });
            out.insert(site.clone(), Moved { most: most_moves(&text), counted });
        }
        out
    }
}

/// The most times any one thing moved in an agent's log: a route group
/// (`segment/group → peer`) or a peer's line (`peer over local→remote`).
/// Moves logged together count once per thing.
fn most_moves(log: &str) -> u64 {
    let mut count: BTreeMap<&str, u64> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("traffic moved")) {
        let Some(moved) = line.split("moved=").nth(1) else { continue };
        for item in moved.split(", ") {
            let what = item.split(" → ").next().unwrap_or(item);
            let what = what.split(" over ").next().unwrap_or(what).trim();
            *count.entry(what).or_default() += 1;
        }
    }
    count.values().copied().max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_are_counted_per_thing_that_moved() {
        let log = "x WARN traffic moved site=s operations=3 moved=ap-west over fiber→fiber\n\
                   x WARN traffic moved site=s operations=3 moved=ap-east over fiber→fiber\n\
                   x WARN traffic moved site=s operations=5 moved=office/office → ap-west, ap-east over lte→inet\n\
                   x WARN traffic moved site=s operations=5 moved=office/office → ap-east, ap-east over fiber→fiber\n\
                   x INFO peer down";
        assert_eq!(most_moves(log), 3, "ap-east's line moved three times");
        assert_eq!(most_moves(""), 0);
    }
}
