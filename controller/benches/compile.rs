//! Benchmark of the pure core at national scale: validate + allocate +
//! compile a generated intent, then an incremental recompile after one site
//! changes. Prints its figures; run with `cargo bench -p musubi-controller`.
//!
//! Sizes come from `MUSUBI_BENCH_SITES` (default 10000) and
//! `MUSUBI_BENCH_SEGMENTS` (default 5).

use std::time::{Duration, Instant};

use musubi_controller::allocate::{Allocations, allocate};
use musubi_controller::compile::{Index, PublicKeys, compile};
use musubi_controller::generate::generate;
use musubi_controller::intent::parse::parse_str;
use musubi_controller::intent::source::SourceMap;
use musubi_controller::plan::affected_sites;
use musubi_controller::validate::validate;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let sites = env("MUSUBI_BENCH_SITES", 10_000);
    let segments = env("MUSUBI_BENCH_SEGMENTS", 5);
    let rounds = env("MUSUBI_BENCH_ROUNDS", 5);
    println!(
        "musubi core benchmark: {sites} sites × {segments} segments (+2 access points per 2,000 sites)"
    );

    let text = generate(sites, segments);
    let t = Instant::now();
    let parsed = parse_str("generated.yaml", &text);
    let parse_time = t.elapsed();
    assert!(
        parsed.diagnostics.is_empty(),
        "generated intent does not parse"
    );
    let intent = parsed.intent;
    let empty = SourceMap::default();
    let keys = PublicKeys::new();
    println!(
        "  YAML: {:.1} MiB, parse {}",
        text.len() as f64 / 1048576.0,
        ms(parse_time)
    );

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
        assert!(
            diags.is_empty(),
            "generated intent is invalid: {}",
            diags[0]
        );
        peers = configs
            .values()
            .flat_map(|c| &c.segments)
            .map(|s| s.peers.len())
            .sum();
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

    // Incremental: one site's line moves to a new address. Only the site and
    // its access points are recompiled.
    let mut samples = Vec::new();
    let mut affected_count = 0;
    let names: Vec<String> = intent
        .sites
        .keys()
        .filter(|n| n.starts_with("site-"))
        .cloned()
        .collect();
    let iterations = 200.min(names.len());
    for i in 0..iterations {
        let mut next = intent.clone();
        let site = std::sync::Arc::make_mut(next.sites.get_mut(&names[(i * 7919) % names.len()]).expect("site"));
        site.lines[0].address = format!("203.0.113.{}", i % 250 + 1).parse().expect("addr");
        let t = Instant::now();
        let affected = affected_sites(&intent, &next);
        let ta = t.elapsed();
        let next_alloc = allocate(&next, &alloc).expect("allocate");
        let tb = t.elapsed();
        let index = Index::new(&next, &next_alloc, &keys);
        let tc = t.elapsed();
        let configs: Vec<_> = affected
            .iter()
            .filter(|s| next.sites.contains_key(*s))
            .map(|s| index.site(s).expect("compile"))
            .collect();
        samples.push(t.elapsed());
        if i == 0 {
            println!(
                "    affected {} alloc {} index {} compile {}",
                ms(ta),
                ms(tb - ta),
                ms(tc - tb),
                ms(t.elapsed() - tc)
            );
        }
        affected_count = configs.len();
    }
    samples.sort();
    println!(
        "  one-site change: affected_sites + allocate + recompile {affected_count} sites: p50 {} p99 {} max {} ({iterations} runs)",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().expect("samples"))
    );
}
