//! Fan-out at scale, with the fleet simulator: a real `musubi-controller`
//! process (mutual TLS, embedded store) and N simulated agents in this
//! process, each enrolled with its own token and certificate, each with an
//! in-memory datapath and its state directory in memory (`/dev/shm`).
//!
//! Measures, per fleet size: time to enrol and converge; time from an apply
//! that changes every site's configuration to the last agent's ack; a
//! one-site change → that agent's ack (p50/p99), each sent as the whole
//! intent and as only the changed object (`merge`); the controller's
//! resident memory.
//!
//! Needs release binaries: `cargo build --release --bins`, then
//! `cargo bench -p musubi-tests --bench fleet`. `MUSUBI_BENCH_FLEET`
//! (default `2000,10000`) and `MUSUBI_BENCH_ROUNDS` (default 50) change the
//! sizes. `MUSUBI_BENCH_REPLICAS=3` runs the replicas' measurement instead
//! (see [`replicas`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use musubi_agent::simulate::{self, Operator};
use musubi_core::generate::generate;
use musubi_core::intent::export::{select, to_yaml};
use musubi_core::intent::parse::parse_str;
use musubi_core::intent::{Intent, Kind};
use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_client::OperatorClient;
use musubi_tests::{Controller, Pki, free_port, ms, percentile};
use tonic::transport::Channel;

/// The simulated agents allocate and free a configuration's worth of
/// memory per apply, 10,000 at a time on two threads: with the system
/// allocator a quarter of their time went to it. The controller uses the
/// same allocator.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Raises the open-file limit of a process to the hard limit (10,000 TLS
/// connections need it).
fn raise_nofile(pid: u32) {
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("prlimit --pid {pid} --nofile=$(ulimit -Hn):$(ulimit -Hn)")])
        .status()
        .expect("prlimit (util-linux)");
    assert!(status.success(), "cannot raise the open-file limit of {pid}");
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime
    // are the 12th and 13th of them, in clock ticks (100 per second here).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<f64> = after.split_whitespace().map(|f| f.parse().unwrap_or(0.0)).collect();
    (fields.get(11).unwrap_or(&0.0) + fields.get(12).unwrap_or(&0.0)) / 100.0
}

fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Applies `text` (YAML written before the clock starts, as an operator's
/// file is): the whole intent, or with `merge` only the objects it declares.
/// Returns the new revision and the call's time.
async fn apply(client: &mut OperatorClient<Channel>, text: String, expected: u64, merge: bool) -> (u64, Duration) {
    let t = Instant::now();
    let resp = client
        .apply(pb::ApplyRequest {
            documents: vec![pb::Document { name: "intent.yaml".into(), text }],
            expected_revision: expected,
            dry_run: false,
            merge,
            remove: Vec::new(),
            propose: false,
        })
        .await
        .expect("apply")
        .into_inner();
    assert!(resp.diagnostics.is_empty(), "invalid intent");
    (resp.revision, t.elapsed())
}

/// [`apply`]s a change that reaches every site and waits until every agent
/// acknowledged it. Returns the new revision, the call's time and the time
/// from the call to the last acknowledgement.
async fn apply_to_every_site(
    client: &mut OperatorClient<Channel>,
    fleet: &mut simulate::Fleet,
    text: String,
    expected: u64,
    merge: bool,
) -> (u64, Duration, Duration) {
    let t = Instant::now();
    let (revision, took) = apply(client, text, expected, merge).await;
    let (last, _) = fleet
        .until(Duration::from_secs(120), |a| a.revision == revision)
        .await
        .expect("not every agent acknowledged the change");
    (revision, took, last - t)
}

fn yaml(intent: &Intent) -> String {
    to_yaml(intent).expect("export")
}

fn settings_yaml(intent: &Intent) -> String {
    select(intent, |k, _| k == Kind::Settings).expect("export").0
}

fn site_yaml(intent: &Intent, site: &str) -> String {
    select(intent, |k, n| k == Kind::Site && n == site).expect("export").0
}

/// How long the controller took to apply `revision`, from its log.
fn applied_ms(log: &std::path::Path, revision: u64) -> Option<u64> {
    let text = std::fs::read_to_string(log).ok()?;
    let wanted = format!("revision={revision} ");
    let line = text.lines().find(|l| l.contains("intent applied") && l.contains(&wanted))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("took_ms=")).and_then(|v| v.parse().ok())
}

