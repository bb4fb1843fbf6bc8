//! Roles and tenant scopes across real processes: a TLS controller on a real
//! etcd, operators with their own certificates (`musubi-controller operator
//! NAME`), bound to roles and tenants by the intent's `Operator` objects
//! (topologies/two-cities.yaml). A city's operator changes its own sites and
//! nothing of the other city's or the nation's; what it may not read is as
//! absent as what is not there; every refusal is logged and writes nothing.

use std::path::Path;
use std::process::{Command, Output};

use musubi_tests::{Controller, EtcdServer, Pki, bin, free_port, topology};

/// `musubi ARGS…` with operator `name`'s certificate.
fn as_operator(pki: &Pki, name: &str, address: &str, args: &[&str]) -> Output {
    Command::new(bin("musubi"))
        .args(args)
        .env("MUSUBI_CONTROLLER", address)
        .env("MUSUBI_CA", pki.ca())
        .env("MUSUBI_CERT", pki.dir.join(format!("{name}.pem")))
        .env("MUSUBI_KEY", pki.dir.join(format!("{name}-key.pem")))
        .output()
        .expect("run musubi")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn issue(pki: &Pki, name: &str) {
    let out = Command::new(bin("musubi-controller"))
        .args(["operator", name, "--pki"])
        .arg(&pki.dir)
        .output()
        .expect("musubi-controller operator");
    assert!(out.status.success(), "operator {name}: {}", text(&out.stderr));
}

/// The intent's revision, as the admin reads it.
fn revision(pki: &Pki, address: &str) -> String {
    let out = pki.musubi(address, &["history"]);
    assert!(out.status.success(), "history: {}", text(&out.stderr));
    // Changes of intent only: events (`12.1`) do not move the revision.
    let changes = text(&out.stdout)
        .lines()
        .filter(|l| l.split_whitespace().next().is_some_and(|label| !label.contains('.')))
        .count();
    changes.to_string()
}

/// A merge of `yaml` as `name`.
fn merge(pki: &Pki, name: &str, address: &str, dir: &Path, yaml: &str) -> Output {
    let file = dir.join(format!("{name}-change.yaml"));
    std::fs::write(&file, yaml).expect("write change");
    as_operator(pki, name, address, &["apply", "--merge", "-f", file.to_str().expect("utf-8"), "--yes"])
}

/// `topologies/two-cities.yaml`'s document of `kind` `name`, with `from`
/// replaced by `to`.
fn edited(kind: &str, name: &str, from: &str, to: &str) -> String {
    let all = topology("two-cities.yaml");
    let doc = all
        .split("\n---\n")
        .find(|d| d.contains(&format!("kind: {kind}\nname: {name}\n")))
        .unwrap_or_else(|| panic!("{kind} {name} in two-cities.yaml"));
    let doc = doc[doc.find("kind:").expect("kind")..].to_string();
    assert!(doc.contains(from), "{kind} {name} has no `{from}`");
    doc.replacen(from, to, 1)
}

/// A PKI with `operators`' certificates besides the admin's, a real etcd,
/// and the controllers' shared log.
struct Deployment {
    dir: tempfile::TempDir,
    pki: Pki,
    etcd: EtcdServer,
    store: String,
    log: std::path::PathBuf,
}

impl Deployment {
    fn new(operators: &[&str]) -> Deployment {
        let dir = tempfile::tempdir().expect("tmp");
        let pki = Pki::init(&dir.path().join("pki"));
        for name in operators {
            issue(&pki, name);
        }
        let etcd = EtcdServer::start();
        let store = format!("etcd://{}", etcd.endpoint());
        let log = dir.path().join("controller.log");
        Deployment { dir, pki, etcd, store, log }
    }

    /// A TLS controller replica on the deployment's store, and its address.
    fn replica(&self) -> (Controller, String) {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let pki_dir = self.pki.dir.display().to_string();
        let args = ["serve", "--pki", &pki_dir, "--listen", &listen, "--store", &self.store];
        (Controller::start_logged(port, &self.store, &args, &self.log), listen)
    }

    /// The admin applies topologies/two-cities.yaml (before any binding,
    /// every certificate is an admin): the operators are bound.
    fn bind(&self, address: &str) {
        let intent = self.dir.path().join("two-cities.yaml");
        std::fs::write(&intent, topology("two-cities.yaml")).expect("write");
        let out = self.pki.musubi(address, &["apply", "-f", intent.to_str().expect("utf-8"), "--yes"]);
        assert!(out.status.success(), "the admin's first apply: {}", text(&out.stderr));
    }
}

#[test]
fn a_citys_operator_changes_only_its_own_tenants_objects() {
    let d = Deployment::new(&["kita-ops", "minami-view", "audit", "stranger"]);
    let (pki, dir, log) = (&d.pki, &d.dir, &d.log);
    let (_controller, address) = d.replica();
    d.bind(&address);
    let bound = pki.musubi(&address, &["get", "operators"]);
    assert!(bound.status.success(), "{}", text(&bound.stderr));
    let listed = text(&bound.stdout);
    for name in ["admin", "kita-ops", "minami-view", "audit"] {
        assert!(listed.contains(&format!("name: {name}\n")), "get operators lacks {name}:\n{listed}");
    }
    let at = revision(pki, &address);

    // Its own site: applied.
    let own = edited("Site", "kita-hall", "region: east", "description: 北区役所\nregion: east");
    let out = merge(pki, "kita-ops", &address, dir.path(), &own);
    assert!(out.status.success(), "kita-ops changing kita-hall: {}", text(&out.stderr));
    let at_own = revision(pki, &address);
    assert_ne!(at_own, at, "kita-ops' change was written");
    let history = text(&pki.musubi(&address, &["history"]).stdout);
    assert!(history.contains("operator:kita-ops"), "the change is audited as kita-ops':\n{history}");

    // The other city's site, a national segment, the settings, an access
    // point, its own role: refused, each naming why, nothing written.
    let refusals = [
        (
            edited("Site", "minami-hall", "region: west", "description: x\nregion: west"),
            "site `minami-hall` is tenant `city-minami`'s",
        ),
        (edited("Segment", "lgwan", "prefixes:", "description: x\nprefixes:"), "segment `lgwan` is a national object"),
        ("kind: Settings\nprobe: {interval_ms: 20, multiplier: 3}\n".to_string(), "settings"),
        (
            edited("Site", "ap-east", "region: east", "description: x\nregion: east"),
            "site `ap-east` is a national object",
        ),
        (
            edited("Operator", "kita-ops", "roles: [operator]", "roles: [operator, admin]"),
            "operator `kita-ops` is a national object",
        ),
    ];
    for (yaml, why) in &refusals {
        let out = merge(pki, "kita-ops", &address, dir.path(), yaml);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "kita-ops may not apply:\n{yaml}");
        assert!(err.contains(why) && err.contains("operator:kita-ops may not make this change"), "{why}: {err}");
        assert_eq!(revision(pki, &address), at_own, "a refused change wrote nothing ({why})");
    }
    // A viewer, an auditor and an unbound certificate change nothing, not
    // even a site of their own tenant.
    let minami = edited("Site", "minami-hall", "region: west", "description: y\nregion: west");
    for name in ["minami-view", "audit", "stranger"] {
        let out = merge(pki, name, &address, dir.path(), &minami);
        assert!(!out.status.success(), "{name} changed minami-hall");
    }
    assert_eq!(revision(pki, &address), at_own);

    // Join tokens and revocations: its own sites only.
    let own_token = as_operator(pki, "kita-ops", &address, &["token", "create", "--site", "kita-hall", "--ttl", "10m"]);
    assert!(own_token.status.success(), "{}", text(&own_token.stderr));
    for args in [
        &["token", "create", "--site", "minami-hall", "--ttl", "10m"][..],
        &["token", "create", "--site", "ap-east", "--ttl", "10m"][..],
        &["site", "revoke", "minami-hall"][..],
    ] {
        let out = as_operator(pki, "kita-ops", &address, args);
        assert!(!out.status.success(), "kita-ops may not {args:?}");
        assert!(text(&out.stderr).contains("outside this operator's roles"), "{args:?}: {}", text(&out.stderr));
    }
    let status = text(&pki.musubi(&address, &["status", "--json"]).stdout);
    assert!(
        !status.contains("\"revoked\": true") && !status.contains("\"revoked\":true"),
        "nothing was revoked: {status}"
    );

    // Reading: its tenant's objects (and the segment shared with it); the
    // rest is absent; the history and an export need admin or auditor.
    let sites = text(&as_operator(pki, "kita-ops", &address, &["get", "sites"]).stdout);
    assert!(
        sites.contains("name: kita-hall") && !sites.contains("minami-hall") && !sites.contains("ap-east"),
        "{sites}"
    );
    let segments = text(&as_operator(pki, "minami-view", &address, &["get", "segments"]).stdout);
    assert!(segments.contains("name: lgwan") && segments.contains("name: minami-lan"), "{segments}");
    assert!(!segments.contains("kita-lan"), "{segments}");
    let hidden = as_operator(pki, "minami-view", &address, &["get", "site", "kita-hall"]);
    assert!(!hidden.status.success() && text(&hidden.stderr).contains("no site named"), "{}", text(&hidden.stderr));
    let status = as_operator(pki, "minami-view", &address, &["status", "--json"]);
    let rows = text(&status.stdout);
    assert!(rows.contains("minami-hall") && !rows.contains("kita-hall") && !rows.contains("ap-east"), "{rows}");
    for name in ["kita-ops", "minami-view"] {
        for args in [&["history"][..], &["export"][..]] {
            let out = as_operator(pki, name, &address, args);
            assert!(!out.status.success(), "{name} ran {args:?}");
            assert!(text(&out.stderr).contains("admin or auditor"), "{name} {args:?}: {}", text(&out.stderr));
        }
    }
    let audited = as_operator(pki, "audit", &address, &["history"]);
    assert!(audited.status.success(), "the auditor reads the history: {}", text(&audited.stderr));
    let stranger = as_operator(pki, "stranger", &address, &["get", "sites"]);
    assert!(!stranger.status.success() && text(&stranger.stderr).contains("has no role"), "{}", text(&stranger.stderr));

    // Every refusal is in the controller's log, with who and what.
    let logged = std::fs::read_to_string(log).expect("controller log");
    let refused_changes =
        logged.lines().filter(|l| l.contains("change refused") && l.contains("operator:kita-ops")).count();
    assert!(refused_changes >= refusals.len(), "{refused_changes} change refusals logged:\n{logged}");
    assert!(logged.contains("refused: the site is outside the operator's tenants"), "{logged}");
    assert!(logged.contains("refused: the operator has no role"), "{logged}");

    // The admin may change the settings, but as a proposal: a second admin
    // approves it (a_national_change_waits_for_a_second_admin).
    let out = merge(pki, "admin", &address, dir.path(), &refusals[2].0);
    assert!(out.status.success(), "the admin's settings change: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Proposed as change"), "{}", text(&out.stdout));
    assert_eq!(revision(pki, &address), at_own, "a proposal writes no revision");
}

