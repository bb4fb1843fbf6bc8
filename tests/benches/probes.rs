//! The probing an access point does, by the size of its membership: the
//! access point of a generated intent (`MUSUBI_BENCH_PEERS` sites, 2,000
//! by default, × 5 segments) is compiled, and the probes its agent sends
//! per second are counted from the targets its configuration gives —
//! probing every member at its line's interval, as the agent did, and now
//! (members alive whenever their own probes arrive, and probed
//! `MEMBER_SLOWDOWN` times more slowly). Replies are not counted: every
//! member's probes of its access points are answered either way.
//!
//! `cargo bench -p musubi-tests --bench probes`

use std::collections::BTreeMap;

use musubi_agent::probe::{MEMBER_SLOWDOWN, probes_per_second, targets};
use musubi_core::allocate::{Allocations, allocate};
use musubi_core::compile::Index;
use musubi_core::generate::generate;
use musubi_core::intent::parse::parse_str;

fn main() {
    let sites: usize = std::env::var("MUSUBI_BENCH_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let intent = parse_str("generated.yaml", &generate(sites, 5)).intent;
    let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
    // Every site has a key for each of its segments (probing needs keys).
    let keys: BTreeMap<String, BTreeMap<String, String>> = intent
        .sites
        .iter()
        .map(|(name, s)| (name.clone(), s.attachments.iter().map(|a| (a.segment.clone(), "K".repeat(44))).collect()))
        .collect();
    let index = Index::new(&intent, &alloc, &keys);
    for ap in intent.sites.values().filter(|s| s.is_access_point()) {
        let config = index.site(&ap.name).expect("compile");
        let now = targets(&config);
        let members = now.iter().filter(|t| t.member).count();
        let mut before = now.clone();
        for t in &mut before {
            t.member = false;
        }
        let (b, a) = (probes_per_second(&before), probes_per_second(&now));
        println!(
            "access point {}: {} tunnel targets ({members} member-segment pairs); probes sent per second: {b:.0} probing every member at its interval, {a:.0} now (members x1/{MEMBER_SLOWDOWN}); ratio {:.2}",
            ap.name,
            now.len(),
            a / b
        );
        assert!(a < b, "members are probed more slowly");
    }
}
