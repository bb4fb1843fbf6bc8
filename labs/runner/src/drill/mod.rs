//! `musubi lab drill FILE`: a failure drill on a running lab.
//!
//! A drill is a timeline of steps (cut a site's line, stop a node, cut the
//! controller off, restore, wait, check the matrix) played while steady UDP
//! streams run between LAN hosts. Every packet carries its stream and
//! sequence number, so the outage of each flow is measured from the gaps in
//! what arrived; every host listens on every stream's port, so a packet
//! that reaches a host of another segment (the lab numbers segments alike
//! on purpose) is counted as a leak. At the end, counters on the routers'
//! lines tell whether traffic is back on each site's preferred line and
//! access point.
//!
//! Failures are made the way they happen: a cut line is a black hole at
//! the router (nftables drops everything on the interface; the link stays
//! up), a stopped node loses every process and goes dark, a partitioned
//! node loses its management interface.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::{Lab, check, start_agent};

/// UDP ports of the streams: the first stream's; one more per stream.
const BASE_PORT: u16 = 47000;
const MAGIC: &[u8; 4] = b"MDRL";
/// The table a drill's black holes live in, in each node it cuts.
const CUT_TABLE: &str = "musubi-drill";
/// The table of the line counters, in each router.
const COUNT_TABLE: &str = "musubi-drill-count";
/// Share of a site's outer packets that must leave on its preferred line,
/// towards its region's access point, for traffic to count as back.
const PREFERRED_SHARE: f64 = 0.9;
/// The agents' probe port (BFD's), which the line counters leave out.
const PROBE_PORT: u16 = 3784;

/// A drill file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrillFile {
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    streams: Vec<StreamSpec>,
    steps: Vec<yaml_serde::Value>,
    #[serde(default)]
    pass: Pass,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamSpec {
    from: String,
    to: String,
    /// Packets per second.
    #[serde(default = "default_rate")]
    rate: u32,
}

fn default_rate() -> u32 {
    1000
}

/// What the drill must show to pass.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Pass {
    /// The longest a flow may go without packets while a way exists.
    max_outage_ms: u64,
    /// Traffic must end on every source site's preferred line and access point.
    preferred: bool,
    /// At most this many times any one of a site's route groups or peer
    /// lines may move during the drill: hysteresis.
    max_moves: BTreeMap<String, u64>,
}

impl Default for Pass {
    fn default() -> Self {
        Pass { max_outage_ms: 1000, preferred: true, max_moves: BTreeMap::new() }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Step {
    Wait(Duration),
    Cut { site: String, line: String },
    Stop(String),
    Partition(String),
    Restore(Restore),
    Flap { site: String, line: String, down: Duration, up: Duration, times: u32 },
    ExpectMatrix,
}

#[derive(Debug, Clone, PartialEq)]
enum Restore {
    All,
    Node(String),
    Line { site: String, line: String },
}

const STEP_KINDS: &str = "wait, cut, stop, partition, restore, flap, expect";

fn duration(v: &yaml_serde::Value, what: &str) -> Result<Duration> {
    let text = match v {
        yaml_serde::Value::String(s) => s.trim().to_string(),
        yaml_serde::Value::Number(n) => format!("{n}s"),
        _ => bail!("{what}: expected a duration such as `2s` or `500ms`"),
    };
    let (number, scale) = if let Some(ms) = text.strip_suffix("ms") {
        (ms, 1e-3)
    } else if let Some(s) = text.strip_suffix('s') {
        (s, 1.0)
    } else {
        bail!("{what}: `{text}` has no unit (write `2s` or `500ms`)")
    };
    let n: f64 = number.trim().parse().with_context(|| format!("{what}: `{text}` is not a duration"))?;
    if !(0.0..=3600.0).contains(&(n * scale)) {
        bail!("{what}: `{text}` is out of range (0 to 1 h)");
    }
    Ok(Duration::from_secs_f64(n * scale))
}

fn text(v: &yaml_serde::Value, what: &str) -> Result<String> {
    v.as_str().map(str::to_string).with_context(|| format!("{what}: expected a name"))
}

fn field<'a>(m: &'a yaml_serde::Mapping, key: &str, what: &str) -> Result<&'a yaml_serde::Value> {
    m.get(key).with_context(|| format!("{what}: `{key}` is missing"))
}

fn site_line(v: &yaml_serde::Value, what: &str) -> Result<(String, String)> {
    let m = v.as_mapping().with_context(|| format!("{what}: expected {{site: S, line: L}}"))?;
    Ok((text(field(m, "site", what)?, what)?, text(field(m, "line", what)?, what)?))
}

