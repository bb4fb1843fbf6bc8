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
//! operation; [`linux`] builds them in the kernel (WireGuard, VRFs or
//! routing tables, rules, nftables).

/// A datapath write, or a failover's first step of writes, that takes
/// longer than this is logged as slow (a few milliseconds is usual; longer
/// means the router's kernel held the writes).
pub const SLOW: std::time::Duration = std::time::Duration::from_millis(100);

mod error;
pub mod fake;
pub mod linux;

pub use error::DatapathError;

/// Runs blocking datapath work (netlink round trips, `nft` and
/// `wireguard-go` subprocesses, UAPI) without holding up the agent's async
/// workers: on a multi-threaded runtime the calling worker hands its other
/// tasks to another thread first (the stream's keepalives, the probes'
/// notifications go on); elsewhere (a test, the simulator's single thread)
/// it just runs.
pub fn off_workers<T>(blocks: bool, work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if blocks && h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
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
    /// The interface's own public key: what identifies its private key.
    pub public_key: String,
    /// Where the private key is (it never leaves the site, nor this file's
    /// directory). Empty when observed: the kernel does not know the file.
    pub key_file: PathBuf,
    pub addresses: BTreeSet<String>,
    /// Peers by public key.
    pub peers: BTreeMap<String, PeerSpec>,
}

/// A peer's configuration. Its name is a label for logs and plans: the
/// kernel knows a peer by its key, so the name takes no part in comparisons.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerSpec {
    pub name: String,
    /// `address:port` of the active endpoint. Empty in a [`Op::SetPeer`]
    /// keeps the endpoint the peer has.
    pub endpoint: String,
    pub allowed_ips: BTreeSet<String>,
    /// The peer picks its own line: `endpoint` is where it starts, and
    /// afterwards WireGuard follows it to wherever its packets come from
    /// (an access point's member sites). Not part of comparisons.
    #[serde(default)]
    pub roams: bool,
}

impl PartialEq for PeerSpec {
    fn eq(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint && self.allowed_ips == other.allowed_ips
    }
}

/// Where the outer packets towards a peer's line leave: the interface of a
/// local line and, beyond the local subnet, the gateway.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hop {
    pub interface: String,
    pub gateway: Option<IpAddr>,
}

/// The hop of each underlay path: (local line address, peer line address).
pub type Hops = BTreeMap<(IpAddr, IpAddr), Hop>;

/// An underlay route the agent pins so that the outer packets to
/// `destination` (a peer's line address) leave on a local line, from its
/// address `source`.
///
/// A line the router picks (`follow` false) is pinned in the main table:
/// every packet to the peer's address leaves on it. A line the router
/// follows (`follow` true: an access point answering its member sites) is
/// pinned for packets *from* `source` only — a table of that line's, looked
/// up by a rule `from source` — and only where the main table would send
/// them out of another interface: the answers to a member that reached
/// this line's address leave on this line. Kernel WireGuard answers from
/// the address it was reached at only while the route from that address
/// leaves on the interface the packet came in by; otherwise it answers from
/// another line's address, which the member's fence drops (its tunnel never
/// comes up).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pin {
    pub destination: IpAddr,
    pub source: IpAddr,
    pub hop: Hop,
    pub follow: bool,
}
impl Eq for PeerSpec {}

/// A route in a segment's table out of one of the agent's tunnels or bound
/// LAN interfaces (a tunnel of another segment for a policy's import).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Route {
    pub table: u32,
    pub prefix: String,
    pub interface: String,
    /// A next hop on that interface (a migration gateway's route to its
    /// old network); empty: on the interface itself.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub via: String,
}

/// The flows allowed between segments, as one object: the nftables table the
/// agent owns is replaced whole (atomically) when it changes, and is
/// recognised by its digest — except its fence, the line addresses not in
/// use ([`PolicySpec::unused_lines`]), which lives in two sets of the table
/// and is rewritten alone when a line moves ([`Op::SetFence`]: a few
/// elements rather than the whole table through nft's JSON parser).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    /// SHA-256 of the specification without its fence, hex; what
    /// observation reads back.
    pub digest: String,
    /// The fence: what the table's sets hold.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub fence: BTreeSet<IpAddr>,
    /// What the table holds; absent when observed.
    pub spec: Option<PolicySpec>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.digest == other.digest && self.fence == other.fence
    }
}
impl Eq for Policy {}

