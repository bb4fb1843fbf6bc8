//! The datapath seam: what the agent owns on the router, as plain data.
//!
//! The reconciler works in three steps: **observe** the objects the agent
//! owns ([`Datapath::observe`]), compute a **plan** — the operations from
//! what is there to what is wanted ([`plan`], pure) — and **apply** it in a
//! safe order ([`Datapath::apply`]). Applying the same configuration twice
//! plans nothing and writes nothing.
//!
//! [`fake`] keeps the objects in memory (optionally persisted to a file, as
//! a kernel keeps them across agent restarts) and refuses every illegal
//! operation; the Linux datapath implements the same trait.

pub mod fake;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A segment's routing domain (a VRF, or a routing table in table mode).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Domain {
    pub name: String,
    pub table: u32,
}

/// A WireGuard interface in a domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunnel {
    pub name: String,
    pub domain: String,
    pub listen_port: u32,
    /// Where the private key is (it never leaves the site, nor this file's directory).
    pub key_file: PathBuf,
    pub addresses: BTreeSet<String>,
    /// Peers by public key.
    pub peers: BTreeMap<String, PeerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerSpec {
    pub name: String,
    /// `address:port` of the active endpoint.
    pub endpoint: String,
    pub allowed_ips: BTreeSet<String>,
}

/// A route in a segment's table through one of its tunnels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    pub table: u32,
    pub prefix: String,
    pub interface: String,
}

/// Everything the agent owns on a router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub domains: BTreeMap<String, Domain>,
    pub tunnels: BTreeMap<String, Tunnel>,
    pub routes: BTreeSet<Route>,
}

/// One write to the datapath.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    DeleteRoute(Route),
    RemovePeer { tunnel: String, public_key: String },
    RemoveAddress { tunnel: String, address: String },
    DeleteTunnel { name: String },
    DeleteDomain { name: String },
    CreateDomain(Domain),
    CreateTunnel { name: String, domain: String, listen_port: u32, key_file: PathBuf },
    AddAddress { tunnel: String, address: String },
    SetPeer { tunnel: String, public_key: String, peer: PeerSpec },
    AddRoute(Route),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatapathError {
    #[error("illegal operation {op}: {reason}")]
    Illegal { op: String, reason: String },
    #[error("{0}")]
    Io(String),
}

pub trait Datapath: Send {
    /// What the agent owns now.
    fn observe(&mut self) -> Result<Owned, DatapathError>;
    /// Applies operations in order; stops at the first failure.
    fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError>;
    /// Writes made since start (for tests and status).
    fn writes(&self) -> u64;
}

/// The operations that turn `actual` into `desired`, in a safe order:
/// routes, peers and addresses go before the tunnels that carry them,
/// tunnels before their domains; creation in the opposite order. A tunnel
/// whose domain, port or key changes is recreated.
pub fn plan(actual: &Owned, desired: &Owned) -> Vec<Op> {
    let mut removals = Vec::new();
    let mut creations = Vec::new();
    for r in actual.routes.difference(&desired.routes) {
        removals.push(Op::DeleteRoute(r.clone()));
    }
    let recreate = |a: &Tunnel, d: &Tunnel| {
        a.domain != d.domain
            || a.listen_port != d.listen_port
            || a.key_file != d.key_file
            || actual.domains.get(&a.domain) != desired.domains.get(&d.domain)
    };
    let mut dead_tunnels = Vec::new();
    for (name, a) in &actual.tunnels {
        match desired.tunnels.get(name) {
            Some(d) if !recreate(a, d) => {
                for (key, _) in a.peers.iter().filter(|(k, _)| !d.peers.contains_key(*k)) {
                    removals.push(Op::RemovePeer { tunnel: name.clone(), public_key: key.clone() });
                }
                for addr in a.addresses.difference(&d.addresses) {
                    removals.push(Op::RemoveAddress { tunnel: name.clone(), address: addr.clone() });
                }
            }
            _ => dead_tunnels.push(name.clone()),
        }
    }
    for name in &dead_tunnels {
        removals.push(Op::DeleteTunnel { name: name.clone() });
    }
    for (name, a) in &actual.domains {
        if desired.domains.get(name) != Some(a) {
            removals.push(Op::DeleteDomain { name: name.clone() });
        }
    }
    for (name, d) in &desired.domains {
        if actual.domains.get(name) != Some(d) {
            creations.push(Op::CreateDomain(d.clone()));
        }
    }
    for (name, d) in &desired.tunnels {
        let existing = actual.tunnels.get(name).filter(|_| !dead_tunnels.contains(name));
        if existing.is_none() {
            creations.push(Op::CreateTunnel {
                name: name.clone(),
                domain: d.domain.clone(),
                listen_port: d.listen_port,
                key_file: d.key_file.clone(),
            });
        }
        for addr in &d.addresses {
            if existing.is_none_or(|a| !a.addresses.contains(addr)) {
                creations.push(Op::AddAddress { tunnel: name.clone(), address: addr.clone() });
            }
        }
        for (key, peer) in &d.peers {
            if existing.is_none_or(|a| a.peers.get(key) != Some(peer)) {
                creations.push(Op::SetPeer { tunnel: name.clone(), public_key: key.clone(), peer: peer.clone() });
            }
        }
    }
    // A route survives only if its tunnel did.
    for r in &desired.routes {
        if !actual.routes.contains(r) || dead_tunnels.contains(&r.interface) {
            creations.push(Op::AddRoute(r.clone()));
        }
    }
    // Routes through a tunnel that is deleted go with it.
    removals.retain(|op| match op {
        Op::DeleteRoute(r) => !dead_tunnels.contains(&r.interface),
        Op::RemovePeer { tunnel, .. } | Op::RemoveAddress { tunnel, .. } => !dead_tunnels.contains(tunnel),
        _ => true,
    });
    removals.extend(creations);
    removals
}