/// The id in `Proposed as change ID: …`.
fn proposal_id(out: &Output) -> String {
    let stdout = text(&out.stdout);
    let rest = stdout.split("Proposed as change ").nth(1).unwrap_or_else(|| panic!("no proposal in: {stdout}"));
    rest.split(':').next().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_national_change_waits_for_a_second_admin() {
    let d = Deployment::new(&["admin-2", "kita-ops"]);
    let (pki, dir, log) = (&d.pki, &d.dir, &d.log);
    let (_controller, address) = d.replica();
    let run = |name: &str, args: &[&str]| tokio::task::block_in_place(|| as_operator(pki, name, &address, args));
    let propose = |name: &str, yaml: &str| tokio::task::block_in_place(|| merge(pki, name, &address, dir.path(), yaml));
    let at = || tokio::task::block_in_place(|| revision(pki, &address));
    tokio::task::block_in_place(|| d.bind(&address));
    let start = at();

    // A national change by one admin: planned, kept, nothing written.
    let settings = "kind: Settings\nprobe: {interval_ms: 20, multiplier: 3}\n";
    let out = propose("admin", settings);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = proposal_id(&out);
    assert_eq!(at(), start, "nothing applied before the approval");
    let listed = text(&run("admin-2", &["pending"]).stdout);
    assert!(listed.contains(&id) && listed.contains("operator:admin") && listed.contains("~settings"), "{listed}");

    // Not by its proposer, not by an operator without the scope.
    let own = run("admin", &["approve", &id, "--yes"]);
    assert!(
        !own.status.success() && text(&own.stderr).contains("another operator approves it"),
        "{}",
        text(&own.stderr)
    );
    let city = run("kita-ops", &["approve", &id, "--yes"]);
    assert!(!city.status.success() && text(&city.stderr).contains("may not approve"), "{}", text(&city.stderr));
    assert_eq!(at(), start);

    // The second admin sees the plan, then approves: applied, both names in
    // the audit chain.
    let shown = run("admin-2", &["approve", &id, "--dry-run"]);
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    assert_eq!(at(), start, "a dry run approves nothing");
    let approved = run("admin-2", &["approve", &id, "--yes"]);
    assert!(approved.status.success(), "{}", text(&approved.stderr));
    assert!(text(&approved.stdout).contains("Applied revision"), "{}", text(&approved.stdout));
    assert_ne!(at(), start);
    let history = text(&run("admin", &["history"]).stdout);
    let last = history.lines().rfind(|l| !l.trim().is_empty()).unwrap_or_default().to_string();
    assert!(last.contains("operator:admin ") && last.contains("approved by operator:admin-2: ~settings"), "{history}");
    let proposed = history.lines().find(|l| l.contains(&format!("change {id} proposed"))).unwrap_or_default();
    assert!(proposed.contains("operator:admin ") && proposed.contains("~settings"), "{history}");
    let again = run("admin-2", &["approve", &id, "--yes"]);
    assert!(!again.status.success() && text(&again.stderr).contains("no pending change"), "{}", text(&again.stderr));

    // A city's own change needs nobody; a proposal the intent moved past
    // cannot be approved.
    let out = propose("admin", "kind: Settings\nprobe: {interval_ms: 30, multiplier: 3}\n");
    let moved = proposal_id(&out);
    let own_site = edited("Site", "kita-hall", "region: east", "description: 北区役所\nregion: east");
    let before = at();
    let out = propose("kita-ops", &own_site);
    assert!(out.status.success() && text(&out.stdout).contains("Applied revision"), "{}", text(&out.stdout));
    assert_ne!(at(), before, "a tenant's own change is applied at once");
    let stale = run("admin-2", &["approve", &moved, "--yes"]);
    assert!(!stale.status.success() && text(&stale.stderr).contains("the intent moved"), "{}", text(&stale.stderr));

    // A proposal expires: one whose time is up cannot be approved and is no
    // longer listed.
    let out = propose("admin", "kind: Settings\nprobe: {interval_ms: 40, multiplier: 3}\n");
    let expiring = proposal_id(&out);
    let mut raw = etcd_client::Client::connect([d.etcd.endpoint()], None).await.expect("etcd");
    let key = format!("/musubi/v1/pending/{expiring}");
    let record = raw.get(key.as_str(), None).await.expect("get").kvs().first().expect("the proposal").value().to_vec();
    let mut record: serde_json::Value = serde_json::from_slice(&record).expect("json");
    record["expires_ms"] = serde_json::json!(1);
    raw.put(key.as_str(), serde_json::to_vec(&record).expect("json"), None).await.expect("put");
    let late = run("admin-2", &["approve", &expiring, "--yes"]);
    assert!(!late.status.success() && text(&late.stderr).contains("no pending change"), "{}", text(&late.stderr));
    assert!(!text(&run("admin-2", &["pending"]).stdout).contains(&expiring));
    let logged = std::fs::read_to_string(log).expect("log");
    assert!(logged.contains("refused: an operator approving its own proposal"), "{logged}");
    assert!(logged.contains("pending change approved and applied"), "{logged}");
}

#[test]
fn bindings_that_leave_no_admin_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("no-admin.yaml");
    let intent = topology("two-cities.yaml").replace("roles: [admin]", "roles: [auditor]");
    std::fs::write(&file, intent).expect("write");
    let out = Command::new(bin("musubi")).arg("validate").arg(&file).output().expect("musubi validate");
    assert!(!out.status.success());
    let err = text(&out.stdout) + &text(&out.stderr);
    assert!(err.contains("none is an admin"), "{err}");
}