/// Every site connected with the configuration it should have.
async fn converged(client: &mut OperatorClient<Channel>) -> bool {
    let Ok(resp) = client.status(pb::StatusRequest::default()).await else { return false };
    resp.into_inner().sites.iter().all(|s| {
        s.connected
            && !s.desired_digest.is_empty()
            && s.reported
                .as_ref()
                .and_then(|r| r.status.as_ref())
                .is_some_and(|st| st.applied_digest == s.desired_digest)
    })
}

async fn fleet(sites: usize, rounds: usize) {
    println!("fleet of {sites} sites × 5 segments (access points of 2,000 peers)");
    let tmp = tempfile::tempdir().expect("tmp");
    // Kept (logs included) even when the run fails, with MUSUBI_BENCH_KEEP.
    let keep = std::env::var_os("MUSUBI_BENCH_KEEP").is_some();
    let dir = if keep { tmp.keep() } else { tmp.path().to_path_buf() };
    if keep {
        println!("  keeping {}", dir.display());
    }
    let pki = Pki::init(&dir.join("pki"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = format!("file://{}", dir.join("store").display());
    let pki_dir = pki.dir.display().to_string();
    let dashboard = free_port();
    let dashboard_at = format!("127.0.0.1:{dashboard}");
    let controller = Controller::start_logged(
        port,
        &store,
        &["serve", "--pki", &pki_dir, "--listen", &listen, "--store", &store, "--dashboard", &dashboard_at],
        &dir.join("controller.log"),
    );
    raise_nofile(controller.pid());
    let operator = Operator { controller: listen.clone(), ca: pki.ca(), cert: pki.cert(), key: pki.key() };
    let mut client = operator.connect().await.expect("operator");

    let mut intent = parse_str("generated.yaml", &generate(sites, 5)).intent;
    let (mut revision, took) = apply(&mut client, yaml(&intent), 0, false).await;
    println!("  import:                          {}", ms(took));
    println!("  controller RSS, no agents:       {:.0} MiB right after the import", rss_mib(controller.pid()).0);
    // What the controller keeps: the allocator returns the import's
    // transient allocations within seconds.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let settled_rss = rss_mib(controller.pid()).0;
    println!("  controller RSS, no agents:       {settled_rss:.0} MiB 10 s later");
    // Access points' compiled structures are set aside once no change
    // reached them for a minute (checked every 10 s): what an idle
    // controller holds.
    let idle = musubi_controller::fanout::FREEZE_AFTER + Duration::from_secs(12);
    tokio::time::sleep(idle - Duration::from_secs(10)).await;
    println!(
        "  controller RSS, no agents:       {:.0} MiB {} s later (access points kept encoded only)",
        rss_mib(controller.pid()).0,
        idle.as_secs()
    );

    let t = Instant::now();
    let (controller_cpu, fleet_cpu) = (cpu_seconds(controller.pid()), cpu_seconds(std::process::id()));
    let names: Vec<String> = intent.sites.keys().cloned().collect();
    // The agents' state in memory: a disk would time the simulator's file system.
    let agents = simulate::scratch().expect("agents' state directory");
    let mut fleet = simulate::start(&operator, names.clone(), agents.path()).await.expect("fleet");
    println!("  tokens made, agents started:     {}", ms(t.elapsed()));
    fleet.until(Duration::from_secs(600), |_| true).await.expect("not every agent got a configuration");
    println!("  every agent has a configuration: {}", ms(t.elapsed()));
    let mut settled = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        while fleet.events.try_recv().is_ok() {}
        if converged(&mut client).await {
            settled = true;
            break;
        }
    }
    assert!(settled, "the fleet did not converge");
    while fleet.events.try_recv().is_ok() {}
    println!(
        "  enrol + converge ({} agents):     {}; CPU: controller {:.1} s, simulated agents {:.1} s",
        names.len(),
        ms(t.elapsed()),
        cpu_seconds(controller.pid()) - controller_cpu,
        cpu_seconds(std::process::id()) - fleet_cpu,
    );
    let (rss, _) = rss_mib(controller.pid());
    println!("  controller RSS, converged:       {rss:.0} MiB");
    // What a connection costs: the access points' structures are in use
    // both 10 s after the import and right after convergence.
    println!(
        "  per connected agent:             {:.0} KiB (converged − 10 s after the import)",
        (rss - settled_rss) * 1024.0 / names.len() as f64
    );
    page(dashboard, &names, &dir);

    // Every site changes: the probe interval is in every configuration. First
    // as the whole intent, then as the Settings document alone (a merge),
    // three times. The apply call's own time is the controller's (from its
    // log): the answer reaches this process late while it runs 10,000 agents.
    for merge in [false, true, true, true] {
        intent.settings.probe.interval_ms += 50;
        let text = if merge { settings_yaml(&intent) } else { yaml(&intent) };
        let (controller_cpu, fleet_cpu) = (cpu_seconds(controller.pid()), cpu_seconds(std::process::id()));
        let (rev, took, acked) = apply_to_every_site(&mut client, &mut fleet, text, revision, merge).await;
        revision = rev;
        println!(
            "  every site changed ({}): apply call {} (in the controller {} ms), apply → last ack {}; CPU: controller {:.2} s, simulated agents {:.2} s",
            if merge { "Settings merged" } else { "whole intent" },
            ms(took),
            applied_ms(&dir.join("controller.log"), revision).map_or("?".into(), |t| t.to_string()),
            ms(acked),
            cpu_seconds(controller.pid()) - controller_cpu,
            cpu_seconds(std::process::id()) - fleet_cpu,
        );
    }

    // One site at a time: a LAN interface only that site's configuration
    // holds. A few rounds as the whole intent, then the site's document alone.
    let members: Vec<String> = names.iter().filter(|n| n.starts_with("site-")).cloned().collect();
    let mut round = 0;
    for (merge, rounds) in [(false, rounds.div_ceil(5)), (true, rounds)] {
        let mut total = Vec::new();
        for _ in 0..rounds {
            round += 1;
            let name = &members[(round * 7919) % members.len()];
            let site = Arc::make_mut(intent.sites.get_mut(name).expect("site"));
            site.attachments[0].interface = Some(format!("lan{}", 100 + round % 7));
            let text = if merge { site_yaml(&intent, name) } else { yaml(&intent) };
            let t = Instant::now();
            let (rev, _) = apply(&mut client, text, revision, merge).await;
            revision = rev;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let left = deadline.checked_duration_since(Instant::now()).expect("no ack within 10 s");
                let event =
                    tokio::time::timeout(left, fleet.events.recv()).await.expect("no ack").expect("fleet ended");
                assert!(event.site == *name, "{} was sent a configuration for a change of {name}", event.site);
                if event.revision == revision {
                    total.push(event.at - t);
                    break;
                }
            }
        }
        total.sort();
        println!(
            "  one-site change → ack ({}, {rounds}): p50 {} p99 {}",
            if merge { "the site's document merged" } else { "whole intent" },
            ms(percentile(&total, 0.5)),
            ms(percentile(&total, 0.99)),
        );
    }
    let (rss, peak) = rss_mib(controller.pid());
    println!("  controller RSS now {rss:.0} MiB, peak {peak:.0} MiB");
    drop(fleet);
}