fn step(i: usize, v: &yaml_serde::Value) -> Result<Step> {
    let what = format!("step {}", i + 1);
    let m = v.as_mapping().filter(|m| m.len() == 1).with_context(|| format!("{what}: expected one of {STEP_KINDS}"))?;
    let Some((key, value)) = m.iter().next() else { bail!("{what}: empty") };
    let key = key.as_str().unwrap_or_default();
    let what = format!("{what} ({key})");
    Ok(match key {
        "wait" => Step::Wait(duration(value, &what)?),
        "cut" => {
            let (site, line) = site_line(value, &what)?;
            Step::Cut { site, line }
        }
        "stop" => Step::Stop(text(value, &what)?),
        "partition" => Step::Partition(text(value, &what)?),
        "restore" => match value {
            yaml_serde::Value::String(s) if s == "all" => Step::Restore(Restore::All),
            yaml_serde::Value::String(s) => Step::Restore(Restore::Node(s.clone())),
            _ => {
                let (site, line) = site_line(value, &what)?;
                Step::Restore(Restore::Line { site, line })
            }
        },
        "flap" => {
            let (site, line) = site_line(value, &what)?;
            let m = value.as_mapping().with_context(|| what.clone())?;
            let times = field(m, "times", &what)?.as_u64().filter(|t| (1..=100).contains(t));
            Step::Flap {
                site,
                line,
                down: duration(field(m, "down", &what)?, &what)?,
                up: duration(field(m, "up", &what)?, &what)?,
                times: times.with_context(|| format!("{what}: `times` must be 1 to 100"))? as u32,
            }
        }
        "expect" if value.as_str() == Some("matrix") => Step::ExpectMatrix,
        "expect" => bail!("{what}: expected `expect: matrix`"),
        other => bail!("{what}: unknown step `{other}` (expected one of {STEP_KINDS})"),
    })
}

/// A drill, read and checked against the lab's topology and intent.
#[derive(Debug)]
struct Drill {
    name: String,
    description: String,
    streams: Vec<StreamSpec>,
    steps: Vec<Step>,
    pass: Pass,
}

fn read(path: &Path) -> Result<Drill> {
    let source = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: DrillFile =
        yaml_serde::from_str(&source).with_context(|| format!("{} is not a drill", path.display()))?;
    let steps = file
        .steps
        .iter()
        .enumerate()
        .map(|(i, v)| step(i, v))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("in {}", path.display()))?;
    if file.streams.iter().any(|s| !(1..=10_000).contains(&s.rate)) {
        bail!("{}: a stream's rate must be 1 to 10000 packets/s", path.display());
    }
    Ok(Drill { name: file.name, description: file.description, streams: file.streams, steps, pass: file.pass })
}

/// What the drill knows of the lab: nodes, sites, lines and their interfaces.
struct World {
    lab: Lab,
    controller: String,
    controller_ip: String,
    /// Router node by site, and site by router node.
    router: BTreeMap<String, String>,
    /// Host node → (site, segment, IPv4 address).
    hosts: BTreeMap<String, (String, String, Ipv4Addr)>,
    /// (site, line) → the router's interface holding the line's address.
    line_if: BTreeMap<(String, String), String>,
    /// Each site's lines, best first.
    lines: BTreeMap<String, Vec<String>>,
    /// Each site's region access point, and every access point's line addresses.
    home_ap: BTreeMap<String, String>,
    ap_addresses: BTreeMap<String, Vec<IpAddr>>,
}

fn interfaces(lab: &Lab, node: &str) -> Result<Vec<(String, IpAddr)>> {
    let out = lab.sh(node, "ip -o addr show")?;
    let mut found = Vec::new();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(at)) = (words.get(1), words.iter().position(|w| *w == "inet" || *w == "inet6")) else {
            continue;
        };
        let Some(addr) = words.get(at + 1).and_then(|a| a.split('/').next()).and_then(|a| a.parse().ok()) else {
            continue;
        };
        found.push((name.split('@').next().unwrap_or(name).to_string(), addr));
    }
    Ok(found)
}

