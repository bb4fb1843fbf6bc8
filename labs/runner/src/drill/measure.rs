//! Measurements. [`outage`] is pure: a flow's send and arrival times in,
//! its longest outage out. The line counters tell where each source site's
//! outer packets go at the end of a drill.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Result;

use super::faults::nft;
use super::world::World;
use super::{COUNT_TABLE, PROBE_PORT};

/// Outage of one flow: the longest stretch without a packet getting through
/// (from the last packet sent that arrived to the next one), less the time
/// an end of the flow had no line at all.
pub(super) fn outage(sent: &[u32], arrived: &[(u64, u32)], dark: &[(u32, u32)], rate: u32) -> Outage {
    let got: BTreeSet<u64> = arrived.iter().map(|a| a.0).collect();
    let interval = 1e6 / f64::from(rate);
    let at = |seq: u64| f64::from(sent.get(seq as usize).copied().unwrap_or(0));
    let mut edges: Vec<(f64, f64)> = Vec::new();
    let mut last: Option<u64> = None;
    for &s in &got {
        let gap_from = match last {
            Some(l) if s > l + 1 => Some(at(l)),
            None if s > 0 => Some(at(0) - interval),
            _ => None,
        };
        if let Some(from) = gap_from {
            edges.push((from, at(s)));
        }
        last = Some(s);
    }
    let end = sent.len() as u64;
    match last {
        Some(l) if l + 1 < end => edges.push((at(l), at(end - 1) + interval)),
        None if end > 0 => edges.push((at(0) - interval, at(end - 1) + interval)),
        _ => {}
    }
    let mut out = Outage::default();
    for (a, b) in edges {
        let overlap: f64 = dark.iter().map(|&(s, e)| (b.min(f64::from(e)) - a.max(f64::from(s))).max(0.0)).sum::<f64>();
        let gap = (b - a - interval).max(0.0);
        let counted = (gap - overlap).max(0.0) / 1e3;
        let at = (a / 1e6).max(0.0);
        out.longest_ms = out.longest_ms.max(gap / 1e3);
        if counted > out.ms {
            (out.ms, out.at_s) = (counted, at);
        }
        if counted >= GAP_MS {
            out.gaps.push((at, counted));
        }
    }
    out
}

/// Outage of a TCP flow, which loses nothing but stalls: the longest
/// stretch between two records arriving (from the first record sent to the
/// first arrival, and from the last arrival to the end of sending), less one
/// send interval, less the time an end of the flow had no line.
pub(super) fn stall(sent: &[u32], arrived: &[(u64, u32)], dark: &[(u32, u32)], rate: u32) -> Outage {
    let interval = 1e6 / f64::from(rate);
    let (Some(&first), Some(&last)) = (sent.first(), sent.last()) else { return Outage::default() };
    let mut times: Vec<f64> = arrived.iter().map(|a| f64::from(a.1)).collect();
    times.sort_by(f64::total_cmp);
    let mut marks = vec![f64::from(first)];
    marks.extend(times);
    let end = f64::from(last) + interval;
    if marks.last().is_some_and(|t| *t < end) {
        marks.push(end);
    }
    let mut out = Outage::default();
    for pair in marks.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let overlap: f64 = dark.iter().map(|&(s, e)| (b.min(f64::from(e)) - a.max(f64::from(s))).max(0.0)).sum::<f64>();
        let gap = (b - a - interval).max(0.0);
        let counted = (gap - overlap).max(0.0) / 1e3;
        out.longest_ms = out.longest_ms.max(gap / 1e3);
        if counted > out.ms {
            (out.ms, out.at_s) = (counted, (a / 1e6).max(0.0));
        }
        if counted >= GAP_MS {
            out.gaps.push(((a / 1e6).max(0.0), counted));
        }
    }
    out
}

/// A flow's gaps from 20 ms on are listed.
const GAP_MS: f64 = 20.0;

/// What [`outage`] finds in a flow.
#[derive(Debug, Default)]
pub(super) struct Outage {
    /// The longest counted stretch, in ms, and when it began (s).
    pub(super) ms: f64,
    pub(super) at_s: f64,
    /// The longest stretch as it was (dark time included).
    pub(super) longest_ms: f64,
    /// Every counted stretch of at least [`GAP_MS`]: (began at s, ms).
    pub(super) gaps: Vec<(f64, f64)>,
}