/// The dashboard's page for the whole fleet: the summary's answer (median
/// of 5), and the page loaded in headless Chromium (when installed) until
/// every site is drawn.
fn page(port: u16, names: &[String], dir: &std::path::Path) {
    let mut took: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let body = musubi_tests::http_get(port, "/api/summary").expect("the summary");
            assert!(body.len() > names.len() * 50, "a row per site");
            t.elapsed()
        })
        .collect();
    took.sort();
    println!("  dashboard summary ({} sites):   {} (median of 5)", names.len(), ms(took[2]));
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("browser/dashboard.py");
    if !std::path::Path::new("/usr/bin/chromium").exists() {
        println!("  dashboard page: no chromium here");
        return;
    }
    let ap = names.iter().find(|n| n.starts_with("ap-")).cloned().unwrap_or_default();
    // Three page loads, each in a fresh browser: each one's time from
    // navigation until the opening summary is drawn.
    let mut loads: Vec<f64> = Vec::new();
    for _ in 0..3 {
        let out = std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(format!("http://127.0.0.1:{port}/"))
            .arg(dir.join("shots"))
            .args(["--sites", &ap, "--any-state"])
            .output()
            .expect("python3");
        let figures: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        match figures["loaded_s"].as_f64() {
            Some(s) if out.status.success() => loads.push(s),
            _ => println!("  dashboard page: {}", String::from_utf8_lossy(&out.stderr).trim()),
        }
    }
    loads.sort_by(f64::total_cmp);
    if let Some(median) = loads.get(loads.len() / 2) {
        println!("  dashboard page in Chromium:      {median:.2} s to the first summary drawn (median; {loads:?})");
    }
}

