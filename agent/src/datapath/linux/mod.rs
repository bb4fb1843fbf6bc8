//! The Linux datapath: WireGuard interfaces (kernel or `wireguard-go`), one
//! routing domain per segment (a VRF, or in **table mode** a routing table
//! plus rules keyed on the segment's interfaces), routes, and the nftables
//! policy.
//!
//! What the agent owns, and the only things it reads back or touches:
//!
//! | object | how it is recognised |
//! | --- | --- |
//! | WireGuard interfaces, VRFs | names starting `me-`, `mw-`, `mm-`, `mi-` / `mv-` |
//! | routes | protocol [`PROTOCOL`] (77), in any table |
//! | rules (table mode) | priority [`RULE_PRIORITY`] (5200) and protocol 77 |
//! | source pins | rules in priority [`LINE_RULE_PRIORITY`] (5300), protocol 77, to [`LINE_TABLES`] + N |
//! | nftables | the table `inet musubi` |
//!
//! A segment's table ends in an `unreachable` default (metric
//! [`UNREACHABLE_METRIC`]), so a lookup that finds nothing there stops
//! instead of falling through to the main table: in table mode that is what
//! keeps a segment out of the underlay. In table mode a domain exists when
//! its table has that default; its name is the segment's (`mv-<segment>`,
//! read from the rules of the segment's tunnels, `me-<segment>` and the like).
//!
//! Every netlink request that changes something, every UAPI `set`, every
//! `wireguard-go` start and every nft transaction counts as one write.

mod apply;
mod capabilities;
mod doctor;
mod fence;
pub mod netlink;
pub mod nft;
mod observe;
mod runtime;
mod underlay;
pub mod wireguard;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;
use wireguard_control::Backend;

pub use self::apply::describe;
use self::capabilities::sysctl_on;
pub use self::capabilities::{Capabilities, DomainChoice, DomainMode, WireguardChoice, WireguardMode, detect};
use self::runtime::{Runtime, Watch, runtime};
use super::{Datapath, DatapathError, Hops, Op, Owned, Pin, Policy};

/// Route protocol number of the agent's routes (and rules).
pub const PROTOCOL: u8 = 77;
/// Priority of the agent's rules in table mode: after the local table (0),
/// before the main table (32766). 1000 is where the kernel puts VRF rules.
pub const RULE_PRIORITY: u32 = 5200;
/// The lines' tables: the source pins of the `N`th line address this
/// router follows peers on (sorted) are in table `LINE_TABLES + N`.
pub const LINE_TABLES: u32 = 0x6d75_0000;
/// How many line tables there can be.
const LINE_TABLE_COUNT: u32 = 256;
/// Priority of the rules `from <line address> lookup <its line table>`:
/// after the segments' rules of table mode, before the main table.
pub const LINE_RULE_PRIORITY: u32 = 5300;

/// Whether `table` is one of the lines' tables.
pub fn is_line_table(table: u32) -> bool {
    (LINE_TABLES..LINE_TABLES + LINE_TABLE_COUNT).contains(&table)
}

/// Metric of the agent's routes.
pub const ROUTE_METRIC: u32 = 100;
/// Metric of the unreachable default that closes a segment's table (the
/// value VRF guides use, so any route added by hand wins).
pub const UNREACHABLE_METRIC: u32 = 4_278_198_272;

/// Name prefixes of the agent's WireGuard interfaces: a site's tunnels to
/// the east and the west access point, an access point's to its members
/// and to the interconnect, a site's to a mutual aid's east and west
/// access point.
const TUNNEL_PREFIXES: [&str; 6] = ["me-", "mw-", "mm-", "mi-", "ae-", "aw-"];

/// The segment of one of the agent's tunnels, from its name.
fn tunnel_segment(name: &str) -> Option<&str> {
    TUNNEL_PREFIXES.iter().find_map(|p| name.strip_prefix(p))
}
const DOMAIN_PREFIX: &str = "mv-";

/// The datapath on this host.
pub struct Linux {
    rt: Runtime,
    handle: Handle,
    wireguard: WireguardMode,
    domains: DomainMode,
    /// Where `wireguard-go` logs go.
    logs: PathBuf,
    writes: u64,
    /// Domain tables by name, from the last observation (table mode names
    /// orphaned tables `table-N`).
    tables: BTreeMap<String, u32>,
    /// The last full observation, trusted while no netlink notification has
    /// arrived since it began and it is younger than [`CACHE_LIFE`].
    cache: Option<(Owned, std::time::Instant)>,
    /// Link, address, route and rule notifications since the last full
    /// observation or write.
    watch: Option<Watch>,
    /// The pins last found or written, trusted like the observation.
    pinned: Option<BTreeSet<Pin>>,
    /// Whether plans take the kept observation's policy without reading it
    /// again ([`Datapath::trust_policy`]).
    trust_policy: bool,
    /// The policy as last read or written (`None` before either): what a
    /// full observation takes while the policy is trusted, instead of an
    /// nft process (100 ms here, and 2 s once in a drill's busiest moment,
    /// when route notifications had dropped the kept observation).
    policy_seen: Option<Option<Policy>>,
    /// The fence's writer: a kept `nft -i` (see [`fence`]).
    fence: fence::Writer,
}

/// How long an observation is trusted without a notification. WireGuard
/// peers changed behind the agent's back (`wg set` on its interfaces) raise
/// no notification; this bounds how long that can go unseen.
pub const CACHE_LIFE: std::time::Duration = std::time::Duration::from_secs(30);

