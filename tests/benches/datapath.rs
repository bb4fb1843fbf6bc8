//! The Linux datapath at access-point scale, in a network namespace (root
//! only): `musubi-agent apply` of an access point's configuration with
//! 2,000 site peers in each of 5 segments (userspace WireGuard, table mode,
//! nftables), then no-op reconciles of the same configuration, and a change
//! of one peer's endpoint.
//!
//! Needs release binaries: `cargo build --release --bins`, then
//! `cargo bench -p musubi-tests --bench datapath`. `MUSUBI_BENCH_PEERS`
//! (default 2000) changes the number of sites; `MUSUBI_LOG=debug` shows
//! where a reconcile's time goes.

use std::io::Read;
use std::path::Path;

use musubi_agent::state::public_of;
use musubi_core::generate::generate;
use musubi_core::intent::parse::parse_str;
use musubi_tests::netns::{Net, is_root};
use musubi_tests::{bin, reconcile_line};

/// Runs `musubi-agent apply` (reconciling `repeat` times in one process)
/// and returns, per reconcile, (operations, writes, milliseconds).
fn apply(net: &Net, config: &Path, state: &Path, repeat: u32) -> Vec<(u64, u64, f64)> {
    let mut cmd = net.command("ap", &bin("musubi-agent"));
    cmd.arg("apply").arg("--config").arg(config).arg("--state").arg(state).arg("--repeat").arg(repeat.to_string());
    let out = cmd.output().expect("musubi-agent apply");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "apply: {text}{}", String::from_utf8_lossy(&out.stderr));
    if std::env::var_os("MUSUBI_LOG").is_some() {
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
    }
    let mut runs = Vec::new();
    for line in text.lines() {
        match reconcile_line(line) {
            Some((ops, writes, took)) => {
                println!("    {ops:>6} operations, {writes:>6} writes: {took:>8.1} ms");
                runs.push((ops, writes, took));
            }
            None => println!("    {line}"),
        }
    }
    runs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if !is_root() {
        println!("datapath bench skipped: needs root for network namespaces");
        return;
    }
    let peers: usize = std::env::var("MUSUBI_BENCH_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let net = {
        let mut net = Net::new("mdb");
        net.router("ap");
        net
    };
    let dir = net.dir().to_path_buf();
    let text = generate(peers, 5);
    let intent = parse_str("generated.yaml", &text).intent;
    let intent_file = dir.join("intent.yaml");
    std::fs::write(&intent_file, &text).expect("intent");
    // Every site has reported a key for each of its segments.
    let mut urandom = std::fs::File::open("/dev/urandom").expect("urandom");
    let mut keys = String::new();
    for (name, site) in &intent.sites {
        keys.push_str(&format!("{name}:\n"));
        for a in &site.attachments {
            let mut private = [0u8; 32];
            urandom.read_exact(&mut private).expect("urandom");
            keys.push_str(&format!("  {}: \"{}\"\n", a.segment, public_of(&private)));
        }
    }
    let keys_file = dir.join("keys.yaml");
    std::fs::write(&keys_file, keys).expect("keys");
    let ap = intent.sites.values().find(|s| s.is_access_point()).expect("an access point").name.clone();
    let compile = |intent: &Path, out: &Path| {
        let o = std::process::Command::new(bin("musubi"))
            .args(["compile", "--format", "json", "--site", &ap, "--keys"])
            .arg(&keys_file)
            .arg(intent)
            .output()
            .expect("compile");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::write(out, &o.stdout).expect("config");
    };
    let config = dir.join("ap.json");
    compile(&intent_file, &config);
    let state = dir.join("state");
    println!(
        "access point {ap}: {peers} sites × 5 segments, configuration {} KiB of JSON",
        std::fs::metadata(&config).map(|m| m.len() / 1024).unwrap_or(0)
    );

    println!("  first apply (builds everything):");
    let (ops, _, first) = apply(&net, &config, &state, 1)[0];
    assert!(ops > 0);
    println!(
        "  no-op reconciles in one process: the first observes everything, the rest reuse it while the kernel raises no notification:"
    );
    let runs = apply(&net, &config, &state, 8);
    assert!(runs.iter().all(|(ops, writes, _)| (*ops, *writes) == (0, 0)), "a no-op reconcile writes nothing");
    let cold = runs[0].2;
    let warm = median(runs[1..].iter().map(|r| r.2).collect());
    // One site moves to another underlay address: the access point follows
    // its member sites wherever WireGuard sees them, so nothing is written —
    // but a new process observes everything first.
    let first_site = intent.sites.values().find(|s| !s.is_access_point()).expect("a site");
    let old = first_site.lines[0].address.to_string();
    let moved = text.replacen(&format!("address: {old}}}"), "address: 203.0.113.77}", 1);
    assert!(moved != text, "the generated intent names {old}");
    let moved_file = dir.join("moved.yaml");
    std::fs::write(&moved_file, moved).expect("intent");
    let moved_config = dir.join("moved.json");
    compile(&moved_file, &moved_config);
    println!("  one site's line address changes:");
    let (ops, writes, change) = apply(&net, &moved_config, &state, 1)[0];
    assert_eq!((ops, writes), (0, 0), "a member site's endpoint is left to WireGuard's roaming");
    println!(
        "  summary: first apply {first:.0} ms (target ≤ 2,000); no-op reconcile {cold:.0} ms observing everything, \
         median {warm:.1} ms reusing the observation (target ≤ 50); one-site change {change:.1} ms ({ops} operations)"
    );
}
