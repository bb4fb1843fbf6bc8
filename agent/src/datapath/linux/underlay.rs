//! The underlay: how each line path's outer packets leave the router, and
//! the pinned routes that keep each peer's outer packets on the line the
//! agent chose for it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::netlink;
use super::runtime::block_on;
use super::{CACHE_LIFE, Linux};
use crate::datapath::{DatapathError, Hop, Hops, Pin};

impl Linux {
    pub(super) fn hops(&mut self, paths: &[(IpAddr, IpAddr)]) -> Result<Hops, DatapathError> {
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
            if let Some(r) = main_route(&routes, remote, |r| !r.ours && r.oif == Some(index)) {
                out.insert((local, remote), Hop { interface: link.name.clone(), gateway: r.gateway });
            }
        }
        Ok(out)
    }

    /// The pins the last [`Linux::pin`] did not write, written (replacing
    /// any route of ours to the same address) without reading the routes
    /// and rules first — three dumps, 10–27 ms of a lab line cut with debug
    /// binaries — and with each interface's index asked of the kernel by
    /// name (a dump of the links took 2–12 ms more). What else differs is
    /// left to the next [`Linux::pin`].
    pub(super) fn pin_ahead(&mut self, pins: &BTreeSet<Pin>) -> Result<(), DatapathError> {
        let Some(before) = &self.pinned else { return self.pin(pins).map(|_| ()) };
        let new: Vec<Pin> = pins.iter().filter(|p| !p.follow && !before.contains(p)).cloned().collect();
        if new.is_empty() {
            return Ok(());
        }
        let index = interface_index()?;
        let mut found = Vec::new();
        for p in new {
            // An interface gone: the full build that follows says so.
            if let Some(i) = index(&p.hop.interface) {
                found.push((p, i));
            }
        }
        let handle = self.handle.clone();
        let count = found.len() as u64;
        block_on(&self.rt, async move {
            for (p, oif) in found {
                netlink::add_pin(&handle, netlink::MAIN_TABLE, p.destination, p.source, oif, p.hop.gateway).await?;
            }
            Ok::<_, DatapathError>(())
        })??;
        self.writes += count;
        Ok(())
    }

    pub(super) fn pin(&mut self, pins: &BTreeSet<Pin>) -> Result<BTreeSet<IpAddr>, DatapathError> {
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
        let (links, routes, rules) = block_on(&self.rt, async move {
            Ok::<_, DatapathError>((
                netlink::links(&handle).await?,
                netlink::main_routes(&handle).await?,
                netlink::source_rules(&handle).await?,
            ))
        })??;
        let index: BTreeMap<&str, u32> = links.iter().map(|l| (l.name.as_str(), l.index)).collect();
        // (table, destination) → (interface, gateway, source).
        let mut wanted: BTreeMap<(u32, IpAddr), (u32, Option<IpAddr>, IpAddr)> = BTreeMap::new();
        for p in pins.iter().filter(|p| !p.follow) {
            if let Some(i) = index.get(p.hop.interface.as_str()) {
                wanted.entry((netlink::MAIN_TABLE, p.destination)).or_insert((*i, p.hop.gateway, p.source));
            }
        }
        let mut rules_wanted = BTreeSet::new();
        for p in source_pins(pins, &routes, &index) {
            wanted.entry((p.table, p.destination)).or_insert((p.oif, p.gateway, p.source));
            rules_wanted.insert((p.source, p.table));
        }
        let mut stale = Vec::new();
        let mut changed = BTreeSet::new();
        for r in routes.iter().filter(|r| r.ours) {
            let full = if r.destination.is_ipv4() { 32 } else { 128 };
            let same = r.length == full
                && wanted
                    .get(&(r.table, r.destination))
                    .is_some_and(|w| (Some(w.0), w.1, Some(w.2)) == (r.oif, r.gateway, r.source));
            if same {
                wanted.remove(&(r.table, r.destination));
            } else {
                stale.push(r.message.clone());
                if r.table == netlink::MAIN_TABLE {
                    changed.insert(r.destination);
                }
            }
        }
        changed.extend(wanted.keys().filter(|(t, _)| *t == netlink::MAIN_TABLE).map(|(_, d)| *d));
        let mut stale_rules = Vec::new();
        for r in rules {
            if !r.source.is_some_and(|s| rules_wanted.remove(&(s, r.table))) {
                stale_rules.push(r.message);
            }
        }
        let writes = (stale.len() + wanted.len() + stale_rules.len() + rules_wanted.len()) as u64;
        if writes == 0 {
            self.pinned = Some(pins.clone());
            return Ok(changed);
        }
        let handle = self.handle.clone();
        block_on(&self.rt, async move {
            for m in stale_rules {
                netlink::del_rule(&handle, m).await?;
            }
            for m in stale {
                netlink::del_route(&handle, m).await?;
            }
            for ((table, destination), (oif, gateway, source)) in wanted {
                netlink::add_pin(&handle, table, destination, source, oif, gateway).await?;
            }
            for (source, table) in rules_wanted {
                netlink::add_source_rule(&handle, source, table).await?;
            }
            Ok::<_, DatapathError>(())
        })??;
        self.writes += writes;
        self.pinned = Some(pins.clone());
        Ok(changed)
    }
}

