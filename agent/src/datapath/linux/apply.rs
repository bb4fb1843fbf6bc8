//! Applying operations to the kernel, a run of one kind at a time: domains,
//! tunnels and their bindings through netlink, peers through one UAPI `set`
//! per tunnel, routes as concurrent netlink requests, the policy through nft.

use std::collections::BTreeMap;

use rtnetlink::Handle;

use super::netlink;
use super::runtime::block_on;
use super::{DomainMode, Linux, WireguardMode, nft, wireguard};
use crate::datapath::{DatapathError, Op, Policy, Route};

impl Linux {
    /// Applies one operation, or a run of one kind that goes together: the
    /// routes of a run as concurrent netlink requests over one socket, the
    /// peers of a run as one UAPI `set` per tunnel, the tunnels side by side
    /// — an access point's thousands of peers and routes are not thousands
    /// of round trips.
    pub(super) fn apply_run(&mut self, run: &[Op]) -> Result<(), DatapathError> {
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
                        netlink::add_route(&handle, table, prefix, None, None, false).await?;
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
            Op::SetKey { tunnel, key_file, .. } => {
                let private = crate::state::private_key(key_file).map_err(|e| DatapathError::Key(Box::new(e)))?;
                wireguard::set_private_key(tunnel, self.backend(), private)?;
                self.writes += 1;
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
            Op::AddRoute(_) => self.routes(run, Write::Add)?,
            Op::ReplaceRoute(_) => self.routes(run, Write::Replace)?,
            Op::DeleteRoute(_) => self.routes(run, Write::Delete)?,
            Op::SetPolicy(p) => {
                // Unknown if the write fails half-way.
                self.policy_seen = None;
                nft::set(p)?;
                self.policy_seen = Some(Some(p.clone()));
                if !p.fence.is_empty() {
                    self.fence.warm();
                }
                self.writes += 1;
            }
            Op::SetFence(fence) => {
                let seen = self.policy_seen.take();
                // A process of its own, which reports nft's error, only
                // when the kept session could not.
                if let Err(why) = self.fence.write(fence) {
                    tracing::debug!(why, "the fence written by an nft process of its own");
                    nft::set_fence(fence)?;
                }
                self.policy_seen = seen.map(|p| p.map(|p| Policy { fence: fence.clone(), ..p }));
                self.writes += 1;
            }
            Op::DeletePolicy => {
                self.policy_seen = None;
                nft::delete()?;
                self.policy_seen = Some(None);
                self.writes += 1;
            }
        }
        Ok(())
    }

    /// Each tunnel's peers in one UAPI `set`, the tunnels side by side
    /// (wireguard-go takes every set on one thread per device).
    pub(super) fn set_peers(&mut self, ops: &[Op]) -> Result<(), DatapathError> {
        let mut by_tunnel: BTreeMap<&str, Vec<(&str, &crate::datapath::PeerSpec)>> = BTreeMap::new();
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

    /// Adds, replaces or deletes the routes of `ops`, up to 64 requests in
    /// flight.
    pub(super) fn routes(&mut self, ops: &[Op], write: Write) -> Result<(), DatapathError> {
        let routes: Vec<Route> = ops
            .iter()
            .filter_map(|o| match o {
                Op::AddRoute(r) | Op::ReplaceRoute(r) | Op::DeleteRoute(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        let n = routes.len() as u64;
        let handle = self.handle.clone();
        block_on(&self.rt, route_batch(handle, routes, write))??;
        self.writes += n;
        Ok(())
    }
}

/// How a run of routes is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    Add,
    Replace,
    Delete,
}

async fn route_batch(handle: Handle, routes: Vec<Route>, write: Write) -> Result<(), DatapathError> {
    use futures::{StreamExt, TryStreamExt};
    let index: BTreeMap<String, u32> = netlink::links(&handle).await?.into_iter().map(|l| (l.name, l.index)).collect();
    let mut requests: Vec<(u32, String, u32, Option<std::net::IpAddr>)> = Vec::with_capacity(routes.len());
    for r in routes {
        let oif =
            *index.get(&r.interface).ok_or_else(|| DatapathError::missing(format!("interface {}", r.interface)))?;
        let via = match r.via.as_str() {
            "" => None,
            text => Some(text.parse().map_err(|_| DatapathError::Invalid(format!("next hop `{text}`")))?),
        };
        requests.push((r.table, r.prefix, oif, via));
    }
    if write != Write::Delete {
        let replace = write == Write::Replace;
        futures::stream::iter(requests.into_iter().map(|(table, prefix, oif, via)| {
            let handle = handle.clone();
            async move { netlink::add_route(&handle, table, &prefix, Some(oif), via, replace).await }
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
        for (table, prefix, oif, _) in requests {
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
            let kept = keep_ipv6_addresses(name)?;
            netlink::set_controller(handle, index, Some(vrf)).await?;
            Ok(1 + kept)
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

/// Enslaving an interface to a VRF takes it down and up again, and an
/// interface that goes down loses its IPv6 addresses — a LAN's gateway
/// address among them — unless `keep_addr_on_down` is set. Sets it
/// (`sysctl net.ipv6.conf.IF.keep_addr_on_down=1`); 1 when that was a write.
fn keep_ipv6_addresses(name: &str) -> Result<u64, DatapathError> {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/keep_addr_on_down");
    match std::fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => Ok(0),
        // No IPv6 on this interface (or in this kernel): nothing to keep.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        _ => std::fs::write(&path, "1")
            .map(|()| 1)
            .map_err(|e| DatapathError::io(format!("keeping the IPv6 addresses of {name} ({path})"), e)),
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
        Op::SetKey { tunnel, .. } => format!("setting a new key on {tunnel}"),
        Op::AddRoute(r) => format!("adding route {} in table {} via {}", r.prefix, r.table, r.interface),
        Op::ReplaceRoute(r) => format!("routing {} in table {} via {}", r.prefix, r.table, r.interface),
        Op::SetPolicy(_) => "writing the policy".into(),
        Op::SetFence(f) => format!("fencing {} line addresses not in use", f.len()),
    }
}
