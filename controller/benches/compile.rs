//! Benchmark of the pure core at national scale: validate + allocate +
//! compile a generated intent, then an incremental recompile after one site
//! changes. Prints its figures; run with `cargo bench -p musubi-controller`.
//!
//! Sizes come from `MUSUBI_BENCH_SITES` (default 10000) and
//! `MUSUBI_BENCH_SEGMENTS` (default 5).

use std::time::{Duration, Instant};

use std::collections::BTreeMap;
use std::sync::Arc;

use musubi_core::allocate::{Allocations, allocate, reallocate};
use musubi_core::compile::incremental::recompile;
use musubi_core::compile::{PublicKeys, compile};
use musubi_core::generate::generate;
use musubi_core::intent::parse::parse_str;
use musubi_core::intent::source::SourceMap;
use musubi_core::plan::affected_sites;
use musubi_core::validate::validate;
use musubi_proto::v1::SiteConfig;
use prost::Message;

/// The controller's allocator: its costs are part of what is measured.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Resident memory of this process.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU time of this process (every thread), user + system, from
/// `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
    f.get(11).zip(f.get(12)).map_or(0.0, |(u, s)| (u + s) / 100.0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// The intent reader on hostile input: one mapping of `keys` keys, every
/// thousandth written twice (duplicate detection must not compare pairs).
fn reader(keys: usize, rounds: usize) {
    let mut text = String::with_capacity(keys * 16);
    for i in 0..keys {
        text.push_str(&format!("k{i}: {i}\n"));
        if i % 1000 == 999 {
            text.push_str(&format!("k{i}: again\n"));
        }
    }
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            let parsed = parse_str("keys.yaml", &text);
            let took = t.elapsed();
            assert!(!parsed.diagnostics.is_empty());
            took
        })
        .collect();
    times.sort();
    println!(
        "reader: one mapping of {keys} keys ({} bytes, {} written twice): median {} (min {}, max {}) over {rounds}",
        text.len(),
        keys / 1000,
        ms(percentile(&times, 0.5)),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
}

