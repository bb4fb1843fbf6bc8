//! The Linux datapath: WireGuard interfaces (kernel or `wireguard-go`), one
//! routing domain per segment (a VRF, or in **table mode** a routing table
//! plus rules keyed on the segment's interfaces), routes, and the nftables
//! policy.
//!
//! What the agent owns, and the only things it reads back or touches:
//!
//! | object | how it is recognised |
//! | --- | --- |
//! | WireGuard interfaces, VRFs | names starting `mw-` / `mv-` |
//! | routes | protocol [`PROTOCOL`] (77), in any table |
//! | rules (table mode) | priority [`RULE_PRIORITY`] (5200) and protocol 77 |
//! | nftables | the table `inet musubi` |
//!
//! A segment's table ends in an `unreachable` default (metric
//! [`UNREACHABLE_METRIC`]), so a lookup that finds nothing there stops
//! instead of falling through to the main table: in table mode that is what
//! keeps a segment out of the underlay. In table mode a domain exists when
//! its table has that default; its name is the segment's (`mv-<segment>`,
//! read from the rules of the segment's tunnel `mw-<segment>`).
//!
//! Every netlink request that changes something, every UAPI `set`, every
//! `wireguard-go` start and every nft transaction counts as one write.

pub mod netlink;
pub mod nft;
pub mod wireguard;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;
use wireguard_control::Backend;

use super::{Datapath, DatapathError, Domain, Hop, Hops, Op, Owned, Pin, Route, Tunnel};
use netlink::Link;

/// Route protocol number of the agent's routes (and rules).
pub const PROTOCOL: u8 = 77;
/// Priority of the agent's rules in table mode: after the local table (0),
/// before the main table (32766). 1000 is where the kernel puts VRF rules.
pub const RULE_PRIORITY: u32 = 5200;
/// Metric of the agent's routes.
pub const ROUTE_METRIC: u32 = 100;
/// Metric of the unreachable default that closes a segment's table (the
/// value VRF guides use, so any route added by hand wins).
pub const UNREACHABLE_METRIC: u32 = 4_278_198_272;

const TUNNEL_PREFIX: &str = "mw-";
const DOMAIN_PREFIX: &str = "mv-";

/// How WireGuard interfaces are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireguardMode {
    Kernel,
    /// `wireguard-go` at this path.
    Userspace(PathBuf),
}

/// How segments are kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainMode {
    Vrf,
    Table,
}

/// What this host offers, found by trying.
#[derive(Debug, Clone)]
pub struct Capabilities {
    pub kernel_wireguard: bool,
    pub vrf: bool,
    pub wireguard_go: Option<PathBuf>,
    /// `nft --version`, or why it is unusable.
    pub nft: Result<String, String>,
    pub ipv4_forwarding: bool,
    pub ipv6_forwarding: bool,
}

impl Capabilities {
    /// The modes these capabilities give, or why there is none.
    pub fn modes(&self) -> Result<(WireguardMode, DomainMode), String> {
        let wg = if self.kernel_wireguard {
            WireguardMode::Kernel
        } else if let Some(p) = &self.wireguard_go {
            WireguardMode::Userspace(p.clone())
        } else {
            return Err("no WireGuard: the kernel has no wireguard module and wireguard-go is not installed \
                        (apt-get install wireguard-go)"
                .into());
        };
        if let Err(e) = &self.nft {
            return Err(format!("no nftables: {e} (apt-get install nftables)"));
        }
        Ok((wg, if self.vrf { DomainMode::Vrf } else { DomainMode::Table }))
    }

