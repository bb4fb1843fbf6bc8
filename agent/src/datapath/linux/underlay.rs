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
