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

mod faults;
mod file;
mod measure;
mod moves;
mod report;
mod traffic;
mod world;

use musubi_process::println;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use self::faults::{Damage, nft, restore_node, stop_node};
use self::file::{Expectation, Flap, Restore, SiteLine, SiteTunnel, Step, read};
use self::measure::{install_counters, line_counts, outage, stall};
use self::moves::Logs;
use self::report::{FlowResult, ForwardedCheck, Gap, Moves, PathResult, Report, markdown, svg};
use self::traffic::{Flow, Sender, in_netns, micros, parse, sender, steady, tcp_receiver};
use self::world::world;
use crate::check::check;
use crate::lab::Lab;

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

/// How long after the drill's last step traffic may take to be back on
/// the preferred paths (× the time scale): the agents' hold-down (3 s)
/// and two seconds' counts.
const PREFERRED_WAIT: Duration = Duration::from_secs(5);

/// The share of `site`'s outer packets on its first line towards its
/// region's access point.
fn preferred_share(w: &world::World, site: &str, counts: &measure::LineCounts) -> f64 {
    let total: u64 = counts.values().sum();
    let first = w.lines.get(site).and_then(|l| l.first()).cloned().unwrap_or_default();
    let ifname = w.line_if.get(&(site.to_string(), first)).cloned().unwrap_or_default();
    let ap = w.home_ap.get(site).cloned().unwrap_or_default();
    let on = counts.get(&(ifname, ap)).copied().unwrap_or(0);
    if total == 0 { 0.0 } else { on as f64 / total as f64 }
}

/// How long a started agent may take to enrol, apply and bring its tunnels up.
const IN_SYNC_WITHIN: Duration = Duration::from_secs(30);

