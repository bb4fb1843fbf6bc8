//! The operator API across real processes: `musubi-controller serve` on the
//! embedded store and on a real etcd, driven by the `musubi` CLI and by
//! concurrent gRPC clients; a `kill -9` in the middle of a stream of applies.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use musubi_core::api::audit_from_pb;
use musubi_core::audit::verify;
use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_client::OperatorClient;
use musubi_tests::{Controller, EtcdServer, bin, free_port, topology};
use tonic::transport::Channel;

/// Each test gets its own store: an embedded directory or an etcd server.
enum Store {
    Embedded(tempfile::TempDir),
    Etcd(EtcdServer),
}

impl Store {
    fn both() -> Vec<Store> {
        vec![Store::Embedded(tempfile::tempdir().expect("tmp")), Store::Etcd(EtcdServer::start())]
    }

    fn url(&self) -> String {
        match self {
            Store::Embedded(dir) => format!("file://{}", dir.path().display()),
            Store::Etcd(server) => format!("etcd://{}", server.endpoint()),
        }
    }
}

fn musubi(controller: &Controller, args: &[&str]) -> Output {
    musubi_remembering(controller, args, Path::new(""))
}

/// `musubi` keeping what it remembers (the verified head) in `state` (empty:
/// nothing remembered).
fn musubi_remembering(controller: &Controller, args: &[&str], state: &Path) -> Output {
    Command::new(bin("musubi"))
        .args(["--color", "never", "--insecure", "--controller", &controller.address()])
        .args(args)
        .env("MUSUBI_STATE_DIR", state)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run musubi")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn revision(controller: &Controller) -> u64 {
    let out = musubi(controller, &["get", "settings"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = text(&out.stdout).lines().next().unwrap_or_default().to_string();
    first
        .strip_prefix("# revision ")
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.parse().ok())
        .expect("revision line")
}

async fn client(controller: &Controller) -> OperatorClient<Channel> {
    OperatorClient::connect(controller.address())
        .await
        .expect("connect")
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX)
}

/// The prefecture with Kita's tenant description set to `mark`.
fn marked(mark: &str) -> Vec<pb::Document> {
    let text = topology("prefecture.yaml").replace("description: 北市\n", &format!("description: \"{mark}\"\n"));
    vec![pb::Document { name: "prefecture.yaml".into(), text }]
}

async fn kita_description(c: &mut OperatorClient<Channel>) -> String {
    let r = c.get(pb::GetRequest { kind: "Tenant".into(), name: "city-kita".into() }).await.expect("get").into_inner();
    r.yaml
        .lines()
        .find_map(|l| l.strip_prefix("description: "))
        .unwrap_or_default()
        .trim_matches(['"', '\''])
        .to_string()
}

async fn chain(c: &mut OperatorClient<Channel>) -> Vec<musubi_core::audit::AuditEntry> {
    let h = c.history(pb::HistoryRequest::default()).await.expect("history").into_inner();
    h.entries.iter().map(audit_from_pb).collect()
}

