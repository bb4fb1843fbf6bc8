//! The labs with the runner (root only): `musubi lab up` of the shipped
//! topologies — controller, intent, agents enrolled with tokens, userspace
//! WireGuard and table mode in network namespaces — `musubi lab check`
//! against `musubi verify`, an intent change seen in the measured network,
//! and `down` leaving nothing behind, also after a failed `up`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use musubi_tests::netns::skip_without_root;
use musubi_tests::{bin, number};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// A lab under a name and a state directory of this test's own.
struct Lab {
    name: String,
    root: tempfile::TempDir,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        Lab { name: format!("{tag}{}", std::process::id() % 100_000), root: tempfile::tempdir().expect("tmp") }
    }

    fn musubi(&self, args: &[&str]) -> Output {
        Command::new(bin("musubi")).args(args).env("MUSUBI_LAB_DIR", self.root.path()).output().expect("musubi")
    }

    fn up(&self, topology: &Path, more: &[&str]) -> Output {
        let mut args = vec!["lab", "up", "--name", &self.name];
        args.extend_from_slice(more);
        let topology = topology.display().to_string();
        args.push(&topology);
        self.musubi(&args)
    }

    fn exec(&self, node: &str, command: &[&str]) -> Output {
        let mut args = vec!["lab", "exec", "--lab", &self.name, node, "--"];
        args.extend_from_slice(command);
        self.musubi(&args)
    }

    /// The operator CLI against the lab's controller (`musubi lab cli`).
    /// Plays a drill into target/drill-reports and prints its Markdown
    /// report: the command's output and the JSON report (null when none
    /// was written).
    fn drill(&self, drill: &Path) -> (Output, serde_json::Value) {
        let reports = repo("target/drill-reports");
        std::fs::create_dir_all(&reports).expect("reports directory");
        let (out_dir, file) = (reports.display().to_string(), drill.display().to_string());
        let out = self.musubi(&["lab", "drill", "--lab", &self.name, "--out", &out_dir, &file]);
        let name = drill.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let md = std::fs::read_to_string(reports.join(format!("{name}.md"))).unwrap_or_else(|_| text(&out));
        eprintln!("{md}");
        let report =
            serde_json::from_str(&std::fs::read_to_string(reports.join(format!("{name}.json"))).unwrap_or_default())
                .unwrap_or_default();
        (out, report)
    }

    fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["lab", "cli", "--lab", &self.name, "--"];
        all.extend_from_slice(args);
        self.musubi(&all)
    }

    fn apply(&self, intent: &Path) -> Output {
        self.cli(&["apply", "--yes", "-f", &intent.display().to_string()])
    }

    /// The peer a route group of `site` uses, as its agent last reported it.
    fn active(&self, site: &str, group: &str) -> Option<String> {
        let out = self.cli(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let row = status["sites"].as_array()?.iter().find(|r| r["site"] == site)?.clone();
        let a = row["reported"]["status"]["active"].as_array()?.iter().find(|a| a["route_group"] == group)?.clone();
        a["peer"].as_str().map(String::from)
    }

    /// (up, rtt µs) of `peer` as `site`'s agent last reported it.
    fn peer_health(&self, site: &str, peer: &str) -> Option<(bool, u64)> {
        let out = self.cli(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let row = status["sites"].as_array()?.iter().find(|r| r["site"] == site)?.clone();
        let p = row["reported"]["status"]["peers"].as_array()?.iter().find(|p| p["peer"] == peer)?.clone();
        Some((p["up"] == true, p["rtt_us"].as_u64().unwrap_or(0)))
    }

    /// The moves `site`'s agent reported since it started: its route
    /// groups' and its lines' (each line to a peer once).
    fn moves(&self, site: &str) -> Option<u64> {
        let out = self.cli(&["status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let row = status["sites"].as_array()?.iter().find(|r| r["site"] == site)?.clone();
        let st = &row["reported"]["status"];
        let groups: u64 = st["active"].as_array()?.iter().map(|a| number(&a["moves"])).sum();
        let lines: std::collections::BTreeMap<String, u64> = st["peers"]
            .as_array()?
            .iter()
            .map(|p| (p["peer"].as_str().unwrap_or_default().to_string(), number(&p["line_moves"])))
            .collect();
        Some(groups + lines.values().sum::<u64>())
    }

    /// Namespaces, processes and mounts of this lab still on the host.
    fn leftovers(&self) -> Vec<String> {
        let prefix = format!("ml-{}-", self.name);
        let mut left: Vec<String> = text(&Command::new("ip").args(["netns", "list"]).output().expect("ip"))
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(String::from)
            .collect();
        let dir = self.root.path().join(&self.name).display().to_string();
        if std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|m| m.contains(&dir)) {
            left.push(format!("a mount under {dir}"));
        }
        if Path::new(&dir).exists() {
            left.push(dir.clone());
        }
        let procs = text(&Command::new("pgrep").args(["-af", &dir]).output().expect("pgrep"));
        left.extend(procs.lines().map(|l| format!("process {l}")));
        left
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.musubi(&["lab", "down", &self.name]);
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn minimal_lab_comes_up_checks_clean_and_goes_down_without_a_trace() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("lm");
    let up = lab.up(&repo("labs/minimal/topology.clab.yml"), &[]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("every agent in sync"), "{}", text(&up));
    let status = lab.musubi(&["lab", "status", &lab.name]);
    let st = text(&status);
    assert!(st.contains("agent running") && !st.contains("stopped") && !st.contains("missing"), "{st}");
    // The lab's processes, every thread of them, run above normal priority
    // (a busy host must not read as an outage).
    let pids = lab.root.path().join(&lab.name).join("pids");
    let mut threads = 0;
    for entry in std::fs::read_dir(&pids).expect("the lab's pids").flatten() {
        let pid = std::fs::read_to_string(entry.path()).expect("pid");
        for task in std::fs::read_dir(format!("/proc/{}/task", pid.trim())).expect("a running process").flatten() {
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            let nice = stat.rsplit_once(") ").and_then(|(_, rest)| rest.split_whitespace().nth(16)).unwrap_or_default();
            assert_eq!(
                nice,
                "-10",
                "{}: thread {:?} runs at niceness {nice}",
                entry.path().display(),
                task.file_name()
            );
            threads += 1;
        }
    }
    assert!(threads >= 5, "the controller's and four agents' threads were read ({threads})");
    // Across regions: office-a (east) → ap-east → ap-west → office-b (west).
    let across = musubi_tests::eventually(Duration::from_secs(10), || {
        lab.exec("host-a", &["ping", "-c", "1", "-W", "1", "10.10.2.10"]).status.success()
    });
    if !across {
        let logs = lab.root.path().join(&lab.name).join("nodes");
        for node in ["office-a", "ap-east", "ap-west", "office-b"] {
            let log = std::fs::read_to_string(logs.join(node).join("agent.log")).unwrap_or_default();
            eprintln!("--- {node}\n{log}");
        }
    }
    assert!(across, "host-a reaches host-b across the regions");
    let check = lab.musubi(&["lab", "check", &lab.name]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("the network does what the intent says"), "{}", text(&check));

    // Tunnel health: probed through the tunnels, reported in status; the
    // west access point loses both of its lines, then gets them back.
    let healthy = |up: bool| {
        musubi_tests::eventually(Duration::from_secs(5), || {
            lab.peer_health("office-a", "ap-west").is_some_and(|(u, rtt)| u == up && (!up || rtt > 0))
        })
    };
    assert!(healthy(true), "office-a reports ap-west up with a round-trip time");
    assert!(lab.peer_health("office-a", "ap-east").is_some_and(|(up, _)| up), "and ap-east up");
    let cut = lab.exec("ap-west", &["sh", "-c", "ip link set eth1 down && ip link set eth2 down"]);
    assert!(cut.status.success(), "{}", text(&cut));
    let cut_at = Instant::now();
    assert!(healthy(false), "office-a reports ap-west down once its lines are cut");
    eprintln!("ap-west's lines cut → reported down after {:?}", cut_at.elapsed());
    assert!(lab.peer_health("office-a", "ap-east").is_some_and(|(up, _)| up), "ap-east stays up");
    let mend = lab.exec("ap-west", &["sh", "-c", "ip link set eth1 up && ip link set eth2 up"]);
    assert!(mend.status.success(), "{}", text(&mend));
    assert!(healthy(true), "ap-west is reported up again");

    // The east access point goes dark under a steady stream (100 packets a
    // second, office-a → ap-east → ap-west → office-b): office-a moves its
    // segment to ap-west, ap-west reaches office-a directly; then back.
    let active = |peer: &str| {
        musubi_tests::eventually(Duration::from_secs(10), || lab.active("office-a", "office").as_deref() == Some(peer))
    };
    assert!(active("ap-east"), "office-a starts on its own region's access point");
    let home = musubi_tests::eventually(Duration::from_secs(10), || {
        lab.active("office-b", "office").as_deref() == Some("ap-west")
    });
    assert!(home, "office-b is back on ap-west after the hold-down");
    let stream = Command::new(bin("musubi"))
        .args([
            "lab",
            "exec",
            "--lab",
            &lab.name,
            "host-a",
            "--",
            "ping",
            "-i",
            "0.01",
            "-c",
            "400",
            "-W",
            "1",
            "10.10.2.10",
        ])
        .env("MUSUBI_LAB_DIR", lab.root.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    std::thread::sleep(Duration::from_millis(1000));
    let dark = lab.exec("ap-east", &["sh", "-c", "ip link set eth1 down && ip link set eth2 down"]);
    assert!(dark.status.success(), "{}", text(&dark));
    assert!(active("ap-west"), "office-a fails over to ap-west");
    let out = stream.wait_with_output().expect("ping");
    let transcript = String::from_utf8_lossy(&out.stdout).to_string();
    let received: u64 = transcript
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let lost = 400 - received;
    eprintln!("east access point dark: {lost} of 400 packets lost at 100/s (≈{} ms of outage)", lost * 10);
    assert!(lost <= 100, "outage over 1 s: {lost} packets lost\n{transcript}");
    let back = lab.exec("ap-east", &["sh", "-c", "ip link set eth1 up && ip link set eth2 up"]);
    assert!(back.status.success(), "{}", text(&back));
    assert!(active("ap-east"), "office-a fails back to ap-east after the hold-down");
    // The requests go through ap-east again (office-b's replies through its
    // own region's ap-west): 50 of them at 10 ms raise ap-east's members'
    // tunnel's count by 50 or more; the probes alone add about 10 in that time.
    let received = || -> u64 {
        // /proc/net/dev is the reader's network namespace's (/sys is the host's).
        let out = lab.exec("ap-east", &["cat", "/proc/net/dev"]);
        let dev = text(&out);
        let line = dev.lines().find_map(|l| l.trim().strip_prefix("mm-office:")).unwrap_or_default().to_string();
        line.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let before = received();
    let ping = lab.exec("host-a", &["ping", "-c", "50", "-i", "0.01", "-W", "2", "10.10.2.10"]);
    let through = received() - before;
    assert!(
        ping.status.success() && through >= 50,
        "back on the path through ap-east ({through} packets received by its tunnel): {}",
        text(&ping)
    );

    let down = lab.musubi(&["lab", "down", &lab.name]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(lab.leftovers(), Vec::<String>::new(), "everything of the lab is gone");
}

#[test]
fn prefecture_lab_matches_verify_and_follows_an_intent_change() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("lp");
    // The intent in a real etcd.
    let up = lab.up(&repo("labs/prefecture/topology.clab.yml"), &["--etcd"]);
    assert!(up.status.success(), "{}", text(&up));
    // Not a terminal: lines only, no progress bar drawn over them.
    assert!(!text(&up).contains(['\r', '\u{1b}']), "no bar in a pipe: {:?}", text(&up));
    assert!(text(&up).contains("store etcd://"), "{}", text(&up));
    // Every pair, overlapping municipalities included: what verify says, and
    // nothing reaches where it must not.
    let check = lab.musubi(&["lab", "check", &lab.name]);
    assert!(check.status.success(), "{}", text(&check));
    // Kita's school, still on its old network behind kita-hall, is one of
    // the endpoints checked (LGWAN, and SSH into My Number by the policy).
    assert!(text(&check).contains("kita-school/lgwan"), "{}", text(&check));
    let migration = lab.cli(&["migration", "status"]);
    assert!(migration.status.success(), "{}", text(&migration));
    assert!(
        text(&migration).contains("pref-aoba/lgwan: 5 of 6 sites on Musubi (83%), 0 declared (agent never connected), 0 cutting over, 1 legacy"),
        "{}",
        text(&migration)
    );

    // Remove the policy: LGWAN's SSH into My Number stops within 2 s.
    let ssh = |lab: &Lab| {
        let server = "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);\
                      s.bind(('0.0.0.0',22));s.listen();s.settimeout(3);print('ready',flush=True);c,_=s.accept();c.sendall(b'ok')";
        let mut listener = Command::new(bin("musubi"))
            .args(["lab", "exec", "--lab", &lab.name, "pref-hq-mynumber", "--", "python3", "-c", server])
            .env("MUSUBI_LAB_DIR", lab.root.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("listener");
        // The client connects once the listener listens (a listener still
        // starting would refuse it).
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(
            &mut std::io::BufReader::new(listener.stdout.take().expect("stdout")),
            &mut line,
        );
        assert_eq!(line.trim(), "ready", "the listener started");
        let client = "import socket;c=socket.create_connection(('10.3.0.10',22),timeout=0.5);print(c.recv(2).decode())";
        let launched = Instant::now();
        let out = lab.exec("kita-hall-lgwan", &["python3", "-c", client]);
        let _ = listener.kill();
        let _ = listener.wait();
        (String::from_utf8_lossy(&out.stdout).trim() == "ok", launched)
    };
    assert!(ssh(&lab).0, "the policy lets LGWAN's SSH into My Number");
    let intent = std::fs::read_to_string(repo("labs/prefecture/intent.yaml")).expect("intent");
    let start = intent.find("kind: Policy").expect("a policy");
    let end = start + intent[start..].find("\n---\n").expect("end of the policy") + 5;
    let without = format!("{}{}", &intent[..start], &intent[end..]);
    let file = lab.root.path().join("without-policy.yaml");
    std::fs::write(&file, without).expect("intent");
    let apply = lab.apply(&file);
    assert!(apply.status.success(), "{}", text(&apply));
    let applied = Instant::now();
    // Probes one after the other until one is refused: the last that still
    // got through and the first that did not, by when their clients
    // started (a probe's own cost — its listener's start, the client's
    // 0.5 s connect timeout — is not the change's).
    let (mut passed, mut blocked) = (None, None);
    while applied.elapsed() < Duration::from_secs(6) {
        let (ok, launched) = ssh(&lab);
        if ok {
            passed = Some(launched - applied);
        } else {
            blocked = Some(launched - applied);
            break;
        }
    }
    let blocked = blocked.expect("SSH still passes after the policy was removed");
    // The change must show within 2 s: no connection started later than
    // that gets through.
    assert!(passed.is_none_or(|p| p < Duration::from_secs(2)), "SSH passed {passed:?} after the apply returned");
    eprintln!(
        "policy removed → the last SSH through started {passed:?} and the first refused {blocked:?} after the apply returned"
    );

    // The dashboard in a real browser (headless Chromium in the
    // controller's node, where the dashboard listens on loopback): every
    // site shown and ok, then the east access point stopped — its tile
    // turns red within 2 s. Screenshots in target/dashboard/.
    let status = lab.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    let sites: Vec<String> =
        status["sites"].as_array().into_iter().flatten().filter_map(|r| r["site"].as_str().map(String::from)).collect();
    assert!(sites.len() >= 5 && sites.iter().any(|s| s == "ap-east"), "{sites:?}");
    let shots = repo("target/dashboard");
    let stop = format!("ip netns pids ml-{}-ap-east | xargs -r kill -9", lab.name);
    let browser = lab.exec(
        "controller",
        &[
            "/usr/bin/python3",
            &repo("tests/browser/dashboard.py").display().to_string(),
            "http://127.0.0.1:7480/",
            &shots.display().to_string(),
            "--sites",
            &sites.join(","),
            "--ap",
            "ap-east",
            "--stop",
            &stop,
        ],
    );
    assert!(browser.status.success(), "the browser test: {}", text(&browser));
    let figures: serde_json::Value = serde_json::from_slice(&browser.stdout).expect("the browser's figures");
    eprintln!("dashboard in Chromium: {figures}");
    assert_eq!(figures["sites_shown"].as_u64(), Some(sites.len() as u64), "{figures}");
    // The prefecture's six segments, each a row of the reachability matrix.
    assert_eq!(figures["matrix_rows"].as_u64(), Some(6), "{figures}");
    assert!(figures["ap_red_after_s"].as_f64().is_some_and(|s| s <= 2.0), "ap-east red within 2 s: {figures}");
    assert!(shots.join("dashboard-ap-down.png").exists() && shots.join("dashboard-healthy.png").exists());
}

#[test]
fn down_clears_a_failed_up() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("lf");
    // A topology that fails half-way: its last link names a node that does not exist.
    let text_in = std::fs::read_to_string(repo("labs/minimal/topology.clab.yml")).expect("topology");
    let broken = text_in.replace(
        r#"- endpoints: ["office-b:eth1", "host-b:eth1"]"#,
        r#"- endpoints: ["office-b:eth1", "nowhere:eth1"]"#,
    );
    assert_ne!(broken, text_in);
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(repo("labs/minimal/intent.yaml"), dir.path().join("intent.yaml")).expect("intent");
    let topology = dir.path().join("topology.clab.yml");
    std::fs::write(&topology, broken).expect("topology");
    let up = lab.up(&topology, &[]);
    assert!(!up.status.success(), "up must fail");
    assert!(text(&up).contains("no node `nowhere`"), "{}", text(&up));
    assert!(!lab.leftovers().is_empty(), "the failed up left namespaces to clear");
    let down = lab.musubi(&["lab", "down", &lab.name]);
    assert!(down.status.success(), "{}", text(&down));
    assert_eq!(lab.leftovers(), Vec::<String>::new());
}

#[test]
fn a_site_added_to_the_intent_joins_the_running_lab_within_2_s() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("la");
    // The minimal lab with an intent that does not have office-b yet.
    let dir = tempfile::tempdir().expect("tmp");
    let full = std::fs::read_to_string(repo("labs/minimal/intent.yaml")).expect("intent");
    let cut = full.find("kind: Site\nname: office-b").expect("office-b is the last document");
    std::fs::write(dir.path().join("intent.yaml"), full[..cut].trim_end().trim_end_matches("---")).expect("intent");
    let topology = dir.path().join("topology.clab.yml");
    std::fs::copy(repo("labs/minimal/topology.clab.yml"), &topology).expect("topology");
    let up = lab.up(&topology, &[]);
    assert!(up.status.success(), "{}", text(&up));
    assert!(text(&up).contains("site office-b is not in the intent yet"), "{}", text(&up));
    // A short wait per echo: the time it joins is measured to within 0.3 s.
    let reaches = |lab: &Lab| lab.exec("host-a", &["ping", "-c", "1", "-W", "0.3", "10.10.2.10"]).status.success();
    assert!(!reaches(&lab), "office-b is not in the network yet");

    let apply = lab.apply(&repo("labs/minimal/intent.yaml"));
    assert!(apply.status.success(), "{}", text(&apply));
    let applied = Instant::now();
    let agent = lab.musubi(&["lab", "agent", "--lab", &lab.name, "office-b"]);
    assert!(agent.status.success(), "{}", text(&agent));
    let mut joined = None;
    while applied.elapsed() < Duration::from_secs(10) {
        if reaches(&lab) {
            joined = Some(applied.elapsed());
            break;
        }
    }
    let joined = joined.expect("office-b never became reachable");
    eprintln!("site added → reachable {joined:?} after the apply returned (enrolment and probe included)");
    assert!(joined < Duration::from_secs(2), "reachable after {joined:?}");
}

/// Every drill shipped with labs/minimal, played on one lab in turn: each
/// must pass (`musubi lab drill` exits 0), and its JSON report must say why
/// — every flow's outage within the drill's limit, no packet in another
/// segment, traffic back on each source site's preferred line and access
/// point. The reports stay in target/drill-reports.
#[test]
fn every_shipped_drill_passes() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("ld");
    let up = lab.up(&repo("labs/minimal/topology.clab.yml"), &[]);
    assert!(up.status.success(), "{}", text(&up));
    let mut drills: Vec<PathBuf> = std::fs::read_dir(repo("labs/minimal/drills"))
        .expect("drills")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    drills.sort();
    assert!(drills.len() >= 5, "five drills ship: {drills:?}");
    let mut failed = Vec::new();
    // Every drill runs once: a failure fails the test (its report is
    // printed above and its agents' logs kept beside the reports).
    for drill in &drills {
        let (out, report) = lab.drill(drill);
        let name = drill.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        let flows = report["flows"].as_array().cloned().unwrap_or_default();
        let limit = report["max_outage_ms"].as_f64().unwrap_or(0.0);
        let good = out.status.success()
            && report["pass"] == true
            && !flows.is_empty()
            && flows.iter().all(|f| {
                f["outage_ms"].as_f64().is_some_and(|o| o <= limit.min(1000.0))
                    && f["leaked"] == 0
                    && f["received"].as_u64().is_some_and(|r| r > 0)
            })
            && report["paths"].as_array().is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["pass"] == true));
        // office-a's agent runs through every drill: its metrics' move
        // counters, scraped before and after, went up at least as often as
        // its log names one thing moved; a line cut moves its lines.
        let office_a = report["moves"].as_array().and_then(|m| m.iter().find(|m| m["site"] == "office-a")).cloned();
        let counted = |what: &str| office_a.as_ref().and_then(|m| m["counted"][what].as_u64());
        let logged = office_a.as_ref().and_then(|m| m["moves"].as_u64()).unwrap_or(0);
        let scraped = counted("route_groups").zip(counted("lines")).is_some_and(|(g, l)| g + l >= logged);
        if !scraped || (name == "primary-line-cut" && counted("lines").is_none_or(|l| l < 1)) {
            failed.push(format!("{name}: office-a's metrics do not count its moves: {office_a:?}"));
        }
        if !good {
            // Keep the agents' logs of a failed drill beside its reports.
            let logs = repo("target/drill-reports").join("logs").join(&name);
            let _ = std::fs::create_dir_all(&logs);
            let nodes = lab.root.path().join(&lab.name).join("nodes");
            for node in std::fs::read_dir(&nodes).into_iter().flatten().flatten() {
                let _ = std::fs::copy(
                    node.path().join("agent.log"),
                    logs.join(format!("{}.log", node.file_name().to_string_lossy())),
                );
            }
            failed.push(format!("{name}: {}", text(&out)));
        }
    }
    // office-a's agent ran through every drill (only the access points'
    // are stopped): the moves its status reports are the ones its log
    // tells, one per route group or line named in a "traffic moved" line.
    let log =
        std::fs::read_to_string(lab.root.path().join(&lab.name).join("nodes/office-a/agent.log")).unwrap_or_default();
    let logged: u64 = log
        .lines()
        .filter(|l| l.contains("traffic moved"))
        .filter_map(|l| l.split("moved=").nth(1))
        .map(|m| m.split(", ").count() as u64)
        .sum();
    let deadline = Instant::now() + Duration::from_secs(10);
    let reported = loop {
        let n = lab.moves("office-a");
        if n == Some(logged) || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(logged > 0, "the drills moved office-a's traffic: its log says it never did");
    assert_eq!(reported, Some(logged), "office-a's status counts the moves its log tells");
    assert!(failed.is_empty(), "drills failed:\n{}", failed.join("\n"));
}

/// The mutual-aid lab's drill (labs/mutual-aid): both access points of the
/// prefecture's network die; its segment continues through the national
/// pair within the outage limit, the national segment's flows see nothing,
/// and once the prefecture's pair is back no packet of its segment crosses
/// the national pair; the sites' use of the aid is in the audit chain.
#[test]
fn the_mutual_aid_drill_passes() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("la");
    let up = lab.up(&repo("labs/mutual-aid/topology.clab.yml"), &[]);
    assert!(up.status.success(), "{}", text(&up));
    let (out, report) = lab.drill(&repo("labs/mutual-aid/drills/local-aps-lost.yaml"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(report["pass"], true);
    let checks = report["forwarded_checks"].as_array().cloned().unwrap_or_default();
    let total = |c: &serde_json::Value| -> u64 {
        c["sites"].as_array().into_iter().flatten().filter_map(|s| s[1].as_u64()).sum()
    };
    assert_eq!(checks.len(), 3, "{checks:?}");
    assert_eq!((total(&checks[0]), total(&checks[2])), (0, 0), "nothing crosses the national pair in peacetime");
    assert!(total(&checks[1]) >= 1000, "the national pair carried the segment: {checks:?}");
    for f in report["flows"].as_array().into_iter().flatten() {
        assert_eq!(f["leaked"], 0, "{f}");
        if f["segment"] == "lgwan" {
            assert!(f["outage_ms"].as_f64().is_some_and(|o| o < 100.0), "the national segment saw it: {f}");
        }
    }
    let audit: Vec<String> =
        report["audit"].as_array().into_iter().flatten().filter_map(|l| l.as_str().map(String::from)).collect();
    for site in ["office-a", "office-b"] {
        let said = |what: &str| audit.iter().any(|l| l.contains(&format!("site:{site}")) && l.contains(what));
        assert!(said("pref-via-national") && said("in use at site") && said("no longer in use"), "{site}: {audit:?}");
    }
}

/// The migration lab: a branch still on its old dedicated network reaches
/// the migrated sites through the migration gateway (and the guest segment
/// nothing), `musubi migration status` says so; the cutover drill moves it
/// onto Musubi with traffic running, within the outage limit, the gateway's
/// own flow untouched; afterwards the branch is a Musubi site in sync.
#[test]
fn the_migration_lab_and_its_cutover_drill() {
    if skip_without_root() {
        return;
    }
    let lab = Lab::new("lm");
    let up = lab.up(&repo("labs/migration/topology.clab.yml"), &[]);
    assert!(up.status.success(), "{}", text(&up));
    let check = lab.musubi(&["lab", "check", &lab.name]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("old-branch/office"), "the legacy site is an endpoint: {}", text(&check));
    let stage = |site: &str| {
        let out = lab.cli(&["migration", "status", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let rows = v["sites"].as_array().cloned().unwrap_or_default();
        rows.iter().find(|r| r["site"] == site && r["segment"] == "office").map(|r| {
            (r["stage"].as_str().unwrap_or_default().to_string(), r["detail"].as_str().unwrap_or_default().to_string())
        })
    };
    assert_eq!(stage("old-branch").map(|s| s.0).as_deref(), Some("legacy"));
    assert_eq!(stage("hq").map(|s| s.1).as_deref(), Some("in sync; migration gateway for 1 legacy site on eth4"));
    assert_eq!(stage("branch"), None);

    let (out, report) = lab.drill(&repo("labs/migration/drills/cutover.yaml"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(report["pass"], true);
    let flows = report["flows"].as_array().cloned().unwrap_or_default();
    assert_eq!(flows.len(), 3, "{flows:?}");
    for f in &flows {
        assert_eq!(f["leaked"], 0, "{f}");
        assert!(f["received"].as_u64().is_some_and(|r| r > 1000), "{f}");
        if f["from"] == "host-hq" {
            assert!(f["outage_ms"].as_f64().is_some_and(|o| o < 100.0), "the gateway's own flow saw it: {f}");
        }
    }
    assert_eq!(stage("old-branch"), None);
    assert_eq!(stage("branch"), Some(("on-musubi".to_string(), "in sync".to_string())));
}

/// Every shipped `.clab.yml` is valid against containerlab's own schema
/// (labs/schema), and the check does reject a broken one.
#[test]
fn clab_files_are_valid_against_containerlabs_schema() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("labs"))
        .expect("labs")
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".clab.yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "{files:?}");
    let check = |files: &[PathBuf]| {
        Command::new("/usr/bin/python3")
            .arg(repo("labs/schema/check.py"))
            .arg(repo("labs/schema/clab.schema.json"))
            .args(files)
            .output()
            .expect("python3")
    };
    let out = check(&files);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(text(&out).matches(": valid").count(), files.len(), "{}", text(&out));
    let dir = tempfile::tempdir().expect("tmp");
    let broken = dir.path().join("broken.clab.yml");
    let good = std::fs::read_to_string(&files[0]).expect("topology");
    std::fs::write(&broken, good.replacen("kind: linux", "kind: 42", 1)).expect("write");
    let out = check(&[broken]);
    assert!(!out.status.success() && text(&out).contains("is not valid"), "{}", text(&out));
}

/// The container image's parts hold together without a container engine
/// (none installs here): the packages its last stage installs are the ones
/// the namespace labs run on, the binaries it copies are the workspace's,
/// every Musubi node of the clab files starts with its role, and the
/// entrypoint does for each role what the lab runner does.
#[test]
fn the_container_image_and_its_entrypoint_hold_together() {
    let containerfile = std::fs::read_to_string(repo("Containerfile")).expect("Containerfile");
    let last = &containerfile[containerfile.rfind("\nFROM ").expect("stages")..];
    let install =
        last.split("--no-install-recommends").nth(1).expect("an apt-get install").lines().next().unwrap_or("");
    let packages: Vec<&str> = install.split_whitespace().take_while(|w| !w.starts_with('&') && *w != "\\").collect();
    for p in ["wireguard-go", "nftables", "iproute2"] {
        assert!(packages.contains(&p), "{p} in the image: {packages:?}");
    }
    for p in &packages {
        let out = Command::new("dpkg").args(["-s", p]).output().expect("dpkg");
        assert!(out.status.success(), "{p} is not a package the labs run on here");
    }
    let copied: Vec<&str> = last
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .flat_map(|l| l.split_whitespace().filter_map(|w| w.strip_prefix("/src/target/release/")))
        .collect();
    assert_eq!(copied, ["musubi", "musubi-controller", "musubi-agent"]);
    for b in copied {
        assert!(bin(b).exists());
    }

    for topology in ["labs/minimal/topology.clab.yml", "labs/prefecture/topology.clab.yml"] {
        let text = std::fs::read_to_string(repo(topology)).expect("topology");
        let doc: serde_json::Value = yaml_serde::from_str(&text).expect("yaml");
        for (name, node) in doc["topology"]["nodes"].as_object().expect("nodes") {
            if node["image"] != "musubi:latest" {
                continue;
            }
            let want = match node["labels"]["musubi.role"].as_str() {
                Some("controller") => "controller".to_string(),
                Some("router") => format!("router {}", node["labels"]["musubi.site"].as_str().unwrap_or_default()),
                other => panic!("{topology}: {name} has role {other:?}"),
            };
            assert_eq!(node["cmd"].as_str(), Some(want.as_str()), "{topology}: {name}");
        }
    }

    let lab = tempfile::tempdir().expect("tmp");
    let node = |args: &[&str]| {
        Command::new("sh")
            .arg(repo("labs/container/musubi-node"))
            .args(args)
            .env("LAB", lab.path())
            .env("INTENT", repo("labs/minimal/intent.yaml"))
            .env("MUSUBI_NODE_DRY_RUN", "1")
            .output()
            .expect("sh")
    };
    let out = node(&["controller"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("musubi-controller init --pki") && said.contains("musubi-controller serve --pki"), "{said}");
    assert!(said.contains(&format!("musubi apply -f {} --yes", repo("labs/minimal/intent.yaml").display())), "{said}");
    for site in ["ap-east", "ap-west", "office-a", "office-b"] {
        assert!(said.contains(&format!("musubi token create --site {site} --ttl 24h")), "{site}: {said}");
    }
    let controller = std::fs::read_to_string(lab.path().join("controller")).expect("the controller's address");
    std::fs::write(lab.path().join("tokens/office-a"), "token").expect("token");
    let out = node(&["router", "office-a"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("musubi-agent run --site office-a --controller {}", controller.trim())),
        "{}",
        text(&out)
    );
    assert!(!node(&["nonsense"]).status.success());
}