impl Policy {
    pub fn new(mut spec: PolicySpec) -> Self {
        use sha2::Digest as _;
        // The digest is of the specification without its fence (an empty
        // set is not written): taken out while it is written, not copied.
        let fence = std::mem::take(&mut spec.unused_lines);
        let text = serde_json::to_vec(&spec).unwrap_or_default();
        spec.unused_lines = fence.clone();
        let digest = sha2::Sha256::digest(&text).iter().map(|b| format!("{b:02x}")).collect();
        Policy { digest, fence, spec: Some(spec) }
    }

    /// An observed policy: its digest and fence, no specification.
    pub fn observed(digest: String, fence: BTreeSet<IpAddr>) -> Self {
        Policy { digest, fence, spec: None }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySpec {
    /// Each segment's interfaces on this router (tunnel and LAN), by segment.
    pub segments: BTreeMap<String, BTreeSet<String>>,
    /// Flows allowed from one segment into another; everything else between
    /// segments (and between a segment and the underlay) is dropped.
    pub allow: Vec<Allow>,
    /// Where the agent picks the lines to its peers: the peers' line
    /// addresses that are not in use, and the tunnels' ports. Tunnel
    /// packets from those addresses are dropped, so a packet that was on its
    /// way over the old line cannot make WireGuard follow it back (roaming
    /// works both ways).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub unused_lines: BTreeSet<IpAddr>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub tunnel_ports: BTreeSet<u16>,
    /// By segment: its tunnels and the inner sources they may carry
    /// (anti-spoofing: a tunnel with one peer accepts every address from
    /// it, so the policy drops what no site of the segment or of a linked
    /// one has).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, Sources>,
    /// Interconnect tunnels: what came in over one never leaves over one
    /// (split horizon: no loop while the two access points disagree).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub interconnects: BTreeSet<String>,
}

/// A segment's tunnels and the inner sources they may carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sources {
    pub tunnels: BTreeSet<String>,
    /// No prefix inside another.
    pub prefixes: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allow {
    pub name: String,
    pub from_segment: String,
    pub to_segment: String,
    pub from_prefixes: Vec<String>,
    pub to_prefixes: Vec<String>,
    /// `tcp`, `udp`, `icmp` or `any`.
    pub protocol: String,
    /// Inclusive destination port ranges (tcp/udp); empty means every port.
    pub ports: Vec<(u16, u16)>,
}

/// Everything the agent owns on a router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub domains: BTreeMap<String, Domain>,
    pub tunnels: BTreeMap<String, Tunnel>,
    /// LAN interfaces bound to a domain (interface → domain). The interfaces
    /// and their addresses belong to the router's operator; the agent only
    /// binds them.
    #[serde(default)]
    pub lans: BTreeMap<String, String>,
    pub routes: BTreeSet<Route>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

/// One write to the datapath. `ReplaceRoute` routes a prefix in a table
/// through an interface whichever it went through before (one write, never
/// a moment without a route): a failover's route groups, written ahead of
/// the full build that checks. `SetFence` rewrites only the policy's fence
/// (the table with its rules must be there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    DeletePolicy,
    DeleteRoute(Route),
    RemovePeer {
        tunnel: String,
        public_key: String,
    },
    RemoveAddress {
        tunnel: String,
        address: String,
    },
    UnbindLan {
        interface: String,
        domain: String,
    },
    DeleteTunnel {
        name: String,
    },
    DeleteDomain {
        name: String,
    },
    CreateDomain(Domain),
    CreateTunnel {
        name: String,
        domain: String,
        listen_port: u32,
        public_key: String,
        key_file: PathBuf,
    },
    BindLan {
        interface: String,
        domain: String,
    },
    AddAddress {
        tunnel: String,
        address: String,
    },
    SetPeer {
        tunnel: String,
        public_key: String,
        peer: PeerSpec,
    },
    /// A new private key on an existing tunnel (a key rotation's switch):
    /// its peers, addresses and routes stay.
    SetKey {
        tunnel: String,
        public_key: String,
        key_file: PathBuf,
    },
    AddRoute(Route),
    ReplaceRoute(Route),
    SetPolicy(Policy),
    SetFence(BTreeSet<IpAddr>),
}

pub trait Datapath: Send {
    /// What the agent owns now.
    fn observe(&mut self) -> Result<Owned, DatapathError>;
    /// The operations from what the agent owns now to `desired`: [`plan`]
    /// over [`Datapath::observe`], unless the datapath knows a cheaper way to
    /// the same answer.
    fn diff(&mut self, desired: &Owned) -> Result<Vec<Op>, DatapathError> {
        Ok(plan(&self.observe()?, desired))
    }
    /// Applies operations in order; stops at the first failure.
    fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError>;
    /// Whether the next plans may take the policy as last read or written
    /// instead of reading it again (a failover's builds: the policy raises
    /// no notification, and reading it costs a process; the periodic upkeep
    /// does not trust it and puts back a policy changed under the agent).
    fn trust_policy(&mut self, _trusted: bool) {}
    /// Observes now what writes just changed, so that the next plan (a
    /// failover's, perhaps) need not: called after a configuration is
    /// applied, off any failover's path.
    fn prepare(&mut self) -> Result<(), DatapathError> {
        Ok(())
    }
    /// Writes made since start (for tests and status).
    fn writes(&self) -> u64;
    /// Whether calls wait on the kernel or other processes (see
    /// [`off_workers`]); an in-memory datapath does not.
    fn blocks(&self) -> bool {
        true
    }
    /// For each (local line address, peer line address): the hop the outer
    /// packets would take, when the router has a route to the peer's
    /// address out of the interface that holds the local one. A path left
    /// out cannot be used. A datapath without an underlay knows none.
    fn hops(&mut self, _paths: &[(IpAddr, IpAddr)]) -> Result<Hops, DatapathError> {
        Ok(Hops::new())
    }
    /// Starts writing the fence of a line switch before the pins and the
    /// endpoints, without waiting for it: the [`Op::SetFence`] of the same
    /// addresses that follows collects the answer instead of writing again.
    /// A datapath that writes nothing ahead ignores it.
    fn fence_ahead(&mut self, _fence: &BTreeSet<IpAddr>) {}
    /// Writes the pins of `pins` that the last [`Datapath::pin`] did not
    /// write, and nothing else: a line switch's outer packets leave over
    /// the new line at once, and the [`Datapath::pin`] of the full build that
    /// follows removes what is stale. A datapath that cannot tell does
    /// [`Datapath::pin`] whole.
    fn pin_ahead(&mut self, pins: &BTreeSet<Pin>) -> Result<(), DatapathError> {
        self.pin(pins).map(|_| ())
    }
    /// Makes the pinned underlay routes exactly `pins`; returns the
    /// destinations whose pin changed (was added, moved or removed).
    fn pin(&mut self, _pins: &BTreeSet<Pin>) -> Result<BTreeSet<IpAddr>, DatapathError> {
        Ok(BTreeSet::new())
    }
}

/// The operations that turn `actual` into `desired`, in a safe order:
/// routes, peers and addresses go before the tunnels that carry them,
/// tunnels before their domains; creation in the opposite order. A tunnel
/// whose domain, port or key changes is recreated.
/// `owned` after `ops` were applied, for the operations that raise no
/// netlink notification (WireGuard peers, the policy): true when every one
/// of them is such an operation and `owned` now says what the datapath
/// holds; false (and `owned` half-updated) otherwise.
pub fn shadow(owned: &mut Owned, ops: &[Op]) -> bool {
    for op in ops {
        match op {
            Op::SetPeer { tunnel, public_key, peer } => match owned.tunnels.get_mut(tunnel) {
                Some(t) => {
                    let mut peer = peer.clone();
                    // An empty endpoint keeps the one the peer has.
                    if peer.endpoint.is_empty() {
                        peer.endpoint = t.peers.get(public_key).map(|p| p.endpoint.clone()).unwrap_or_default();
                    }
                    t.peers.insert(public_key.clone(), peer);
                }
                None => return false,
            },
            Op::RemovePeer { tunnel, public_key } => match owned.tunnels.get_mut(tunnel) {
                Some(t) => {
                    t.peers.remove(public_key);
                }
                None => return false,
            },
            Op::SetKey { tunnel, public_key, .. } => match owned.tunnels.get_mut(tunnel) {
                Some(t) => t.public_key.clone_from(public_key),
                None => return false,
            },
            Op::SetPolicy(policy) => owned.policy = Some(policy.clone()),
            Op::SetFence(fence) => match owned.policy.as_mut() {
                Some(p) => p.fence = fence.clone(),
                None => return false,
            },
            Op::DeletePolicy => owned.policy = None,
            _ => return false,
        }
    }
    true
}

pub fn plan(actual: &Owned, desired: &Owned) -> Vec<Op> {
    let mut removals = Vec::new();
    let mut creations = Vec::new();
    for r in actual.routes.difference(&desired.routes) {
        removals.push(Op::DeleteRoute(r.clone()));
    }
    // A new key alone is set in place (a rotation loses no route).
    let recreate = |a: &Tunnel, d: &Tunnel| {
        a.domain != d.domain
            || a.listen_port != d.listen_port
            || actual.domains.get(&a.domain) != desired.domains.get(&d.domain)
    };
    if actual.policy.is_some() && desired.policy.is_none() {
        removals.push(Op::DeletePolicy);
    }
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
    // A LAN stays bound only to an unchanged domain.
    let domain_kept =
        |name: &String| actual.domains.contains_key(name) && actual.domains.get(name) == desired.domains.get(name);
    let mut unbound = Vec::new();
    for (lan, domain) in &actual.lans {
        if desired.lans.get(lan) != Some(domain) || !domain_kept(domain) {
            removals.push(Op::UnbindLan { interface: lan.clone(), domain: domain.clone() });
            unbound.push(lan.clone());
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
                public_key: d.public_key.clone(),
                key_file: d.key_file.clone(),
            });
        } else if existing.is_some_and(|a| a.public_key != d.public_key) {
            creations.push(Op::SetKey {
                tunnel: name.clone(),
                public_key: d.public_key.clone(),
                key_file: d.key_file.clone(),
            });
        }
        for addr in &d.addresses {
            if existing.is_none_or(|a| !a.addresses.contains(addr)) {
                creations.push(Op::AddAddress { tunnel: name.clone(), address: addr.clone() });
            }
        }
    }
    // The policy before the peers: when a peer's line changes, the tunnel
    // packets from its old line must be dropped (the policy's unused lines)
    // before the endpoint moves, or one still on its way over the old line
    // makes WireGuard roam back to it — and the other side, answering to
    // where that came from, is dropped by the new policy: a tunnel dead
    // until the agent next reads the peer's endpoint (35 s in a drill).
    if let Some(p) = &desired.policy
        && actual.policy.as_ref() != Some(p)
    {
        let fence_only = actual.policy.as_ref().is_some_and(|a| a.digest == p.digest);
        creations.push(if fence_only { Op::SetFence(p.fence.clone()) } else { Op::SetPolicy(p.clone()) });
    }
    // Peers after every tunnel exists, so a datapath can set the tunnels'
    // peers side by side.
    for (name, d) in &desired.tunnels {
        let existing = actual.tunnels.get(name).filter(|_| !dead_tunnels.contains(name));
        for (key, peer) in &d.peers {
            let now = existing.and_then(|a| a.peers.get(key));
            // A roaming peer keeps the endpoint WireGuard has learnt.
            let roamed = peer.roams && now.is_some_and(|n| !n.endpoint.is_empty());
            let changed = match now {
                None => true,
                Some(n) if roamed => n.allowed_ips != peer.allowed_ips,
                Some(n) => n != peer,
            };
            if changed {
                let mut peer = peer.clone();
                if roamed {
                    peer.endpoint.clear();
                }
                creations.push(Op::SetPeer { tunnel: name.clone(), public_key: key.clone(), peer });
            }
        }
    }
    for (lan, domain) in &desired.lans {
        if actual.lans.get(lan) != Some(domain) || unbound.contains(lan) {
            creations.push(Op::BindLan { interface: lan.clone(), domain: domain.clone() });
        }
    }
    // A route survives only if its interface and its table did.
    let kept_tables: BTreeSet<u32> =
        actual.domains.values().filter(|d| domain_kept(&d.name)).map(|d| d.table).collect();
    let gone = |r: &Route| {
        dead_tunnels.contains(&r.interface) || unbound.contains(&r.interface) || !kept_tables.contains(&r.table)
    };
    for r in &desired.routes {
        if !actual.routes.contains(r) || gone(r) {
            creations.push(Op::AddRoute(r.clone()));
        }
    }
    // What goes with a deleted tunnel, an unbound LAN or a deleted domain is
    // not removed one by one.
    removals.retain(|op| match op {
        Op::DeleteRoute(r) => !gone(r),
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
            if let Some((lan, _)) = owned.lans.iter().find(|(_, d)| *d == name) {
                return illegal(format!("{lan} is still bound to domain {name}"));
            }
            let Some(d) = owned.domains.remove(name) else { return illegal(format!("no domain {name}")) };
            owned.routes.retain(|r| r.table != d.table);
        }
        Op::SetPolicy(p) => {
            if p.spec.is_none() {
                return illegal("a policy without its specification".into());
            }
            owned.policy = Some(p.clone());
        }
        Op::SetFence(fence) => {
            let Some(p) = owned.policy.as_mut() else { return illegal("a fence without a policy".into()) };
            p.fence = fence.clone();
        }
        Op::DeletePolicy => {
            if owned.policy.take().is_none() {
                return illegal("no policy".into());
            }
        }
        Op::BindLan { interface, domain } => {
            if !owned.domains.contains_key(domain) {
                return illegal(format!("no domain {domain} to bind {interface} to"));
            }
            if owned.tunnels.contains_key(interface) {
                return illegal(format!("{interface} is a tunnel"));
            }
            if let Some(other) = owned.lans.get(interface) {
                return illegal(format!("{interface} is bound to {other}"));
            }
            owned.lans.insert(interface.clone(), domain.clone());
        }
        Op::UnbindLan { interface, domain } => {
            if owned.lans.get(interface) != Some(domain) {
                return illegal(format!("{interface} is not bound to {domain}"));
            }
            owned.lans.remove(interface);
            owned.routes.retain(|r| r.interface != *interface);
        }
        Op::CreateTunnel { name, domain, listen_port, public_key, key_file } => {
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
                    public_key: public_key.clone(),
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
        Op::SetKey { tunnel, public_key, .. } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            t.public_key.clone_from(public_key);
        }
        Op::SetPeer { tunnel, public_key, peer } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            let mut peer = peer.clone();
            if peer.endpoint.is_empty()
                && let Some(old) = t.peers.get(public_key)
            {
                peer.endpoint = old.endpoint.clone();
            }
            t.peers.insert(public_key.clone(), peer);
        }
        Op::RemovePeer { tunnel, public_key } => {
            let Some(t) = owned.tunnels.get_mut(tunnel) else { return illegal(format!("no tunnel {tunnel}")) };
            if t.peers.remove(public_key).is_none() {
                return illegal(format!("no peer {public_key} on {tunnel}"));
            }
        }
        Op::AddRoute(r) => {
            if !owned.tunnels.contains_key(&r.interface) && !owned.lans.contains_key(&r.interface) {
                return illegal(format!("no tunnel or bound LAN {} to route through", r.interface));
            }
            if !owned.domains.values().any(|d| d.table == r.table) {
                return illegal(format!("no domain has table {}", r.table));
            }
            if !owned.routes.insert(r.clone()) {
                return illegal(format!("route {} exists", r.prefix));
            }
        }
        Op::ReplaceRoute(r) => {
            if !owned.tunnels.contains_key(&r.interface) && !owned.lans.contains_key(&r.interface) {
                return illegal(format!("no tunnel or bound LAN {} to route through", r.interface));
            }
            if !owned.domains.values().any(|d| d.table == r.table) {
                return illegal(format!("no domain has table {}", r.table));
            }
            owned.routes.retain(|o| (o.table, &o.prefix) != (r.table, &r.prefix));
            owned.routes.insert(r.clone());
        }
        Op::DeleteRoute(r) => {
            if !owned.routes.remove(r) {
                return illegal(format!("no route {} in table {}", r.prefix, r.table));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use super::*;

    fn peer(endpoint: &str, allowed: &[&str]) -> PeerSpec {
        PeerSpec {
            name: "ap".into(),
            endpoint: endpoint.into(),
            allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
            roams: false,
        }
    }

    /// A router with one tunnel holding two peers, and a policy.
    fn owned() -> Owned {
        let mut o = Owned::default();
        let mut t = Tunnel {
            name: "mw-office".into(),
            domain: "office".into(),
            listen_port: 51820,
            public_key: "K".into(),
            key_file: PathBuf::new(),
            addresses: BTreeSet::new(),
            peers: BTreeMap::new(),
        };
        t.peers.insert("KE".into(), peer("192.0.2.1:51820", &["10.0.0.0/8"]));
        t.peers.insert("KW".into(), peer("192.0.2.2:51820", &["100.64.0.2/32"]));
        o.tunnels.insert(t.name.clone(), t);
        o.policy = Some(Policy::observed("a".into(), BTreeSet::new()));
        o
    }

    /// A failover's writes (a route group's prefixes to the other peer, the
    /// fence of a moved line) are applied to the kept observation: the plan
    /// against it afterwards is empty, as one against the kernel would be.
    #[test]
    fn peers_and_policy_written_are_shadowed_in_the_kept_observation() {
        let mut desired = owned();
        let t = desired.tunnels.get_mut("mw-office").expect("tunnel");
        t.peers.insert("KE".into(), peer("198.51.100.1:51820", &["100.64.0.1/32"]));
        t.peers.insert("KW".into(), peer("192.0.2.2:51820", &["10.0.0.0/8", "100.64.0.2/32"]));
        desired.policy = Some(Policy::observed("b".into(), BTreeSet::new()));
        let mut kept = owned();
        let ops = plan(&kept, &desired);
        assert!(!ops.is_empty());
        assert!(shadow(&mut kept, &ops), "{ops:?}");
        assert!(plan(&kept, &desired).is_empty(), "{:?}", plan(&kept, &desired));
        // A peer set without an endpoint keeps the one it has.
        let keep = Op::SetPeer { tunnel: "mw-office".into(), public_key: "KW".into(), peer: peer("", &["10.0.0.0/8"]) };
        assert!(shadow(&mut kept, &[keep]));
        assert_eq!(kept.tunnels["mw-office"].peers["KW"].endpoint, "192.0.2.2:51820");
    }

    /// A key rotation's switch: the tunnel's new key is set in place — no
    /// tunnel deleted and made again, its peers, addresses and routes kept —
    /// and a peer's next key held beside the current one is promoted by
    /// moving the addresses to it and removing the old one. The kept
    /// observation follows both.
    #[test]
    fn a_new_key_is_set_in_place_and_a_peers_next_key_takes_its_addresses() {
        let mut before = owned();
        let t = before.tunnels.get_mut("mw-office").expect("tunnel");
        t.peers.insert("KE2".into(), PeerSpec { allowed_ips: BTreeSet::new(), ..peer("192.0.2.1:51820", &[]) });
        before.routes.insert(Route {
            table: 1000,
            prefix: "10.0.0.0/8".into(),
            interface: "mw-office".into(),
            via: String::new(),
        });
        before.domains.insert("office".into(), Domain { name: "office".into(), table: 1000 });
        let mut after = before.clone();
        let t = after.tunnels.get_mut("mw-office").expect("tunnel");
        t.public_key = "K2".into();
        t.key_file = PathBuf::from("keys/office.key");
        t.peers.remove("KE");
        t.peers.insert("KE2".into(), peer("192.0.2.1:51820", &["10.0.0.0/8"]));
        let ops = plan(&before, &after);
        assert!(
            !ops.iter().any(|o| matches!(o, Op::DeleteTunnel { .. } | Op::CreateTunnel { .. } | Op::DeleteRoute(_))),
            "{ops:?}"
        );
        assert!(ops.contains(&Op::SetKey {
            tunnel: "mw-office".into(),
            public_key: "K2".into(),
            key_file: PathBuf::from("keys/office.key")
        }));
        assert!(ops.contains(&Op::RemovePeer { tunnel: "mw-office".into(), public_key: "KE".into() }));
        assert!(ops.iter().any(|o| matches!(o, Op::SetPeer { public_key, peer, .. }
            if public_key == "KE2" && peer.allowed_ips.contains("10.0.0.0/8"))));
        let mut kept = before.clone();
        assert!(shadow(&mut kept, &ops), "{ops:?}");
        assert!(plan(&kept, &after).is_empty(), "{:?}", plan(&kept, &after));
        let mut stepped = before;
        for op in &ops {
            step(&mut stepped, op).expect("legal");
        }
        assert!(plan(&stepped, &after).is_empty());
    }

    /// A line move: the policy that drops the old line's tunnel packets is
    /// written before the endpoint moves (after it, a packet still on its
    /// way over the old line made WireGuard roam back, and the tunnel was
    /// dead until the endpoint was next read: 35 s in `east-ap-outage`).
    #[test]
    fn the_fence_of_a_moved_line_goes_before_the_endpoint() {
        let mut desired = owned();
        let t = desired.tunnels.get_mut("mw-office").expect("tunnel");
        t.peers.insert("KE".into(), peer("198.51.100.1:51820", &["10.0.0.0/8"]));
        desired.policy = Some(Policy::observed("fenced".into(), BTreeSet::new()));
        let ops = plan(&owned(), &desired);
        let at = |f: &dyn Fn(&Op) -> bool| ops.iter().position(f).expect("planned");
        let fence = at(&|o| matches!(o, Op::SetPolicy(_)));
        let endpoint = at(&|o| matches!(o, Op::SetPeer { public_key, .. } if public_key == "KE"));
        assert!(fence < endpoint, "{ops:?}");
    }

    /// A line move changes only the policy's fence: the digest (the rules)
    /// stays, and the plan rewrites the fence's sets alone, which the kept
    /// observation and the fake follow.
    #[test]
    fn a_fence_alone_is_rewritten_alone() {
        let spec = PolicySpec {
            tunnel_ports: [51820].into(),
            unused_lines: ["192.0.2.1".parse().expect("ip")].into(),
            ..Default::default()
        };
        let moved = PolicySpec { unused_lines: ["198.51.100.1".parse().expect("ip")].into(), ..spec.clone() };
        let (before, after) = (Policy::new(spec), Policy::new(moved));
        assert_eq!(before.digest, after.digest, "the fence is not in the digest");
        assert_ne!(before, after, "but two fences differ");
        let mut kept = owned();
        kept.policy = Some(before.clone());
        let mut desired = owned();
        desired.policy = Some(after.clone());
        let ops = plan(&kept, &desired);
        assert_eq!(ops, vec![Op::SetFence(after.fence.clone())]);
        assert!(shadow(&mut kept, &ops));
        assert!(plan(&kept, &desired).is_empty());
        let mut fake = owned();
        fake.policy = Some(before);
        step(&mut fake, &ops[0]).expect("the fake takes it");
        assert_eq!(fake.policy, Some(after));
        fake.policy = None;
        assert!(step(&mut fake, &ops[0]).is_err(), "no fence without a policy");
    }

    /// Writes that raise notifications (routes, tunnels), or that name a
    /// tunnel the observation does not hold, are not shadowed: the next
    /// plan observes again.
    #[test]
    fn other_writes_are_not_shadowed() {
        let route =
            Route { table: 1000, prefix: "10.0.0.0/8".into(), interface: "mw-office".into(), via: String::new() };
        assert!(!shadow(&mut owned(), &[Op::AddRoute(route)]));
        let elsewhere = Op::SetPeer { tunnel: "mw-guest".into(), public_key: "KE".into(), peer: peer("", &[]) };
        assert!(!shadow(&mut owned(), &[elsewhere]));
        assert!(!shadow(&mut owned(), &[Op::DeleteTunnel { name: "mw-office".into() }]));
    }

    /// With one async worker, a tick every 5 ms keeps going while the
    /// datapath blocks for 300 ms.
    #[test]
    fn blocking_datapath_work_leaves_the_async_workers_free() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().expect("rt");
        let ticks = Arc::new(AtomicU64::new(0));
        let during = rt.block_on(async {
            let counter = ticks.clone();
            let ticker = tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_millis(5));
                loop {
                    every.tick().await;
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
            tokio::time::sleep(Duration::from_millis(20)).await;
            let worker = tokio::spawn({
                let ticks = ticks.clone();
                async move {
                    let before = ticks.load(Ordering::Relaxed);
                    off_workers(true, || std::thread::sleep(Duration::from_millis(300)));
                    ticks.load(Ordering::Relaxed) - before
                }
            });
            let during = worker.await.expect("worker");
            ticker.abort();
            during
        });
        // 60 at 5 ms; a blocked worker would give 0 or 1.
        assert!(during >= 10, "only {during} ticks while the datapath blocked");
    }
}