#[test]
fn cli_apply_export_and_bad_input_on_both_stores() {
    for store in Store::both() {
        let controller = Controller::start(&store.url());
        let out = musubi(&controller, &["apply", "-f", "topologies/prefecture.yaml", "--yes"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        // One line of counts, not every object's name.
        let applied = text(&out.stdout);
        assert!(
            applied.contains("Applied revision 1: settings changed, 4 tenants added, 6 segments added, 7 sites added, 1 policy added; 7 site configurations to send."),
            "{applied}"
        );

        // Without --yes and without a terminal, nothing is applied.
        let out = musubi(&controller, &["apply", "-f", "topologies/minimal.yaml"]);
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains("pass --yes"), "{}", text(&out.stderr));
        assert_eq!(revision(&controller), 1);

        // Export, then a dry run of the export: no changes.
        let dir = tempfile::tempdir().expect("tmp");
        let exported = musubi(&controller, &["export"]);
        assert!(exported.status.success());
        let file = dir.path().join("export.yaml");
        std::fs::write(&file, &exported.stdout).expect("write");
        let out = musubi(&controller, &["apply", "-f", &file.to_string_lossy(), "--dry-run"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with("No changes."), "{}", text(&out.stdout));

        // Bad input gets exactly the local diagnostics and writes nothing.
        for bad in ["topologies/invalid/broken-yaml.yaml", "topologies/invalid/overlapping-attachments.yaml"] {
            let local = Command::new(bin("musubi"))
                .args(["--color", "never", "validate", bad])
                .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
                .output()
                .expect("validate");
            let remote = musubi(&controller, &["apply", "-f", bad, "--yes"]);
            assert_eq!(remote.status.code(), Some(1), "{bad}");
            assert_eq!(
                text(&remote.stderr),
                text(&local.stderr),
                "{bad}: the controller's diagnostics differ from local ones"
            );
            assert!(text(&remote.stderr).contains(&format!("{bad}:")), "{}", text(&remote.stderr));
            assert_eq!(revision(&controller), 1, "{bad} changed the store");
        }

        // A 50 MB document: a clear size error, nothing written.
        let big = dir.path().join("big.yaml");
        let mut body = topology("prefecture.yaml");
        body.push_str(&format!("# {}\n", "x".repeat(50 * 1024 * 1024)));
        std::fs::write(&big, body).expect("write");
        let out = musubi(&controller, &["apply", "-f", &big.to_string_lossy(), "--yes"]);
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(err.contains("MiB") || err.contains("too large"), "{err}");
        assert_eq!(revision(&controller), 1);

        // Files that declare nothing would remove every object: refused
        // after the plan is shown, unless asked for by name.
        let empty = tempfile::NamedTempFile::new().expect("empty file");
        let empty = empty.path().to_string_lossy().into_owned();
        let out = musubi(&controller, &["apply", "-f", &empty, "--yes"]);
        assert!(!out.status.success(), "{}", text(&out.stdout));
        assert!(text(&out.stdout).contains("- site kita-hall"), "the plan is shown: {}", text(&out.stdout));
        assert!(text(&out.stderr).contains("--allow-destroy-all"), "{}", text(&out.stderr));
        assert_eq!(revision(&controller), 1, "an empty intent was applied");

        // History verifies; a rollback adds a revision.
        let out = musubi(&controller, &["apply", "-f", "topologies/minimal.yaml", "--yes"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = musubi(&controller, &["rollback", "--to", "1", "--yes"]);
        assert!(
            text(&out.stdout).contains("Applied revision 3: rollback to 1"),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        let out = musubi(&controller, &["history", "--verify"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        // Three changes, and the seven sites they removed (each revoked, an event).
        let verified = text(&out.stdout);
        assert!(verified.contains("audit chain verified: 10 entries (7 events beside the intent"), "{verified}");
        assert!(verified.contains("change records of 3 revisions checked"), "{verified}");
    }
}

/// `musubi apply --merge`: the files add or replace only the objects they
/// declare, checked against the whole intent, on two replicas sharing one
/// etcd (each keeps the intent it last read or wrote, and must notice the
/// other's commits).
#[test]
fn merge_changes_only_the_declared_objects_on_two_replicas() {
    let etcd = EtcdServer::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let (a, b) = (Controller::start(&store), Controller::start(&store));
    let out = musubi(&a, &["apply", "-f", "topologies/prefecture.yaml", "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let dir = tempfile::tempdir().expect("tmp");
    let write = |name: &str, body: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, body).expect("write");
        path.to_string_lossy().into_owned()
    };
    let get = |c: &Controller, kind: &str, name: &str| text(&musubi(c, &["get", kind, name]).stdout);

    // Replica B changes one tenant; everything else stays.
    let tenant = write("tenant.yaml", "kind: Tenant\nname: city-kita\ndescription: merged on b\n");
    let out = musubi(&b, &["apply", "--merge", "-f", &tenant, "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Applied revision 2: "), "{}", text(&out.stdout));
    assert!(get(&a, "Tenant", "city-kita").contains("merged on b"));
    let export = text(&musubi(&a, &["export"]).stdout);
    assert_eq!(export.matches("kind: Site").count(), topology("prefecture.yaml").matches("kind: Site").count());

    // Replica A, which last wrote revision 1, merges a site on top of B's change.
    let site = get(&a, "Site", "kita-hall").replace("北市役所", "北市役所 (merged on a)");
    let site = write("site.yaml", &site);
    let out = musubi(&a, &["apply", "--merge", "-f", &site, "--yes"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).contains("Applied revision 3: "), "{}", text(&out.stdout));
    assert!(get(&b, "Site", "kita-hall").contains("merged on a"));
    assert!(get(&b, "Tenant", "city-kita").contains("merged on b"), "A's merge undid B's");

    // A merged object is checked against the whole intent: its prefix
    // overlaps another site's; the error points into the merged file.
    let bad = get(&a, "Site", "kita-hall").replace("10.1.21.0/24", "10.1.0.0/24");
    assert_ne!(bad, get(&a, "Site", "kita-hall"), "the test's site has moved");
    let bad = write("bad.yaml", &bad);
    let out = musubi(&b, &["apply", "--merge", "-f", &bad, "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("10.1.0.0/24 of site `kita-hall` overlaps 10.1.0.0/24 of site `pref-hq`"), "{err}");
    assert!(err.contains("site `kita-hall`, field `attachments[0].prefixes[0]`") && err.contains("bad.yaml:"), "{err}");
    assert_eq!(revision(&a), 3, "a refused merge wrote something");
    assert_eq!(revision(&b), 3);

    // Removal by name: what is not there, or is still used, is refused.
    let out = musubi(&a, &["apply", "--merge", "--remove", "site/nowhere", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("site `nowhere`: no such site in the intent"), "{}", text(&out.stderr));
    let out = musubi(&a, &["apply", "--merge", "--remove", "Segment/juki", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("segment `juki` is not declared"), "{}", text(&out.stderr));
    let out = musubi(&a, &["apply", "--merge", "-f", &tenant, "--remove", "tenant/city-kita", "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("declared and removed in one apply"), "{}", text(&out.stderr));
    assert_eq!(revision(&b), 3, "a refused removal wrote something");
    let out = musubi(&b, &["apply", "--merge", "--remove", "site/kita-hall", "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Applied revision 4: 1 site removed;"), "{}", text(&out.stdout));
    assert!(!musubi(&a, &["get", "Site", "kita-hall"]).status.success(), "the removed site is still there");
    assert!(get(&a, "Tenant", "city-kita").contains("merged on b"));
}

/// Operators of different sites do not refuse each other: 100 `musubi apply
/// --merge` processes, each changing its own site, started together against
/// two controller replicas on one etcd, are all applied — each its own revision and audit
/// entry, validated whole. A merge of an object someone changed after it was
/// planned is still refused (a removal too), and one of another object is
/// moved onto the newest revision, which its audit entry says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_merges_of_different_sites_all_apply_and_a_same_object_race_is_refused() {
    let etcd = EtcdServer::start();
    let controller = Controller::start(&format!("etcd://{}", etcd.endpoint()));
    // Every other operator talks to a second replica on the same etcd.
    let replica = Controller::start(&format!("etcd://{}", etcd.endpoint()));
    let dir = tempfile::tempdir().expect("tmp");
    let intent = musubi_core::generate::generate(110, 2);
    let whole = dir.path().join("generated.yaml");
    std::fs::write(&whole, &intent).expect("write");
    let out = musubi(&controller, &["apply", "-f", &whole.to_string_lossy(), "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let base = revision(&controller);

    // Each member site's own document with a description of its own.
    let site_doc = |name: &str, description: &str| {
        let doc = intent
            .split("---\n")
            .find(|d| d.starts_with(&format!("kind: Site\nname: {name}\n")))
            .expect("the generated site");
        format!("{doc}description: {description}\n")
    };
    let files: Vec<(String, String)> = (0..100)
        .map(|i| {
            let name = format!("site-0-{i}");
            let path = dir.path().join(format!("{name}.yaml"));
            std::fs::write(&path, site_doc(&name, &format!("merged by {name}'s operator"))).expect("write");
            (name, path.to_string_lossy().into_owned())
        })
        .collect();
    let started = Instant::now();
    let children: Vec<_> = files
        .iter()
        .enumerate()
        .map(|(i, (_, path))| {
            let to = if i % 2 == 0 { &controller } else { &replica };
            Command::new(bin("musubi"))
                .args(["--color", "never", "--insecure", "--controller", &to.address()])
                .args(["apply", "--merge", "-f", path, "--yes"])
                .env("MUSUBI_STATE_DIR", "")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run musubi")
        })
        .collect();
    let outputs: Vec<Output> = children.into_iter().map(|c| c.wait_with_output().expect("wait")).collect();
    let took = started.elapsed();
    let mut applied: Vec<u64> = Vec::new();
    for ((name, _), out) in files.iter().zip(&outputs) {
        assert!(out.status.success(), "{name}: {}{}", text(&out.stdout), text(&out.stderr));
        let stdout = text(&out.stdout);
        let revision = stdout
            .split("Applied revision ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no revision in {stdout}"));
        applied.push(revision);
    }
    applied.sort();
    assert_eq!(applied, (base + 1..=base + 100).collect::<Vec<_>>(), "each merge its own revision");
    let export = text(&musubi(&controller, &["export"]).stdout);
    for (name, _) in &files {
        assert!(export.contains(&format!("merged by {name}'s operator")), "{name}'s change is not in the intent");
    }
    let mut c = client(&controller).await;
    let history = chain(&mut c).await;
    verify(&history).expect("chain verifies");
    let merges: Vec<_> = history.iter().filter(|e| e.revision > base && e.event == 0).collect();
    assert_eq!(merges.len(), 100, "one audit entry per merge");
    let moved = merges.iter().filter(|e| e.summary.contains("planned at revision")).count();
    println!(
        "100 concurrent merges of different sites on two replicas: all applied in {:.2} s ({:.0} per second), {moved} of them planned against an older revision",
        took.as_secs_f64(),
        100.0 / took.as_secs_f64()
    );

    // The same object, planned twice at one revision: the second is refused.
    let merge = |name: &str, description: &str| {
        vec![pb::Document { name: format!("{name}.yaml"), text: site_doc(name, description) }]
    };
    let plan = |docs: Vec<pb::Document>, remove: Vec<String>| pb::PlanRequest { documents: docs, merge: true, remove };
    let first = merge("site-0-100", "first");
    let second = merge("site-0-100", "second");
    let other = merge("site-0-101", "another operator's");
    let planned = c.plan(plan(first.clone(), Vec::new())).await.expect("plan").into_inner().revision;
    assert_eq!(planned, base + 100);
    let apply = |documents: Vec<pb::Document>, remove: Vec<String>| pb::ApplyRequest {
        documents,
        expected_revision: planned,
        dry_run: false,
        merge: true,
        remove,
        propose: false,
    };
    let won = c.apply(apply(first, Vec::new())).await.expect("first merge").into_inner();
    assert_eq!(won.revision, planned + 1);
    let lost = c.apply(apply(second, Vec::new())).await.expect_err("the same site again");
    assert_eq!(lost.code(), tonic::Code::Aborted);
    let expected = format!("site `site-0-100` changed in revision {}, after revision {planned}", planned + 1);
    assert!(lost.message().contains(&expected), "{}", lost.message());
    let lost = c.apply(apply(Vec::new(), vec!["Site/site-0-100".into()])).await.expect_err("its removal");
    assert!(lost.message().contains(&expected), "{}", lost.message());
    // Another site, planned at the same revision: moved onto the newest.
    let moved = c.apply(apply(other, Vec::new())).await.expect("another site").into_inner();
    assert_eq!(moved.revision, planned + 2);
    let entry = moved.audit.expect("an audit entry");
    assert!(entry.summary.starts_with(&format!("planned at revision {planned}: ")), "{}", entry.summary);
    assert_eq!(revision(&controller), planned + 2, "a refused merge wrote something");
    let site = text(&musubi(&controller, &["get", "Site", "site-0-100"]).stdout);
    assert!(site.contains("description: first"), "{site}");
}

/// 2 clients × 100 applies, each planned against the revision it saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_lose_no_update() {
    for store in Store::both() {
        let controller = Controller::start(&store.url());
        // On etcd the second client talks to a second controller replica.
        let replica = matches!(store, Store::Etcd(_)).then(|| Controller::start(&store.url()));
        let mut handles = Vec::new();
        for who in ["a", "b"] {
            let target = if who == "b" { replica.as_ref().unwrap_or(&controller) } else { &controller };
            let mut c = client(target).await;
            handles.push(tokio::spawn(async move {
                let mut won = Vec::new();
                let mut conflicts = 0;
                for i in 0..100 {
                    let docs = marked(&format!("{who}-{i}"));
                    let planned = c
                        .plan(pb::PlanRequest { documents: docs.clone(), merge: false, remove: Vec::new() })
                        .await
                        .expect("plan")
                        .into_inner();
                    let request = pb::ApplyRequest {
                        documents: docs,
                        expected_revision: planned.revision,
                        dry_run: false,
                        merge: false,
                        remove: Vec::new(),
                        propose: false,
                    };
                    match c.apply(request).await {
                        Ok(r) => won.push((r.into_inner().revision, format!("{who}-{i}"))),
                        Err(s) if s.code() == tonic::Code::Aborted => conflicts += 1,
                        Err(s) => panic!("unexpected failure: {s}"),
                    }
                }
                (won, conflicts)
            }));
        }
        let mut won = Vec::new();
        let mut conflicts = 0;
        for h in handles {
            let (w, c) = h.await.expect("join");
            won.extend(w);
            conflicts += c;
        }
        won.sort();
        assert_eq!(won.len() + conflicts, 200);
        let revisions: Vec<u64> = won.iter().map(|(r, _)| *r).collect();
        assert_eq!(revisions, (1..=won.len() as u64).collect::<Vec<_>>(), "every success got its own revision");
        let mut c = client(&controller).await;
        let history = chain(&mut c).await;
        assert_eq!(history.len(), won.len(), "the chain holds exactly the successful applies");
        verify(&history).expect("chain verifies");
        let last = &won.last().expect("some apply won").1;
        assert_eq!(&kita_description(&mut c).await, last, "the last acknowledged apply is the intent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_applies_keeps_the_last_acknowledged_intent() {
    for store in Store::both() {
        let mut controller = Controller::start(&store.url());
        let mut c = client(&controller).await;
        let acked = Arc::new(AtomicU64::new(0));
        let acked_in_loop = acked.clone();
        let stream = tokio::spawn(async move {
            let mut expected = 0;
            for i in 1..=10_000u64 {
                let request = pb::ApplyRequest {
                    documents: marked(&format!("m-{i}")),
                    expected_revision: expected,
                    dry_run: false,
                    merge: false,
                    remove: Vec::new(),
                    propose: false,
                };
                match c.apply(request).await {
                    Ok(r) => {
                        expected = r.into_inner().revision;
                        acked_in_loop.store(i, Ordering::SeqCst);
                    }
                    Err(_) => return,
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.load(Ordering::SeqCst) < 15 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        controller.kill_hard();
        let _ = stream.await;
        let last = acked.load(Ordering::SeqCst);
        assert!(last >= 15, "only {last} applies were acknowledged before the kill");

        let restarted = Controller::start(&store.url());
        let mut c = client(&restarted).await;
        let now = kita_description(&mut c).await;
        // The apply in flight at the kill may have committed without its
        // acknowledgement; nothing older, nothing half-written.
        assert!(
            now == format!("m-{last}") || now == format!("m-{}", last + 1),
            "after the crash: {now}, last acked m-{last}"
        );
        let history = chain(&mut c).await;
        verify(&history).expect("chain verifies after the crash");
        assert_eq!(history.len() as u64, history.last().expect("entries").revision);
        let export = c.export(pb::ExportRequest {}).await.expect("export").into_inner();
        assert_eq!(export.revision, history.len() as u64);
        // Allocations survived: a dry run of the same intent changes nothing.
        let docs = marked(&now);
        let dry = c
            .apply(pb::ApplyRequest {
                documents: docs,
                expected_revision: export.revision,
                dry_run: true,
                merge: false,
                remove: Vec::new(),
                propose: false,
            })
            .await
            .expect("dry run")
            .into_inner();
        assert!(dry.sites.is_empty(), "a dry run of the current intent planned changes: {:?}", dry.sites);
    }
}

#[test]
fn config_file_and_graceful_sigterm() {
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let store = format!("file://{}", dir.path().join("data").display());
    let config = dir.path().join("controller.yaml");
    std::fs::write(&config, format!("listen: 127.0.0.1:{port}\nstore: {store}\ninsecure: true\nmax_intent_mib: 8\n"))
        .expect("write");
    let args = ["serve", "--config", config.to_str().expect("utf-8")];
    let mut controller = Controller::start_with(port, &store, &args);
    let out = musubi(&controller, &["apply", "-f", "topologies/minimal.yaml", "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(controller.terminate(Duration::from_secs(10)), Some(0), "SIGTERM should stop the controller cleanly");

    // The same configuration again: the intent is still there.
    let controller = Controller::start_with(port, &store, &args);
    assert_eq!(revision(&controller), 1);

    // An unknown setting is refused with its name.
    std::fs::write(&config, "listen: 127.0.0.1:1\nlisten_port: 7\n").expect("write");
    let out = Command::new(bin("musubi-controller")).args(args).output().expect("run");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("listen_port"), "{}", text(&out.stderr));
}

/// `musubi apply` of the document `marked(mark)` (from a multi-threaded
/// test: the CLI blocks).
fn apply_marked(controller: &Controller, mark: &str) {
    let out = tokio::task::block_in_place(|| {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, &marked(mark)[0].text).expect("write");
        musubi(controller, &["apply", "-f", &file.to_string_lossy(), "--yes"])
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_verify_names_a_tampered_entry() {
    let etcd = EtcdServer::start();
    let controller = Controller::start(&format!("etcd://{}", etcd.endpoint()));
    for mark in ["one", "two", "three"] {
        apply_marked(&controller, mark);
    }
    let ok = tokio::task::block_in_place(|| musubi(&controller, &["history", "--verify"]));
    assert!(ok.status.success(), "{}", text(&ok.stderr));

    // Someone with write access to etcd rewrites who made revision 2.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("etcd");
    let key = "/musubi/v1/audit/00000000000000000002";
    let found = raw.get(key, None).await.expect("get");
    let all = raw
        .get("/musubi/v1/audit/", Some(etcd_client::GetOptions::new().with_prefix().with_keys_only()))
        .await
        .expect("get");
    let names: Vec<String> = all.kvs().iter().map(|kv| kv.key_str().unwrap_or("?").to_string()).collect();
    let value = found
        .kvs()
        .first()
        .unwrap_or_else(|| panic!("{key} missing; have {names:?}"))
        .value_str()
        .expect("utf-8")
        .to_string();
    raw.put(key, value.replace("\"actor\":\"local\"", "\"actor\":\"mallory\""), None).await.expect("put");

    let out = tokio::task::block_in_place(|| musubi(&controller, &["history", "--verify"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("audit entry 1 (revision 2) was altered"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_verify_finds_an_edited_change_record_a_removed_entry_and_a_rewritten_history() {
    let etcd = EtcdServer::start();
    let controller = Controller::start(&format!("etcd://{}", etcd.endpoint()));
    let state = tempfile::tempdir().expect("tmp");
    let apply = |mark: &str| apply_marked(&controller, mark);
    let verify =
        || tokio::task::block_in_place(|| musubi_remembering(&controller, &["history", "--verify"], state.path()));
    for mark in ["one", "two", "three"] {
        apply(mark);
    }
    let ok = verify();
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("change records of 3 revisions checked"), "{}", text(&ok.stdout));

    // Someone with write access to etcd edits what revision 2 changed: the
    // entries are intact, the records no longer hash to what entry 2 holds.
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("etcd");
    let key = "/musubi/v1/changes/00000000000000000002";
    let found = raw.get(key, None).await.expect("get");
    let original = found.kvs().first().expect("change records of revision 2").value().to_vec();
    let edited = String::from_utf8(original.clone()).expect("utf-8").replacen("two", "TWO", 1);
    assert_ne!(edited.as_bytes(), &original[..], "revision 2's records mention its mark");
    raw.put(key, edited, None).await.expect("put");
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("the change records of revision 2 were altered"), "{}", text(&out.stderr));
    raw.put(key, original, None).await.expect("put back");
    assert!(verify().status.success());

    // An intent object edited in the store, outside any apply: the chain
    // is intact, but it does not end with the intent the store holds.
    let tenant =
        raw.get("/musubi/v1/intent/tenant/", Some(etcd_client::GetOptions::new().with_prefix())).await.expect("get");
    let kv = tenant.kvs().first().expect("a tenant");
    let (tkey, tvalue) = (kv.key().to_vec(), kv.value().to_vec());
    let mut object: serde_json::Value = serde_json::from_slice(&tvalue).expect("json");
    object["description"] = serde_json::Value::String("edited in etcd".into());
    raw.put(tkey.clone(), serde_json::to_vec(&object).expect("json"), None).await.expect("put");
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("it was changed outside an apply"), "{}", text(&out.stderr));
    raw.put(tkey, tvalue, None).await.expect("put back");
    let ok = verify();
    assert!(text(&ok.stdout).contains("matches every digest and the store"), "{}", text(&ok.stdout));

    // An entry removed from the middle of the chain.
    let entry = "/musubi/v1/audit/00000000000000000002";
    let kept = raw.get(entry, None).await.expect("get").kvs().first().expect("entry 2").value().to_vec();
    raw.delete(entry, None).await.expect("delete");
    let out = verify();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not link to the entry before it"), "{}", text(&out.stderr));
    raw.put(entry, kept, None).await.expect("put back");
    assert!(verify().status.success());

    // The whole history rewritten: a consistent new chain from scratch, as
    // someone with the store could make, served at the same address. It
    // verifies on its own, but it no longer holds the head this CLI verified.
    let (port, store) = (controller.port, controller.store.clone());
    let mut controller = controller;
    controller.kill_hard();
    raw.delete("/musubi/v1/", Some(etcd_client::DeleteOptions::new().with_prefix())).await.expect("wipe");
    let listen = format!("127.0.0.1:{port}");
    let controller =
        Controller::start_with(port, &store, &["serve", "--insecure", "--listen", &listen, "--store", &store]);
    for mark in ["one", "two", "three", "four"] {
        apply_marked(&controller, mark);
    }
    let fresh = tokio::task::block_in_place(|| musubi(&controller, &["history", "--verify"]));
    assert!(fresh.status.success(), "the new chain is consistent: {}", text(&fresh.stderr));
    let out = tokio::task::block_in_place(|| musubi_remembering(&controller, &["history", "--verify"], state.path()));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("no longer extends the head verified before (revision 3"),
        "{}",
        text(&out.stderr)
    );
}

/// A controller on etcd compacts etcd's own history of the keys, which it
/// does not need (the intent's history is in its change records): an old
/// etcd revision is gone after the retention (`--etcd-history-s`), and the
/// audit chain still holds and verifies every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcds_own_history_is_compacted_and_the_intents_history_kept() {
    let etcd = EtcdServer::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let controller = Controller::start_with(
        port,
        &store,
        &["serve", "--insecure", "--listen", &listen, "--store", &store, "--etcd-history-s", "1"],
    );
    let mut c = client(&controller).await;
    let mut kv = etcd_client::Client::connect([etcd.endpoint()], None).await.expect("etcd");
    let mut old = 0;
    for (i, mark) in ["one", "two", "three"].into_iter().enumerate() {
        let request = pb::ApplyRequest {
            documents: marked(mark),
            expected_revision: i as u64,
            dry_run: false,
            merge: false,
            remove: Vec::new(),
            propose: false,
        };
        c.apply(request).await.expect("apply");
        if i == 0 {
            let now = kv.get("/musubi/v1/revision", None).await.expect("get");
            old = now.header().expect("header").revision();
        }
    }
    let at_old = etcd_client::GetOptions::new().with_revision(old);
    assert!(kv.get("/musubi/v1/revision", Some(at_old.clone())).await.is_ok(), "etcd revision {old} readable at first");
    let started = Instant::now();
    loop {
        match kv.get("/musubi/v1/revision", Some(at_old.clone())).await {
            Err(e) if e.to_string().contains("compacted") => break,
            _ => {}
        }
        assert!(started.elapsed() < Duration::from_secs(20), "etcd revision {old} never compacted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let history = chain(&mut c).await;
    assert_eq!(history.iter().filter(|e| e.event == 0).count(), 3, "every change in the chain");
    verify(&history).expect("chain verifies");
    assert_eq!(kita_description(&mut c).await, "three");
}

/// `musubi migration status` on the prefecture with one legacy site (Kita's
/// school behind its city hall): legacy, then being cut over once its Musubi
/// site is declared beside it (a plan like any other), on Musubi once the
/// legacy entry goes; a cutover to a site that is not in the segment is
/// refused with its position and changes nothing.
#[test]
fn migration_status_follows_a_cutover() {
    let dir = tempfile::tempdir().expect("tmp");
    let controller = Controller::start(&format!("file://{}", dir.path().display()));
    let out = musubi(&controller, &["apply", "-f", "topologies/prefecture.yaml", "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status = |json: bool| {
        let out = musubi(&controller, if json { &["migration", "status", "--json"] } else { &["migration", "status"] });
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let table = status(false);
    eprintln!("{table}");
    let row = |table: &str, site: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("lgwan") && l.split_whitespace().nth(2) == Some(site))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
    };
    assert_eq!(
        row(&table, "kita-school").as_deref(),
        Some("pref-aoba lgwan kita-school legacy 10.2.24.0/24 through kita-hall (eth7, via 172.16.21.1)")
    );
    assert!(
        row(&table, "kita-hall")
            .is_some_and(|r| r.contains("declared agent never connected; migration gateway for 1 legacy site on eth7")),
        "{table}"
    );
    assert!(
        table.contains(
            "pref-aoba/lgwan: 0 of 6 sites on Musubi (0%), 5 declared (agent never connected), 0 cutting over, 1 legacy"
        ),
        "{table}"
    );

    // First plan: the school's Musubi site beside its legacy entry.
    let intent = topology("prefecture.yaml");
    let prepare = intent.replace(
        "{name: kita-school, prefixes: [10.2.24.0/24]}",
        "{name: kita-school, prefixes: [10.2.24.0/24], cutover_to: kita-school-new}",
    ) + "---\nkind: Site\nname: kita-school-new\ntenant: city-kita\nregion: east\n\
         lines: [{name: wae, kind: wide-area-ethernet, priority: 1, address: 198.51.100.24}]\n\
         attachments: [{segment: lgwan, interface: eth2, prefixes: [10.2.24.0/24]}]\n";
    let file = dir.path().join("prepare.yaml");
    std::fs::write(&file, &prepare).expect("write");
    // A cutover to a site that is not in the segment: refused, nothing applied.
    let wrong = dir.path().join("wrong.yaml");
    std::fs::write(
        &wrong,
        prepare.replace(
            "segment: lgwan, interface: eth2, prefixes: [10.2.24.0/24]",
            "segment: kita-inet, interface: eth2, prefixes: [192.168.24.0/24]",
        ),
    )
    .expect("write");
    let out = musubi(&controller, &["apply", "-f", &wrong.to_string_lossy(), "--yes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cutover_to"), "{}", text(&out.stderr));
    assert_eq!(revision(&controller), 1);

    let out = musubi(&controller, &["apply", "-f", &file.to_string_lossy(), "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&status(true)).expect("json");
    let school =
        json["sites"].as_array().into_iter().flatten().find(|s| s["site"] == "kita-school").expect("kita-school");
    assert_eq!(school["stage"], "cutting-over", "{school}");
    assert_eq!(school["cutover_to"], "kita-school-new", "{school}");
    assert!(json["sites"].as_array().into_iter().flatten().all(|s| s["site"] != "kita-school-new"), "listed once");

    // Second plan: the legacy entry goes.
    let complete = prepare.replace(
        "\n    legacy:\n      interface: eth7\n      via: 172.16.21.1\n      sites:\n        - {name: kita-school, prefixes: [10.2.24.0/24], cutover_to: kita-school-new}",
        "",
    );
    assert_ne!(complete, prepare);
    std::fs::write(&file, &complete).expect("write");
    let out = musubi(&controller, &["apply", "-f", &file.to_string_lossy(), "--yes"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = status(false);
    assert!(row(&table, "kita-school").is_none(), "{table}");
    assert!(row(&table, "kita-school-new").is_some_and(|r| r.contains("declared agent never connected")), "{table}");
    assert!(
        table.contains(
            "pref-aoba/lgwan: 0 of 6 sites on Musubi (0%), 6 declared (agent never connected), 0 cutting over, 0 legacy"
        ),
        "{table}"
    );
}
