//! Apply latency at national scale: a one-site change to a 10,000-site
//! intent, committed through the apply pipeline (validate, load, allocate,
//! plan, audit, atomic commit) on the embedded store and on a real etcd.
//!
//! `cargo bench -p musubi-tests --bench apply`; `MUSUBI_BENCH_SITES` and
//! `MUSUBI_BENCH_ROUNDS` change the size and the number of applies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use musubi_controller::store::IntentStore;
use musubi_controller::store::apply::{Accepted, Change, Hold, Mode, NO_KEYS, apply, apply_on};
use musubi_controller::store::embedded::Embedded;
use musubi_controller::store::etcd::{Etcd, EtcdConfig};
use musubi_controller::store::layout::Stored;
use musubi_core::generate::generate;
use musubi_core::intent::Kind;
use musubi_core::intent::export::select;
use musubi_core::intent::parse::{Parsed, parse_str};
use musubi_tests::{EtcdServer, ms, percentile};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Parses `text` and merges it into `kept`, as the controller does; the
/// time both took, and what was written.
async fn merge<S: IntentStore>(store: &S, kept: &Stored, text: &str) -> (Duration, Accepted) {
    let t = Instant::now();
    let parsed = parse_str("merged.yaml", text);
    let change = Change {
        actor: "bench",
        now_ms: 0,
        dry_run: false,
        note: None,
        keys: &NO_KEYS,
        before_commit: None,
        hold: Hold::Never,
        approver: None,
    };
    let done = apply_on(store, kept, &parsed, Mode::Merge { remove: &[] }, Some(kept.revision), change);
    let done = done.await.expect("merge");
    (t.elapsed(), done)
}

async fn run<S: IntentStore>(name: &str, store: &S, base: &Parsed, rounds: usize) {
    let t = Instant::now();
    apply(store, base, 0, "bench", 0, false).await.expect("initial apply");
    println!("  {name}: initial import of {} sites in one transaction: {}", base.intent.sites.len(), ms(t.elapsed()));
    let names: Vec<String> = base.intent.sites.keys().filter(|n| n.starts_with("site-")).cloned().collect();
    let mut current = Parsed { intent: base.intent.clone(), ..Parsed::default() };
    let mut samples = Vec::new();
    let mut load = Vec::new();
    for i in 0..rounds {
        let name = &names[(i * 7919) % names.len()];
        let site = Arc::make_mut(current.intent.sites.get_mut(name).expect("site"));
        site.lines[0].address = format!("203.0.{}.{}", 113 + i / 250, i % 250 + 1).parse().expect("addr");
        let t = Instant::now();
        store.load().await.expect("load");
        load.push(t.elapsed());
        let t = Instant::now();
        let done = apply(store, &current, 1 + i as u64, "bench", 0, false).await.expect("apply");
        samples.push(t.elapsed());
        assert_eq!(done.revision, 2 + i as u64);
    }
    samples.sort();
    load.sort();
    println!(
        "  {name}: one-site change: p50 {} p99 {} ({rounds} applies; of which loading the intent p50 {})",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(percentile(&load, 0.5))
    );

    // As the controller does it: the one site's document merged into the
    // state the previous apply left (parsing the document included).
    let mut kept = Arc::new(store.load().await.expect("load"));
    let mut samples = Vec::new();
    for i in 0..rounds {
        let name = &names[(i * 7919 + 13) % names.len()];
        let site = Arc::make_mut(current.intent.sites.get_mut(name).expect("site"));
        site.lines[0].address = format!("100.64.{}.{}", i / 250, i % 250 + 1).parse().expect("addr");
        let one = select(&current.intent, |k, n| k == Kind::Site && n == name).expect("export").0;
        let (took, done) = merge(store, &kept, &one).await;
        samples.push(took);
        kept = done.after.expect("written");
    }
    samples.sort();
    println!(
        "  {name}: one-site change merged into the kept intent: p50 {} p99 {} ({rounds} applies)",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
    );

    // A change every site's configuration holds: the Settings document alone.
    let mut samples = Vec::new();
    for _ in 0..3 {
        current.intent.settings.probe.interval_ms += 50;
        let one = select(&current.intent, |k, _| k == Kind::Settings).expect("export").0;
        let (took, done) = merge(store, &kept, &one).await;
        samples.push(took);
        assert_eq!(done.plan.sites.len(), current.intent.sites.len(), "every site changes");
        kept = done.after.expect("written");
    }
    samples.sort();
    println!(
        "  {name}: every site changes (Settings merged): median {} of 3, plan of {} sites",
        ms(percentile(&samples, 0.5)),
        current.intent.sites.len()
    );
}

#[tokio::main]
async fn main() {
    let sites = env("MUSUBI_BENCH_SITES", 10_000);
    let rounds = env("MUSUBI_BENCH_ROUNDS", 30);
    println!("apply latency: {sites} sites × 5 segments");
    let base = parse_str("generated.yaml", &generate(sites, 5));
    assert!(base.diagnostics.is_empty());

    let dir = tempfile::tempdir().expect("tmp");
    let embedded = Embedded::open(dir.path()).expect("open");
    run("embedded", &embedded, &base, rounds).await;

    let server = EtcdServer::start();
    let config = EtcdConfig { endpoints: vec![server.endpoint()], ..EtcdConfig::default() };
    let etcd = Etcd::connect(&config).await.expect("connect");
    run("etcd", &etcd, &base, rounds).await;
}
