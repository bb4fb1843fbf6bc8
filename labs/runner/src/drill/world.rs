//! What a drill knows of the lab: its nodes, the routers' sites and
//! lines, the LAN hosts, read once from the topology, the intent and the
//! nodes' interfaces; and the check that a drill names only what exists.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};

use super::file::{Drill, Flap, Restore, SiteLine, Step};
use crate::lab::Lab;

/// What the drill knows of the lab: nodes, sites, lines and their interfaces.
/// What the drill knows of the lab: nodes, sites, lines and their interfaces.
pub(super) struct World {
    pub(super) lab: Lab,
    pub(super) controller: String,
    pub(super) controller_ip: String,
    /// Router node by site, and site by router node.
    pub(super) router: BTreeMap<String, String>,
    /// Host node → (site, segment, IPv4 address).
    pub(super) hosts: BTreeMap<String, (String, String, Ipv4Addr)>,
    /// (site, line) → the router's interface holding the line's address.
    pub(super) line_if: BTreeMap<(String, String), String>,
    /// (site, line) → the carrier's end of the line: (node, interface).
    pub(super) line_far: BTreeMap<(String, String), (String, String)>,
    /// Each site's lines, best first.
    pub(super) lines: BTreeMap<String, Vec<String>>,
    /// Each site's region access point, and every access point's line addresses.
    pub(super) home_ap: BTreeMap<String, String>,
    pub(super) ap_addresses: BTreeMap<String, Vec<IpAddr>>,
}

fn interfaces(lab: &Lab, node: &str) -> Result<Vec<(String, IpAddr)>> {
    let out = lab.sh(node, "ip -o addr show")?;
    let mut found = Vec::new();
    for line in out.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(at)) = (words.get(1), words.iter().position(|w| *w == "inet" || *w == "inet6")) else {
            continue;
        };
        let Some(addr) = words.get(at + 1).and_then(|a| a.split('/').next()).and_then(|a| a.parse().ok()) else {
            continue;
        };
        found.push((name.split('@').next().unwrap_or(name).to_string(), addr));
    }
    Ok(found)
}

pub(super) fn world(lab: Lab) -> Result<World> {
    let clab = lab.topology()?;
    let (controller, ctl) = clab.controller()?;
    let controller_ip = ctl.mgmt_ipv4.clone().context("the controller has no mgmt-ipv4")?;
    let parsed = musubi_core::load::load(&[lab.dir.join("intent.yaml")])?;
    let intent = &parsed.intent;
    let mut w = World {
        controller: controller.clone(),
        controller_ip,
        router: BTreeMap::new(),
        hosts: BTreeMap::new(),
        line_if: BTreeMap::new(),
        line_far: BTreeMap::new(),
        lines: BTreeMap::new(),
        home_ap: BTreeMap::new(),
        ap_addresses: BTreeMap::new(),
        lab,
    };
    for (name, node) in &clab.topology.nodes {
        match node.role() {
            "router" => {
                let Some(site) = node.labels.get("musubi.site") else { continue };
                let Some(s) = intent.sites.get(site) else { continue };
                w.router.insert(site.clone(), name.clone());
                let held = interfaces(&w.lab, name)?;
                let mut lines: Vec<_> = s.lines.iter().collect();
                lines.sort_by_key(|l| l.priority);
                for l in &lines {
                    if let Some((ifname, _)) = held.iter().find(|(_, a)| *a == l.address) {
                        w.line_if.insert((site.clone(), l.name.clone()), ifname.clone());
                        if let Some(far) = far_end(&clab, name, ifname) {
                            w.line_far.insert((site.clone(), l.name.clone()), far);
                        }
                    }
                }
                w.lines.insert(site.clone(), lines.iter().map(|l| l.name.clone()).collect());
            }
            "host" => {
                let (Some(site), Some(seg)) = (node.labels.get("musubi.site"), node.labels.get("musubi.segment"))
                else {
                    continue;
                };
                let address = interfaces(&w.lab, name)?
                    .into_iter()
                    .find_map(|(i, a)| match a {
                        IpAddr::V4(v4) if i == "eth1" => Some(v4),
                        _ => None,
                    })
                    .with_context(|| format!("host {name} has no IPv4 address on eth1"))?;
                w.hosts.insert(name.clone(), (site.clone(), seg.clone(), address));
            }
            _ => {}
        }
    }
    for s in intent.sites.values() {
        if s.is_access_point() {
            w.ap_addresses.insert(s.name.clone(), s.lines.iter().map(|l| l.address).collect());
        }
    }
    for s in intent.sites.values().filter(|s| !s.is_access_point()) {
        if let Some(ap) = intent.sites.values().find(|a| a.is_access_point() && a.region == s.region) {
            w.home_ap.insert(s.name.clone(), ap.name.clone());
        }
    }
    Ok(w)
}