fn world(lab: Lab) -> Result<World> {
    let clab = lab.topology()?;
    let (controller, ctl) = clab.controller()?;
    let controller_ip = ctl.mgmt_ipv4.clone().context("the controller has no mgmt-ipv4")?;
    let parsed = musubi_core::load::load(&[lab.dir.join("intent.yaml")])?;
    let intent = &parsed.intent;
    let mut w = World {
        controller: controller.clone(),
        controller_ip,
        router: BTreeMap::new(),
        hosts: BTreeMap::new(),
        line_if: BTreeMap::new(),
        lines: BTreeMap::new(),
        home_ap: BTreeMap::new(),
        ap_addresses: BTreeMap::new(),
        lab,
    };
    for (name, node) in &clab.topology.nodes {
        match node.role() {
            "router" => {
                let Some(site) = node.labels.get("musubi.site") else { continue };
                let Some(s) = intent.sites.get(site) else { continue };
                w.router.insert(site.clone(), name.clone());
                let held = interfaces(&w.lab, name)?;
                let mut lines: Vec<_> = s.lines.iter().collect();
                lines.sort_by_key(|l| l.priority);
                for l in &lines {
                    if let Some((ifname, _)) = held.iter().find(|(_, a)| *a == l.address) {
                        w.line_if.insert((site.clone(), l.name.clone()), ifname.clone());
                    }
                }
                w.lines.insert(site.clone(), lines.iter().map(|l| l.name.clone()).collect());
            }
            "host" => {
                let (Some(site), Some(seg)) = (node.labels.get("musubi.site"), node.labels.get("musubi.segment"))
                else {
                    continue;
                };
                let address = interfaces(&w.lab, name)?
                    .into_iter()
                    .find_map(|(i, a)| match a {
                        IpAddr::V4(v4) if i == "eth1" => Some(v4),
                        _ => None,
                    })
                    .with_context(|| format!("host {name} has no IPv4 address on eth1"))?;
                w.hosts.insert(name.clone(), (site.clone(), seg.clone(), address));
            }
            _ => {}
        }
    }
    for s in intent.sites.values() {
        if s.is_access_point() {
            w.ap_addresses.insert(s.name.clone(), s.lines.iter().map(|l| l.address).collect());
        }
    }
    for s in intent.sites.values().filter(|s| !s.is_access_point()) {
        if let Some(ap) = intent.sites.values().find(|a| a.is_access_point() && a.region == s.region) {
            w.home_ap.insert(s.name.clone(), ap.name.clone());
        }
    }
    Ok(w)
}

impl World {
    fn line(&self, site: &str, line: &str) -> Result<(String, String)> {
        let router = self.router.get(site).with_context(|| format!("no router in the lab is site `{site}`"))?;
        let ifname = self
            .line_if
            .get(&(site.to_string(), line.to_string()))
            .with_context(|| format!("site `{site}` has no line `{line}` on its router `{router}`"))?;
        Ok((router.clone(), ifname.clone()))
    }

    fn node(&self, node: &str) -> Result<()> {
        let clab = self.lab.topology()?;
        if clab.topology.nodes.contains_key(node) {
            Ok(())
        } else {
            bail!("lab {} has no node `{node}`", self.lab.name)
        }
    }

