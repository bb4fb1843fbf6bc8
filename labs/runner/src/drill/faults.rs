//! Faults made the way they happen: a cut line is a black hole at the
//! carrier's end of it (nftables drops every frame on that port; the
//! router's link stays up),
//! a stopped node freezes and goes dark (its processes are killed when it
//! is restored), a partitioned node loses its management interface. Every fault can be mended, and the drill
//! mends them all at its end, whatever happened.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use musubi_process::session::{Ended, Line, Session};

use super::CUT_TABLE;
use super::world::World;
use crate::lab::Lab;
use crate::up::start_agent;

/// The black holes and stopped nodes of a drill under way, and the kept
/// `nft -i` of each node they were written through.
#[derive(Default)]
pub(super) struct Damage {
    pub(super) cut: BTreeMap<String, BTreeSet<String>>,
    pub(super) stopped: BTreeSet<String>,
    sessions: BTreeMap<String, Session>,
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

/// How long a black hole's write may take before the drill stops.
const WRITTEN_WITHIN: Duration = Duration::from_secs(10);

impl Damage {
    /// Makes `node`'s black holes exactly its cut interfaces: every frame
    /// in or out of each dropped at the device (netdev ingress and egress,
    /// so a carrier's bridge port and a router's own interface alike; a
    /// sender is not told, as over a line that died). One transaction,
    /// written to the node's kept `nft -i` and read back: a fault takes
    /// effect within a millisecond of its step even on a loaded machine,
    /// where an nft process of its own per step took up to 1.5 s to exit
    /// (see [`musubi_process::session`]) — a flap's 400 ms down became
    /// two seconds, and a site's second line went dark a second and a half
    /// before the drill knew it had cut it.
    fn sync(&mut self, lab: &Lab, node: &str) -> Result<()> {
        let want = self.cut.get(node).cloned().unwrap_or_default();
        let mut script =
            format!("add table netdev {CUT_TABLE}; delete table netdev {CUT_TABLE}; add table netdev {CUT_TABLE}");
        for (i, name) in want.iter().enumerate() {
            for (chain, hook) in [("in", "ingress"), ("out", "egress")] {
                write!(
                    script,
                    "; add chain netdev {CUT_TABLE} {chain}{i} {{ type filter hook {hook} device \"{name}\" priority -500; policy drop; }}"
                )?;
            }
        }
        writeln!(script, "\nlist table netdev {CUT_TABLE}")?;
        let session = match self.sessions.entry(node.to_string()) {
            std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let mut command = lab.command(node, "nft");
                command.arg("-i");
                v.insert(Session::start(command).with_context(|| format!("nft -i in {node}"))?)
            }
        };
        let written = (|| {
            session.send(&script).context("writing to nft -i")?;
            let deadline = std::time::Instant::now() + WRITTEN_WITHIN;
            let (mut devices, mut errors) = (BTreeSet::new(), Vec::new());
            loop {
                match session.next(deadline.saturating_duration_since(std::time::Instant::now())) {
                    Ok(Line::Out(line)) if line == "}" => break,
                    Ok(Line::Out(line)) => {
                        if let Some((_, rest)) = line.split_once("device \"")
                            && let Some((device, _)) = rest.split_once('"')
                        {
                            devices.insert(device.to_string());
                        }
                    }
                    Ok(Line::Err(line)) => errors.push(line),
                    Err(Ended::Silent) => bail!("no answer within {WRITTEN_WITHIN:?}"),
                    Err(Ended::Gone) => bail!("nft -i ended: {}", errors.join(" ")),
                }
            }
            if devices != want {
                bail!("black holes read {devices:?} after writing {want:?}: {}", errors.join(" "));
            }
            Ok(())
        })();
        if written.is_err() {
            self.sessions.remove(node);
        }
        written.with_context(|| format!("black holes in {node}"))
    }

    /// The processes of the drill's own `nft -i` in `node`.
    fn own_pids(&self, node: &str) -> Vec<String> {
        self.sessions.get(node).map(|s| s.pid().to_string()).into_iter().collect()
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
fn node_pids(w: &World, damage: &Damage, node: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "pids", &w.lab.ns(node)]).output().context("ip netns pids")?;
    let mut own = damage.own_pids(node);
    own.push(std::process::id().to_string());
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|p| !own.iter().any(|o| o == p))
        .map(String::from)
        .collect())
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
    for pid in node_pids(w, damage, node)? {
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
fn kill_frozen(w: &World, damage: &Damage, node: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + GONE_WITHIN;
    loop {
        let pids = node_pids(w, damage, node)?;
        if pids.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            bail!("{node}: processes {} still there {GONE_WITHIN:?} after being killed", pids.join(", "));
        }
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", pid]).stderr(Stdio::null()).status();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long the killed processes of a restored node may take to go.
const GONE_WITHIN: Duration = Duration::from_secs(10);

/// Mends every black hole of `node`; a stopped router gets its agent back
/// (which restores its last configuration, controller or not).
pub(super) fn restore_node(w: &World, damage: &mut Damage, node: &str) -> Result<()> {
    if damage.stopped.contains(node) {
        kill_frozen(w, damage, node)?;
    }
    damage.mend(&w.lab, node, None)?;
    if damage.stopped.remove(node)
        && let Some((site, _)) = w.router.iter().find(|(_, r)| *r == node)
    {
        start_agent(&w.lab, &w.controller, &w.controller_ip, node, site)?;
    }
    Ok(())
}