/// Packets by (line interface, access point).
pub(super) type LineCounts = BTreeMap<(String, String), u64>;

/// Outer packets each source site sent per (line interface, access point)
/// in a second: the lines' counters, read twice.
pub(super) fn line_counts(w: &World, sites: &BTreeSet<String>) -> Result<BTreeMap<String, LineCounts>> {
    let read = |router: &str| -> Result<LineCounts> {
        let out = w.lab.sh(router, &format!("nft -j list table inet {COUNT_TABLE}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut counts = BTreeMap::new();
        for r in v["nftables"].as_array().into_iter().flatten().filter_map(|o| o.get("rule")) {
            let comment = r["comment"].as_str().unwrap_or_default();
            let packets = r["expr"].as_array().into_iter().flatten().find_map(|e| e["counter"]["packets"].as_u64());
            if let (Some((ifname, ap)), Some(p)) = (comment.split_once(' '), packets) {
                *counts.entry((ifname.to_string(), ap.to_string())).or_default() += p;
            }
        }
        Ok(counts)
    };
    let mut before = BTreeMap::new();
    for s in sites {
        before.insert(s.clone(), read(&w.router[s])?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut out = BTreeMap::new();
    for s in sites {
        let after = read(&w.router[s])?;
        let diff =
            after.iter().map(|(k, v)| (k.clone(), v.saturating_sub(before[s].get(k).copied().unwrap_or(0)))).collect();
        out.insert(s.clone(), diff);
    }
    Ok(out)
}

/// The table of a `forwarded` count (beside the line counters').
const FORWARD_TABLE: &str = "musubi-drill-forwarded";

/// Packets of `segment` that each of `sites`' routers forwards during
/// `window`: entering from one of the segment's tunnels or its domain, on
/// their way elsewhere (probes end at the router and do not count). Counted
/// before any filter of the agent's, so a packet the router would drop
/// counts too.
pub(super) fn forwarded(w: &World, sites: &[String], segment: &str, window: Duration) -> Result<BTreeMap<String, u64>> {
    let mut names: Vec<String> =
        musubi_core::intent::TUNNEL_PREFIXES.iter().map(|p| format!("\"{p}{segment}\"")).collect();
    names.push(format!("\"{}\"", musubi_core::intent::vrf_name(segment)));
    let script = format!(
        "add table inet {FORWARD_TABLE}\ndelete table inet {FORWARD_TABLE}\ntable inet {FORWARD_TABLE} {{\n  chain forward {{\n    type filter hook forward priority -350; policy accept;\n    iifname {{ {} }} counter comment \"segment\"\n  }}\n}}\n",
        names.join(", ")
    );
    for site in sites {
        nft(&w.lab, &w.router[site], &script)?;
    }
    std::thread::sleep(window);
    let mut out = BTreeMap::new();
    for site in sites {
        let router = &w.router[site];
        let text = w.lab.sh(router, &format!("nft -j list table inet {FORWARD_TABLE}"))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        let packets = v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| o.get("rule"))
            .flat_map(|r| r["expr"].as_array().into_iter().flatten().filter_map(|e| e["counter"]["packets"].as_u64()))
            .sum();
        nft(&w.lab, router, &format!("delete table inet {FORWARD_TABLE}\n"))?;
        out.insert(site.clone(), packets);
    }
    Ok(out)
}

/// Counters of outer packets (WireGuard, not probes) per line interface and
/// access point, in `site`'s router.
pub(super) fn install_counters(w: &World, site: &str) -> Result<()> {
    let router = &w.router[site];
    let mut rules = String::new();
    for l in w.lines.get(site).into_iter().flatten() {
        let Some(ifname) = w.line_if.get(&(site.to_string(), l.clone())) else { continue };
        for (ap, addrs) in &w.ap_addresses {
            for a in addrs {
                let family = if a.is_ipv4() { "ip" } else { "ip6" };
                writeln!(
                    rules,
                    "    oifname \"{ifname}\" {family} daddr {a} udp dport != {PROBE_PORT} counter comment \"{ifname} {ap}\""
                )?;
            }
        }
    }
    nft(
        &w.lab,
        router,
        &format!(
            "add table inet {COUNT_TABLE}\ndelete table inet {COUNT_TABLE}\ntable inet {COUNT_TABLE} {{\n  chain output {{\n    type filter hook postrouting priority 0; policy accept;\n{rules}  }}\n}}\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_flows_outage_is_its_longest_stall() {
        // 100 records/s for 2 s; from 0.5 s nothing arrives for 300 ms, then
        // the held records arrive at once (a retransmission).
        let sent: Vec<u32> = (0..200).map(|i| i * 10_000).collect();
        let arrived: Vec<(u64, u32)> =
            (0..200u64).map(|s| (s, if (50..80).contains(&s) { 800_500 } else { s as u32 * 10_000 + 500 })).collect();
        let o = stall(&sent, &arrived, &[], 100);
        assert!((o.ms - 300.0).abs() < 1.5, "{o:?}");
        assert!((o.at_s - 0.4905).abs() < 0.001, "{o:?}");
        assert_eq!(o.gaps.len(), 1, "{o:?}");
        // A connection that stops at 1.5 s is out until the end of sending.
        let head: Vec<(u64, u32)> = (0..150u64).map(|s| (s, s as u32 * 10_000 + 500)).collect();
        let o = stall(&sent, &head, &[], 100);
        assert!((o.ms - 499.5).abs() < 1.5, "{o:?}");
        // Dark time at an end does not count; nothing at all is out all along.
        let o = stall(&sent, &arrived, &[(490_000, 700_000)], 100);
        assert!((o.ms - 90.0).abs() < 1.5, "{o:?}");
        assert!(stall(&sent, &[], &[], 100).ms > 1980.0, "nothing arrived: out all along");
    }

    #[test]
    fn outage_is_the_longest_gap_less_the_time_without_any_line() {
        // 1,000 packets/s for 2 s; 100 lost from 0.5 s, 300 lost from 1.2 s.
        let sent: Vec<u32> = (0..2000).map(|i| i * 1000).collect();
        let lost = |s: u64| (500..600).contains(&s) || (1200..1500).contains(&s);
        let arrived: Vec<(u64, u32)> = (0..2000u64).filter(|s| !lost(*s)).map(|s| (s, s as u32 * 1000 + 300)).collect();
        let o = outage(&sent, &arrived, &[], 1000);
        let (outage_ms, gap_ms, at) = (o.ms, o.longest_ms, o.at_s);
        assert!((outage_ms - 300.0).abs() < 1.5, "{outage_ms}");
        assert!((gap_ms - 300.0).abs() < 1.5 && (at - 1.199).abs() < 0.01, "{gap_ms} at {at}");
        assert_eq!(o.gaps.len(), 2, "both gaps listed: {:?}", o.gaps);
        assert!((o.gaps[0].0 - 0.499).abs() < 0.01 && (o.gaps[0].1 - 100.0).abs() < 1.5, "{:?}", o.gaps);
        // The end of the flow had no line from 1.1 s to 1.45 s: only the 50 ms after count.
        let o = outage(&sent, &arrived, &[(1_100_000, 1_450_000)], 1000);
        let (outage_ms, gap_ms) = (o.ms, o.longest_ms);
        assert!((gap_ms - 300.0).abs() < 1.5, "the longest gap as it was: {gap_ms}");
        assert!((outage_ms - 100.0).abs() < 1.5, "the 0.5 s gap is now the worst: {outage_ms}");
        // Nothing at the end, and nothing at all.
        let head: Vec<(u64, u32)> = arrived.iter().copied().filter(|a| a.0 < 1900).collect();
        assert!((outage(&sent, &head, &[], 1000).ms - 300.0).abs() < 1.5);
        let tail_only: Vec<(u64, u32)> = arrived.iter().copied().filter(|a| a.0 < 1000).collect();
        assert!(outage(&sent, &tail_only, &[], 1000).ms > 990.0, "a flow that stops is out until the end");
        assert!(outage(&sent, &[], &[], 1000).ms > 1990.0, "a flow that never arrives is out all along");
    }
}