    /// Checks every name a drill uses before anything is touched.
    fn validate(&self, d: &Drill) -> Result<()> {
        for s in &d.streams {
            for h in [&s.from, &s.to] {
                if !self.hosts.contains_key(h) {
                    bail!("stream {} → {}: `{h}` is not a LAN host of lab {}", s.from, s.to, self.lab.name);
                }
            }
        }
        for st in &d.steps {
            match st {
                Step::Cut { site, line } | Step::Flap { site, line, .. } => {
                    self.line(site, line)?;
                }
                Step::Restore(Restore::Line { site, line }) => {
                    self.line(site, line)?;
                }
                Step::Stop(n) | Step::Partition(n) | Step::Restore(Restore::Node(n)) => self.node(n)?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The black holes and stopped nodes of a drill under way.
#[derive(Default)]
struct Damage {
    cut: BTreeMap<String, BTreeSet<String>>,
    stopped: BTreeSet<String>,
}

fn nft(lab: &Lab, node: &str, script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = lab.command(node, "nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {node}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Damage {
    /// Makes `node`'s black holes exactly its cut interfaces.
    fn sync(&self, lab: &Lab, node: &str) -> Result<()> {
        let mut script = format!("add table inet {CUT_TABLE}\ndelete table inet {CUT_TABLE}\n");
        if let Some(set) = self.cut.get(node).filter(|s| !s.is_empty()) {
            let names = set.iter().map(|i| format!("\"{i}\"")).collect::<Vec<_>>().join(", ");
            writeln!(
                script,
                "table inet {CUT_TABLE} {{
  chain input {{ type filter hook input priority -300; iifname {{ {names} }} drop; }}
  chain output {{ type filter hook output priority -300; oifname {{ {names} }} drop; }}
  chain forward {{ type filter hook forward priority -300; iifname {{ {names} }} drop; oifname {{ {names} }} drop; }}
}}"
            )?;
        }
        nft(lab, node, &script)
    }

    fn cut(&mut self, lab: &Lab, node: &str, ifname: &str) -> Result<()> {
        self.cut.entry(node.to_string()).or_default().insert(ifname.to_string());
        self.sync(lab, node)
    }

    fn mend(&mut self, lab: &Lab, node: &str, ifname: Option<&str>) -> Result<()> {
        match ifname {
            Some(i) => {
                self.cut.entry(node.to_string()).or_default().remove(i);
            }
            None => {
                self.cut.remove(node);
            }
        }
        self.sync(lab, node)
    }

    /// Whether `site` has no line left (every line cut, or its router stopped).
    fn isolated(&self, w: &World, site: &str) -> bool {
        let Some(router) = w.router.get(site) else { return false };
        if self.stopped.contains(router) {
            return true;
        }
        let cut = self.cut.get(router);
        let lines = w.lines.get(site).map(Vec::as_slice).unwrap_or_default();
        !lines.is_empty()
            && lines.iter().all(|l| {
                w.line_if.get(&(site.to_string(), l.clone())).is_some_and(|i| cut.is_some_and(|c| c.contains(i)))
            })
    }
}

/// Runs `f` in a thread that has entered `node`'s network namespace (what
/// it creates, sockets, stays there).
fn in_netns<T: Send>(lab: &Lab, node: &str, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{}", lab.ns(node));
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread entering {path} panicked"))?
    })
}

/// One running stream's record.
struct Flow {
    spec: StreamSpec,
    sent: Mutex<Vec<u32>>,
    /// (sequence number, arrival) in µs since the drill began, at the receiver.
    arrived: Mutex<Vec<(u64, u32)>>,
    received: AtomicU64,
    /// Packets of this stream that reached a host of another segment, and
    /// another host of its own segment.
    leaked: AtomicU64,
    misdelivered: AtomicU64,
}

fn packet(stream: u32, seq: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(MAGIC);
    p[4..8].copy_from_slice(&stream.to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p
}

fn parse(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < 16 || &p[..4] != MAGIC {
        return None;
    }
    Some((u32::from_be_bytes(p[4..8].try_into().ok()?), u64::from_be_bytes(p[8..16].try_into().ok()?)))
}

fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// Outage of one flow: the longest stretch without a packet getting through
/// (from the last packet sent that arrived to the next one), less the time
/// an end of the flow had no line at all.
fn outage(sent: &[u32], arrived: &[(u64, u32)], dark: &[(u32, u32)], rate: u32) -> Outage {
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

/// A flow's gaps from 20 ms on are listed.
const GAP_MS: f64 = 20.0;

/// What [`outage`] finds in a flow.
#[derive(Debug, Default)]
struct Outage {
    /// The longest counted stretch, in ms, and when it began (s).
    ms: f64,
    at_s: f64,
    /// The longest stretch as it was (dark time included).
    longest_ms: f64,
    /// Every counted stretch of at least [`GAP_MS`]: (began at s, ms).
    gaps: Vec<(f64, f64)>,
}

/// Packets by (line interface, access point).
type LineCounts = BTreeMap<(String, String), u64>;

/// Outer packets each source site sent per (line interface, access point)
/// in a second: the lines' counters, read twice.
fn line_counts(w: &World, sites: &BTreeSet<String>) -> Result<BTreeMap<String, LineCounts>> {
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

/// Counters of outer packets (WireGuard, not probes) per line interface and
/// access point, in `site`'s router.
fn install_counters(w: &World, site: &str) -> Result<()> {
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

/// One drill's outcome, as the reports give it.
#[derive(Debug, serde::Serialize)]
struct FlowResult {
    from: String,
    to: String,
    segment: String,
    rate: u32,
    sent: u64,
    received: u64,
    lost: u64,
    outage_ms: f64,
    /// When the counted outage began, in s since the drill began.
    outage_at_s: f64,
    longest_gap_ms: f64,
    /// Every counted stretch of 20 ms or more.
    gaps: Vec<Gap>,
    leaked: u64,
    misdelivered: u64,
    pass: bool,
}

#[derive(Debug, serde::Serialize)]
struct Gap {
    at_s: f64,
    ms: f64,
}

#[derive(Debug, serde::Serialize)]
struct PathResult {
    site: String,
    preferred_line: String,
    access_point: String,
    share: f64,
    packets: u64,
    /// Packets by `line → access point`.
    seen: BTreeMap<String, u64>,
    pass: bool,
}

#[derive(Debug, serde::Serialize)]
struct Moves {
    site: String,
    moves: u64,
    limit: Option<u64>,
    pass: bool,
}

/// The agents' logs, read from where they were when the drill began:
/// how often each site's agent moved traffic.
struct Logs(BTreeMap<String, (PathBuf, u64)>);

impl Logs {
    fn mark(w: &World) -> Logs {
        Logs(
            w.router
                .iter()
                .map(|(site, node)| {
                    let path = w.lab.node_dir(node).join("agent.log");
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    (site.clone(), (path, len))
                })
                .collect(),
        )
    }

    fn moves(&self) -> BTreeMap<String, u64> {
        use std::io::{Read as _, Seek as _};
        let mut out = BTreeMap::new();
        for (site, (path, from)) in &self.0 {
            let mut text = String::new();
            if let Ok(mut f) = std::fs::File::open(path) {
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                // A restarted agent starts a new log.
                let _ = f.seek(std::io::SeekFrom::Start(if len < *from { 0 } else { *from }));
                let _ = f.read_to_string(&mut text);
            }
            out.insert(site.clone(), most_moves(&text));
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

#[derive(Debug, serde::Serialize)]
struct Report {
    drill: String,
    description: String,
    lab: String,
    duration_s: f64,
    max_outage_ms: u64,
    timeline: Vec<(f64, String)>,
    flows: Vec<FlowResult>,
    paths: Vec<PathResult>,
    moves: Vec<Moves>,
    matrix_checks: Vec<(f64, bool)>,
    pass: bool,
}

pub fn run(lab: Lab, file: &Path, out: Option<PathBuf>) -> Result<()> {
    let drill = read(file)?;
    let w = world(lab)?;
    w.validate(&drill)?;
    let out = out.unwrap_or_else(|| w.lab.dir.join("drills"));
    std::fs::create_dir_all(&out)?;
    println!("drill {} on lab {}: {}", drill.name, w.lab.name, drill.description.trim());

    // The sites that send a stream (and have a router in the lab).
    let sources: BTreeSet<String> =
        drill.streams.iter().map(|s| w.hosts[&s.from].0.clone()).filter(|s| w.router.contains_key(s)).collect();
    for site in &sources {
        install_counters(&w, site)?;
    }

    let logs = Logs::mark(&w);
    // Receivers: every host listens on every stream's port.
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let flows: Vec<Arc<Flow>> = drill
        .streams
        .iter()
        .map(|s| {
            Arc::new(Flow {
                spec: s.clone(),
                sent: Mutex::new(Vec::new()),
                arrived: Mutex::new(Vec::new()),
                received: AtomicU64::new(0),
                leaked: AtomicU64::new(0),
                misdelivered: AtomicU64::new(0),
            })
        })
        .collect();
    let mut threads = Vec::new();
    for (host, (_, segment, _)) in &w.hosts {
        for (i, _) in drill.streams.iter().enumerate() {
            let port = BASE_PORT + i as u16;
            let sock = in_netns(&w.lab, host, || {
                let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
                s.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok(s)
            })?;
            let (flows, stop, host, segment) = (flows.clone(), stop.clone(), host.clone(), segment.clone());
            let sender_segment: Vec<String> = drill.streams.iter().map(|s| w.hosts[&s.from].1.clone()).collect();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else { continue };
                    let Some((stream, seq)) = parse(&buf[..n]) else { continue };
                    let Some(flow) = flows.get(stream as usize) else { continue };
                    if flow.spec.to == host {
                        flow.received.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut a) = flow.arrived.lock() {
                            a.push((seq, micros(started)));
                        }
                    } else if sender_segment[stream as usize] != segment {
                        flow.leaked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        flow.misdelivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    // Senders.
    for (i, flow) in flows.iter().enumerate() {
        let target = SocketAddr::new(IpAddr::V4(w.hosts[&flow.spec.to].2), BASE_PORT + i as u16);
        let sock = in_netns(&w.lab, &flow.spec.from, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
        let (flow, stop) = (flow.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let interval = Duration::from_secs_f64(1.0 / f64::from(flow.spec.rate));
            let begin = Instant::now();
            let mut seq: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let due = begin + interval.mul_f64(seq as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let at = micros(started);
                // Sending fails while the host has no route: still a packet lost.
                let _ = sock.send_to(&packet(i as u32, seq), target);
                if let Ok(mut s) = flow.sent.lock() {
                    s.push(at);
                }
                seq += 1;
            }
        }));
    }
    // The live view: each flow's packets per second.
    {
        let (flows, stop) = (flows.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut last: Vec<u64> = vec![0; flows.len()];
            let mut tick = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if tick.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                tick = Instant::now();
                let mut line = format!("  {:>6.1} s ", started.elapsed().as_secs_f64());
                for (f, l) in flows.iter().zip(last.iter_mut()) {
                    let r = f.received.load(Ordering::Relaxed);
                    let _ = write!(line, "  {}→{} {:>5}/s", f.spec.from, f.spec.to, r - *l);
                    *l = r;
                }
                println!("{line}");
            }
        }));
    }

    let mut damage = Damage::default();
    let mut timeline: Vec<(f64, String)> = Vec::new();
    let mut dark: BTreeMap<String, Vec<(u32, Option<u32>)>> = BTreeMap::new();
    let mut matrix_checks = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    let note = |timeline: &mut Vec<(f64, String)>, what: String| {
        let t = started.elapsed().as_secs_f64();
        println!("  {t:>6.1} s ▶ {what}");
        timeline.push((t, what));
    };
    // Keeps the sites' dark windows (no line at all) up to date.
    let track = |damage: &Damage, dark: &mut BTreeMap<String, Vec<(u32, Option<u32>)>>| {
        let now = micros(started);
        for site in w.router.keys() {
            let windows = dark.entry(site.clone()).or_default();
            let open = windows.last().is_some_and(|w| w.1.is_none());
            match (damage.isolated(&w, site), open) {
                (true, false) => windows.push((now, None)),
                (false, true) => {
                    if let Some(last) = windows.last_mut() {
                        last.1 = Some(now);
                    }
                }
                _ => {}
            }
        }
    };
    // The drill begins once every stream flows steadily: a tunnel's first
    // handshake is not an outage. Packets before that are not counted.
    let first = steady(&flows, Duration::from_secs(20));
    let first = match first {
        Ok(f) => f,
        Err(e) => {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    };
    note(&mut timeline, "every stream flows steadily".into());
    for st in &drill.steps {
        let result: Result<()> = (|| {
            match st {
                Step::Wait(d) => std::thread::sleep(*d),
                Step::Cut { site, line } => {
                    let (router, ifname) = w.line(site, line)?;
                    damage.cut(&w.lab, &router, &ifname)?;
                    note(&mut timeline, format!("cut line {line} of {site} ({router} {ifname})"));
                }
                Step::Restore(Restore::Line { site, line }) => {
                    let (router, ifname) = w.line(site, line)?;
                    damage.mend(&w.lab, &router, Some(&ifname))?;
                    note(&mut timeline, format!("restore line {line} of {site}"));
                }
                Step::Flap { site, line, down, up, times } => {
                    let (router, ifname) = w.line(site, line)?;
                    note(&mut timeline, format!("flap line {line} of {site}: {times} × ({down:?} down, {up:?} up)"));
                    for _ in 0..*times {
                        damage.cut(&w.lab, &router, &ifname)?;
                        track(&damage, &mut dark);
                        std::thread::sleep(*down);
                        damage.mend(&w.lab, &router, Some(&ifname))?;
                        track(&damage, &mut dark);
                        std::thread::sleep(*up);
                    }
                    note(&mut timeline, format!("line {line} of {site} steady again"));
                }
                Step::Stop(node) => {
                    stop_node(&w, &mut damage, node)?;
                    note(&mut timeline, format!("stop {node}: its processes killed, every interface dark"));
                }
                Step::Partition(node) => {
                    damage.cut(&w.lab, node, "eth0")?;
                    note(&mut timeline, format!("partition {node} from the management network"));
                }
                Step::Restore(Restore::Node(node)) => {
                    restore_node(&w, &mut damage, node)?;
                    note(&mut timeline, format!("restore {node}"));
                }
                Step::Restore(Restore::All) => {
                    let nodes: BTreeSet<String> = damage.cut.keys().chain(damage.stopped.iter()).cloned().collect();
                    for n in &nodes {
                        restore_node(&w, &mut damage, n)?;
                    }
                    note(&mut timeline, "restore everything".into());
                }
                Step::ExpectMatrix => {
                    note(&mut timeline, "expect the matrix".into());
                    let ok = check(&w.lab).is_ok();
                    matrix_checks.push((started.elapsed().as_secs_f64(), ok));
                    note(&mut timeline, format!("matrix {}", if ok { "as the intent says" } else { "DIFFERS" }));
                }
            }
            Ok(())
        })();
        track(&damage, &mut dark);
        if let Err(e) = result {
            failure = Some(e);
            break;
        }
    }
    // Where traffic runs now, while the streams still run.
    let mut paths = Vec::new();
    if failure.is_none() && drill.pass.preferred {
        for (site, counts) in line_counts(&w, &sources)? {
            let total: u64 = counts.values().sum();
            let first = w.lines.get(&site).and_then(|l| l.first()).cloned().unwrap_or_default();
            let ifname = w.line_if.get(&(site.clone(), first.clone())).cloned().unwrap_or_default();
            let ap = w.home_ap.get(&site).cloned().unwrap_or_default();
            let on = counts.get(&(ifname, ap.clone())).copied().unwrap_or(0);
            let share = if total == 0 { 0.0 } else { on as f64 / total as f64 };
            let line_of = |i: &str| {
                w.line_if
                    .iter()
                    .find(|((s, _), n)| *s == site && n.as_str() == i)
                    .map_or(i.to_string(), |((_, l), _)| l.clone())
            };
            let seen = counts
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|((i, a), n)| (format!("{} → {a}", line_of(i)), *n))
                .collect();
            paths.push(PathResult {
                site,
                preferred_line: first,
                access_point: ap,
                share,
                packets: total,
                seen,
                pass: share >= PREFERRED_SHARE,
            });
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Leave the lab as it was, whatever happened.
    let nodes: BTreeSet<String> = damage.cut.keys().chain(damage.stopped.iter()).cloned().collect();
    for n in &nodes {
        if let Err(e) = restore_node(&w, &mut damage, n) {
            eprintln!("could not restore {n}: {e:#}");
        }
    }
    for site in &sources {
        let _ =
            nft(&w.lab, &w.router[site], &format!("add table inet {COUNT_TABLE}\ndelete table inet {COUNT_TABLE}\n"));
    }
    if let Some(e) = failure {
        return Err(e.context(format!("drill {} stopped", drill.name)));
    }

    let end = micros(started);
    let mut plot: Vec<(String, Vec<u32>)> = Vec::new();
    let flows: Vec<FlowResult> = flows
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let skip = first.get(i).copied().unwrap_or(0);
            let sent: Vec<u32> = f.sent.lock().map(|s| s.get(skip..).unwrap_or_default().to_vec()).unwrap_or_default();
            let all = f.arrived.lock().map(|a| a.clone()).unwrap_or_default();
            let arrived: Vec<(u64, u32)> =
                all.iter().filter(|a| a.0 >= skip as u64).map(|&(seq, at)| (seq - skip as u64, at)).collect();
            plot.push((format!("{} → {}", f.spec.from, f.spec.to), all.iter().map(|a| a.1).collect()));
            let ends = [&w.hosts[&f.spec.from].0, &w.hosts[&f.spec.to].0];
            let windows: Vec<(u32, u32)> = ends
                .iter()
                .flat_map(|s| dark.get(*s).into_iter().flatten())
                .map(|&(a, b)| (a, b.unwrap_or(end)))
                .collect();
            let o = outage(&sent, &arrived, &windows, f.spec.rate);
            let (outage_ms, longest_gap_ms, outage_at_s) = (o.ms, o.longest_ms, o.at_s);
            let unique: BTreeSet<u64> = arrived.iter().map(|a| a.0).collect();
            let leaked = f.leaked.load(Ordering::Relaxed);
            FlowResult {
                from: f.spec.from.clone(),
                to: f.spec.to.clone(),
                segment: w.hosts[&f.spec.from].1.clone(),
                rate: f.spec.rate,
                sent: sent.len() as u64,
                received: unique.len() as u64,
                lost: (sent.len() as u64).saturating_sub(unique.len() as u64),
                outage_ms,
                outage_at_s,
                longest_gap_ms,
                gaps: o.gaps.iter().map(|&(at_s, ms)| Gap { at_s, ms }).collect(),
                leaked,
                misdelivered: f.misdelivered.load(Ordering::Relaxed),
                pass: outage_ms <= drill.pass.max_outage_ms as f64 && leaked == 0,
            }
        })
        .collect();
    let moves: Vec<Moves> = logs
        .moves()
        .into_iter()
        .map(|(site, moves)| {
            let limit = drill.pass.max_moves.get(&site).copied();
            Moves { pass: limit.is_none_or(|l| moves <= l), site, moves, limit }
        })
        .collect();
    let pass = flows.iter().all(|f| f.pass)
        && paths.iter().all(|p| p.pass)
        && moves.iter().all(|m| m.pass)
        && matrix_checks.iter().all(|m| m.1);
    let report = Report {
        drill: drill.name.clone(),
        description: drill.description.trim().to_string(),
        lab: w.lab.name.clone(),
        duration_s: f64::from(end) / 1e6,
        max_outage_ms: drill.pass.max_outage_ms,
        timeline,
        flows,
        paths,
        moves,
        matrix_checks,
        pass,
    };
    let markdown = markdown(&report);
    println!("\n{markdown}");
    let base = out.join(&drill.name);
    std::fs::write(base.with_extension("json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(base.with_extension("md"), &markdown)?;
    std::fs::write(base.with_extension("svg"), svg(&report, &plot))?;
    println!("reports: {}.{{json,md,svg}}", base.display());
    if !report.pass {
        bail!("drill {} failed", drill.name);
    }
    Ok(())
}

/// Waits until every flow has delivered at least 80 % of its rate for half a
/// second; returns how many packets each had sent by then.
fn steady(flows: &[Arc<Flow>], limit: Duration) -> Result<Vec<usize>> {
    let begin = Instant::now();
    let mut last: Vec<u64> = flows.iter().map(|f| f.received.load(Ordering::Relaxed)).collect();
    let mut good = 0;
    while good < 5 {
        if begin.elapsed() > limit {
            let slow: Vec<String> = flows.iter().map(|f| format!("{} → {}", f.spec.from, f.spec.to)).collect();
            bail!("the streams did not flow steadily within {limit:?} ({})", slow.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
        let now: Vec<u64> = flows.iter().map(|f| f.received.load(Ordering::Relaxed)).collect();
        let ok =
            flows.iter().zip(now.iter().zip(&last)).all(|(f, (n, l))| (n - l) * 10 >= u64::from(f.spec.rate) * 8 / 10);
        good = if ok { good + 1 } else { 0 };
        last = now;
    }
    Ok(flows.iter().map(|f| f.sent.lock().map(|s| s.len()).unwrap_or(0)).collect())
}

/// Kills every process of `node` and blacks out all its interfaces.
fn stop_node(w: &World, damage: &mut Damage, node: &str) -> Result<()> {
    if node == w.controller {
        bail!("the controller cannot be stopped in a drill; `partition: {node}` cuts it off");
    }
    let out = Command::new("ip").args(["netns", "pids", &w.lab.ns(node)]).output().context("ip netns pids")?;
    let me = std::process::id().to_string();
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|p| *p != me) {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    let links = w.lab.sh(node, "ip -o link show")?;
    for name in links.lines().filter_map(|l| l.split(':').nth(1)).map(|n| n.trim().split('@').next().unwrap_or("")) {
        if !name.is_empty() && name != "lo" {
            damage.cut.entry(node.to_string()).or_default().insert(name.to_string());
        }
    }
    damage.sync(&w.lab, node)?;
    damage.stopped.insert(node.to_string());
    Ok(())
}

/// Mends every black hole of `node`; a stopped router gets its agent back
/// (which restores its last configuration, controller or not).
fn restore_node(w: &World, damage: &mut Damage, node: &str) -> Result<()> {
    damage.mend(&w.lab, node, None)?;
    if damage.stopped.remove(node)
        && let Some((site, _)) = w.router.iter().find(|(_, r)| *r == node)
    {
        start_agent(&w.lab, &w.controller, &w.controller_ip, node, site)?;
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
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
            f.gaps.iter().map(|g| format!("{:.1} s: {:.0} ms", g.at_s, g.ms)).collect::<Vec<_>>().join(", ")
        );
    }
    if !r.paths.is_empty() {
        let _ = writeln!(md, "\nAt the end, outer packets of each source site over one second:\n");
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
    let _ = writeln!(md, "| site | moves | limit | |\n| --- | ---: | ---: | --- |");
    for m in &r.moves {
        let limit = m.limit.map_or("–".to_string(), |l| l.to_string());
        let _ = writeln!(md, "| {} | {} | {limit} | {} |", m.site, m.moves, if m.pass { "✓" } else { "✗" });
    }
    for (t, ok) in &r.matrix_checks {
        let _ = writeln!(md, "\nMatrix at {t:.1} s: {}", if *ok { "as the intent says ✓" } else { "DIFFERS ✗" });
    }
    md
}

/// The timeline plot: each flow's delivered packets per 50 ms, with the steps.
fn svg(r: &Report, plot: &[(String, Vec<u32>)]) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(yaml: &str) -> Result<Vec<Step>> {
        let values: Vec<yaml_serde::Value> = yaml_serde::from_str(yaml)?;
        values.iter().enumerate().map(|(i, v)| step(i, v)).collect()
    }

    #[test]
    fn steps_read_as_written_and_mistakes_are_named() {
        let read = steps(
            "- wait: 1.5s\n- cut: {site: s, line: l}\n- stop: n\n- partition: controller\n- restore: all\n\
             - restore: n\n- restore: {site: s, line: l}\n- flap: {site: s, line: l, down: 400ms, up: 1s, times: 3}\n\
             - expect: matrix\n",
        )
        .expect("valid steps");
        assert_eq!(read[0], Step::Wait(Duration::from_millis(1500)));
        assert_eq!(read[1], Step::Cut { site: "s".into(), line: "l".into() });
        assert_eq!(read[4], Step::Restore(Restore::All));
        assert_eq!(read[5], Step::Restore(Restore::Node("n".into())));
        assert_eq!(
            read[7],
            Step::Flap {
                site: "s".into(),
                line: "l".into(),
                down: Duration::from_millis(400),
                up: Duration::from_secs(1),
                times: 3
            }
        );
        assert_eq!(read[8], Step::ExpectMatrix);
        for (bad, says) in [
            ("- wait: 2\n- wait: 2 minutes\n", "step 2 (wait): `2 minutes` is not a duration"),
            ("- wait: 2h\n", "step 1 (wait): `2h` has no unit"),
            ("- cut: {site: s}\n", "step 1 (cut): `line` is missing"),
            ("- explode: now\n", "step 1 (explode): unknown step `explode`"),
            ("- flap: {site: s, line: l, down: 1s, up: 1s, times: 0}\n", "`times` must be 1 to 100"),
            ("- expect: everything\n", "expected `expect: matrix`"),
        ] {
            let e = steps(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad} → {e}");
        }
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

    #[test]
    fn packets_carry_their_stream_and_number() {
        assert_eq!(parse(&packet(3, 77)), Some((3, 77)));
        assert_eq!(parse(b"something else entirely"), None);
    }
}