#[test]
fn a_revoked_operator_is_refused_by_every_replica_from_its_next_call() {
    let d = Deployment::new(&["kita-ops", "minami-view"]);
    let (pki, dir, log) = (&d.pki, &d.dir, &d.log);
    let ((_a, at_a), (_b, at_b)) = (d.replica(), d.replica());
    d.bind(&at_a);
    let reads = |address: &str| as_operator(pki, "kita-ops", address, &["get", "sites"]).status.success();
    assert!(reads(&at_a) && reads(&at_b), "kita-ops reads its sites on both replicas");

    // Only an admin revokes.
    let out = as_operator(pki, "minami-view", &at_b, &["operator", "revoke", "kita-ops"]);
    assert!(!out.status.success() && text(&out.stderr).contains("needs admin"), "{}", text(&out.stderr));
    assert!(reads(&at_b));

    // Revoked through one replica, refused by the other at its next call.
    let out = pki.musubi(&at_a, &["operator", "revoke", "kita-ops"]);
    assert!(out.status.success(), "revoke: {}", text(&out.stderr));
    let revoked = std::time::Instant::now();
    let refused = as_operator(pki, "kita-ops", &at_b, &["get", "sites"]);
    let took = revoked.elapsed();
    assert!(!refused.status.success(), "replica b still served a revoked operator");
    assert!(text(&refused.stderr).contains("revoked"), "{}", text(&refused.stderr));
    assert!(took < std::time::Duration::from_secs(1), "refused after {took:?}");
    assert!(!reads(&at_a), "replica a refuses it too");
    let logged = std::fs::read_to_string(log).expect("log");
    assert!(logged.contains("refused: the operator's certificate is revoked"), "{logged}");

    // Restored: a certificate issued from then on is accepted, the old one
    // stays refused. (Certificates carry whole seconds.)
    let old = dir.path().join("kita-ops-old.pem");
    std::fs::copy(pki.dir.join("kita-ops.pem"), &old).expect("keep the old certificate");
    std::fs::copy(pki.dir.join("kita-ops-key.pem"), dir.path().join("kita-ops-old-key.pem")).expect("old key");
    let out = pki.musubi(&at_a, &["operator", "revoke", "kita-ops", "--restore"]);
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    issue(pki, "kita-ops");
    assert!(reads(&at_b), "a certificate issued after the revocation is accepted");
    let with_old = Command::new(bin("musubi"))
        .args(["get", "sites"])
        .env("MUSUBI_CONTROLLER", &at_b)
        .env("MUSUBI_CA", pki.ca())
        .env("MUSUBI_CERT", &old)
        .env("MUSUBI_KEY", dir.path().join("kita-ops-old-key.pem"))
        .output()
        .expect("musubi");
    assert!(!with_old.status.success(), "the certificate issued before the revocation stays refused");

    // Both are entries of the audit chain, which still verifies, with who did them.
    let history = pki.musubi(&at_b, &["history", "--verify"]);
    let shown = text(&history.stdout);
    assert!(history.status.success(), "{shown}{}", text(&history.stderr));
    let line = |what: &str| shown.lines().find(|l| l.contains(what)).map(str::to_string);
    let revoked = line("operator kita-ops revoked").unwrap_or_else(|| panic!("no revocation entry: {shown}"));
    assert!(revoked.contains("operator:admin"), "{revoked}");
    assert!(line("operator kita-ops restored").is_some(), "no restore entry: {shown}");
    assert!(shown.contains("2 events beside the intent"), "{shown}");
}