    /// A report for `musubi-agent doctor`.
    pub fn report(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let mut out = String::new();
        out.push_str(&format!("kernel WireGuard: {}\n", yes(self.kernel_wireguard)));
        out.push_str(&format!(
            "wireguard-go:     {}\n",
            self.wireguard_go.as_ref().map_or("not found".to_string(), |p| p.display().to_string())
        ));
        out.push_str(&format!("VRF:              {}\n", yes(self.vrf)));
        out.push_str(&format!(
            "nftables:         {}\n",
            match &self.nft {
                Ok(v) => v.clone(),
                Err(e) => format!("unusable: {e}"),
            }
        ));
        out.push_str(&format!(
            "forwarding:       IPv4 {}, IPv6 {}\n",
            yes(self.ipv4_forwarding),
            yes(self.ipv6_forwarding)
        ));
        match self.modes() {
            Ok((wg, domain)) => {
                out.push_str(&format!(
                    "mode:             {} WireGuard, {}\n",
                    if wg == WireguardMode::Kernel { "kernel" } else { "userspace (wireguard-go)" },
                    if domain == DomainMode::Vrf {
                        "one VRF per segment"
                    } else {
                        "table mode (a routing table and rules per segment)"
                    }
                ));
                if wg != WireguardMode::Kernel {
                    out.push_str(
                        "advice:           kernel WireGuard is faster; load it with `modprobe wireguard` \
                         (Debian kernels ship it)\n",
                    );
                }
                if domain == DomainMode::Table {
                    out.push_str(
                        "advice:           VRFs isolate sockets on the router too; `modprobe vrf` \
                         (Debian kernels ship it)\n",
                    );
                }
                if !self.ipv4_forwarding || !self.ipv6_forwarding {
                    out.push_str("advice:           the agent turns forwarding on when it starts\n");
                }
            }
            Err(e) => out.push_str(&format!("mode:             none: {e}\n")),
        }
        out
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

fn sysctl_on(path: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1")
}

/// The datapath's own single-threaded runtime for netlink. It may be
/// dropped inside the agent's runtime, so it shuts down in the background.
struct Runtime(Option<tokio::runtime::Runtime>);

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs a future to completion on the datapath's runtime, from any thread
/// (the agent calls the datapath from inside its own runtime).
fn block_on<T: Send>(rt: &Runtime, f: impl Future<Output = T> + Send) -> Result<T, DatapathError> {
    let rt = rt.0.as_ref().ok_or_else(|| DatapathError::Internal("the netlink runtime is gone".into()))?;
    std::thread::scope(|s| s.spawn(|| rt.block_on(f)).join())
        .map_err(|_| DatapathError::Internal("the netlink worker panicked".into()))
}

fn runtime() -> Result<(Runtime, Handle), DatapathError> {
    let rt = Runtime(Some(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| DatapathError::io("starting the netlink runtime", e))?,
    ));
    let handle = block_on(&rt, async {
        rtnetlink::new_connection().map(|(conn, handle, _)| {
            tokio::spawn(conn);
            handle
        })
    })?
    .map_err(|e| DatapathError::io("opening a netlink socket", e))?;
    Ok((rt, handle))
}

/// Tries the kernel's WireGuard and VRF by creating and deleting a probe
/// interface of each, and looks for `wireguard-go` and `nft`.
pub fn detect() -> Result<Capabilities, DatapathError> {
    let (rt, handle) = runtime()?;
    let (kernel_wireguard, vrf) = block_on(&rt, async {
        let probe = |name: &'static str| {
            let handle = handle.clone();
            async move {
                let idx = netlink::links(&handle).await.ok()?.into_iter().find(|l| l.name == name)?.index;
                netlink::delete_link(&handle, idx).await.ok()
            }
        };
        let wg = netlink::add_wireguard(&handle, "mw-probe0").await.is_ok();
        if wg {
            probe("mw-probe0").await;
        }
        let vrf = netlink::add_vrf(&handle, "mv-probe0", 0xfff0_0000).await.is_ok();
        if vrf {
            probe("mv-probe0").await;
        }
        (wg, vrf)
    })?;
    let nft = match std::process::Command::new("nft").arg("--version").output() {
        Ok(o) if o.status.success() => match nft::list() {
            Ok(_) => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
            Err(e) => Err(e.to_string()),
        },
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(format!("nft: {e}")),
    };
    Ok(Capabilities {
        kernel_wireguard,
        vrf,
        wireguard_go: find_program("wireguard-go"),
        nft,
        ipv4_forwarding: sysctl_on("/proc/sys/net/ipv4/ip_forward"),
        ipv6_forwarding: sysctl_on("/proc/sys/net/ipv6/conf/all/forwarding"),
    })
}

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
}

/// How long an observation is trusted without a notification. WireGuard
/// peers changed behind the agent's back (`wg set` on its interfaces) raise
/// no notification; this bounds how long that can go unseen.
pub const CACHE_LIFE: std::time::Duration = std::time::Duration::from_secs(30);