/// The index of an interface by its name (`SIOCGIFINDEX`), or `None`
/// when there is no such interface.
fn interface_index() -> Result<impl Fn(&str) -> Option<u32>, DatapathError> {
    use rustix::net::{AddressFamily, SocketType, netdevice, socket};
    let sock = socket(AddressFamily::INET, SocketType::DGRAM, None)
        .map_err(|e| DatapathError::io("a socket to ask for interface indexes", e.into()))?;
    Ok(move |name: &str| netdevice::name_to_index(&sock, name).ok())
}

/// A route in a line's table: packets from `source` to `destination` leave
/// by interface `oif`, through `gateway`.
struct SourcePin {
    table: u32,
    source: IpAddr,
    destination: IpAddr,
    oif: u32,
    gateway: Option<IpAddr>,
}

/// The source pins `pins` need: one for each followed path whose hop leaves
/// on another interface (or through another gateway) than the main table
/// would send packets to its destination. Each source address has a table,
/// numbered by its rank among the followed sources.
fn source_pins(pins: &BTreeSet<Pin>, routes: &[netlink::MainRoute], index: &BTreeMap<&str, u32>) -> Vec<SourcePin> {
    let sources: BTreeSet<IpAddr> = pins.iter().filter(|p| p.follow).map(|p| p.source).collect();
    let mut out = Vec::new();
    for p in pins.iter().filter(|p| p.follow) {
        let Some(&oif) = index.get(p.hop.interface.as_str()) else { continue };
        // Where the main table sends it, whatever the source.
        if main_route(routes, p.destination, |_| true).is_some_and(|r| r.oif == Some(oif) && r.gateway == p.hop.gateway)
        {
            continue;
        }
        let rank = sources.iter().position(|s| *s == p.source).unwrap_or_default() as u32;
        if rank >= super::LINE_TABLE_COUNT {
            continue;
        }
        out.push(SourcePin {
            table: super::LINE_TABLES + rank,
            source: p.source,
            destination: p.destination,
            oif,
            gateway: p.hop.gateway,
        });
    }
    out
}

/// The main table's route to `to` among those `keep` keeps, as the kernel
/// picks it: the most specific, then the lowest metric.
fn main_route(
    routes: &[netlink::MainRoute],
    to: IpAddr,
    keep: impl Fn(&netlink::MainRoute) -> bool,
) -> Option<&netlink::MainRoute> {
    routes
        .iter()
        .filter(|r| r.table == netlink::MAIN_TABLE && contains(r.destination, r.length, to) && keep(r))
        .max_by_key(|r| (r.length, std::cmp::Reverse(r.metric)))
}

/// Whether `prefix/length` contains `ip` (same family).
fn contains(prefix: IpAddr, length: u8, ip: IpAddr) -> bool {
    ipnetwork::IpNetwork::new(prefix, length).is_ok_and(|n| n.contains(ip))
}