/// Every entry a replica writes is signed with its server key; an operator
/// revoked from a host that reaches etcd (`musubi-controller operator
/// revoke`) is refused and its entry signed too; an entry appended by
/// someone with etcd access but no replica's key is found by `--verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_is_signed_and_an_entry_without_a_replicas_key_is_found() {
    let d = Deployment::new(&["kita-ops"]);
    let pki = &d.pki;
    let (_controller, address) = d.replica();
    let run = |name: &str, args: &[&str]| tokio::task::block_in_place(|| as_operator(pki, name, &address, args));
    tokio::task::block_in_place(|| d.bind(&address));
    assert!(run("admin", &["token", "create", "--site", "kita-hall", "--ttl", "10m"]).status.success());
    let verify = || tokio::task::block_in_place(|| pki.musubi(&address, &["history", "--verify"]));
    let out = verify();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 signed by a controller of this CA"), "{}", text(&out.stdout));

    // Revoked without the API, straight into etcd, from the controller's host.
    assert!(run("kita-ops", &["get", "sites"]).status.success());
    let pki_dir = pki.dir.display().to_string();
    let revoke = tokio::task::block_in_place(|| {
        Command::new(bin("musubi-controller"))
            .args(["operator", "revoke", "kita-ops", "--store", &d.store, "--pki", &pki_dir])
            .output()
            .expect("musubi-controller")
    });
    assert!(revoke.status.success(), "{}", text(&revoke.stderr));
    let refused = run("kita-ops", &["get", "sites"]);
    assert!(!refused.status.success() && text(&refused.stderr).contains("revoked"), "{}", text(&refused.stderr));
    let out = verify();
    let shown = text(&out.stdout);
    assert!(out.status.success() && shown.contains("3 signed by a controller of this CA"), "{shown}");
    assert!(shown.lines().any(|l| l.contains("operator kita-ops revoked") && l.contains("local:")), "{shown}");

    // Someone with write access to etcd appends an entry that links and
    // hashes correctly, but cannot sign it.
    let mut raw = etcd_client::Client::connect([d.etcd.endpoint()], None).await.expect("etcd");
    let head = raw.get("/musubi/v1/head", None).await.expect("get").kvs()[0].value().to_vec();
    let head: musubi_core::audit::AuditEntry = serde_json::from_slice(&head).expect("head");
    let forged = musubi_core::audit::AuditEntry::event(
        Some(&head),
        head.revision,
        head.time_ms + 1,
        "operator:admin",
        "operator kita-ops restored",
    );
    let json = serde_json::to_string(&forged).expect("json");
    let key = format!("/musubi/v1/audit/{:020}.{:010}", forged.revision, forged.event);
    raw.put(key, json.clone(), None).await.expect("put");
    raw.put("/musubi/v1/head", json, None).await.expect("put");
    let out = verify();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(&format!("audit entry {} is not signed", forged.label())),
        "{}",
        text(&out.stderr)
    );
}