fn main() {
    reader(env("MUSUBI_BENCH_KEYS", 100_000), env("MUSUBI_BENCH_ROUNDS", 5));
    if std::env::var("MUSUBI_BENCH_ONLY").is_ok_and(|v| v == "reader") {
        return;
    }
    let sites = env("MUSUBI_BENCH_SITES", 10_000);
    let segments = env("MUSUBI_BENCH_SEGMENTS", 5);
    let rounds = env("MUSUBI_BENCH_ROUNDS", 5);
    println!("musubi core benchmark: {sites} sites × {segments} segments (+2 access points per 2,000 sites)");

    let text = generate(sites, segments);
    let t = Instant::now();
    let parsed = parse_str("generated.yaml", &text);
    let parse_time = t.elapsed();
    assert!(parsed.diagnostics.is_empty(), "generated intent does not parse");
    let intent = parsed.intent;
    let empty = SourceMap::default();
    let keys = PublicKeys::new();
    println!("  YAML: {:.1} MiB, parse {}", text.len() as f64 / 1048576.0, ms(parse_time));

    let mut full = Vec::new();
    let (mut tv, mut ta, mut tc) = (Duration::MAX, Duration::MAX, Duration::MAX);
    let mut alloc = Allocations::default();
    let mut peers = 0usize;
    for _ in 0..rounds {
        let t0 = Instant::now();
        let diags = validate(&intent, &empty);
        let t1 = Instant::now();
        alloc = allocate(&intent, &Allocations::default()).expect("allocate");
        let t2 = Instant::now();
        let configs = compile(&intent, &alloc, &keys).expect("compile");
        let t3 = Instant::now();
        assert!(diags.is_empty(), "generated intent is invalid: {}", diags[0]);
        peers = configs.values().flat_map(|c| &c.segments).map(|s| s.peers.len()).sum();
        tv = tv.min(t1 - t0);
        ta = ta.min(t2 - t1);
        tc = tc.min(t3 - t2);
        full.push(t3 - t0);
    }
    full.sort();
    println!(
        "  full: validate {} + allocate {} + compile {} (best of {rounds}); total median {} ({} site configs, {peers} peers)",
        ms(tv),
        ms(ta),
        ms(tc),
        ms(percentile(&full, 0.5)),
        intent.sites.len()
    );

    // Every site changes (the probe interval, as a Settings merge): what an
    // apply computes for its plan — every site compiled again, then the plan
    // of every site's change, with every peer's probe timing in it.
    {
        let old = compile(&intent, &alloc, &keys).expect("compile");
        let mut next = intent.clone();
        next.settings.probe.interval_ms += 50;
        let (mut compiles, mut diffs) = (Vec::new(), Vec::new());
        let mut plan = musubi_core::plan::Plan::default();
        let (mut compile_cpu, mut diff_cpu) = (0.0, 0.0);
        for _ in 0..rounds {
            let c0 = cpu_seconds();
            let t = Instant::now();
            let new = compile(&next, &alloc, &keys).expect("compile");
            compiles.push(t.elapsed());
            let c1 = cpu_seconds();
            let t = Instant::now();
            plan = musubi_core::plan::diff(&old, &new);
            diffs.push(t.elapsed());
            let c2 = cpu_seconds();
            compile_cpu += c1 - c0;
            diff_cpu += c2 - c1;
        }
        compiles.sort();
        diffs.sort();
        let peers: usize = plan.sites.iter().flat_map(|s| &s.children).map(|s| s.children.len()).sum();
        println!(
            "  every site changed (probe interval): compile {} + plan {} (medians of {rounds}; CPU per round {:.0} + {:.0} ms; {} sites, {peers} peers in the plan)",
            ms(percentile(&compiles, 0.5)),
            ms(percentile(&diffs, 0.5)),
            compile_cpu * 1e3 / rounds as f64,
            diff_cpu * 1e3 / rounds as f64,
            plan.sites.len()
        );
        let t = Instant::now();
        let text = musubi_core::plan::render(&plan, false);
        let render = t.elapsed();
        if let Ok(path) = std::env::var("MUSUBI_BENCH_PLAN") {
            std::fs::write(&path, &text).expect("the plan written out");
        }
        let wire: usize = musubi_core::api::plan_to_pb(&plan).iter().map(|c| c.encoded_len()).sum();
        println!(
            "  that plan: rendered {} lines, {:.1} MiB in {}; {:.1} MiB of protobuf in the apply's answer",
            text.lines().count(),
            text.len() as f64 / 1048576.0,
            ms(render),
            wire as f64 / 1048576.0
        );
    }

    // Incremental: one site's line moves to a new address. The site is
    // recompiled; its access points get that one peer replaced in place.
    let before = rss_mib();
    let mut configs: BTreeMap<String, Arc<SiteConfig>> =
        compile(&intent, &alloc, &keys).expect("compile").into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
    let encoded: usize = configs.values().map(|c| c.encoded_len()).sum();
    println!(
        "  every compiled configuration held in memory: +{:.0} MiB resident ({:.0} MiB encoded)",
        rss_mib() - before,
        encoded as f64 / 1048576.0
    );
    let mut current = intent.clone();
    let mut samples = Vec::new();
    let mut affected_samples = Vec::new();
    let mut touched_count = 0;
    let names: Vec<String> = intent.sites.keys().filter(|n| n.starts_with("site-")).cloned().collect();
    let iterations = 200.min(names.len());
    for i in 0..iterations {
        let mut next = current.clone();
        let site = Arc::make_mut(next.sites.get_mut(&names[(i * 7919) % names.len()]).expect("site"));
        site.lines[0].address = format!("203.0.113.{}", i % 250 + 1).parse().expect("addr");
        let t = Instant::now();
        let affected = affected_sites(&current, &next);
        affected_samples.push(t.elapsed());
        let t = Instant::now();
        reallocate(&next, &mut alloc).expect("allocate");
        let touched = recompile(&current, &next, &alloc, &keys, &mut configs).expect("recompile");
        samples.push(t.elapsed());
        assert_eq!(touched.len(), affected.len(), "the site and its two access points");
        touched_count = touched.len();
        current = next;
    }
    samples.sort();
    affected_samples.sort();
    println!(
        "  one-site change: reallocate + recompile ({touched_count} sites touched): p50 {} p99 {} max {} ({iterations} runs)",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().expect("samples"))
    );
    println!(
        "  affected_sites(old, new) alone: p50 {} p99 {}",
        ms(percentile(&affected_samples, 0.5)),
        ms(percentile(&affected_samples, 0.99))
    );

    // What a fan-out that keeps the previous snapshot pays on top: copying an
    // access point's configuration before changing it.
    let ap = configs.keys().find(|k| k.starts_with("ap-")).expect("ap").clone();
    let t = Instant::now();
    let copy = (*configs[&ap]).clone();
    let clone_time = t.elapsed();
    let peers: usize = copy.segments.iter().map(|s| s.peers.len()).sum();
    println!("  copy of one access point's configuration ({peers} peers): {}", ms(clone_time));

    // The configuration stream: what sending this access point a full
    // snapshot costs, against a delta of the one peer a member change touches.
    let mut snapshot = copy;
    for seg in &mut snapshot.segments {
        for p in &mut seg.peers {
            p.public_key = format!("{:A<43}=", p.name.len());
        }
    }
    let runs = 20;
    let time = |f: &mut dyn FnMut()| {
        let mut v: Vec<Duration> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        v[runs / 2]
    };
    let mut bytes = Vec::new();
    let encode = time(&mut || bytes = snapshot.encode_to_vec());
    let decode = time(&mut || {
        SiteConfig::decode(bytes.as_slice()).expect("decode");
    });
    let digest = time(&mut || {
        musubi_controller::fanout::digest(&snapshot);
    });
    let filter = time(&mut || {
        musubi_controller::fanout::deliverable(&snapshot);
    });
    let seg = &snapshot.segments[0];
    let delta = seg.peers[0].encoded_len() + seg.route_groups[0].encoded_len();
    println!(
        "  snapshot of {ap} ({peers} peers, keys filled): {:.0} KiB; encode {}, decode {}, SHA-256 digest {}, leave out keyless peers {}",
        bytes.len() as f64 / 1024.0,
        ms(encode),
        ms(decode),
        ms(digest),
        ms(filter)
    );
    println!("  a one-member delta (its peer + route group in one segment) would be {delta} bytes");
}
