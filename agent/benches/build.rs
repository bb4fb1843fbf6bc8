//! What an access point's agent computes for each configuration it
//! receives: the desired state of 2,000 member sites × 5 segments (10,010
//! peers), and the whole build against the in-memory datapath — first
//! (everything new), then again with one member's key changed (what each
//! enrolling member causes). The fleet simulator's access points do this
//! on every republish; a real access point before it observes the kernel.
//!
//! `cargo bench -p musubi-agent --bench build`; `MUSUBI_BENCH_PEERS`
//! (default 2000) and `MUSUBI_BENCH_ROUNDS` (default 15).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use musubi_agent::datapath::Datapath;
use musubi_agent::datapath::fake::Fake;
use musubi_agent::failover::first_choices;
use musubi_agent::reconcile::{LocalKey, LocalKeys, build, desired};
use musubi_agent::state::public_of;
use musubi_core::allocate::Allocations;
use musubi_core::allocate::allocate;
use musubi_core::compile::{PublicKeys, compile};
use musubi_core::generate::generate;
use musubi_core::intent::parse::parse_str;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// This thread's CPU time (the bench runs on one), in nanoseconds from
/// the scheduler's accounting (`/proc/thread-self/schedstat`).
fn cpu() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    Duration::from_nanos(text.split_whitespace().next().and_then(|n| n.parse().ok()).expect("schedstat's first field"))
}

/// A deterministic public key: the n-th.
fn key(n: u64) -> String {
    let mut private = [7u8; 32];
    private[..8].copy_from_slice(&n.to_le_bytes());
    public_of(&private)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    let sites = env("MUSUBI_BENCH_PEERS", 2000);
    let rounds = env("MUSUBI_BENCH_ROUNDS", 15).max(1);
    let intent = parse_str("generated.yaml", &generate(sites, 5)).intent;
    let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
    let mut keys = PublicKeys::new();
    let mut n = 0;
    for (name, site) in &intent.sites {
        let own = keys.entry(name.clone()).or_default();
        for a in &site.attachments {
            n += 1;
            own.insert(a.segment.clone(), key(n));
        }
    }
    let ap = intent.sites.values().find(|s| s.is_access_point()).expect("an access point").name.clone();
    let config = |keys: &PublicKeys| {
        let mut all = compile(&intent, &alloc, keys).expect("compile");
        all.remove(&ap).expect("the access point's configuration")
    };
    let before = config(&keys);
    // One member's key changes (a member enrolling, or rotating).
    let member = intent.sites.values().find(|s| !s.is_access_point()).expect("a member").name.clone();
    for k in keys.get_mut(&member).expect("member keys").values_mut() {
        *k = key(u64::MAX);
    }
    let after = config(&keys);
    let local: LocalKeys = before
        .segments
        .iter()
        .map(|s| {
            let k =
                LocalKey { public_key: key(1 << 40), file: PathBuf::from(format!("/nonexistent/{}.key", s.segment)) };
            (s.segment.clone(), k)
        })
        .collect();
    let peers: usize = before.segments.iter().map(|s| s.peers.len()).sum();
    println!("access point {ap}: {sites} member sites × 5 segments, {peers} peers");

    let choices = first_choices(&before, &Default::default());
    let (mut wall, mut cpus) = (Vec::new(), Vec::new());
    let mut objects = 0;
    for _ in 0..rounds {
        let (t, c) = (Instant::now(), cpu());
        let owned = desired(&before, &local).expect("desired");
        wall.push(t.elapsed());
        cpus.push(cpu() - c);
        objects = owned.routes.len() + owned.tunnels.values().map(|t| t.peers.len()).sum::<usize>();
    }
    println!(
        "  desired state: {} (CPU {}; medians of {rounds}; {objects} routes and peers)",
        ms(median(wall)),
        ms(median(cpus))
    );

    let (mut first, mut again) = (Vec::new(), Vec::new());
    let (mut first_cpu, mut again_cpu) = (Vec::new(), Vec::new());
    let mut changed = 0;
    for _ in 0..rounds {
        let mut dp = Fake::new();
        let (t, c) = (Instant::now(), cpu());
        let ops = build(&mut dp, &before, &local, &choices, &Default::default()).expect("first build");
        first.push(t.elapsed());
        first_cpu.push(cpu() - c);
        assert!(ops.len() > peers, "the first build writes every peer");
        let choices = first_choices(&after, &Default::default());
        let (t, c) = (Instant::now(), cpu());
        let ops = build(&mut dp, &after, &local, &choices, &Default::default()).expect("build");
        again.push(t.elapsed());
        again_cpu.push(cpu() - c);
        changed = ops.len();
        assert!(changed > 0 && changed < 50, "one member's keys change a few peers, not {changed}");
        assert!(dp.writes() > 0, "the in-memory datapath counted the writes");
    }
    println!(
        "  build, first: {} (CPU {}); one member's keys changed: {} (CPU {}, {changed} operations); medians of {rounds}",
        ms(median(first)),
        ms(median(first_cpu)),
        ms(median(again)),
        ms(median(again_cpu))
    );
}
