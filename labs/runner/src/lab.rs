//! A lab's names and paths, and commands run in its nodes.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::topology::{Clab, read_topology};
use crate::{PORT, ROOT};

pub(crate) fn root() -> PathBuf {
    std::env::var_os("MUSUBI_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(ROOT))
}

/// A lab's names and paths.
pub(crate) struct Lab {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
}

impl Lab {
    pub(crate) fn new(name: &str) -> Lab {
        Lab { name: name.to_string(), dir: root().join(name) }
    }

    /// The one running lab, or the named one.
    pub(crate) fn find(name: Option<String>) -> Result<Lab> {
        if let Some(n) = name {
            return Ok(Lab::new(&n));
        }
        let running: Vec<String> = std::fs::read_dir(root())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        match running.as_slice() {
            [one] => Ok(Lab::new(one)),
            [] => bail!("no lab is running (under {})", root().display()),
            many => bail!("several labs are running ({}): name one", many.join(", ")),
        }
    }

    pub(crate) fn ns(&self, node: &str) -> String {
        format!("ml-{}-{node}", self.name)
    }
    pub(crate) fn mnt(&self, node: &str) -> PathBuf {
        self.dir.join("mnt").join(node)
    }
    pub(crate) fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    pub(crate) fn topology(&self) -> Result<Clab> {
        read_topology(&self.dir.join("topology.clab.yml"))
    }

    /// A command run inside `node` (its network namespace, and its mount
    /// namespace when it has one).
    pub(crate) fn command(&self, node: &str, program: &str) -> Command {
        let mounts = self.mnt(node);
        crate::netns::command(&self.ns(node), mounts.exists().then_some(mounts.as_path()), program)
    }

    pub(crate) fn sh(&self, node: &str, script: &str) -> Result<String> {
        let out = self.command(node, "/bin/sh").args(["-c", script]).output().context("nsenter")?;
        if !out.status.success() {
            bail!("in {node}: `{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The operator CLI, run in the controller's namespace against it.
    pub(crate) fn musubi(&self, controller: &str) -> Command {
        let pki = self.dir.join("pki");
        let mut cmd = self.command(controller, &sibling("musubi").display().to_string());
        cmd.arg("--controller")
            .arg(format!("127.0.0.1:{PORT}"))
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("admin.pem"))
            .arg("--key")
            .arg(pki.join("admin-key.pem"));
        cmd
    }

    /// Starts a long-running process in `node`, detached from this one, its
    /// output appended to its log in the node's directory and its PID recorded for `down`.
    pub(crate) fn spawn(&self, node: &str, what: &str, mut cmd: Command) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(self.node_dir(node))?;
        // Appended to: a restarted agent's log follows its predecessor's,
        // so a drill's whole story stays (a lab's directory goes at `down`).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.node_dir(node).join(format!("{what}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what} in {node}"))?;
        std::fs::create_dir_all(self.dir.join("pids"))?;
        std::fs::write(self.dir.join("pids").join(format!("{node}.{what}")), child.id().to_string())?;
        Ok(child.id())
    }
}

/// A binary installed next to this one.
pub(crate) fn sibling(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name))).unwrap_or_else(|| name.into())
}

pub(crate) use crate::netns::{ip, run};
