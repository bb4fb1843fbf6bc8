//! Network namespaces for tests that need root: nodes joined by veth pairs,
//! each router with its own mount namespace (so its `/var/run/wireguard/`
//! is its own), everything removed when the [`Net`] is dropped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use musubi_lab::netns;
pub use musubi_lab::netns::is_root;

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
        netns::private_mounts(&mounts).expect("private mounts");
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
        netns::add(&self.ns(node)).expect("network namespace");
        self.nodes.push(node.to_string());
    }

    /// A router: a network namespace and a mount namespace with its own
    /// tmpfs on `/var/run/wireguard`.
    pub fn router(&mut self, node: &str) {
        self.host(node);
        netns::own_mounts(&self.mounts.join(node)).expect("mount namespace");
        self.routers.push(node.to_string());
    }

    /// A command line run in `node` (a router: in its mount namespace too).
    pub fn command(&self, node: &str, program: &Path) -> Command {
        let mounts = self.mounts.join(node);
        let router = self.routers.iter().any(|r| r == node);
        netns::command(&self.ns(node), router.then_some(mounts.as_path()), program)
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
        netns::veth(&self.ns(a), a_if, &self.ns(b), b_if).expect("veth pair");
    }

    /// Every namespace this set made that still exists.
    pub fn remaining(&self) -> Vec<String> {
        netns::list().into_iter().filter(|n| n.starts_with(&format!("{}-", self.prefix))).collect()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for node in &self.nodes {
            // Processes left in the namespace (wireguard-go, agents) go first.
            let _ = netns::remove(&self.ns(node));
        }
        for r in &self.routers {
            netns::unmount(&self.mounts.join(r));
        }
        netns::unmount(&self.mounts);
    }
}