type Notifications = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

/// A subscription to the kernel's link, address, route and rule
/// notifications (`ip monitor`).
struct Watch {
    messages: Notifications,
    task: tokio::task::JoinHandle<()>,
}

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
        })
    }

    /// Detects the host's capabilities and picks the best modes.
    pub fn detect(logs: &Path) -> Result<Self, DatapathError> {
        let caps = detect()?;
        let (wg, domains) = caps.modes().map_err(DatapathError::Program)?;
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

    /// Starts a fresh subscription (ending the previous one): from now on any
    /// change to links, addresses, routes or rules is noticed.
    fn subscribe(&mut self) -> Result<(), DatapathError> {
        use rtnetlink::MulticastGroup as G;
        if let Some(old) = self.watch.take() {
            old.task.abort();
        }
        let groups = [G::Link, G::Ipv4Ifaddr, G::Ipv6Ifaddr, G::Ipv4Route, G::Ipv6Route, G::Ipv4Rule, G::Ipv6Rule];
        let watch = block_on(&self.rt, async move {
            let (conn, _, messages) = rtnetlink::new_multicast_connection(&groups)?;
            Ok::<_, std::io::Error>(Watch { messages, task: tokio::spawn(conn) })
        })?
        .map_err(|e| DatapathError::io("subscribing to netlink notifications", e))?;
        self.watch = Some(watch);
        Ok(())
    }

    /// Whether nothing has changed since the subscription began.
    fn quiet(&mut self) -> bool {
        let Some(watch) = self.watch.as_mut() else { return false };
        // Let the subscription's task read what the socket holds.
        if block_on(&self.rt, tokio::time::sleep(std::time::Duration::from_millis(1))).is_err() {
            return false;
        }
        // Empty and open: quiet. A message, an overrun or a closed channel: not.
        matches!(watch.messages.try_recv(), Err(e) if e.is_empty())
    }

    fn observe_all(&mut self) -> Result<Owned, DatapathError> {
        let started = std::time::Instant::now();
        let handle = self.handle.clone();
        let (links, addresses, routes, rules) = block_on(&self.rt, async move {
            Ok::<_, DatapathError>((
                netlink::links(&handle).await?,
                netlink::addresses(&handle).await?,
                netlink::owned_routes(&handle).await?,
                netlink::owned_rules(&handle).await?,
            ))
        })??;
        // The main table holds only the underlay pins (see `pin`), kept apart.
        let routes: Vec<_> = routes.into_iter().filter(|r| r.table != netlink::MAIN_TABLE).collect();
        let netlink_ms = started.elapsed().as_secs_f64() * 1e3;
        let by_index: BTreeMap<u32, &Link> = links.iter().map(|l| (l.index, l)).collect();
        let mut owned = Owned::default();

        // Domains, and which domain each interface is in.
        let mut member: BTreeMap<String, String> = BTreeMap::new();
        self.tables.clear();
        match self.domains {
            DomainMode::Vrf => {
                for l in links.iter().filter(|l| l.name.starts_with(DOMAIN_PREFIX) && l.kind.as_deref() == Some("vrf"))
                {
                    let table = l.vrf_table.unwrap_or(0);
                    owned.domains.insert(l.name.clone(), Domain { name: l.name.clone(), table });
                }
                for l in &links {
                    if let Some(vrf) = l.controller.and_then(|c| by_index.get(&c))
                        && owned.domains.contains_key(&vrf.name)
                    {
                        member.insert(l.name.clone(), vrf.name.clone());
                    }
                }
            }
            DomainMode::Table => {
                let closed: BTreeSet<u32> =
                    routes.iter().filter(|r| r.oif.is_none() && r.prefix.ends_with("/0")).map(|r| r.table).collect();
                // An interface is in a table when all four of its rules are.
                let mut rules_of: BTreeMap<(String, u32), usize> = BTreeMap::new();
                for r in &rules {
                    if let Some(name) = r.iif.as_ref().or(r.oif.as_ref()) {
                        *rules_of.entry((name.clone(), r.table)).or_default() += 1;
                    }
                }
                let mut name_of: BTreeMap<u32, String> = BTreeMap::new();
                for ((name, table), count) in &rules_of {
                    if *count == 4
                        && closed.contains(table)
                        && let Some(segment) = name.strip_prefix(TUNNEL_PREFIX)
                    {
                        name_of.insert(*table, format!("{DOMAIN_PREFIX}{segment}"));
                    }
                }
                for table in &closed {
                    let name = name_of.get(table).cloned().unwrap_or_else(|| format!("table-{table}"));
                    owned.domains.insert(name.clone(), Domain { name, table: *table });
                }
                for ((name, table), count) in &rules_of {
                    if *count == 4
                        && let Some(domain) = name_of.get(table)
                    {
                        member.insert(name.clone(), domain.clone());
                    }
                }
                // Interfaces with rules that are not complete are unbound and bound again.
                for ((name, _), _) in rules_of.iter().filter(|(_, c)| **c != 4) {
                    member.entry(name.clone()).or_default();
                }
            }
        }
        for d in owned.domains.values() {
            self.tables.insert(d.name.clone(), d.table);
        }

        // Tunnels: the agent's WireGuard interfaces that answer.
        let wg_started = std::time::Instant::now();
        let backend = self.backend();
        for l in links.iter().filter(|l| l.name.starts_with(TUNNEL_PREFIX)) {
            let Some(state) = wireguard::read(&l.name, backend) else {
                // An interface that does not answer (a process that is gone): recreated.
                owned.tunnels.insert(l.name.clone(), broken(&l.name));
                continue;
            };
            let domain = if l.up { member.get(&l.name).cloned().unwrap_or_default() } else { String::new() };
            owned.tunnels.insert(
                l.name.clone(),
                Tunnel {
                    name: l.name.clone(),
                    domain,
                    listen_port: state.listen_port,
                    public_key: state.public_key,
                    key_file: PathBuf::new(),
                    addresses: addresses.iter().filter(|(i, _)| *i == l.index).map(|(_, a)| a.clone()).collect(),
                    peers: state.peers,
                },
            );
        }
        let wireguard_ms = wg_started.elapsed().as_secs_f64() * 1e3;
        for (name, domain) in &member {
            if !name.starts_with(TUNNEL_PREFIX) && !name.starts_with(DOMAIN_PREFIX) {
                owned.lans.insert(name.clone(), domain.clone());
            }
        }
        for r in routes.iter().filter(|r| r.oif.is_some()) {
            let interface = r.oif.and_then(|i| by_index.get(&i)).map(|l| l.name.clone()).unwrap_or_default();
            owned.routes.insert(Route { table: r.table, prefix: r.prefix.clone(), interface });
        }
        let nft_started = std::time::Instant::now();
        owned.policy = nft::observe()?;
        tracing::debug!(
            netlink_ms,
            wireguard_ms,
            nft_ms = nft_started.elapsed().as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            routes = owned.routes.len(),
            "observed"
        );
        Ok(owned)
    }

    /// Applies one operation, or a run of one kind that goes together: the
    /// routes of a run as concurrent netlink requests over one socket, the
    /// peers of a run as one UAPI `set` per tunnel, the tunnels side by side
    /// — an access point's thousands of peers and routes are not thousands
    /// of round trips.
    fn apply_run(&mut self, run: &[Op]) -> Result<(), DatapathError> {
        let handle = self.handle.clone();
        let mode = self.domains;
        let Some(op) = run.first() else { return Ok(()) };
        match op {
            Op::CreateDomain(d) => {
                let (name, table) = (d.name.clone(), d.table);
                self.writes += block_on(&self.rt, async move {
                    let mut writes = 0;
                    if mode == DomainMode::Vrf {
                        netlink::add_vrf(&handle, &name, table).await?;
                        writes += 1;
                    }
                    for prefix in ["0.0.0.0/0", "::/0"] {
                        netlink::add_route(&handle, table, prefix, None).await?;
                        writes += 1;
                    }
                    Ok::<_, DatapathError>(writes)
                })??;
                self.tables.insert(d.name.clone(), d.table);
            }
            Op::DeleteDomain { name } => {
                let table = *self.tables.get(name).ok_or_else(|| DatapathError::missing(format!("domain {name}")))?;
                let name = name.clone();
                self.writes += block_on(&self.rt, async move {
                    let mut writes = 0;
                    for r in netlink::owned_routes(&handle).await?.into_iter().filter(|r| r.table == table) {
                        netlink::del_route(&handle, r.message).await?;
                        writes += 1;
                    }
                    for r in netlink::owned_rules(&handle).await?.into_iter().filter(|r| r.table == table) {
                        netlink::del_rule(&handle, r.message).await?;
                        writes += 1;
                    }
                    if mode == DomainMode::Vrf
                        && let Some(l) = netlink::links(&handle).await?.into_iter().find(|l| l.name == name)
                    {
                        netlink::delete_link(&handle, l.index).await?;
                        writes += 1;
                    }
                    Ok::<_, DatapathError>(writes)
                })??;
            }
            Op::CreateTunnel { name, domain, listen_port, key_file, .. } => {
                let private = crate::state::private_key(key_file).map_err(|e| DatapathError::Key(Box::new(e)))?;
                let table =
                    *self.tables.get(domain).ok_or_else(|| DatapathError::missing(format!("domain {domain}")))?;
                match &self.wireguard {
                    WireguardMode::Userspace(program) => {
                        let log = self.logs.join(format!("wireguard-go-{name}.log"));
                        wireguard::start_userspace(program, name, &log)?;
                    }
                    WireguardMode::Kernel => {
                        let (h, n) = (handle.clone(), name.clone());
                        block_on(&self.rt, async move { netlink::add_wireguard(&h, &n).await })??;
                    }
                }
                self.writes += 1;
                wireguard::configure(name, self.backend(), private, *listen_port)?;
                self.writes += 1;
                let (name, domain) = (name.clone(), domain.clone());
                self.writes += block_on(&self.rt, async move {
                    let index = index_of(&handle, &name).await?;
                    let writes = bind(&handle, mode, &name, index, &domain, table).await?;
                    netlink::set_up(&handle, index).await?;
                    Ok::<_, DatapathError>(writes + 1)
                })??;
            }
            Op::DeleteTunnel { name } => {
                let name = name.clone();
                self.writes += block_on(&self.rt, async move {
                    let mut writes = unbind_rules(&handle, &name).await?;
                    if let Ok(index) = index_of(&handle, &name).await {
                        netlink::delete_link(&handle, index).await?;
                        writes += 1;
                    }
                    Ok::<_, DatapathError>(writes)
                })??;
            }
            Op::BindLan { interface, domain } => {
                let table =
                    *self.tables.get(domain).ok_or_else(|| DatapathError::missing(format!("domain {domain}")))?;
                let (name, domain) = (interface.clone(), domain.clone());
                self.writes += block_on(&self.rt, async move {
                    let index = index_of(&handle, &name).await?;
                    bind(&handle, mode, &name, index, &domain, table).await
                })??;
            }
            Op::UnbindLan { interface, .. } => {
                let name = interface.clone();
                self.writes += block_on(&self.rt, async move {
                    let index = index_of(&handle, &name).await?;
                    let mut writes = unbind_rules(&handle, &name).await?;
                    for r in netlink::owned_routes(&handle).await?.into_iter().filter(|r| r.oif == Some(index)) {
                        netlink::del_route(&handle, r.message).await?;
                        writes += 1;
                    }
                    if mode == DomainMode::Vrf {
                        netlink::set_controller(&handle, index, None).await?;
                        writes += 1;
                    }
                    Ok::<_, DatapathError>(writes)
                })??;
            }
            Op::AddAddress { tunnel, address } | Op::RemoveAddress { tunnel, address } => {
                let add = matches!(op, Op::AddAddress { .. });
                let (name, address) = (tunnel.clone(), address.clone());
                block_on(&self.rt, async move {
                    let index = index_of(&handle, &name).await?;
                    if add {
                        netlink::add_address(&handle, index, &address).await
                    } else {
                        netlink::del_address(&handle, index, &address).await
                    }
                })??;
                self.writes += 1;
            }
            Op::SetPeer { .. } => self.set_peers(run)?,
            Op::RemovePeer { tunnel, public_key } => {
                wireguard::remove_peer(tunnel, self.backend(), public_key)?;
                self.writes += 1;
            }
            Op::AddRoute(_) | Op::DeleteRoute(_) => self.routes(run, matches!(op, Op::AddRoute(_)))?,
            Op::SetPolicy(p) => {
                nft::set(p)?;
                self.writes += 1;
            }
            Op::DeletePolicy => {
                nft::delete()?;
                self.writes += 1;
            }
        }
        Ok(())
    }

    /// Each tunnel's peers in one UAPI `set`, the tunnels side by side
    /// (wireguard-go takes every set on one thread per device).
    fn set_peers(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        let mut by_tunnel: BTreeMap<&str, Vec<(&str, &super::PeerSpec)>> = BTreeMap::new();
        for o in ops {
            if let Op::SetPeer { tunnel, public_key, peer } = o {
                by_tunnel.entry(tunnel.as_str()).or_default().push((public_key.as_str(), peer));
            }
        }
        let backend = self.backend();
        let results: Vec<Result<(), DatapathError>> = std::thread::scope(|s| {
            let workers: Vec<_> = by_tunnel
                .iter()
                .map(|(tunnel, peers)| {
                    s.spawn(move || {
                        wireguard::set_peers(tunnel, backend, peers).map_err(|e| DatapathError::During {
                            op: format!("setting {} peers on {tunnel}", peers.len()),
                            source: Box::new(e),
                        })
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err(DatapathError::Internal("a UAPI worker panicked".into()))))
                .collect()
        });
        self.writes += results.iter().filter(|r| r.is_ok()).count() as u64;
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// Adds (or deletes) the routes of `ops`, up to 64 requests in flight.
    fn routes(&mut self, ops: &[Op], add: bool) -> Result<(), DatapathError> {
        let routes: Vec<Route> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddRoute(r) | Op::DeleteRoute(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let n = routes.len() as u64;
        let handle = self.handle.clone();
        block_on(&self.rt, route_batch(handle, routes, add))??;
        self.writes += n;
        Ok(())
    }

    /// The kept observation if it can still be trusted (the policy table,
    /// which raises no notification here, read again), else a new one.
    fn current(&mut self) -> Result<&Owned, DatapathError> {
        let fresh = self.cache.as_ref().is_some_and(|(_, at)| at.elapsed() < CACHE_LIFE);
        if fresh && self.quiet() {
            let policy = nft::observe()?;
            if let Some((owned, _)) = self.cache.as_mut() {
                owned.policy = policy;
            }
        } else {
            self.cache = None;
            self.subscribe()?;
            let owned = self.observe_all()?;
            self.cache = Some((owned, std::time::Instant::now()));
        }
        self.cache.as_ref().map(|(o, _)| o).ok_or_else(|| DatapathError::Internal("no observation".into()))
    }
}

async fn route_batch(handle: Handle, routes: Vec<Route>, add: bool) -> Result<(), DatapathError> {
    use futures::{StreamExt, TryStreamExt};
    let index: BTreeMap<String, u32> = netlink::links(&handle).await?.into_iter().map(|l| (l.name, l.index)).collect();
    let mut requests: Vec<(u32, String, u32)> = Vec::with_capacity(routes.len());
    for r in routes {
        let oif =
            *index.get(&r.interface).ok_or_else(|| DatapathError::missing(format!("interface {}", r.interface)))?;
        requests.push((r.table, r.prefix, oif));
    }
    if add {
        futures::stream::iter(requests.into_iter().map(|(table, prefix, oif)| {
            let handle = handle.clone();
            async move { netlink::add_route(&handle, table, &prefix, Some(oif)).await }
        }))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    } else {
        let mut present: BTreeMap<(u32, String, Option<u32>), netlink::OwnedRoute> = netlink::owned_routes(&handle)
            .await?
            .into_iter()
            .map(|o| ((o.table, o.prefix.clone(), o.oif), o))
            .collect();
        let mut messages = Vec::with_capacity(requests.len());
        for (table, prefix, oif) in requests {
            let found = present.remove(&(table, prefix.clone(), Some(oif)));
            let o = found.ok_or_else(|| DatapathError::missing(format!("route {prefix} in table {table}")))?;
            messages.push(o.message);
        }
        futures::stream::iter(messages.into_iter().map(|m| {
            let handle = handle.clone();
            async move { netlink::del_route(&handle, m).await }
        }))
        .buffer_unordered(64)
        .try_collect::<Vec<()>>()
        .await?;
    }
    Ok(())
}

/// A tunnel that exists but does not answer: it matches nothing, so the
/// plan deletes and recreates it.
fn broken(name: &str) -> Tunnel {
    Tunnel {
        name: name.to_string(),
        domain: String::new(),
        listen_port: 0,
        public_key: String::new(),
        key_file: PathBuf::new(),
        addresses: BTreeSet::new(),
        peers: BTreeMap::new(),
    }
}

async fn index_of(handle: &Handle, name: &str) -> Result<u32, DatapathError> {
    netlink::links(handle)
        .await?
        .into_iter()
        .find(|l| l.name == name)
        .map(|l| l.index)
        .ok_or_else(|| DatapathError::missing(format!("interface {name}")))
}

/// Puts an interface in a domain: enslaved to the VRF, or the four rules
/// (iif/oif × IPv4/IPv6) of table mode. Returns the writes made.
async fn bind(
    handle: &Handle,
    mode: DomainMode,
    name: &str,
    index: u32,
    domain: &str,
    table: u32,
) -> Result<u64, DatapathError> {
    match mode {
        DomainMode::Vrf => {
            let vrf = index_of(handle, domain).await?;
            netlink::set_controller(handle, index, Some(vrf)).await?;
            Ok(1)
        }
        DomainMode::Table => {
            // Rules name interfaces and outlive them: a tunnel whose process
            // died (its interface gone) left its rules behind.
            let stale = unbind_rules(handle, name).await?;
            for v6 in [false, true] {
                for input in [true, false] {
                    netlink::add_rule(handle, table, name, input, v6).await?;
                }
            }
            Ok(stale + 4)
        }
    }
}

/// Deletes the agent's rules that name an interface.
async fn unbind_rules(handle: &Handle, name: &str) -> Result<u64, DatapathError> {
    let mut writes = 0;
    for r in netlink::owned_rules(handle).await? {
        if r.iif.as_deref() == Some(name) || r.oif.as_deref() == Some(name) {
            netlink::del_rule(handle, r.message).await?;
            writes += 1;
        }
    }
    Ok(writes)
}

impl Datapath for Linux {
    /// What the agent owns. A full observation (netlink dumps, every
    /// WireGuard device, nft) is kept, and given again while no
    /// notification has arrived since it began — the policy table, which
    /// raises none here, is read every time.
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
        // The kernel is about to differ from what was observed.
        self.cache = None;
        let started = std::time::Instant::now();
        let mut i = 0;
        while i < ops.len() {
            // Routes to add, routes to delete and peers to set go in runs.
            let batched = |o: &Op| {
                matches!(
                    (&ops[i], o),
                    (Op::AddRoute(_), Op::AddRoute(_))
                        | (Op::DeleteRoute(_), Op::DeleteRoute(_))
                        | (Op::SetPeer { .. }, Op::SetPeer { .. })
                )
            };
            let end = i + 1 + ops[i + 1..].iter().take_while(|o| batched(o)).count();
            self.apply_run(&ops[i..end])
                .map_err(|e| DatapathError::During { op: describe(&ops[i]), source: Box::new(e) })?;
            tracing::debug!(op = describe(&ops[i]), until = end, ms = started.elapsed().as_secs_f64() * 1e3, "applied");
            i = end;
        }
        Ok(())
    }

    fn writes(&self) -> u64 {
        self.writes
    }

    fn hops(&mut self, paths: &[(IpAddr, IpAddr)]) -> Result<Hops, DatapathError> {
        let handle = self.handle.clone();
        let (links, addresses, routes) = block_on(&self.rt, async move {
            Ok::<_, DatapathError>((
                netlink::links(&handle).await?,
                netlink::addresses(&handle).await?,
                netlink::main_routes(&handle).await?,
            ))
        })??;
        let mut out = BTreeMap::new();
        for &(local, remote) in paths {
            let holder =
                addresses.iter().find(|(_, a)| a.split('/').next().and_then(|ip| ip.parse().ok()) == Some(local));
            let Some(&(index, _)) = holder else { continue };
            let Some(link) = links.iter().find(|l| l.index == index) else { continue };
            // The operator's most specific route to the peer's address out of
            // that interface (never one of the agent's own pins).
            let best = routes
                .iter()
                .filter(|r| !r.ours && r.oif == Some(index) && contains(r.destination, r.length, remote))
                .max_by_key(|r| (r.length, std::cmp::Reverse(r.metric)));
            if let Some(r) = best {
                out.insert((local, remote), Hop { interface: link.name.clone(), gateway: r.gateway });
            }
        }
        Ok(out)
    }

    fn pin(&mut self, pins: &BTreeSet<Pin>) -> Result<BTreeSet<IpAddr>, DatapathError> {
        // The same pins while the kernel has raised no notification since the
        // kept observation: nothing to read (a dump walks every table, 30,000
        // routes on an access point). A notification drops the observation too.
        if self.pinned.as_ref() == Some(pins) && self.cache.as_ref().is_some_and(|(_, at)| at.elapsed() < CACHE_LIFE) {
            if self.quiet() {
                return Ok(BTreeSet::new());
            }
            self.cache = None;
        }
        self.pinned = None;
        let handle = self.handle.clone();
        let (links, routes) = block_on(&self.rt, async move {
            Ok::<_, DatapathError>((netlink::links(&handle).await?, netlink::main_routes(&handle).await?))
        })??;
        let index: BTreeMap<&str, u32> = links.iter().map(|l| (l.name.as_str(), l.index)).collect();
        let mut wanted: BTreeMap<IpAddr, (u32, Option<IpAddr>, IpAddr)> = BTreeMap::new();
        for p in pins {
            if let Some(i) = index.get(p.hop.interface.as_str()) {
                wanted.entry(p.destination).or_insert((*i, p.hop.gateway, p.source));
            }
        }
        let mut stale = Vec::new();
        let mut changed = BTreeSet::new();
        for r in routes.iter().filter(|r| r.ours) {
            let full = if r.destination.is_ipv4() { 32 } else { 128 };
            let same = r.length == full
                && wanted
                    .get(&r.destination)
                    .is_some_and(|w| (Some(w.0), w.1, Some(w.2)) == (r.oif, r.gateway, r.source));
            if same {
                wanted.remove(&r.destination);
            } else {
                stale.push(r.message.clone());
                changed.insert(r.destination);
            }
        }
        changed.extend(wanted.keys().copied());
        let writes = (stale.len() + wanted.len()) as u64;
        if writes == 0 {
            self.pinned = Some(pins.clone());
            return Ok(changed);
        }
        let handle = self.handle.clone();
        block_on(&self.rt, async move {
            for m in stale {
                netlink::del_route(&handle, m).await?;
            }
            for (destination, (oif, gateway, source)) in wanted {
                netlink::add_pin(&handle, destination, source, oif, gateway).await?;
            }
            Ok::<_, DatapathError>(())
        })??;
        self.writes += writes;
        self.pinned = Some(pins.clone());
        Ok(changed)
    }
}

/// Whether `prefix/length` contains `ip` (same family).
fn contains(prefix: IpAddr, length: u8, ip: IpAddr) -> bool {
    ipnetwork::IpNetwork::new(prefix, length).is_ok_and(|n| n.contains(ip))
}

/// An operation in a few words, for errors and logs.
pub fn describe(op: &Op) -> String {
    match op {
        Op::DeletePolicy => "deleting the policy".into(),
        Op::DeleteRoute(r) => format!("deleting route {} in table {} via {}", r.prefix, r.table, r.interface),
        Op::RemovePeer { tunnel, public_key } => format!("removing peer {public_key} from {tunnel}"),
        Op::RemoveAddress { tunnel, address } => format!("removing {address} from {tunnel}"),
        Op::UnbindLan { interface, domain } => format!("unbinding {interface} from {domain}"),
        Op::DeleteTunnel { name } => format!("deleting tunnel {name}"),
        Op::DeleteDomain { name } => format!("deleting domain {name}"),
        Op::CreateDomain(d) => format!("creating domain {} (table {})", d.name, d.table),
        Op::CreateTunnel { name, listen_port, .. } => format!("creating tunnel {name} (port {listen_port})"),
        Op::BindLan { interface, domain } => format!("binding {interface} to {domain}"),
        Op::AddAddress { tunnel, address } => format!("adding {address} to {tunnel}"),
        Op::SetPeer { tunnel, peer, .. } => format!("setting peer {} on {tunnel}", peer.name),
        Op::AddRoute(r) => format!("adding route {} in table {} via {}", r.prefix, r.table, r.interface),
        Op::SetPolicy(_) => "writing the policy".into(),
    }
}