impl World {
    /// The lab node that is `site`'s router.
    pub(super) fn router_of(&self, site: &str) -> Result<String> {
        self.router.get(site).cloned().with_context(|| format!("no router in the lab is site `{site}`"))
    }

    /// Where a cut of `site`'s `line` is made: at the carrier's end of it
    /// (the router's own interface when the line ends nowhere else). A
    /// line fails in the carrier's network, not in the router; and in the
    /// lab the black hole's nft transaction, made in the router's own
    /// namespace, held that namespace's nftables lock while the kernel
    /// waited for RCU at the process's exit — the router's failover wrote
    /// its fence through nft behind it (1.3 s on a loaded machine).
    pub(super) fn cut_point(&self, site: &str, line: &str) -> Result<(String, String)> {
        match self.line_far.get(&(site.to_string(), line.to_string())) {
            Some(far) => Ok(far.clone()),
            None => self.line(site, line),
        }
    }

    pub(super) fn line(&self, site: &str, line: &str) -> Result<(String, String)> {
        let router = self.router.get(site).with_context(|| format!("no router in the lab is site `{site}`"))?;
        let ifname = self
            .line_if
            .get(&(site.to_string(), line.to_string()))
            .with_context(|| format!("site `{site}` has no line `{line}` on its router `{router}`"))?;
        Ok((router.clone(), ifname.clone()))
    }

    fn node(&self, node: &str) -> Result<()> {
        let clab = self.lab.topology()?;
        if clab.topology.nodes.contains_key(node) {
            Ok(())
        } else {
            bail!("lab {} has no node `{node}`", self.lab.name)
        }
    }

    /// Checks every name a drill uses before anything is touched.
    pub(super) fn validate(&self, d: &Drill) -> Result<()> {
        for s in &d.streams {
            for h in [&s.from, &s.to] {
                if !self.hosts.contains_key(h) {
                    bail!("stream {} → {}: `{h}` is not a LAN host of lab {}", s.from, s.to, self.lab.name);
                }
            }
        }
        for st in &d.steps {
            match st {
                Step::Cut(SiteLine { site, line })
                | Step::Flap(Flap { site, line, .. })
                | Step::Restore(Restore::Line(SiteLine { site, line })) => {
                    self.line(site, line)?;
                }
                Step::Stop(n) | Step::Partition(n) | Step::Restore(Restore::Node(n)) | Step::Agent(n) => {
                    self.node(n)?
                }
                Step::Exec(super::file::NodeCommand { node, .. }) => self.node(node)?,
                Step::RotateKeys(site) | Step::RevokeKeys(site) => {
                    self.router_of(site)?;
                }
                Step::Expect(super::file::Expectation::Forwarded(f)) => {
                    for site in &f.sites {
                        self.router_of(site)?;
                    }
                    if f.max.is_some_and(|max| max < f.min) {
                        bail!("expect forwarded: max {} is below min {}", f.max.unwrap_or_default(), f.min);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The other end of `node`'s interface `ifname` in the topology's links.
fn far_end(clab: &crate::topology::Clab, node: &str, ifname: &str) -> Option<(String, String)> {
    let me = format!("{node}:{ifname}");
    clab.topology.links.iter().find_map(|l| match l.endpoints.as_slice() {
        [a, b] if *a == me => b.split_once(':').map(|(n, i)| (n.to_string(), i.to_string())),
        [a, b] if *b == me => a.split_once(':').map(|(n, i)| (n.to_string(), i.to_string())),
        _ => None,
    })
}