/// Waits until `site` is connected, in sync and every tunnel of it is up.
fn wait_in_sync(w: &world::World, site: &str) -> Result<()> {
    let until = Instant::now() + IN_SYNC_WITHIN;
    loop {
        let out = w.lab.musubi(&w.controller).args(["status", "--json", site]).output().context("musubi status")?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if crate::up::in_sync(&status, site) {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{site} was not in sync with every tunnel up within {IN_SYNC_WITHIN:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The controller's audit chain, one line per entry (`musubi history`).
fn audit_lines(w: &world::World) -> Result<Vec<String>> {
    let out = w.lab.musubi(&w.controller).arg("history").output().context("musubi history")?;
    if !out.status.success() {
        bail!("musubi history: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(|l| l.trim().to_string()).collect())
}

/// The audit entries written since the chain had `before` of them (none
/// when it could not be read then or now).
fn audit_since(w: &world::World, before: usize) -> Vec<String> {
    match audit_lines(w) {
        Ok(lines) if before <= lines.len() => lines[before..].to_vec(),
        _ => Vec::new(),
    }
}

/// Plays a drill on a running lab. `rate` replaces every stream's packets
/// per second; `scale` multiplies the drill's times (waits, flaps, the
/// longest outage allowed), for a lab whose probe timers and hold-down were
/// multiplied by as much (the kernel lab's emulated guest).
pub fn run(lab: Lab, file: &Path, out: Option<PathBuf>, rate: Option<u32>, scale: u32) -> Result<()> {
    let mut drill = read(file)?;
    if let Some(rate) = rate {
        for s in &mut drill.streams {
            s.rate = rate;
        }
    }
    drill.scale(scale);
    let w = world(lab)?;
    w.validate(&drill)?;
    let out = out.unwrap_or_else(|| w.lab.dir.join("drills"));
    std::fs::create_dir_all(&out)?;
    println!("drill {} on lab {}: {}", drill.name, w.lab.name, drill.description.trim());
    if scale > 1 {
        println!("times × {scale}: waits, flaps and the outage allowed ({} ms)", drill.pass.max_outage_ms);
    }

    // The sites that send a stream (and have a router in the lab).
    let sources: BTreeSet<String> =
        drill.streams.iter().map(|s| w.hosts[&s.from].0.clone()).filter(|s| w.router.contains_key(s)).collect();
    for site in &sources {
        install_counters(&w, site)?;
    }

    let logs = Logs::mark(&w);
    let audit_before = audit_lines(&w).map_or(usize::MAX, |l| l.len());
    // Receivers: every host listens on every stream's port.
    let started = Instant::now();
    let started_unix_s =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let stop = Arc::new(AtomicBool::new(false));
    let flows: Vec<Arc<Flow>> = drill.streams.iter().map(|s| Arc::new(Flow::new(s.clone()))).collect();
    let mut threads = Vec::new();
    for (host, (_, segment, _)) in &w.hosts {
        for (i, _) in drill.streams.iter().enumerate().filter(|(_, s)| s.tcp.is_none()) {
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
    // TCP streams: a listener at the receiver, accepting one connection.
    for flow in flows.iter().filter(|f| f.spec.tcp.is_some()) {
        let port = flow.spec.tcp.unwrap_or_default();
        let listener = in_netns(&w.lab, &flow.spec.to, || {
            let l = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })?;
        let (flow, stop) = (flow.clone(), stop.clone());
        threads.push(std::thread::spawn(move || tcp_receiver(listener, flow, stop, started)));
    }
    // Senders.
    for (i, flow) in flows.iter().enumerate() {
        let to = IpAddr::V4(w.hosts[&flow.spec.to].2);
        let out = match flow.spec.tcp {
            None => {
                let sock = in_netns(&w.lab, &flow.spec.from, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
                Sender::Udp(sock, SocketAddr::new(to, BASE_PORT + i as u16))
            }
            Some(port) => {
                let connected = in_netns(&w.lab, &flow.spec.from, || {
                    let c = TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_secs(5))?;
                    c.set_nodelay(true)?;
                    c.set_write_timeout(Some(Duration::from_secs(5)))?;
                    Ok(c)
                });
                match connected {
                    Ok(c) => Sender::Tcp(c),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        bail!("stream {} → {}: no TCP connection to port {port}: {e:#}", flow.spec.from, flow.spec.to);
                    }
                }
            }
        };
        let (flow, stop) = (flow.clone(), stop.clone());
        threads.push(std::thread::spawn(move || sender(out, i as u32, flow, stop, started)));
    }
    // On a terminal, a bar of the drill's steps under the live lines.
    let progress = musubi_process::progress::Progress::new(drill.steps.len() as u64, "steps");
    // The live view: each flow's packets per second.
    {
        let (flows, stop, progress) = (flows.clone(), stop.clone(), progress.clone());
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
                progress.line(&line);
            }
        }));
    }

    let mut damage = Damage::default();
    let mut timeline: Vec<(f64, String)> = Vec::new();
    let mut dark: BTreeMap<String, Vec<(u32, Option<u32>)>> = BTreeMap::new();
    let mut matrix_checks = Vec::new();
    let mut forwarded_checks: Vec<ForwardedCheck> = Vec::new();
    let mut failure: Option<anyhow::Error> = None;
    let note = |timeline: &mut Vec<(f64, String)>, what: String| {
        let t = started.elapsed().as_secs_f64();
        progress.line(&format!("  {t:>6.1} s ▶ {what}"));
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
                Step::Cut(SiteLine { site, line }) => {
                    let (router, ifname) = w.line(site, line)?;
                    let (node, port) = w.cut_point(site, line)?;
                    damage.cut(&w.lab, &node, &port)?;
                    note(&mut timeline, format!("cut line {line} of {site} ({router} {ifname}, at {node} {port})"));
                }
                Step::Block(SiteTunnel { site, tunnel }) => {
                    let router = w.router_of(site)?;
                    damage.cut(&w.lab, &router, tunnel)?;
                    note(&mut timeline, format!("block tunnel {tunnel} of {site} ({router}), its lines up"));
                }
                Step::Restore(Restore::Line(SiteLine { site, line })) => {
                    let (node, port) = w.cut_point(site, line)?;
                    damage.mend(&w.lab, &node, Some(&port))?;
                    note(&mut timeline, format!("restore line {line} of {site}"));
                }
                Step::Flap(Flap { site, line, down, up, times }) => {
                    let (node, port) = w.cut_point(site, line)?;
                    note(&mut timeline, format!("flap line {line} of {site}: {times} × ({down:?} down, {up:?} up)"));
                    for _ in 0..*times {
                        damage.cut(&w.lab, &node, &port)?;
                        track(&damage, &mut dark);
                        std::thread::sleep(*down);
                        damage.mend(&w.lab, &node, Some(&port))?;
                        track(&damage, &mut dark);
                        std::thread::sleep(*up);
                    }
                    note(&mut timeline, format!("line {line} of {site} steady again"));
                }
                Step::Stop(node) => {
                    stop_node(&w, &mut damage, node)?;
                    note(&mut timeline, format!("stop {node}: its processes frozen, every interface dark"));
                }
                Step::RotateKeys(site) => {
                    note(&mut timeline, format!("rotate the WireGuard keys of {site}"));
                    let out = w
                        .lab
                        .musubi(&w.controller)
                        .args(["site", "rotate-keys", site, "--reason", "drill", "--wait", "60s"])
                        .output()
                        .context("musubi site rotate-keys")?;
                    let said = String::from_utf8_lossy(&out.stdout);
                    if !out.status.success() {
                        bail!("rotating the keys of {site}: {said}{}", String::from_utf8_lossy(&out.stderr));
                    }
                    let phases: Vec<&str> = said.lines().skip(1).map(str::trim).collect();
                    note(&mut timeline, format!("keys of {site} rotated: {}", phases.join("; ")));
                }
                Step::RevokeKeys(site) => {
                    let out = w
                        .lab
                        .musubi(&w.controller)
                        .args(["site", "revoke-keys", site, "--reason", "drill"])
                        .output()
                        .context("musubi site revoke-keys")?;
                    if !out.status.success() {
                        bail!("revoking the keys of {site}: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    note(&mut timeline, format!("revoked the WireGuard keys of {site}"));
                }
                Step::Apply(change) => {
                    let beside = file.parent().unwrap_or(Path::new(".")).join(change);
                    // Absolute: the command runs in the controller node's namespaces.
                    let path = beside.canonicalize().with_context(|| format!("reading {}", beside.display()))?;
                    let out = w
                        .lab
                        .musubi(&w.controller)
                        .arg("apply")
                        .arg("--merge")
                        .arg("-f")
                        .arg(&path)
                        .arg("--yes")
                        .output()
                        .context("musubi apply")?;
                    if !out.status.success() {
                        bail!("applying {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
                    }
                    let said = String::from_utf8_lossy(&out.stdout);
                    let summary = said.lines().rev().find(|l| l.starts_with("Applied")).unwrap_or("applied").trim();
                    note(&mut timeline, format!("apply {change}: {summary}"));
                }
                Step::Agent(node) => {
                    let clab = w.lab.topology()?;
                    let site = clab
                        .router_site(node)
                        .with_context(|| format!("`{node}` is not a router of lab {}", w.lab.name))?
                        .clone();
                    crate::up::start_agent(&w.lab, &w.controller, &w.controller_ip, node, &site)?;
                    note(&mut timeline, format!("agent of {site} started on {node}"));
                    wait_in_sync(&w, &site)?;
                    note(&mut timeline, format!("{site} in sync, its tunnels up"));
                }
                Step::Exec(file::NodeCommand { node, command }) => {
                    w.lab.sh(node, command)?;
                    note(&mut timeline, format!("{node}: {command}"));
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
                Step::Expect(Expectation::Forwarded(f)) => {
                    let at = started.elapsed().as_secs_f64();
                    let counted = measure::forwarded(&w, &f.sites, &f.segment, f.window)?;
                    let total: u64 = counted.values().sum();
                    let pass = total >= f.min && f.max.is_none_or(|m| total <= m);
                    let each: Vec<String> = counted.iter().map(|(s, n)| format!("{s} {n}")).collect();
                    note(
                        &mut timeline,
                        format!(
                            "{total} packets of {} forwarded in {:.1} s ({}){}",
                            f.segment,
                            f.window.as_secs_f64(),
                            each.join(", "),
                            if pass { "" } else { " — NOT as expected" }
                        ),
                    );
                    forwarded_checks.push(ForwardedCheck {
                        at_s: at,
                        segment: f.segment.clone(),
                        window_s: f.window.as_secs_f64(),
                        sites: counted.into_iter().collect(),
                        min: f.min,
                        max: f.max,
                        pass,
                    });
                }
                Step::Expect(Expectation::Matrix) => {
                    note(&mut timeline, "expect the matrix".into());
                    let ok = check(&w.lab).is_ok();
                    matrix_checks.push((started.elapsed().as_secs_f64(), ok));
                    note(&mut timeline, format!("matrix {}", if ok { "as the intent says" } else { "DIFFERS" }));
                }
            }
            Ok(())
        })();
        progress.inc();
        track(&damage, &mut dark);
        if let Err(e) = result {
            failure = Some(e);
            break;
        }
    }
    // Where traffic runs now, while the streams still run: one second's
    // counts, again until every site is back or a hold-down has had time to
    // end (a brief silence near the drill's end — a busy host holding up a
    // router — moves a group away for a hold-down, by design; it must come
    // back). How long it took is reported.
    let mut paths = Vec::new();
    let mut back_after = None;
    if failure.is_none() && drill.pass.preferred {
        let waited = Instant::now();
        let limit = PREFERRED_WAIT * scale;
        let mut counted = line_counts(&w, &sources)?;
        while !counted.iter().all(|(site, counts)| preferred_share(&w, site, counts) >= PREFERRED_SHARE)
            && waited.elapsed() < limit
        {
            counted = line_counts(&w, &sources)?;
        }
        back_after = Some(waited.elapsed().as_secs_f64() - 1.0);
        for (site, counts) in counted {
            let total: u64 = counts.values().sum();
            let first = w.lines.get(&site).and_then(|l| l.first()).cloned().unwrap_or_default();
            let ap = w.home_ap.get(&site).cloned().unwrap_or_default();
            let share = preferred_share(&w, &site, &counts);
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
            let o = if f.spec.tcp.is_some() {
                stall(&sent, &arrived, &windows, f.spec.rate)
            } else {
                outage(&sent, &arrived, &windows, f.spec.rate)
            };
            let broken = f.broken.lock().ok().and_then(|b| b.clone());
            let (outage_ms, longest_gap_ms, outage_at_s) = (o.ms, o.longest_ms, o.at_s);
            let unique: BTreeSet<u64> = arrived.iter().map(|a| a.0).collect();
            let leaked = f.leaked.load(Ordering::Relaxed);
            FlowResult {
                from: f.spec.from.clone(),
                to: f.spec.to.clone(),
                segment: match f.spec.tcp {
                    None => w.hosts[&f.spec.from].1.clone(),
                    Some(port) => format!("{} → {} (tcp/{port})", w.hosts[&f.spec.from].1, w.hosts[&f.spec.to].1),
                },
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
                pass: outage_ms <= drill.pass.max_outage_ms as f64 && leaked == 0 && broken.is_none(),
                broken,
            }
        })
        .collect();
    let moves: Vec<Moves> = logs
        .moves(&w)
        .into_iter()
        .map(|(site, moved)| {
            let limit = drill.pass.max_moves.get(&site).copied();
            Moves {
                pass: limit.is_none_or(|l| moved.most <= l),
                site,
                moves: moved.most,
                limit,
                counted: moved.counted,
            }
        })
        .collect();
    let pass = flows.iter().all(|f| f.pass)
        && paths.iter().all(|p| p.pass)
        && moves.iter().all(|m| m.pass)
        && matrix_checks.iter().all(|m| m.1)
        && forwarded_checks.iter().all(|f| f.pass);
    let report = Report {
        drill: drill.name.clone(),
        description: drill.description.trim().to_string(),
        lab: w.lab.name.clone(),
        started_unix_s,
        duration_s: f64::from(end) / 1e6,
        max_outage_ms: drill.pass.max_outage_ms,
        timeline,
        flows,
        paths,
        paths_after_s: back_after,
        moves,
        matrix_checks,
        forwarded_checks,
        audit: audit_since(&w, audit_before),
        pass,
    };
    progress.finish();
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
