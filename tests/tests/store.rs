//! One conformance suite for both intent stores: the embedded redb file and a
//! real etcd server (Debian's `etcd-server`), started by the test on free
//! loopback ports with a temporary data directory and stopped by PID.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use std::time::{Duration, Instant};

use musubi_controller::fanout::{FREEZE_AFTER, Fanout, Priming, deliverable, digest};
use musubi_controller::store::apply::{
    ApplyError, BeforeCommit, Change, Hold, Mode, RollbackError, apply, apply_on, rollback,
};
use musubi_controller::store::embedded::Embedded;
use musubi_controller::store::etcd::{Etcd, EtcdConfig};
use musubi_controller::store::generations::Limits;
use musubi_controller::store::layout;
use musubi_controller::store::watch::{apply_changes, watch};
use musubi_controller::store::{Event, Guard, IntentStore, StoreError, Write};
use musubi_core::audit::verify;
use musubi_core::compile::compile;
use musubi_core::intent::parse::{Parsed, parse_str};
use musubi_proto::v1::SiteConfig;
use musubi_tests::{EtcdServer, topology};

fn prefecture() -> Parsed {
    parse_str("prefecture.yaml", &topology("prefecture.yaml"))
}

/// The prefecture with one more branch office.
fn prefecture_plus_branch() -> Parsed {
    let extra = "---\nkind: Site\nname: kita-east\ntenant: city-kita\nregion: east\n\
                 lines: [{name: wae, kind: wide-area-ethernet, priority: 1, address: 198.51.100.23}]\n\
                 attachments: [{segment: lgwan, interface: eth2, prefixes: [10.2.23.0/24]}]\n";
    parse_str("prefecture.yaml", &(topology("prefecture.yaml") + extra))
}