/// The state after applying `ops` to `owned`, or the first illegal operation.
/// Shared by the fake datapath and the tests of [`plan`].
pub fn step(owned: &mut Owned, op: &Op) -> Result<(), DatapathError> {
    let illegal = |reason: String| Err(DatapathError::Illegal { op: format!("{op:?}"), reason });
    match op {
        Op::CreateDomain(d) => {
            if owned.domains.contains_key(&d.name) {
                return illegal(format!("domain {} exists", d.name));
            }
            if let Some(other) = owned.domains.values().find(|o| o.table == d.table) {
                return illegal(format!("table {} is used by {}", d.table, other.name));
            }
            owned.domains.insert(d.name.clone(), d.clone());
        }
        Op::DeleteDomain { name } => {
            if let Some(t) = owned.tunnels.values().find(|t| t.domain == *name) {
                return illegal(format!("tunnel {} is still in domain {name}", t.name));
            }
            if owned.domains.remove(name).is_none() {
                return illegal(format!("no domain {name}"));
            }
        }
        Op::CreateTunnel { name, domain, listen_port, key_file } => {
            if owned.tunnels.contains_key(name) {
                return illegal(format!("tunnel {name} exists"));
            }
            if !owned.domains.contains_key(domain) {
                return illegal(format!("no domain {domain} to put {name} in"));
            }
            if owned.tunnels.values().any(|t| t.listen_port == *listen_port) {
                return illegal(format!("port {listen_port} is in use"));
            }
            owned.tunnels.insert(
                name.clone(),
                Tunnel {
                    name: name.clone(),
                    domain: domain.clone(),
                    listen_port: *listen_port,
                    key_file: key_file.clone(),
                    addresses: BTreeSet::new(),
                    peers: BTreeMap::new(),
                },
            );
        }
        Op::DeleteTunnel { name } => {
            if owned.tunnels.remove(name).is_none() {
                return illegal(format!("no tunnel {name}"));
            }
            owned.routes.retain(|r| r.interface != *name);
        }
        Op::AddAddress { tunnel, address } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            if !t.addresses.insert(address.clone()) {
                return illegal(format!("{address} is already on {tunnel}"));
            }
        }
        Op::RemoveAddress { tunnel, address } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            if !t.addresses.remove(address) {
                return illegal(format!("{address} is not on {tunnel}"));
            }
        }
        Op::SetPeer { tunnel, public_key, peer } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            t.peers.insert(public_key.clone(), peer.clone());
        }
        Op::RemovePeer { tunnel, public_key } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            if t.peers.remove(public_key).is_none() {
                return illegal(format!("no peer {public_key} on {tunnel}"));
            }
        }
        Op::AddRoute(r) => {
            let Some(t) = owned.tunnels.get(&r.interface) else {
                return illegal(format!("no tunnel {} to route through", r.interface));
            };
            if owned.domains.get(&t.domain).is_none_or(|d| d.table != r.table) {
                return illegal(format!("{} is not in table {}", r.interface, r.table));
            }
            if !owned.routes.insert(r.clone()) {
                return illegal(format!("route {} exists", r.prefix));
            }
        }
        Op::DeleteRoute(r) => {
            if !owned.routes.remove(r) {
                return illegal(format!("no route {} in table {}", r.prefix, r.table));
            }
        }
    }
    Ok(())
}