/// `MUSUBI_BENCH_REPLICAS=3`: three controllers on a three-member etcd
/// cluster share the fleet (each agent lists every replica and starts at
/// one at random); every site is changed twice (the CPU each replica
/// spends), then the replica with the most agents is killed, and the
/// bench measures how long its agents take to be on the others, what the
/// survivors send and spend meanwhile, and that nothing moves when it is
/// back.
async fn replicas(sites: usize, count: usize) {
    println!("{count} replicas on a {count}-member etcd, {sites} sites × 5 segments");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_path_buf();
    if std::env::var_os("MUSUBI_BENCH_KEEP").is_some() {
        println!("  logs kept in {}", tmp.keep().display());
    }
    let etcd = musubi_tests::EtcdServer::cluster(count);
    let store = format!("etcd://{}", etcd.endpoints().join(","));
    let pki = Pki::init(&dir.join("pki"));
    let pki_dir = pki.dir.display().to_string();
    let ports: Vec<(u16, u16)> = (0..count).map(|_| (free_port(), free_port())).collect();
    let start = |i: usize| {
        let (port, metrics) = ports[i];
        let (listen, metrics) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{metrics}"));
        let args = ["serve", "--pki", &pki_dir, "--listen", &listen, "--store", &store, "--metrics", &metrics];
        let c = Controller::start_logged(port, &store, &args, &dir.join(format!("controller-{i}.log")));
        raise_nofile(c.pid());
        c
    };
    let mut controllers: Vec<Controller> = (0..count).map(start).collect();
    let addresses: Vec<String> = ports.iter().map(|(p, _)| format!("127.0.0.1:{p}")).collect();
    let scrape = |i: usize, series: &str| {
        let text = musubi_tests::http_get(ports[i].1, "/metrics").unwrap_or_default();
        musubi_lab::netns::sample(&text, series).unwrap_or(0.0)
    };
    let sessions = |i: usize| scrape(i, "musubi_controller_agent_sessions") as usize;
    let sent = |i: usize| scrape(i, "musubi_controller_configurations_sent_total") as u64;
    let operator = Operator { controller: addresses[0].clone(), ca: pki.ca(), cert: pki.cert(), key: pki.key() };
    let mut client = operator.connect().await.expect("operator");
    let mut intent = parse_str("generated.yaml", &generate(sites, 5)).intent;
    let (mut revision, took) = apply(&mut client, yaml(&intent), 0, false).await;
    println!("  import into etcd:                {}", ms(took));
    let names: Vec<String> = intent.sites.keys().cloned().collect();
    let agents = simulate::scratch().expect("agents' state directory");
    let t = Instant::now();
    let mut fleet =
        simulate::start_with(&operator, addresses.clone(), names.clone(), agents.path()).await.expect("fleet");
    fleet.until(Duration::from_secs(900), |_| true).await.expect("not every agent got a configuration");
    let mut settled = false;
    for _ in 0..1200 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        while fleet.events.try_recv().is_ok() {}
        if (0..count).map(sessions).sum::<usize>() == names.len() && converged(&mut client).await {
            settled = true;
            break;
        }
    }
    assert!(settled, "the fleet did not converge");
    while fleet.events.try_recv().is_ok() {}
    let spread: Vec<usize> = (0..count).map(sessions).collect();
    println!("  enrol + converge:                {} (agents per replica {spread:?})", ms(t.elapsed()));
    let rss: Vec<String> = controllers.iter().map(|c| format!("{:.0}", rss_mib(c.pid()).0)).collect();
    println!("  controllers' RSS, converged:     {} MiB", rss.join(" / "));
    let etcd_state = |etcd: &musubi_tests::EtcdServer| {
        let rss: Vec<String> = etcd.pids().iter().map(|p| format!("{:.0}", rss_mib(*p).0)).collect();
        format!("{:.0} MiB on disk (three members), RSS {} MiB", etcd.disk_bytes() as f64 / 1048576.0, rss.join(" / "))
    };
    println!("  etcd, converged:                 {}", etcd_state(&etcd));
    // Where the enrolment's time went: CPU of each process since it started.
    let cpu = |pids: Vec<u32>| pids.iter().map(|p| format!("{:.1}", cpu_seconds(*p))).collect::<Vec<_>>().join(" / ");
    println!(
        "  CPU so far, s: controllers {}; etcd members {}; the simulator (this process) {:.1}",
        cpu(controllers.iter().map(Controller::pid).collect()),
        cpu(etcd.pids()),
        cpu_seconds(std::process::id())
    );

    // Nothing changes for 20 s: what holding the agents costs (presence,
    // keepalives, etcd's own upkeep).
    let controller_pids: Vec<u32> = controllers.iter().map(Controller::pid).collect();
    let cpu_now = |pids: &[u32]| pids.iter().map(|p| cpu_seconds(*p)).collect::<Vec<f64>>();
    // CPU seconds each process spent since `before`, divided by `per`.
    let spent = |pids: &[u32], before: &[f64], per: f64| {
        cpu_now(pids).iter().zip(before).map(|(a, b)| format!("{:.2}", (a - b) / per)).collect::<Vec<_>>().join(" / ")
    };
    let (etcd_before, controllers_before) = (cpu_now(&etcd.pids()), cpu_now(&controller_pids));
    tokio::time::sleep(Duration::from_secs(20)).await;
    println!(
        "  idle 20 s, CPU s per s: etcd members {}; controllers {}",
        spent(&etcd.pids(), &etcd_before, 20.0),
        spent(&controller_pids, &controllers_before, 20.0)
    );

    // Every site changes (the Settings document merged through replica 0):
    // what each replica spends — each follows every site's change, and
    // sends and hears only its own agents.
    for _ in 0..2 {
        intent.settings.probe.interval_ms += 50;
        let before = cpu_now(&controller_pids);
        let (rev, _, acked) =
            apply_to_every_site(&mut client, &mut fleet, settings_yaml(&intent), revision, true).await;
        revision = rev;
        println!(
            "  every site changed (Settings merged): apply → last ack {}; CPU per replica {} s (agents {spread:?})",
            ms(acked),
            spent(&controller_pids, &before, 1.0)
        );
    }
    while fleet.events.try_recv().is_ok() {}

    let victim = (0..count).max_by_key(|i| spread[*i]).expect("a replica");
    let others: Vec<usize> = (0..count).filter(|i| *i != victim).collect();
    let sent_before: Vec<u64> = others.iter().map(|i| sent(*i)).collect();
    let cpu_before: Vec<f64> = others.iter().map(|i| cpu_seconds(controllers[*i].pid())).collect();
    controllers[victim].kill_hard();
    let killed = Instant::now();
    let moved = loop {
        if others.iter().map(|i| sessions(*i)).sum::<usize>() == names.len() {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(120), "the agents did not reach the other replicas");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let resent: u64 = others.iter().zip(&sent_before).map(|(i, b)| sent(*i) - b).sum();
    let cpu: Vec<String> =
        others.iter().zip(&cpu_before).map(|(i, b)| format!("{:.2}", cpu_seconds(controllers[*i].pid()) - b)).collect();
    let mut applied = 0;
    while fleet.events.try_recv().is_ok() {
        applied += 1;
    }
    println!(
        "  replica {victim} killed: its {} agents on the others in {} (polled every 100 ms); configurations sent again {resent}, applied {applied}; survivors' CPU {} s",
        spread[victim],
        ms(moved),
        cpu.join(" / ")
    );
    controllers[victim] = start(victim);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let now: Vec<usize> = (0..count).map(sessions).collect();
    let resent: u64 = others.iter().zip(&sent_before).map(|(i, b)| sent(*i) - b).sum();
    let mut applied = 0;
    while fleet.events.try_recv().is_ok() {
        applied += 1;
    }
    println!(
        "  restarted, 10 s later: agents per replica {now:?}; sent by the restarted one {}, again by the others {resent}; applied {applied}",
        sent(victim)
    );
    println!("  etcd at the end:                 {}", etcd_state(&etcd));
    drop(fleet);
}

#[tokio::main]
async fn main() {
    raise_nofile(std::process::id());
    let sizes: Vec<usize> = std::env::var("MUSUBI_BENCH_FLEET")
        .unwrap_or_else(|_| "2000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rounds = std::env::var("MUSUBI_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    if let Some(count) = std::env::var("MUSUBI_BENCH_REPLICAS").ok().and_then(|v| v.parse().ok()).filter(|c| *c > 1) {
        for n in sizes {
            replicas(n, count).await;
        }
        return;
    }
    for n in sizes {
        fleet(n, rounds).await;
    }
}