async fn connect(server: &EtcdServer) -> Etcd {
    let config = EtcdConfig { endpoints: server.endpoints(), ..EtcdConfig::default() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(store) = Etcd::connect(&config).await
            && store.load().await.is_ok()
        {
            return store;
        }
        assert!(Instant::now() < deadline, "etcd did not answer on {}", server.endpoint());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const T0: u64 = 1_790_000_000_000;

async fn conformance<S: IntentStore + 'static>(store: Arc<S>) {
    // A watcher from the very beginning sees every revision in order.
    let mut from_start = watch(store.clone(), 0).await.expect("watch");

    // Empty.
    let empty = store.load().await.expect("load");
    assert_eq!(empty.revision, 0);
    assert!(empty.intent.sites.is_empty());
    assert!(store.history().await.expect("history").is_empty());

    // First apply.
    let first = apply(&*store, &prefecture(), 0, "local", T0, false).await.expect("apply");
    assert_eq!(first.revision, 1);
    assert_eq!(first.affected.len(), 7, "every site is new");
    let loaded = store.load().await.expect("load");
    assert_eq!(loaded.revision, 1);
    assert_eq!(loaded.intent, prefecture().intent, "the stored intent is what was applied");
    assert_eq!(loaded.allocations.sites.len(), 7);
    assert_eq!(loaded.allocations.segments.len(), 6);

    // The same intent again writes nothing.
    let again = apply(&*store, &prefecture(), 1, "local", T0 + 1, false).await.expect("apply");
    assert_eq!(again.revision, 1);
    assert!(again.audit.is_none() && again.plan.is_empty());
    assert_eq!(store.history().await.expect("history").len(), 1);

    // A dry run plans without writing.
    let dry = apply(&*store, &prefecture_plus_branch(), 1, "local", T0 + 2, true).await.expect("dry run");
    assert_eq!(dry.revision, 1);
    assert!(!dry.plan.is_empty());
    assert_eq!(store.load().await.expect("load").revision, 1);

    // A real change: one site added; allocations of the others kept.
    let second = apply(&*store, &prefecture_plus_branch(), 1, "alice@ops", T0 + 3, false).await.expect("apply");
    assert_eq!(second.revision, 2);
    assert_eq!(second.affected, ["ap-east", "ap-west", "kita-east"].map(String::from).into());
    let after = store.load().await.expect("load");
    assert_eq!(after.intent.sites.len(), 8);
    for (name, a) in loaded.allocations.sites.iter() {
        assert_eq!(after.allocations.sites[name], *a, "{name} kept its tunnel addresses");
    }
    assert_eq!(after.allocations.segments, loaded.allocations.segments);

    // A change planned against revision 1 lost the race: nothing written.
    let stale = apply(&*store, &prefecture(), 1, "bob@ops", T0 + 4, false).await;
    assert!(matches!(stale, Err(ApplyError::Store(StoreError::Conflict { expected: 1, actual: 2 }))), "{stale:?}");
    assert_eq!(store.load().await.expect("load"), after);

    // Invalid intent: nothing written.
    let broken =
        parse_str("broken.yaml", &topology("prefecture.yaml").replace("name: lgwan\n", "name: lgwan\ncolour: red\n"));
    let invalid = apply(&*store, &broken, 2, "local", T0 + 5, false).await;
    assert!(matches!(&invalid, Err(ApplyError::Invalid(d)) if d.len() == 1), "{invalid:?}");
    assert_eq!(store.load().await.expect("load"), after);

    // Removing the site deletes its key and frees its allocation.
    let third = apply(&*store, &prefecture(), 2, "local", T0 + 6, false).await.expect("apply");
    assert_eq!(third.revision, 3);
    let back = store.load().await.expect("load");
    assert_eq!(back.intent, prefecture().intent);
    assert!(!back.allocations.sites.contains_key("kita-east"));

    // The audit chain holds exactly the accepted changes and verifies.
    let history = store.history().await.expect("history");
    assert_eq!(history.iter().map(|e| e.revision).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(history[1].actor, "alice@ops");
    assert_eq!(history[1].summary, "+site kita-east");
    assert_eq!(history[2].summary, "-site kita-east");
    verify(&history).expect("chain verifies");

    // Two applies racing from the same revision: exactly one wins.
    let (a, b) = (store.clone(), store.clone());
    let one = tokio::spawn(async move { apply(&*a, &prefecture_plus_branch(), 3, "one", T0 + 7, false).await });
    let two = tokio::spawn(async move {
        let mut p = prefecture();
        std::sync::Arc::make_mut(p.intent.tenants.get_mut("city-kita").expect("tenant")).description =
            "北市 (renamed)".into();
        apply(&*b, &p, 3, "two", T0 + 7, false).await
    });
    let results = [one.await.expect("join"), two.await.expect("join")];
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "{results:?}");
    assert!(results.iter().any(|r| matches!(r, Err(ApplyError::Store(StoreError::Conflict { .. })))));
    let history = store.history().await.expect("history");
    assert_eq!(history.len(), 4);
    verify(&history).expect("chain verifies");

    // Rollbacks are new forward revisions with an earlier revision's content.
    let rolled = rollback(&*store, 3, Some(4), "carol@ops", T0 + 8, false).await.expect("rollback");
    assert_eq!(rolled.revision, 5);
    assert_eq!(store.load().await.expect("load").intent, prefecture().intent, "the content of revision 3");
    let rolled = rollback(&*store, 2, Some(5), "carol@ops", T0 + 9, false).await.expect("rollback");
    assert_eq!(rolled.revision, 6);
    assert_eq!(store.load().await.expect("load").intent, prefecture_plus_branch().intent, "the content of revision 2");
    let last = store.history().await.expect("history").pop().expect("entry");
    assert_eq!(last.summary, "rollback to 2: +site kita-east");
    assert!(matches!(rollback(&*store, 6, Some(6), "x", T0, false).await, Err(RollbackError::NoSuchRevision { .. })));
    assert!(matches!(
        rollback(&*store, 1, Some(5), "x", T0, false).await,
        Err(RollbackError::Apply(ApplyError::Store(StoreError::Conflict { expected: 5, actual: 6 })))
    ));
    rollback(&*store, 1, Some(6), "carol@ops", T0 + 10, false).await.expect("rollback");
    assert_eq!(store.load().await.expect("load").intent, prefecture().intent);

    // Replaying the watched changes onto nothing rebuilds the stored intent.
    let last = store.load().await.expect("load");
    let mut replayed = musubi_core::intent::Intent::default();
    let mut seen = Vec::new();
    while seen.last() != Some(&last.revision) {
        let next = tokio::time::timeout(Duration::from_secs(10), from_start.recv())
            .await
            .expect("a revision within 10 s")
            .expect("stream open")
            .expect("no store error");
        apply_changes(&mut replayed, &next).expect("replay");
        seen.push(next.revision);
    }
    assert_eq!(seen, (1..=last.revision).collect::<Vec<_>>(), "every revision once, in order");
    assert_eq!(replayed, last.intent);

    // Agents' public keys are stored beside the intent: no revision, no audit.
    let key = "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=";
    store.put_public_keys("kita-hall", &[("lgwan".into(), key.into())]).await.expect("put key");
    let with_key = store.load().await.expect("load");
    assert_eq!(with_key.keys["kita-hall"]["lgwan"], key);
    assert_eq!(with_key.revision, last.revision);
    assert_eq!(store.history().await.expect("history").len() as u64, last.revision);

    // Presence: withdrawn at once when dropped, expires when its holder dies.
    let here = store.announce("kita-hall", Duration::from_secs(1)).await.expect("announce");
    let crashed = store.announce("minami-hall", Duration::from_secs(1)).await.expect("announce");
    // Renewed: still there well past the 1 s time-to-live (etcd rounds small
    // TTLs up to its own minimum, so wait past that too).
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let present = store.present().await.expect("present");
    assert!(present.contains_key("kita-hall") && present.contains_key("minami-hall"), "{present:?}");
    drop(here);
    crashed.forget();
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut gone_at = None;
    loop {
        let present = store.present().await.expect("present");
        if gone_at.is_none() && !present.contains_key("kita-hall") {
            gone_at = Some(Instant::now());
        }
        if !present.contains_key("minami-hall") {
            break;
        }
        assert!(Instant::now() < deadline, "an unrenewed presence did not expire: {present:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone_at.is_some(), "a dropped presence was not withdrawn");

    // A site's agent moved to another session (another replica) while the
    // old one still wrote: the old one's late writes and its withdrawal
    // leave the new one's record as it is (on etcd the old session's last
    // status replaced the record under its own lease, and revoking that
    // lease deleted it: 1,163 of 10,000 connected agents shown offline).
    let old = store.announce("kita-hall", Duration::from_secs(30)).await.expect("announce");
    let new = store.announce("kita-hall", Duration::from_secs(30)).await.expect("announce");
    new.set(b"new".to_vec()).await.expect("set");
    old.set(b"old".to_vec()).await.expect("a late write is not an error");
    assert_eq!(store.present().await.expect("present").get("kita-hall"), Some(&b"new".to_vec()), "the newer holder's");
    drop(old);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.present().await.expect("present").get("kita-hall"), Some(&b"new".to_vec()), "still there");
    drop(new);

    // A watcher from a later revision starts after it.
    let mut late = watch(store.clone(), last.revision - 1).await.expect("watch");
    let next =
        tokio::time::timeout(Duration::from_secs(10), late.recv()).await.expect("in time").expect("open").expect("ok");
    assert_eq!(next.revision, last.revision);
    verify(&store.history().await.expect("history")).expect("chain verifies");

    // Events beside the intent (a join token here) are links of the same
    // chain, written with their record: both or neither.
    let at = store.load().await.expect("load");
    let token =
        Write { key: "/musubi/v1/tokens/conformance".into(), guard: Guard::Absent, value: Some(b"{}".to_vec()) };
    let event = |s: &str| Event { time_ms: T0 + 20, actor: "operator:a".into(), summary: s.into() };
    let created = store.record(event("token created"), vec![token.clone()]).await.expect("record").expect("written");
    assert_eq!((created.revision, created.event), (at.revision, 1));
    let before = store.history().await.expect("history");
    assert_eq!(before.last(), Some(&created));
    assert_eq!(store.record(event("token again"), vec![token]).await.expect("record"), None, "its guard failed");
    assert_eq!(store.history().await.expect("history"), before, "no entry without its write");
    let first_second = store.record(event("site revoked"), Vec::new()).await.expect("record").expect("written");
    assert_eq!(
        (first_second.revision, first_second.event, first_second.previous.as_str()),
        (at.revision, 2, created.hash.as_str())
    );
    // Several writes with one event (join tokens made for many sites at
    // once): all or nothing — one guard that fails writes none of them.
    let batch: Vec<Write> = (0..3)
        .map(|i| Write {
            key: format!("/musubi/v1/tokens/batch-{i}"),
            guard: Guard::Absent,
            value: Some(b"{}".to_vec()),
        })
        .collect();
    let mut clashing = batch.clone();
    clashing.push(Write { key: "/musubi/v1/tokens/conformance".into(), ..batch[0].clone() });
    assert_eq!(store.record(event("tokens, one clashing"), clashing).await.expect("record"), None);
    assert_eq!(store.list("/musubi/v1/tokens/batch-").await.expect("list").len(), 0, "none of the batch written");
    let second = store.record(event("tokens for 3 sites"), batch).await.expect("record").expect("written");
    assert_eq!(store.list("/musubi/v1/tokens/batch-").await.expect("list").len(), 3, "the whole batch written");
    assert_eq!((second.event, second.previous.as_str()), (3, first_second.hash.as_str()));
    // A change planned before those events commits after them, linked to the
    // newest: nothing cut out of the chain.
    let change = Change {
        actor: "dave@ops",
        now_ms: T0 + 21,
        dry_run: false,
        note: None,
        keys: &musubi_controller::store::apply::NO_KEYS,
        before_commit: None,
        hold: Hold::Never,
        approver: None,
    };
    let later = apply_on(&*store, &at, &prefecture_plus_branch(), Mode::Replace, Some(at.revision), change)
        .await
        .expect("applied after the events");
    let history = store.history().await.expect("history");
    let head = history.last().expect("head");
    assert_eq!((head.revision, head.event, head.previous.as_str()), (later.revision, 0, second.hash.as_str()));
    verify(&history).expect("chain verifies with its events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_conforms() {
    let dir = tempfile::tempdir().expect("tmp");
    conformance(Arc::new(Embedded::open(dir.path()).expect("open"))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms() {
    let server = EtcdServer::start();
    conformance(Arc::new(connect(&server).await)).await;
}

/// Every change committed as a new generation (a store that believes one
/// transaction carries 4 operations and 400 bytes): the whole suite holds,
/// change records in parts included, and nothing is left staged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_conforms_when_every_change_is_a_new_generation() {
    let server = EtcdServer::start();
    let store = connect(&server).await.with_limits(Limits { ops: 4, bytes: 400 });
    conformance(Arc::new(store)).await;
    let raw = raw_keys(&server).await;
    assert!(raw.iter().any(|k| k == layout::GENERATION), "changes went to generations");
    let generation = raw_value(&server, layout::GENERATION).await;
    assert!(raw.iter().any(|k| k.starts_with(layout::CHANGE_PARTS)), "change records in parts");
    for k in &raw {
        assert!(!k.starts_with(layout::INTENT) && !k.starts_with(layout::ALLOC), "{k} outside the generation");
        assert!(!k.starts_with(layout::STAGING), "{k}: left staged");
        if let Some(rest) = k.strip_prefix(layout::GENERATIONS) {
            assert!(rest.starts_with(&format!("{generation}/")), "{k}: an old generation left behind");
        }
    }
}

/// A replica holds its agents' presence records with one etcd lease (not
/// one per agent: 10,000 agents renewed 3,000 leases a second); when that
/// lease is lost (revoked here, as an expiry after etcd was out of reach
/// would), the records come back under a new one, each with its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_records_share_one_lease_and_come_back_when_it_is_lost() {
    let server = EtcdServer::start();
    let store = connect(&server).await;
    let mut held = Vec::new();
    for i in 0..50 {
        let p = store.announce(&format!("site-{i}"), Duration::from_secs(10)).await.expect("announce");
        p.set(format!("status {i}").into_bytes()).await.expect("set");
        held.push(p);
    }
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await.expect("raw client");
    let leases = raw.leases().await.expect("leases");
    assert_eq!(leases.leases().len(), 1, "one lease for 50 records");
    let present = store.present().await.expect("present");
    assert_eq!(present.len(), 50);
    assert_eq!(present.get("site-7"), Some(&b"status 7".to_vec()));

    raw.lease_revoke(leases.leases()[0].id()).await.expect("revoke");
    assert!(store.present().await.expect("present").is_empty(), "gone with their lease");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let present = store.present().await.expect("present");
        if present.len() == 50 {
            assert_eq!(present.get("site-7"), Some(&b"status 7".to_vec()), "its last value");
            break;
        }
        assert!(Instant::now() < deadline, "records not back under a new lease: {} of 50", present.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leases = raw.leases().await.expect("leases");
    assert_eq!(leases.leases().len(), 1, "a new lease, one for all");
    // Still held: a later status is written, a withdrawal deletes.
    held[7].set(b"later".to_vec()).await.expect("set");
    assert_eq!(store.present().await.expect("present").get("site-7"), Some(&b"later".to_vec()));
    drop(held.remove(7));
    let deadline = Instant::now() + Duration::from_secs(5);
    while store.present().await.expect("present").contains_key("site-7") {
        assert!(Instant::now() < deadline, "a dropped record was not withdrawn");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.present().await.expect("present").len(), 49);
}

/// All the keys etcd holds.
async fn raw_keys(server: &EtcdServer) -> Vec<String> {
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await.expect("raw client");
    let all = etcd_client::GetOptions::new().with_prefix().with_keys_only();
    let resp = raw.get("/", Some(all)).await.expect("get");
    resp.kvs().iter().map(|kv| kv.key_str().expect("utf-8").to_string()).collect()
}

async fn raw_value(server: &EtcdServer, key: &str) -> String {
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await.expect("raw client");
    let resp = raw.get(key, None).await.expect("get");
    resp.kvs().first().map(|kv| kv.value_str().expect("utf-8").to_string()).unwrap_or_default()
}

/// A national intent into an etcd started with no flags (128 operations and
/// 1.5 MiB per transaction): the import is written as a generation and made
/// current at once; everyday changes, watchers, the audit chain and
/// rollback work as before; a generation whose writer died half-way is
/// swept away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_sites_import_into_an_etcd_with_default_limits() {
    let server = EtcdServer::start();
    let store = Arc::new(connect(&server).await);
    let mut watcher = watch(store.clone(), 0).await.expect("watch");
    let national = parse_str("national.yaml", &musubi_core::generate::generate(10_000, 2));
    assert!(national.diagnostics.is_empty(), "{:?}", national.diagnostics.first());
    let started = Instant::now();
    let first = apply(&*store, &national, 0, "local", T0, false).await.expect("import into a default etcd");
    println!("10,000 sites imported into a default etcd in {:?}", started.elapsed());
    assert_eq!(first.revision, 1);
    let loaded = store.load().await.expect("load");
    assert_eq!(loaded.intent, national.intent, "read back whole");
    assert_eq!(loaded.allocations.sites.len(), national.intent.sites.len());
    let keys = raw_keys(&server).await;
    assert!(!keys.iter().any(|k| k.starts_with(layout::INTENT)), "the import lives in its generation");
    assert!(!keys.iter().any(|k| k.starts_with(layout::STAGING)), "nothing left staged");

    // An everyday change: one transaction, into the current generation.
    let mut one_more = parse_str("national.yaml", &musubi_core::generate::generate(10_000, 2));
    let site = one_more.intent.sites.keys().find(|n| n.starts_with("site-")).cloned().expect("a member site");
    Arc::make_mut(one_more.intent.sites.get_mut(&site).expect("site")).description = "moved".into();
    let second = apply(&*store, &one_more, 1, "alice@ops", T0 + 1, false).await.expect("one-site change");
    assert_eq!(store.load().await.expect("load").intent.sites[&site].description, "moved");
    assert!(
        raw_keys(&server).await.iter().filter(|k| k.starts_with(layout::GENERATIONS)).count()
            == keys.iter().filter(|k| k.starts_with(layout::GENERATIONS)).count(),
        "written in place, no new generation"
    );

    // A watcher from the start sees both revisions with every key changed
    // (the import's change record was stored in parts).
    let mut replayed = musubi_core::intent::Intent::default();
    for expected in [1, 2] {
        let revision = tokio::time::timeout(Duration::from_secs(30), watcher.recv())
            .await
            .expect("in time")
            .expect("open")
            .expect("read");
        assert_eq!(revision.revision, expected);
        apply_changes(&mut replayed, &revision).expect("replay");
    }
    assert_eq!(replayed, one_more.intent, "the watcher's copy equals the intent");

    // The audit chain verifies against the change records and the stored intent.
    let history = store.history().await.expect("history");
    verify(&history).expect("chain");
    let records: BTreeMap<u64, Vec<u8>> = store
        .list(layout::CHANGES)
        .await
        .expect("changes")
        .into_iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(layout::CHANGES)?.parse().ok()?, v)))
        .collect();
    musubi_core::audit::verify_changes(&history, &records).expect("change records match the chain");
    let intent_keys = store.list(layout::INTENT).await.expect("intent keys");
    assert!(intent_keys.len() > 10_000);
    let digest = musubi_core::audit::intent_digest(intent_keys.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    assert!(musubi_core::audit::verify_intent(&history, &records, Some(&digest)).expect("intent verifies"));

    // Rollback to the import: a forward change, the site's description back.
    let back = rollback(&*store, 1, Some(second.revision), "alice@ops", T0 + 2, false).await.expect("rollback");
    assert_eq!(back.revision, 3);
    assert_eq!(store.load().await.expect("load").intent, national.intent);

    // A controller that died while writing a generation: its lease expires
    // and the sweep removes what it wrote; the intent is untouched.
    let mut raw = etcd_client::Client::connect([server.endpoint()], None).await.expect("raw client");
    let lease = raw.lease_grant(1, None).await.expect("lease").id();
    let dead = "00000000000000000004-deadbeefdeadbeef";
    raw.put(format!("{}{dead}", layout::STAGING), lease.to_string(), None).await.expect("put");
    raw.put(format!("{}{dead}/intent/site/ghost", layout::GENERATIONS), "{}", None).await.expect("put");
    raw.put(format!("{}{dead}/00000000", layout::CHANGE_PARTS), "[", None).await.expect("put");
    store.sweep_staged().await;
    assert!(raw_keys(&server).await.iter().any(|k| k.contains(dead)), "kept while its writer's lease lives");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    store.sweep_staged().await;
    assert!(!raw_keys(&server).await.iter().any(|k| k.contains(dead)), "swept once the lease is gone");
    assert_eq!(store.load().await.expect("load").intent, national.intent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_member_etcd_cluster_conforms_and_survives_losing_a_member() {
    let mut cluster = EtcdServer::cluster(3);
    let store = Arc::new(connect(&cluster).await);
    conformance(store.clone()).await;
    let before = store.load().await.expect("load");
    // A majority remains: reads and writes go on.
    cluster.kill_member(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let applied = loop {
        match apply(&*store, &prefecture(), before.revision, "local", T0 + 100, false).await {
            Ok(a) => break a,
            Err(e) => {
                assert!(Instant::now() < deadline, "no write after losing a member: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(applied.revision, before.revision + 1);
    assert_eq!(store.load().await.expect("load").intent, prefecture().intent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_refuses_a_second_controller_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Embedded::open(dir.path()).expect("open");
    apply(&store, &prefecture(), 0, "local", T0, false).await.expect("apply");
    let second = Embedded::open(dir.path());
    assert!(matches!(second, Err(StoreError::Locked { .. })), "{second:?}");
    drop(store);
    let reopened = Embedded::open(dir.path()).expect("reopen");
    let loaded = reopened.load().await.expect("load");
    assert_eq!(loaded.revision, 1);
    assert_eq!(loaded.intent, prefecture().intent);
}

/// Every site's delivery from the fan-out is exactly what compiling the
/// stored intent gives (keyless peers left out), kept encoded: the bytes
/// its digest is of.
async fn assert_deliveries_match_the_intent<S: IntentStore>(store: &S, fanout: &Fanout) {
    let stored = store.load().await.expect("load");
    let compiled = compile(&stored.intent, &stored.allocations, &stored.keys).expect("compile");
    for (site, raw) in &compiled {
        let d = fanout.desired(site).unwrap_or_else(|| panic!("nothing to deliver to {site}"));
        assert_eq!(d.digest, musubi_core::audit::sha256_hex(&d.encoded), "{site}: the digest is of the kept bytes");
        let expected = SiteConfig { revision: d.revision, ..deliverable(raw) };
        assert_eq!(
            d.to_pb().expect("decodes").config.as_ref(),
            Some(&expected),
            "{site}: delivered configuration differs"
        );
        assert_eq!(d.digest, digest(&deliverable(raw)), "{site}: digest");
    }
}

/// Records a made-up public key for every segment `site` is attached to and
/// waits until the fan-out has it.
async fn give_keys<S: IntentStore>(store: &S, fanout: &Fanout, site: &str) {
    let stored = store.load().await.expect("load");
    let n = stored.intent.sites.keys().position(|s| s == site).expect("site") as u8;
    let keys: Vec<(String, String)> = stored.intent.sites[site]
        .attachments
        .iter()
        .map(|a| (a.segment.clone(), base64::engine::general_purpose::STANDARD.encode([n; 32])))
        .collect();
    store.put_public_keys(site, &keys).await.expect("keys");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fanout.keys(site).len() < keys.len() {
        assert!(Instant::now() < deadline, "the fan-out did not take the keys of {site}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Digests of every site's delivery now.
fn digests(fanout: &Fanout) -> BTreeMap<String, String> {
    fanout.sites().into_iter().filter_map(|s| Some((s.clone(), fanout.desired(&s)?.digest.clone()))).collect()
}

/// Sites whose delivery differs from `before` (or is new).
fn changed_since(fanout: &Fanout, before: &BTreeMap<String, String>) -> Vec<String> {
    digests(fanout).into_iter().filter(|(s, d)| before.get(s) != Some(d)).map(|(s, _)| s).collect()
}

/// The prefecture applied to an embedded store, and a fan-out following it
/// (no agent keys yet).
async fn prefecture_fanout() -> (tempfile::TempDir, Arc<Embedded>, Arc<Fanout>) {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Embedded::open(dir.path()).expect("open"));
    apply(&*store, &prefecture(), 0, "local", T0, false).await.expect("apply");
    let fanout = Fanout::start(store.clone()).await.expect("fan-out");
    (dir, store, fanout)
}

/// Applies the prefecture with a new branch office (revision 2) and waits
/// until the fan-out followed it.
async fn add_branch<S: IntentStore>(store: &S, fanout: &Fanout) {
    apply(store, &prefecture_plus_branch(), 1, "local", T0 + 1, false).await.expect("apply");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fanout.revision() < 2 {
        assert!(Instant::now() < deadline, "the fan-out did not follow revision 2");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every site's keys, each waited for.
async fn give_every_key<S: IntentStore>(store: &S, fanout: &Fanout) {
    for site in fanout.sites() {
        give_keys(store, fanout, &site).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_keeps_member_configs_encoded_and_republishes_only_what_changed() {
    let (_dir, store, fanout) = prefecture_fanout().await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;
    give_every_key(&*store, &fanout).await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;

    // A new branch office: its own feed, and a route to it on its
    // segment's access points (its peer comes with its key); nobody else.
    let (before, published) = (digests(&fanout), fanout.published());
    add_branch(&*store, &fanout).await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;
    let stored = store.load().await.expect("load");
    let is_ap = |s: &String| stored.intent.sites[s].is_access_point();
    let changed = changed_since(&fanout, &before);
    assert!(changed.contains(&"kita-east".to_string()), "the new branch has no feed: {changed:?}");
    assert!(changed.iter().filter(|s| *s != "kita-east").all(is_ap), "member sites republished: {changed:?}");
    assert!(changed.iter().any(is_ap), "no access point learned of the new branch: {changed:?}");
    assert_eq!(fanout.published() - published, changed.len() as u64, "published configurations");

    // Its key arrives: its peer appears on those access points only.
    let (before, published) = (digests(&fanout), fanout.published());
    give_keys(&*store, &fanout, "kita-east").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;
    let changed = changed_since(&fanout, &before);
    assert!(!changed.is_empty() && changed.iter().all(is_ap), "republished for a branch's key: {changed:?}");
    assert_eq!(fanout.published() - published, changed.len() as u64, "published configurations");
}

/// Access points no change reached for `FREEZE_AFTER` keep only their
/// encoding (the bytes their agents are sent); a member's change then
/// decodes them back before it is spliced in — through an intent revision
/// and through a new key alike — and what every agent is sent is what
/// compiling the stored intent gives, as if nothing had been set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_access_points_are_kept_encoded_and_a_change_reaches_them_all_the_same() {
    let (_dir, store, fanout) = prefecture_fanout().await;
    give_every_key(&*store, &fanout).await;
    let stored = store.load().await.expect("load");
    let aps = stored.intent.sites.values().filter(|s| s.is_access_point()).count();
    assert!(aps >= 2, "the prefecture has access points");
    let is_ap = |s: &String| stored.intent.sites[s].is_access_point();
    let quiet = |fanout: &Fanout| fanout.changed_at() + FREEZE_AFTER;

    // Not a millisecond early; then every access point, once.
    let before = digests(&fanout);
    assert_eq!(fanout.freeze_idle(quiet(&fanout) - Duration::from_millis(1)), 0, "set aside before its time");
    assert_eq!(fanout.freeze_idle(quiet(&fanout)), aps, "access points set aside");
    assert_eq!(fanout.freeze_idle(quiet(&fanout)), 0, "set aside twice");
    assert_eq!(digests(&fanout), before, "deliveries changed by setting structures aside");
    assert_deliveries_match_the_intent(&*store, &fanout).await;

    // A new branch office, as an intent revision: spliced into the access
    // points of its segment, which were set aside.
    add_branch(&*store, &fanout).await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;
    let changed = changed_since(&fanout, &before);
    assert!(changed.iter().any(is_ap), "no access point learned of the new branch: {changed:?}");

    // Set aside again; the branch's key arrives.
    assert_eq!(fanout.freeze_idle(quiet(&fanout)), aps, "access points set aside again");
    let before = digests(&fanout);
    give_keys(&*store, &fanout, "kita-east").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_deliveries_match_the_intent(&*store, &fanout).await;
    let changed = changed_since(&fanout, &before);
    assert!(!changed.is_empty() && changed.iter().all(is_ap), "republished for a branch's key: {changed:?}");
}

/// Marks the configurations an apply compiled, then hands them to the
/// fan-out — as compiled for the intent being committed, or (`lie`) for
/// another one.
struct Marking<'a> {
    inner: Priming<'a>,
    lie: bool,
}

impl BeforeCommit for Marking<'_> {
    fn compiled(
        &self,
        revision: u64,
        intent: &musubi_core::intent::Intent,
        allocations: &musubi_core::allocate::Allocations,
        mut configs: BTreeMap<String, SiteConfig>,
    ) {
        for c in configs.values_mut() {
            c.tenant.push_str(" (primed)");
        }
        let mut other = intent.clone();
        other.settings.probe.interval_ms += 1;
        self.inner.compiled(revision, if self.lie { &other } else { intent }, allocations, configs);
    }
}

/// An apply hands the configurations its plan compiled to the fan-out
/// before it commits: the fan-out delivers them when the revision it
/// follows has the same intent, allocations and keys, and compiles its own
/// otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_takes_an_applys_configurations_only_for_that_content() {
    let (_dir, store, fanout) = prefecture_fanout().await;
    give_every_key(&*store, &fanout).await;
    let primed = |fanout: &Fanout| {
        let marked = |s: &String| {
            fanout.desired(s).and_then(|d| d.to_pb().ok()?.config).is_some_and(|c| c.tenant.ends_with(" (primed)"))
        };
        fanout.sites().iter().filter(|s| marked(s)).count()
    };
    for (round, lie) in [(1, false), (2, true)] {
        let current = store.load().await.expect("load");
        let mut parsed = prefecture();
        parsed.intent.settings.probe.interval_ms = current.intent.settings.probe.interval_ms + 50;
        let keys = fanout.public_keys();
        let hook = Marking { inner: fanout.priming(&keys), lie };
        let change = Change {
            actor: "local",
            now_ms: T0 + round,
            dry_run: false,
            note: None,
            keys: &keys.keys,
            before_commit: Some(&hook),
            hold: Hold::Never,
            approver: None,
        };
        let done =
            apply_on(&*store, &current, &parsed, Mode::Replace, Some(current.revision), change).await.expect("apply");
        let deadline = Instant::now() + Duration::from_secs(10);
        while fanout.revision() < done.revision {
            assert!(Instant::now() < deadline, "the fan-out did not follow revision {}", done.revision);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if lie {
            assert_eq!(primed(&fanout), 0, "configurations compiled for another intent were delivered");
            assert_deliveries_match_the_intent(&*store, &fanout).await;
        } else {
            assert_eq!(primed(&fanout), fanout.sites().len(), "the apply's configurations were compiled again");
        }
    }
}

/// Passes an apply's questions and configurations to the fan-out, counting
/// the plans it answered.
struct Asking<'a> {
    inner: Priming<'a>,
    answered: std::sync::atomic::AtomicUsize,
}

impl BeforeCommit for Asking<'_> {
    fn compiled(
        &self,
        revision: u64,
        intent: &musubi_core::intent::Intent,
        allocations: &musubi_core::allocate::Allocations,
        configs: BTreeMap<String, SiteConfig>,
    ) {
        self.inner.compiled(revision, intent, allocations, configs);
    }

    fn held(&self, revision: u64, sites: &[&str]) -> Option<BTreeMap<String, SiteConfig>> {
        let held = self.inner.held(revision, sites);
        if held.is_some() {
            self.answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        held
    }
}

/// A change of settings plans with the fan-out's configurations as its
/// before side (not compiled again), and that plan equals one compiled on
/// both sides; with keys of another generation the fan-out does not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_takes_its_before_side_from_the_fanout_and_equals_one_compiled_afresh() {
    let (_dir, store, fanout) = prefecture_fanout().await;
    give_every_key(&*store, &fanout).await;
    let current = store.load().await.expect("load");
    assert_eq!(fanout.revision(), current.revision, "the fan-out is behind the store");
    let mut parsed = prefecture();
    parsed.intent.settings.probe.interval_ms = current.intent.settings.probe.interval_ms + 50;
    // As the fan-out holds access points while changes come, then once
    // they are set aside (kept encoded only: decoded for the plan).
    for set_aside in [false, true] {
        if set_aside {
            assert!(fanout.freeze_idle(fanout.changed_at() + FREEZE_AFTER) > 0, "no access point set aside");
        }
        let keys = fanout.public_keys();
        let stale = musubi_controller::fanout::Keys { generation: keys.generation + 1, keys: keys.keys.clone() };
        let mut plans = Vec::new();
        for (keys, ask) in [(&keys, true), (&keys, false), (&stale, true)] {
            let asking = Asking { inner: fanout.priming(keys), answered: 0.into() };
            let change = Change {
                actor: "local",
                now_ms: T0,
                dry_run: true,
                note: None,
                keys: &keys.keys,
                before_commit: ask.then_some(&asking as &dyn BeforeCommit),
                hold: Hold::Never,
                approver: None,
            };
            let done = apply_on(&*store, &current, &parsed, Mode::Replace, Some(current.revision), change)
                .await
                .expect("plan");
            plans.push((done.plan, asking.answered.into_inner()));
        }
        let [(held, answered), (afresh, _), (_, stale_answered)] = <[_; 3]>::try_from(plans).expect("three plans");
        assert_eq!(answered, 1, "the fan-out was not asked, or did not answer (set aside: {set_aside})");
        assert_eq!(stale_answered, 0, "the fan-out answered for keys of another generation");
        assert_eq!(held.sites.len(), fanout.sites().len(), "a change of settings reaches every site");
        assert_eq!(held, afresh, "the plan from the fan-out's configurations differs (set aside: {set_aside})");
    }
}

/// Join tokens made and spent in batches on a real etcd: 250 tokens in
/// three audit entries; 250 agents enrolling at once spend them in a
/// handful of entries, not 250; the same token presented twice at once
/// is spent once; a token for another site is refused without failing
/// the rest of its batch; the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_are_made_and_spent_in_batches_of_one_audit_entry() {
    use musubi_controller::sites::{self, Redeemer, TokenError};
    let server = EtcdServer::start();
    let store = Arc::new(connect(&server).await);
    let sites: Vec<String> = (0..250).map(|i| format!("school-{i:03}")).collect();
    let ttl = Duration::from_secs(600);
    let now = 1_796_000_000_000;
    let mut tokens = Vec::new();
    for batch in sites.chunks(sites::TOKENS_PER_BATCH) {
        tokens.extend(sites::create_tokens(&*store, batch, ttl, "operator:ops", now).await.expect("tokens"));
    }
    assert_eq!(tokens.len(), 250);
    let spare = sites::create_token(&*store, "spare", ttl, "operator:ops", now).await.expect("token").0;
    let made = store.history().await.expect("history").len();
    assert_eq!(made, 4, "one audit entry per hundred tokens, and one for the spare");
    let too_many: Vec<String> = (0..101).map(|i| format!("s{i}")).collect();
    assert!(sites::create_tokens(&*store, &too_many, ttl, "operator:ops", now).await.is_err(), "101 in one batch");

    let redeemer = Arc::new(Redeemer::new(store.clone()));
    let mut spending = tokio::task::JoinSet::new();
    for (site, (token, _)) in sites.iter().zip(&tokens) {
        let (redeemer, site, token) = (redeemer.clone(), site.clone(), token.clone());
        spending.spawn(async move { (site.clone(), redeemer.redeem(&token, &site, now + 1).await) });
    }
    // The first token again, at once, and the spare one for another site.
    let (again, elsewhere) = (redeemer.clone(), redeemer.clone());
    let first = tokens[0].0.clone();
    spending.spawn(async move { ("replay".into(), again.redeem(&first, "school-000", now + 1).await) });
    spending.spawn(async move { ("other-site".into(), elsewhere.redeem(&spare, "school-999", now + 1).await) });
    let mut spent = 0;
    let mut refused = BTreeMap::new();
    while let Some(joined) = spending.join_next().await {
        match joined.expect("task") {
            (_, Ok(())) => spent += 1,
            (site, Err(e)) => {
                refused.insert(site, e);
            }
        }
    }
    // school-000 is spent once: by its agent or by the replay, whichever came first.
    assert_eq!(spent, 250, "every token spent once; refused: {refused:?}");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused.values().any(|e| matches!(e, TokenError::Used { .. })), "the replay: {refused:?}");
    assert!(matches!(refused.get("other-site"), Some(TokenError::OtherSite { .. })), "{refused:?}");
    let history = store.history().await.expect("history");
    let entries = history.len() - made;
    eprintln!("250 tokens spent in {entries} audit entries");
    assert!(entries <= 25, "{entries} audit entries for 250 redemptions");
    assert!(
        history.iter().any(|e| e.summary.starts_with("join tokens of ") && e.summary.contains("school-123")),
        "a batch's entry names its sites"
    );
    verify(&history).expect("chain verifies");
    // Spent is spent.
    assert!(matches!(sites::redeem(&*store, &tokens[5].0, "school-005", now + 2).await, Err(TokenError::Used { .. })));
}

/// New WireGuard keys from many agents at once are registered in batches on
/// a real etcd with its default limits: 300 sites' keys claimed, put and
/// audited in a handful of transactions, each site and key named once.
/// A site that reports a key another site holds meanwhile is turned back
/// with nothing of it written, and the rest of its batch still lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_keys_are_registered_in_batches() {
    use musubi_controller::sites::{Registrar, owner_index};
    let server = EtcdServer::start();
    let store = Arc::new(connect(&server).await);
    let registrar = Arc::new(Registrar::new(store.clone()));
    let key = |i: usize, kind: u8| {
        base64::engine::general_purpose::STANDARD.encode([i as u8, (i >> 8) as u8, kind, 7].repeat(8))
    };
    let mut registering = tokio::task::JoinSet::new();
    let now = 1_796_000_000_000;
    for i in 0..300 {
        let (to, site) = (registrar.clone(), format!("school-{i:03}"));
        let keys = vec![("lgwan".to_string(), key(i, 1)), ("inet".to_string(), key(i, 2))];
        registering.spawn(async move { (site.clone(), to.register(&site, keys.clone(), keys, now).await) });
        if i == 150 {
            // Another site reporting school-140's key, among them.
            let (to, keys) = (registrar.clone(), vec![("lgwan".to_string(), key(140, 1))]);
            registering
                .spawn(async move { ("intruder".to_string(), to.register("intruder", keys.clone(), keys, now).await) });
        }
    }
    // One key for two interfaces of one site.
    let twin = vec![("lgwan".to_string(), key(999, 1)), ("inet".to_string(), key(999, 1))];
    assert!(!registrar.register("twin", twin.clone(), twin, now).await.expect("no store failure"), "twin refused");
    let mut turned_back = Vec::new();
    while let Some(done) = registering.join_next().await {
        let (site, registered) = done.expect("task");
        if !registered.expect("no store failure") {
            turned_back.push(site);
        }
    }
    assert_eq!(turned_back.len(), 1, "one of school-140 and the intruder: {turned_back:?}");
    let winner = if turned_back[0] == "intruder" { "school-140" } else { "intruder" };
    let owners: BTreeMap<String, Vec<u8>> = store.list(layout::KEY_OWNERS).await.expect("owners").into_iter().collect();
    assert_eq!(owners.get(&owner_index(&key(140, 1))).map(Vec::as_slice), Some(format!("{winner}/lgwan").as_bytes()));
    for site in [turned_back[0].as_str(), "twin"] {
        let written = store.list(&layout::public_key_key(site, "")).await.expect("keys");
        assert!(written.is_empty(), "nothing of {site} written: {written:?}");
    }
    let claimed = if winner == "intruder" { 599 } else { 600 };
    assert_eq!(owners.len(), claimed, "every other key claimed");
    assert_eq!(store.list(layout::KEYS).await.expect("keys").len(), claimed);
    assert_eq!(
        store.list(&layout::public_key_key("school-299", "inet")).await.expect("key")[0].1,
        key(299, 2).into_bytes()
    );
    let history = store.history().await.expect("history");
    eprintln!("301 sites' new keys in {} audit entries", history.len());
    // 30 sites a batch; the batch that met the held key was recorded site by site.
    assert!(history.len() <= 45, "{} entries for 301 registrations", history.len());
    let all: String = history.iter().map(|e| e.summary.as_str()).collect::<Vec<_>>().join("\n");
    for i in [0, 150, 299] {
        assert!(all.contains(&format!("school-{i:03}")), "school-{i:03} named");
    }
    assert_eq!(all.matches(" sha256:").count(), claimed, "every key claimed named once");
    verify(&history).expect("chain verifies");

    // etcd refuses a transaction that writes a key twice: said at once, not
    // retried for seconds as if the audit head kept moving.
    let twice = |v: &str| Write { key: "/musubi/v1/twice".into(), guard: Guard::Any, value: Some(v.into()) };
    let event = Event { time_ms: now, actor: "test".into(), summary: "twice".into() };
    let t = Instant::now();
    let refused = store.record(event, vec![twice("a"), twice("b")]).await;
    assert!(matches!(refused, Err(StoreError::Refused(_))), "{refused:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused after {:?}", t.elapsed());
    assert_eq!(store.history().await.expect("history").len(), history.len(), "nothing appended");
    // So are the other writes: an agent's keys past etcd's 128 operations,
    // a value past its request limit.
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("seg-{i:03}"), key(1, 1))).collect();
    let refused = store.put_public_keys("school-001", &many).await;
    assert!(matches!(refused, Err(StoreError::Refused(_))), "{refused:?}");
    // Past etcd's limit, then past its gRPC server's (2 MiB).
    for size in [1_800_000, 2 << 20] {
        let refused = store.swap("/musubi/v1/big", Guard::Any, Some(vec![b'x'; size])).await;
        assert!(matches!(refused, Err(StoreError::Refused(_))), "{size} bytes: {refused:?}");
    }
    assert!(store.list(&layout::public_key_key("school-001", "seg-000")).await.expect("list").is_empty());
}

/// Waits (10 s at most) until the fan-out shows `what`.
async fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "the fan-out never saw {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The configuration the fan-out holds for `peer`, once its peer entry for
/// `site` in `segment` carries `key` as its next key.
async fn next_key_reaches(fanout: &Fanout, peer: &str, site: &str, segment: &str, key: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = fanout.desired(peer).expect("a delivery");
        let config = d.decoded().expect("decodes");
        let holds = config
            .segments
            .iter()
            .filter(|s| s.segment == segment)
            .flat_map(|s| &s.peers)
            .any(|p| p.name == site && p.next_public_key == key);
        if holds {
            return d.digest.clone();
        }
        assert!(Instant::now() < deadline, "{peer}'s configuration never held {site}'s next key in {segment}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connected agent's presence record saying it applied `digest`.
async fn applied_digest<S: IntentStore>(
    store: &S,
    site: &str,
    digest: &str,
) -> musubi_controller::store::presence::Presence {
    let presence = store.announce(site, Duration::from_secs(60)).await.expect("announce");
    let status = musubi_proto::v1::SiteStatus {
        site: site.to_string(),
        status: Some(musubi_proto::v1::Status { applied_digest: digest.to_string(), ..Default::default() }),
        ..Default::default()
    };
    presence.set(musubi_controller::sites::encode_status(&status)).await.expect("status");
    presence
}

/// Key rotations on a scripted timeline (`rotation::step` takes the time):
/// one whose connected peer never applies the next keys is given up once
/// the prepare limit passed — the site keeps its keys, the next ones go;
/// the next one switches at an instant ahead, and ends only when that
/// instant passed and the site's agent confirmed the switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_moves_on_the_time_it_is_given() {
    use musubi_controller::rotation::{self, PREPARE_LIMIT};
    use musubi_core::rotation::{NEXT, Phase, SINCE, SWITCHED, Schedule, next_entry};
    let (_dir, store, fanout) = prefecture_fanout().await;
    give_every_key(&*store, &fanout).await;
    let site = "kita-branch";
    let no_schedule = Schedule { period_ms: 0, at_once: 1 };
    let keys_before = fanout.keys(site);
    let phase = |fanout: &Fanout| musubi_core::rotation::rotation(&fanout.public_keys().keys, site);
    let step = async |now: u64| rotation::step(&*store, &fanout, now, no_schedule).await.expect("step");
    // The site's agent registers its next keys (what a session writes).
    let register_next = async |n: u8| {
        let next: Vec<(String, String)> = ["kita-inet", "lgwan"]
            .iter()
            .map(|s| (next_entry(s), base64::engine::general_purpose::STANDARD.encode([n; 32])))
            .collect();
        store.put_public_keys(site, &next).await.expect("next keys");
        next
    };

    // Asked for; ap-east is connected and stays on a configuration without
    // the next key.
    let t = T0 + 60_000;
    let first = rotation::request(&*store, site, "operator:drill", "drill", t).await.expect("request");
    wait_for("the rotation asked for", || phase(&fanout).is_some_and(|r| r.id == first)).await;
    assert_eq!(step(t + 1).await, 0, "moved on before the next keys were registered");
    let next = register_next(201).await;
    next_key_reaches(&fanout, "ap-east", site, "lgwan", &next[1].1).await;
    let _stale = applied_digest(&*store, "ap-east", "an older configuration").await;
    let limit = PREPARE_LIMIT.as_millis() as u64;
    assert_eq!(step(t + 1_000).await, 0, "switched while a connected peer lacked the next keys");
    assert_eq!(step(first + limit).await, 0, "given up at the limit, not after it");
    assert_eq!(phase(&fanout).map(|r| r.phase), Some(Phase::Prepare));
    assert_eq!(step(first + limit + 1).await, 1, "not given up after the prepare limit");
    wait_for("the rotation given up", || phase(&fanout).is_none()).await;
    let history = store.history().await.expect("history");
    let last = &history.last().expect("an entry").summary;
    assert!(last.contains("given up") && last.contains("waiting for peer ap-east"), "{last}");
    let keys = fanout.keys(site);
    assert!(!keys.keys().any(|k| k.starts_with(NEXT)), "next keys kept after giving up: {keys:?}");
    for (segment, key) in keys_before.iter().filter(|(k, _)| !k.starts_with('+')) {
        assert_eq!(keys.get(segment), Some(key), "{segment}'s key changed by a rotation given up");
    }
    drop(_stale);

    // Again, and ap-east applies the configuration with the next keys.
    let t = first + limit + 10_000;
    let second = rotation::request(&*store, site, "operator:drill", "drill", t).await.expect("request");
    wait_for("the second rotation", || phase(&fanout).is_some_and(|r| r.id == second)).await;
    let next = register_next(202).await;
    next_key_reaches(&fanout, "ap-east", site, "lgwan", &next[1].1).await;
    let holding = next_key_reaches(&fanout, "ap-east", site, "kita-inet", &next[0].1).await;
    let _current = applied_digest(&*store, "ap-east", &holding).await;
    assert_eq!(step(t + 5).await, 1, "did not switch once the connected peer held the next keys");
    wait_for("the switch", || phase(&fanout).is_some_and(|r| r.phase == Phase::Switch)).await;
    let at = phase(&fanout).and_then(|r| r.switch_at).expect("an instant");
    assert_eq!(at, t + 5 + musubi_core::rotation::switch_lead_ms(1), "the instant: ahead by the lead for one peer");
    // Not done before the instant, nor at it until the agent confirms.
    assert_eq!(step(at - 1).await, 0);
    assert_eq!(step(at).await, 0, "done before the site's agent confirmed the switch");
    store.put_public_keys(site, &[(SWITCHED.to_string(), second.to_string())]).await.expect("switched");
    wait_for("the confirmation", || fanout.keys(site).contains_key(SWITCHED)).await;
    assert_eq!(step(at - 1).await, 0, "done before the instant");
    assert_eq!(step(at).await, 1, "not done at the instant after the confirmation");
    wait_for("the rotation done", || phase(&fanout).is_none()).await;
    let keys = fanout.keys(site);
    for (entry, key) in &next {
        let segment = entry.strip_prefix(NEXT).expect("a next entry");
        assert_eq!(keys.get(segment), Some(key), "{segment} is not on its next key");
    }
    assert_eq!(keys.get(SINCE), Some(&at.to_string()), "the keys' age counts from the instant");
    assert!(!keys.keys().any(|k| k.starts_with(NEXT) || k == SWITCHED), "{keys:?}");
}