/// Mutual aid across two networks once roles exist: the city's operator
/// asks for the national pair's aid of its segment and an admin (the
/// aiding network) completes the request; a viewer is refused; a longer
/// activation than the aid's duration is refused; the activation shows in
/// `musubi status` and ends when it expires; every step is an audit entry.
#[test]
fn an_aid_opens_when_both_networks_ask_and_closes_when_it_expires() {
    let d = Deployment::new(&["kita-ops", "minami-view"]);
    let (pki, dir) = (&d.pki, &d.dir);
    let (_controller, address) = d.replica();
    let aid =
        "aid: [{name: kita-via-national, access_points: [nat-east, nat-west], activation: manual, max_duration: 1h}]";
    let with_aid = topology("two-cities.yaml").replacen(
        "name: kita-lan\ntenant: city-kita\nprefixes: [10.1.0.0/16]\n",
        &format!("name: kita-lan\ntenant: city-kita\nprefixes: [10.1.0.0/16]\n{aid}\n"),
        1,
    );
    assert!(with_aid.contains("kita-via-national"), "kita-lan's document changed in two-cities.yaml");
    let pair = |name: &str, region: &str, address: &str| {
        format!(
            "---\nkind: Site\nname: {name}\ntenant: nation\nrole: access-point\nregion: {region}\n\
             lines: [{{name: fiber, kind: dark-fiber, priority: 1, address: {address}}}]\n\
             attachments: [{{segment: nat-core}}]\n"
        )
    };
    let intent = format!(
        "{with_aid}\n---\nkind: Segment\nname: nat-core\ntenant: nation\nprefixes: [10.250.0.0/16]\n{}{}",
        pair("nat-east", "east", "192.0.2.101"),
        pair("nat-west", "west", "192.0.2.102")
    );
    let file = dir.path().join("aid.yaml");
    std::fs::write(&file, intent).expect("write");
    let out = pki.musubi(&address, &["apply", "-f", file.to_str().expect("utf-8"), "--yes"]);
    assert!(out.status.success(), "the admin's first apply: {}", text(&out.stderr));
    let status = || text(&pki.musubi(&address, &["status"]).stdout);
    let row = |s: &str| s.lines().find(|l| l.starts_with("kita-via-national")).unwrap_or_default().to_string();
    assert!(row(&status()).contains("manual     no"), "declared, not active:\n{}", status());

    let activate = |name: &str, args: &[&str]| {
        let mut all = vec!["aid", "activate", "kita-via-national", "--reason", "river flooded"];
        all.extend_from_slice(args);
        as_operator(pki, name, &address, &all)
    };
    let refused = activate("minami-view", &[]);
    assert!(!refused.status.success(), "a viewer of another city activated the aid");
    assert!(text(&refused.stderr).contains("speaks for neither"), "{}", text(&refused.stderr));
    let too_long = activate("kita-ops", &["--for", "2h"]);
    assert!(
        !too_long.status.success() && text(&too_long.stderr).contains("lasts at most 1h"),
        "{}",
        text(&too_long.stderr)
    );

    // The city asks; the aid waits for the aiding network.
    let asked = activate("kita-ops", &["--for", "3s"]);
    assert!(asked.status.success(), "{}", text(&asked.stderr));
    assert!(text(&asked.stdout).contains("aiding access points' network asks too"), "{}", text(&asked.stdout));
    assert!(row(&status()).contains("manual     no"), "not active on one network's word:\n{}", status());
    // An admin completes it.
    let opened = activate("admin", &["--for", "3s"]);
    assert!(opened.status.success(), "{}", text(&opened.stderr));
    assert!(text(&opened.stdout).contains("active for"), "{}", text(&opened.stdout));
    assert!(row(&status()).contains("yes, "), "active:\n{}", status());
    let history = || text(&pki.musubi(&address, &["history"]).stdout);
    let h = history();
    assert!(
        h.contains("activation of mutual aid kita-via-national (segment kita-lan through nat-east and nat-west) asked for the aided segment's network: river flooded")
            && h.contains("activated (asked by operator:kita-ops for the aided segment's network) for 3s: river flooded"),
        "{h}"
    );

    // It expires: closed by the controller within a second of its end.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !history().contains("expired: isolation restored") {
        assert!(std::time::Instant::now() < until, "the activation did not expire:\n{}", history());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(row(&status()).contains("manual     no"), "expired:\n{}", status());
    let gone = as_operator(pki, "kita-ops", &address, &["aid", "deactivate", "kita-via-national", "--reason", "done"]);
    assert!(!gone.status.success() && text(&gone.stderr).contains("is not active"), "{}", text(&gone.stderr));
}
