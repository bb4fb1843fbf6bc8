//! Helpers for Musubi's end-to-end tests: the workspace's binaries, free
//! loopback ports, and a real etcd server started on them.

pub mod netns;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A workspace binary, built by `cargo build --workspace --bins` (scripts/test does it).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: build the workspace first (cargo build --workspace --bins)", path.display());
    path
}

/// One reconcile as `musubi-agent apply` reports it — the line
/// `site S: N operations, W writes in X ms` — as (operations, writes, ms);
/// `None` for its other lines.
pub fn reconcile_line(line: &str) -> Option<(u64, u64, f64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.get(3) != Some(&"operations,") || words.get(5) != Some(&"writes") {
        return None;
    }
    Some((words[2].parse().ok()?, words[4].parse().ok()?, words.get(7)?.parse().ok()?))
}

/// A duration in milliseconds, as the benchmarks print them.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

/// The `q` quantile (0–1) of sorted samples.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Waits until something accepts connections on the port, for at most `limit`.
pub fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Real etcd members (Debian's `etcd-server`) on loopback, each with its own
/// data directory; killed by PID when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    members: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    /// A single-member cluster.
    pub fn start() -> EtcdServer {
        Self::cluster(1)
    }

    /// An `n`-member cluster.
    ///
    /// Ports are found free, then handed to etcd: in between, another
    /// process's outgoing connection may take one (they come from the same
    /// range), and that member exits at once. Such a cluster is started
    /// again on new ports, at most three times, and said on stderr; a
    /// member that fails otherwise fails the test with its log.
    pub fn cluster(n: usize) -> EtcdServer {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match Self::start_members(n) {
                Ok(server) => return server,
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {
                    eprintln!("etcd: a port was taken before etcd bound it; starting again on new ports\n{log}");
                }
                Err(log) => panic!("etcd did not start: {log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts the members and waits until each listens; a member's log
    /// when one exits or does not listen within 20 s.
    fn start_members(n: usize) -> Result<EtcdServer, String> {
        let dir = tempfile::tempdir().expect("tmp");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        let log_of = |i: usize| dir.path().join(format!("etcd-{i}.log"));
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(log_of(i)).expect("log");
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join(format!("data-{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                // etcd's defaults: 128 operations and 1.5 MiB per transaction.
                .args(["--logger", "zap", "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd is not installed: apt-get install etcd-server (scripts/test does it)");
            members.push(child);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        let why = |which: usize, how: &str| {
            let log = std::fs::read_to_string(log_of(which)).unwrap_or_default();
            format!("member m{which} on {} {how}:\n{log}", ports[which].0)
        };
        let exited = |members: &mut [Child]| members.iter_mut().position(|m| m.try_wait().ok().flatten().is_some());
        let mut failed = None;
        for (i, (client, _)) in ports.iter().enumerate() {
            while failed.is_none() && std::net::TcpStream::connect(("127.0.0.1", *client)).is_err() {
                if let Some(which) = exited(&mut members) {
                    failed = Some(why(which, "exited"));
                } else if Instant::now() >= deadline {
                    failed = Some(why(i, "did not listen within 20 s"));
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        // A port another process listens on answers too: a member that
        // could not bind it has exited by now.
        if failed.is_none() {
            std::thread::sleep(Duration::from_millis(100));
            failed = exited(&mut members).map(|which| why(which, "exited"));
        }
        if let Some(why) = failed {
            for m in &mut members {
                let _ = m.kill();
                let _ = m.wait();
            }
            return Err(why);
        }
        Ok(EtcdServer { members, ports: ports.iter().map(|(c, _)| *c).collect(), _dir: dir })
    }

    /// The first member's client address.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }

    /// Every member's client address.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    /// Bytes on disk of every member's data directory (its backend and
    /// write-ahead log).
    pub fn disk_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => walk(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        }
        walk(self._dir.path())
    }

    /// Every member's process id.
    pub fn pids(&self) -> Vec<u32> {
        self.members.iter().map(Child::id).collect()
    }

    /// Stops one member (`kill -9`).
    pub fn kill_member(&mut self, i: usize) {
        let _ = self.members[i].kill();
        let _ = self.members[i].wait();
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

/// A child process that is killed (`kill -9`) and reaped when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Reaped {
    /// `kill -9`: no chance to clean up.
    pub fn kill_hard(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }

    /// The exit code if it exits within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// A `musubi-controller serve` process on a free port; killed when dropped.
#[derive(Debug)]
pub struct Controller {
    child: Reaped,
    pub port: u16,
    pub store: String,
}

impl Controller {
    pub fn start(store: &str) -> Controller {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        Self::start_with(port, store, &["serve", "--insecure", "--listen", &listen, "--store", store])
    }

    /// `musubi-controller ARGS…`, expected to listen on `port`.
    pub fn start_with(port: u16, store: &str, args: &[&str]) -> Controller {
        Self::spawn(port, store, args, None)
    }

    /// Like [`Controller::start_with`], logging at `info` to `log` (appended).
    pub fn start_logged(port: u16, store: &str, args: &[&str], log: &Path) -> Controller {
        Self::spawn(port, store, args, Some(log))
    }

    fn spawn(port: u16, store: &str, args: &[&str], log: Option<&Path>) -> Controller {
        let (level, stderr) = match log {
            Some(path) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("controller log");
                ("info,memory=debug", Stdio::from(f))
            }
            None => ("warn", Stdio::inherit()),
        };
        let child = Command::new(bin("musubi-controller"))
            .args(args)
            .env("MUSUBI_LOG", level)
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start musubi-controller");
        assert!(wait_for_port(port, Duration::from_secs(20)), "the controller did not listen on {port}");
        Controller { child: Reaped(child), port, store: store.to_string() }
    }

    /// SIGTERM, then the exit code if it stops within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let pid = self.child.0.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        self.child.wait_exit(limit)
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill_hard(&mut self) {
        self.child.kill_hard();
    }
}

/// The text of a file under topologies/.
pub fn topology(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies").join(name)).expect("topology")
}

/// A PKI directory made by `musubi-controller init`.
#[derive(Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn init(dir: &Path) -> Pki {
        let out = Command::new(bin("musubi-controller"))
            .args(["init", "--pki"])
            .arg(dir)
            .output()
            .expect("musubi-controller init");
        assert!(out.status.success(), "init failed: {}", String::from_utf8_lossy(&out.stderr));
        // The root's key goes offline, as the ceremony says: nothing a
        // test runs may need it (replicas sign with the issuing CA).
        let offline = dir.join("offline-root");
        std::fs::create_dir_all(&offline).expect("offline dir");
        std::fs::rename(dir.join("ca-key.pem"), offline.join("ca-key.pem")).expect("the root key moved offline");
        Pki { dir: dir.to_path_buf() }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("admin.pem")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("admin-key.pem")
    }

    /// `musubi ARGS…` as the admin operator against `controller` (host:port).
    pub fn musubi(&self, controller: &str, args: &[&str]) -> std::process::Output {
        Command::new(bin("musubi"))
            .args(args)
            .env("MUSUBI_CONTROLLER", controller)
            .env("MUSUBI_CA", self.ca())
            .env("MUSUBI_CERT", self.cert())
            .env("MUSUBI_KEY", self.key())
            .output()
            .expect("run musubi")
    }

    /// A join token for `site`, valid for `ttl` (e.g. `1h`).
    pub fn token(&self, controller: &str, site: &str, ttl: &str) -> String {
        let out = self.musubi(controller, &["token", "create", "--site", site, "--ttl", ttl]);
        assert!(out.status.success(), "token create: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `musubi status --json`, parsed.
    pub fn status(&self, controller: &str) -> serde_json::Value {
        let out = self.musubi(controller, &["status", "--json"]);
        assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }
}

/// One site's row of `musubi status --json`.
pub fn site_row<'a>(status: &'a serde_json::Value, site: &str) -> &'a serde_json::Value {
    status["sites"].as_array().and_then(|v| v.iter().find(|s| s["site"] == site)).expect("site in status")
}

/// A number in a status row's reported status (proto3 JSON writes 64-bit
/// numbers as strings and leaves zeros out).
pub fn reported(row: &serde_json::Value, field: &str) -> u64 {
    number(&row["reported"]["status"][field])
}

/// A 64-bit number as proto3 JSON writes it (a string; absent when zero).
pub fn number(v: &serde_json::Value) -> u64 {
    v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(0)
}

/// Connected, and the applied configuration is the desired one.
pub fn in_sync(row: &serde_json::Value) -> bool {
    row["connected"] == true
        && row["desired_digest"].as_str().is_some_and(|d| !d.is_empty())
        && row["reported"]["status"]["applied_digest"] == row["desired_digest"]
}

/// A `musubi-agent run` process; killed when dropped.
#[derive(Debug)]
pub struct AgentProcess {
    child: Reaped,
    pub log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent of `site` with state in `state`; `token` enrols it.
    pub fn start(site: &str, controller: &str, state: &Path, token: Option<&str>, ca: &Path) -> AgentProcess {
        Self::start_with(site, controller, state, token, ca, &[])
    }

    /// [`AgentProcess::start`] with more arguments to `musubi-agent run`.
    pub fn start_with(
        site: &str,
        controller: &str,
        state: &Path,
        token: Option<&str>,
        ca: &Path,
        extra: &[&str],
    ) -> AgentProcess {
        std::fs::create_dir_all(state).expect("state dir");
        let log = state.with_extension("log");
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("agent log");
        let mut cmd = Command::new(bin("musubi-agent"));
        cmd.args(["run", "--datapath", "fake", "--site", site, "--controller", controller, "--state"])
            .arg(state)
            .arg("--ca")
            .arg(ca);
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        cmd.args(extra);
        let child = cmd
            .env("MUSUBI_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::from(f))
            .spawn()
            .expect("start musubi-agent");
        AgentProcess { child: Reaped(child), log }
    }

    /// The exit code if it exits within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        self.child.wait_exit(limit)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kill_hard(&mut self) {
        self.child.kill_hard();
    }
}

/// `limit` times `TEST_TIME_SCALE` (1 unless set): the kernel lab's guest
/// runs the same tests under software emulation, many times slower than
/// this host, and scales the limits that assume this host's speed.
pub fn scaled(limit: Duration) -> Duration {
    let scale = std::env::var("TEST_TIME_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1);
    limit * scale
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` from `127.0.0.1:port` (HTTP/1.0): the body, or `None` if the
/// server does not answer 200. Bounded: 2 s to connect, 5 s to read.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.split_whitespace().nth(1).is_some_and(|c| c == "200").then(|| body.to_string())
}
