//! Helpers for Musubi's end-to-end tests: the workspace's binaries, free
//! loopback ports, and a real etcd server started on them.

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
    pub fn cluster(n: usize) -> EtcdServer {
        let dir = tempfile::tempdir().expect("tmp");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> =
            ports.iter().enumerate().map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}")).collect();
        let mut members = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("etcd-{i}.log"))).expect("log");
            let child = Command::new("etcd")
                .args(["--name", &format!("m{i}"), "--data-dir"])
                .arg(dir.path().join(format!("data-{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args(["--initial-cluster", &initial.join(","), "--initial-cluster-state", "new"])
                // Large intents are committed in one transaction.
                .args(["--max-txn-ops", "100000", "--max-request-bytes", "67108864"])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("etcd is not installed: apt-get install etcd-server (scripts/test does it)");
            members.push(child);
        }
        for (client, _) in &ports {
            assert!(wait_for_port(*client, Duration::from_secs(20)), "etcd did not listen on {client}");
        }
        EtcdServer { members, ports: ports.iter().map(|(c, _)| *c).collect(), _dir: dir }
    }

    /// The first member's client address.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.ports[0])
    }

    /// Every member's client address.
    pub fn endpoints(&self) -> Vec<String> {
        self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect()
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

/// A `musubi-controller serve` process on a free port; killed when dropped.
#[derive(Debug)]
pub struct Controller {
    child: Child,
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
        let child = Command::new(bin("musubi-controller"))
            .args(args)
            .env("MUSUBI_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start musubi-controller");
        assert!(wait_for_port(port, Duration::from_secs(20)), "the controller did not listen on {port}");
        Controller { child, port, store: store.to_string() }
    }

    /// SIGTERM, then the exit code if it stops within `limit`.
    pub fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The text of a file under topologies/.
pub fn topology(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../topologies").join(name)).expect("topology")
}
