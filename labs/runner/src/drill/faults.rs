//! Faults made the way they happen: a cut line is a black hole at the
//! carrier's end of it (nftables drops every frame on that port; the
//! router's link stays up),
//! a stopped node freezes and goes dark (its processes are killed when it
//! is restored), a partitioned node loses its management interface. Every fault can be mended, and the drill
//! mends them all at its end, whatever happened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::CUT_TABLE;
use super::world::World;
use crate::lab::Lab;
use crate::up::start_agent;

/// The black holes and stopped nodes of a drill under way.
#[derive(Default)]
pub(super) struct Damage {
    pub(super) cut: BTreeMap<String, BTreeSet<String>>,
    pub(super) stopped: BTreeSet<String>,
}

pub(super) fn nft(lab: &Lab, node: &str, script: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = lab.command(node, "nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("nft in {node}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Damage {
    /// Makes `node`'s black holes exactly its cut interfaces: every frame
    /// in or out of each dropped at the device (netdev ingress and egress,
    /// so a carrier's bridge port and a router's own interface alike; a
    /// sender is not told, as over a line that died).
    fn sync(&self, lab: &Lab, node: &str) -> Result<()> {
        let mut script = format!("add table netdev {CUT_TABLE}\ndelete table netdev {CUT_TABLE}\n");
        if let Some(set) = self.cut.get(node).filter(|s| !s.is_empty()) {
            writeln!(script, "table netdev {CUT_TABLE} {{")?;
            for (i, name) in set.iter().enumerate() {
                writeln!(
                    script,
                    "  chain in{i} {{ type filter hook ingress device \"{name}\" priority -500; policy drop; }}
  chain out{i} {{ type filter hook egress device \"{name}\" priority -500; policy drop; }}"
                )?;
            }
            writeln!(script, "}}")?;
        }
        nft(lab, node, &script)
    }

    pub(super) fn cut(&mut self, lab: &Lab, node: &str, ifname: &str) -> Result<()> {
        self.cut.entry(node.to_string()).or_default().insert(ifname.to_string());
        self.sync(lab, node)
    }

    pub(super) fn mend(&mut self, lab: &Lab, node: &str, ifname: Option<&str>) -> Result<()> {
        match ifname {
            Some(i) => {
                self.cut.entry(node.to_string()).or_default().remove(i);
            }
            None => {
                self.cut.remove(node);
            }
        }
        self.sync(lab, node)
    }

    /// Whether `site` has no line left (every line cut, or its router stopped).
    pub(super) fn isolated(&self, w: &World, site: &str) -> bool {
        let Some(router) = w.router.get(site) else { return false };
        if self.stopped.contains(router) {
            return true;
        }
        let lines = w.lines.get(site).map(Vec::as_slice).unwrap_or_default();
        !lines.is_empty()
            && lines.iter().all(|l| {
                w.cut_point(site, l).is_ok_and(|(node, i)| self.cut.get(&node).is_some_and(|c| c.contains(&i)))
            })
    }
}

/// The processes in `node`'s network namespace (the runner's own excluded).
fn node_pids(w: &World, node: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "pids", &w.lab.ns(node)]).output().context("ip netns pids")?;
    let me = std::process::id().to_string();
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().filter(|p| *p != me).map(String::from).collect())
}

/// Freezes every process of `node` and blacks out all its interfaces: from
/// outside, a router that died. Its processes are killed only when it is
/// restored. Killing them here made the lab's shared kernel unregister the
/// node's TUN devices in the middle of the measurement, under the host-wide
/// RTNL lock that every other router's route writes need (held 1–3 s on a
/// loaded machine, while it waits for RCU); a real router's death does not
/// touch its neighbours' kernels.
pub(super) fn stop_node(w: &World, damage: &mut Damage, node: &str) -> Result<()> {
    if node == w.controller {
        bail!("the controller cannot be stopped in a drill; `partition: {node}` cuts it off");
    }
    for pid in node_pids(w, node)? {
        let _ = Command::new("kill").args(["-STOP", &pid]).status();
    }
    let links = w.lab.sh(node, "ip -o link show")?;
    for name in links.lines().filter_map(|l| l.split(':').nth(1)).map(|n| n.trim().split('@').next().unwrap_or("")) {
        if !name.is_empty() && name != "lo" {
            damage.cut.entry(node.to_string()).or_default().insert(name.to_string());
        }
    }
    damage.sync(&w.lab, node)?;
    damage.stopped.insert(node.to_string());
    Ok(())
}

/// Kills the frozen processes of a stopped `node` and waits (at most
/// [`GONE_WITHIN`]) until none is left in its namespace, so that its
/// restarted agent finds its interfaces' names free.
fn kill_frozen(w: &World, node: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + GONE_WITHIN;
    loop {
        let pids = node_pids(w, node)?;
        if pids.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{node}: processes {} still there {GONE_WITHIN:?} after being killed", pids.join(", "));
        }
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", pid]).stderr(Stdio::null()).status();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How long the killed processes of a restored node may take to go.
const GONE_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Mends every black hole of `node`; a stopped router gets its agent back
/// (which restores its last configuration, controller or not).
pub(super) fn restore_node(w: &World, damage: &mut Damage, node: &str) -> Result<()> {
    if damage.stopped.contains(node) {
        kill_frozen(w, node)?;
    }
    damage.mend(&w.lab, node, None)?;
    if damage.stopped.remove(node)
        && let Some((site, _)) = w.router.iter().find(|(_, r)| *r == node)
    {
        start_agent(&w.lab, &w.controller, &w.controller_ip, node, site)?;
    }
    Ok(())
}