impl std::fmt::Debug for Linux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linux")
            .field("wireguard", &self.wireguard)
            .field("domains", &self.domains)
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

impl Linux {
    /// A datapath in the given modes; `logs` receives `wireguard-go`'s output.
    /// Turns IPv4 and IPv6 forwarding on (a router forwards).
    pub fn new(wireguard: WireguardMode, domains: DomainMode, logs: &Path) -> Result<Self, DatapathError> {
        for path in ["/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"] {
            if !sysctl_on(path) {
                std::fs::write(path, "1")
                    .map_err(|e| DatapathError::io(format!("turning forwarding on ({path})"), e))?;
                tracing::info!(path, "forwarding turned on");
            }
        }
        std::fs::create_dir_all(logs).map_err(|e| DatapathError::io(format!("creating {}", logs.display()), e))?;
        let (rt, handle) = runtime()?;
        Ok(Linux {
            rt,
            handle,
            wireguard,
            domains,
            logs: logs.to_path_buf(),
            writes: 0,
            tables: BTreeMap::new(),
            cache: None,
            watch: None,
            pinned: None,
            trust_policy: false,
            policy_seen: None,
            fence: fence::Writer::default(),
        })
    }

    /// Detects the host's capabilities and picks the best modes.
    pub fn detect(logs: &Path) -> Result<Self, DatapathError> {
        Linux::with(logs, WireguardChoice::Auto, DomainChoice::Auto)
    }

    /// The modes asked for, if this host has them (`auto` as [`Linux::detect`]).
    pub fn with(logs: &Path, wg: WireguardChoice, domains: DomainChoice) -> Result<Self, DatapathError> {
        let caps = detect()?;
        let (wg, domains) = caps.choose(wg, domains).map_err(DatapathError::Program)?;
        tracing::info!(
            wireguard = ?wg,
            domains = ?domains,
            nft = caps.nft.as_deref().unwrap_or("?"),
            "Linux datapath"
        );
        Linux::new(wg, domains, logs)
    }

    fn backend(&self) -> Backend {
        match self.wireguard {
            WireguardMode::Kernel => Backend::Kernel,
            WireguardMode::Userspace(_) => Backend::Userspace,
        }
    }
}

impl Datapath for Linux {
    /// What the agent owns. A full observation (netlink dumps, every
    /// WireGuard device, nft) is kept, and given again while no
    /// notification has arrived since it began — the policy table, which
    /// raises none here, is read every time, unless a failover's build
    /// trusts it ([`Datapath::trust_policy`]). Writes that raise no
    /// notification (peers, the policy) update the kept observation.
    fn observe(&mut self) -> Result<Owned, DatapathError> {
        self.current().cloned()
    }

    /// Plans against the kept observation without copying it.
    fn diff(&mut self, desired: &Owned) -> Result<Vec<Op>, DatapathError> {
        Ok(super::plan(self.current()?, desired))
    }

    /// Applies in order. Runs of routes to add or delete go to netlink as
    /// concurrent requests over one socket, and a run of peers of one
    /// tunnel as one UAPI `set`: an access point's thousands of peers and
    /// routes are not thousands of round trips.
    fn apply(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        // The kernel is about to differ from what was observed: the
        // observation is kept only if these writes raise no notification
        // and it can say what they did (a failover's peers and policy).
        let mut kept = self.cache.take();
        let started = std::time::Instant::now();
        let mut i = 0;
        while i < ops.len() {
            // Routes to add, routes to delete and peers to set go in runs.
            let batched = |o: &Op| {
                matches!(
                    (&ops[i], o),
                    (Op::AddRoute(_), Op::AddRoute(_))
                        | (Op::ReplaceRoute(_), Op::ReplaceRoute(_))
                        | (Op::DeleteRoute(_), Op::DeleteRoute(_))
                        | (Op::SetPeer { .. }, Op::SetPeer { .. })
                )
            };
            let end = i + 1 + ops[i + 1..].iter().take_while(|o| batched(o)).count();
            let run = std::time::Instant::now();
            self.apply_run(&ops[i..end])
                .map_err(|e| DatapathError::During { op: describe(&ops[i]), source: Box::new(e) })?;
            if run.elapsed() > super::SLOW {
                let ms = run.elapsed().as_secs_f64() * 1e3;
                tracing::warn!(op = describe(&ops[i]), operations = end - i, ms, "a datapath write was slow");
            }
            tracing::debug!(op = describe(&ops[i]), until = end, ms = started.elapsed().as_secs_f64() * 1e3, "applied");
            i = end;
        }
        if let Some((owned, _)) = kept.as_mut()
            && super::shadow(owned, ops)
        {
            self.cache = kept;
        }
        Ok(())
    }

    fn trust_policy(&mut self, trusted: bool) {
        self.trust_policy = trusted;
    }

    fn prepare(&mut self) -> Result<(), DatapathError> {
        if self.cache.is_none() {
            self.current()?;
        }
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.writes
    }

    fn hops(&mut self, paths: &[(IpAddr, IpAddr)]) -> Result<Hops, DatapathError> {
        Linux::hops(self, paths)
    }

    fn pin(&mut self, pins: &BTreeSet<Pin>) -> Result<BTreeSet<IpAddr>, DatapathError> {
        Linux::pin(self, pins)
    }

    fn pin_ahead(&mut self, pins: &BTreeSet<Pin>) -> Result<(), DatapathError> {
        Linux::pin_ahead(self, pins)
    }

    fn fence_ahead(&mut self, fence: &BTreeSet<IpAddr>) {
        self.fence.send(fence);
    }
}
