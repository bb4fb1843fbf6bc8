//! Network namespaces for tests that need root: nodes joined by veth pairs,
//! each router with its own mount namespace (so its `/var/run/wireguard/`
//! is its own), everything removed when the [`Net`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Whether this process may create namespaces (the tests that need it are
/// skipped, loudly, otherwise).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

/// True (after saying so) when the tests that need root must be skipped.
pub fn skip_without_root() -> bool {
    let skip = !is_root();
    if skip {
        eprintln!("skipped: needs root for network namespaces");
    }
    skip
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn sh_ok(script: &str) {
    let out = run(Command::new("sh").args(["-c", script]));
    assert!(out.status.success(), "`{script}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A set of namespaces named `<prefix>-<node>`.
#[derive(Debug)]
pub struct Net {
    prefix: String,
    nodes: Vec<String>,
    /// Mount-namespace files of the routers, under a private bind mount.
    mounts: PathBuf,
    routers: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Net {
    pub fn new(tag: &str) -> Net {
        let dir = tempfile::tempdir().expect("tmp");
        let prefix = format!("{tag}{}", std::process::id() % 100_000);
        let mounts = dir.path().join("mnt");
        std::fs::create_dir_all(&mounts).expect("mnt dir");
        std::fs::create_dir_all("/var/run/wireguard").expect("/var/run/wireguard");
        let m = mounts.display();
        sh_ok(&format!("mount --bind {m} {m} && mount --make-private {m}"));
        Net { prefix, nodes: Vec::new(), mounts, routers: Vec::new(), _dir: dir }
    }

    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// A plain node (a LAN host, the underlay switch).
    pub fn host(&mut self, node: &str) {
        sh_ok(&format!("ip netns add {0} && ip -n {0} link set lo up", self.ns(node)));
        self.nodes.push(node.to_string());
    }

    /// A router: a network namespace and a mount namespace with its own
    /// tmpfs on `/var/run/wireguard`.
    pub fn router(&mut self, node: &str) {
        self.host(node);
        let file = self.mounts.join(node);
        std::fs::write(&file, b"").expect("mount ns file");
        sh_ok(&format!(
            "unshare --mount={} --propagation private sh -c 'mount -t tmpfs tmpfs /var/run/wireguard'",
            file.display()
        ));
        self.routers.push(node.to_string());
    }

    /// A command line run in `node` (a router: in its mount namespace too).
    pub fn command(&self, node: &str, program: &Path) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(node)));
        if self.routers.iter().any(|r| r == node) {
            cmd.arg(format!("--mount={}", self.mounts.join(node).display()));
        }
        cmd.arg("--").arg(program);
        cmd
    }

    /// `sh -c script` in `node`.
    pub fn sh(&self, node: &str, script: &str) -> Output {
        let mut cmd = self.command(node, Path::new("/bin/sh"));
        cmd.args(["-c", script]);
        run(&mut cmd)
    }

    /// `sh -c script` in `node`, which must succeed; its standard output.
    pub fn ok(&self, node: &str, script: &str) -> String {
        let out = self.sh(node, script);
        assert!(
            out.status.success(),
            "in {node}: `{script}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// A veth pair between `a:a_if` and `b:b_if`, both up.
    pub fn link(&self, a: &str, a_if: &str, b: &str, b_if: &str) {
        let (na, nb) = (self.ns(a), self.ns(b));
        sh_ok(&format!(
            "ip link add {a_if} netns {na} type veth peer name {b_if} netns {nb} && \
             ip -n {na} link set {a_if} up && ip -n {nb} link set {b_if} up"
        ));
    }

    /// Every namespace this set made that still exists.
    pub fn remaining(&self) -> Vec<String> {
        let out = run(Command::new("ip").args(["netns", "list"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .map(String::from)
            .collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &self.nodes {
            let ns = self.ns(node);
            // Processes left in the namespace (wireguard-go, agents) first.
            let _ = Command::new("sh").args(["-c", &format!("ip netns pids {ns} | xargs -r kill -9")]).status();
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        for r in &self.routers {
            let _ = Command::new("umount").arg(self.mounts.join(r)).status();
        }
        let _ = Command::new("umount").arg(&self.mounts).status();
    }
}
