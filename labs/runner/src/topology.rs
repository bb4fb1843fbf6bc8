//! The containerlab topology file (`.clab.yml`): the parts Musubi reads.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(crate) struct Clab {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) mgmt: Option<Mgmt>,
    pub(crate) topology: Topology,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Mgmt {
    #[serde(rename = "ipv4-subnet")]
    pub(crate) ipv4_subnet: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Topology {
    pub(crate) nodes: BTreeMap<String, Node>,
    #[serde(default)]
    pub(crate) links: Vec<Link>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Node {
    #[serde(default)]
    #[allow(dead_code)]
    pub(crate) kind: String,
    #[serde(default)]
    pub(crate) exec: Vec<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(rename = "mgmt-ipv4")]
    pub(crate) mgmt_ipv4: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Link {
    pub(crate) endpoints: Vec<String>,
}

impl Clab {
    /// The node labelled `musubi.role: controller`.
    pub(crate) fn controller(&self) -> Result<(&String, &Node)> {
        self.topology
            .nodes
            .iter()
            .find(|(_, n)| n.role() == "controller")
            .context("the topology has no node labelled musubi.role: controller")
    }

    /// The site whose router `node` is (`musubi.role: router`, `musubi.site`).
    pub(crate) fn router_site(&self, node: &str) -> Option<&String> {
        self.topology.nodes.get(node).filter(|n| n.role() == "router").and_then(|n| n.labels.get("musubi.site"))
    }
}

impl Node {
    pub(crate) fn role(&self) -> &str {
        self.labels.get("musubi.role").map(String::as_str).unwrap_or("host")
    }
}

pub(crate) fn read_topology(path: &Path) -> Result<Clab> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let clab: Clab =
        yaml_serde::from_str(&text).with_context(|| format!("{} is not a containerlab topology", path.display()))?;
    Ok(clab)
}
