//! Numbers and addresses that the kernel sees: a routing table id and a
//! WireGuard port per segment, tunnel addresses per site, an AP-to-AP
//! interconnect network per segment.
//!
//! `allocate` is pure and sticky: every object that still exists keeps what
//! it had, new objects take the lowest free value, removed objects free
//! theirs. Renumbering would cut live traffic, so nothing else ever moves.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnetwork::{Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

use crate::intent::{Intent, NumRange};
use crate::sorted::{Side, merge};

/// Shared from one revision to the next (`Arc`): a change that allocates
/// nothing new — nearly every change — copies no map (10,000 sites' worth
/// at national scale) and the store's write set sees the same map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocations {
    pub segments: Arc<BTreeMap<String, SegmentAllocation>>,
    pub sites: Arc<BTreeMap<String, SiteAllocation>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentAllocation {
    pub table: u32,
    /// The listen port of a site's tunnel to the east access point and of
    /// the access points' tunnels to their member sites.
    pub port: u16,
    /// The listen port of a site's tunnel to the west access point and of
    /// the access points' interconnect tunnels. Allocations made before
    /// sites had a tunnel per access point have none (0) and are given one
    /// by the next allocation; nothing else of theirs moves.
    #[serde(default)]
    pub second_port: u16,
    /// The listen ports of a site's tunnels to its mutual aid's east and
    /// west access points; given when the segment first declares an aid
    /// (0 before), kept after.
    #[serde(default, skip_serializing_if = "no_ports")]
    pub aid_ports: [u16; 2],
    /// /31: the east access point takes the first address, the west the second.
    pub interconnect_ipv4: Ipv4Network,
    /// /127, same order.
    pub interconnect_ipv6: Ipv6Network,
}

fn no_ports(p: &[u16; 2]) -> bool {
    *p == [0, 0]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteAllocation {
    pub tunnel_ipv4: Ipv4Addr,
    pub tunnel_ipv6: Ipv6Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("{what} is exhausted: no free value left in {range} for {object}")]
    Exhausted { what: &'static str, range: String, object: String },
}

/// Hands out the lowest free value of a range, skipping values in use.
/// Values are offsets from the start of the range.
struct Pool {
    used: HashSet<u128>,
    next: u128,
    size: u128,
}

impl Pool {
    fn new(first: u128, size: u128, used: impl IntoIterator<Item = u128>) -> Self {
        Pool { used: used.into_iter().collect(), next: first, size }
    }

    fn take(&mut self) -> Option<u128> {
        while self.next < self.size {
            let v = self.next;
            self.next += 1;
            if self.used.insert(v) {
                return Some(v);
            }
        }
        None
    }
}

fn range_pool(r: NumRange, used: impl IntoIterator<Item = u32>) -> Pool {
    Pool::new(0, u128::from(r.len()), used.into_iter().filter(|v| r.contains(*v)).map(|v| u128::from(v - r.first)))
}

fn offset4(net: Ipv4Network, a: Ipv4Addr) -> Option<u128> {
    net.contains(a).then(|| u128::from(u32::from(a) - u32::from(net.network())))
}

fn offset6(net: Ipv6Network, a: Ipv6Addr) -> Option<u128> {
    net.contains(a).then(|| u128::from(a) - u128::from(net.network()))
}

fn size4(net: Ipv4Network) -> u128 {
    1u128 << (32 - u32::from(net.prefix()))
}

fn size6(net: Ipv6Network) -> u128 {
    let bits = 128 - u32::from(net.prefix());
    if bits >= 127 { 1u128 << 126 } else { 1u128 << bits }
}

/// Allocations for `intent`, keeping every allocation in `previous` whose
/// object still exists.
pub fn allocate(intent: &Intent, previous: &Allocations) -> Result<Allocations, AllocError> {
    let mut out = previous.clone();
    reallocate(intent, &mut out)?;
    Ok(out)
}

/// Keys of `have` that are missing from `want`, and keys of `want` missing
/// from `have`.
fn key_diff<'a, A, B>(have: &'a BTreeMap<String, A>, want: &'a BTreeMap<String, B>) -> (Vec<String>, Vec<&'a String>) {
    let (mut gone, mut new) = (Vec::new(), Vec::new());
    for side in merge(have, want) {
        match side {
            Side::Left(k, _) => gone.push(k.clone()),
            Side::Right(k, _) => new.push(k),
            Side::Both(..) => {}
        }
    }
    (gone, new)
}

/// Updates `alloc` in place for `intent`: frees what no longer exists and
/// allocates what is new, touching nothing else. Returns whether anything
/// changed. On error `alloc` is left as it was.
pub fn reallocate(intent: &Intent, alloc: &mut Allocations) -> Result<bool, AllocError> {
    let (gone_segments, new_segments) = key_diff(&alloc.segments, &intent.segments);
    let (gone_sites, new_sites) = key_diff(&alloc.sites, &intent.sites);
    let without_second: Vec<String> = alloc
        .segments
        .iter()
        .filter(|(k, a)| a.second_port == 0 && intent.segments.contains_key(*k))
        .map(|(k, _)| k.clone())
        .collect();
    // Segments that declare an aid and have no ports for it yet (new
    // segments among them get theirs below, with the rest).
    let without_aid_ports: Vec<String> = intent
        .segments
        .values()
        .filter(|s| !s.aid.is_empty() && alloc.segments.get(&s.name).is_some_and(|a| no_ports(&a.aid_ports)))
        .map(|s| s.name.clone())
        .collect();
    if gone_segments.is_empty()
        && new_segments.is_empty()
        && gone_sites.is_empty()
        && new_sites.is_empty()
        && without_second.is_empty()
        && without_aid_ports.is_empty()
    {
        return Ok(false);
    }
    let s = &intent.settings;
    let mut segments = Vec::new();
    let mut second_ports = Vec::new();
    let mut aid_ports = Vec::new();
    if !new_segments.is_empty() || !without_second.is_empty() || !without_aid_ports.is_empty() {
        let kept = alloc.segments.iter().filter(|(k, _)| intent.segments.contains_key(*k)).map(|(_, a)| a);
        let mut tables = range_pool(s.routing_tables, kept.clone().map(|a| a.table));
        let mut ports = range_pool(
            s.wireguard_ports,
            kept.clone()
                .flat_map(|a| [a.port, a.second_port, a.aid_ports[0], a.aid_ports[1]].map(u32::from))
                .filter(|p| *p != 0),
        );
        let ports_exhausted = |name: &str| AllocError::Exhausted {
            what: "wireguard_ports",
            range: format!("{}-{}", s.wireguard_ports.first, s.wireguard_ports.last),
            object: format!("segment `{name}`"),
        };
        for name in &without_second {
            let port = ports.take().ok_or_else(|| ports_exhausted(name))?;
            second_ports.push((name.clone(), (s.wireguard_ports.first + port as u32) as u16));
        }
        let mut take_pair = |name: &str| -> Result<[u16; 2], AllocError> {
            let east = ports.take().ok_or_else(|| ports_exhausted(name))?;
            let west = ports.take().ok_or_else(|| ports_exhausted(name))?;
            Ok([east, west].map(|p| (s.wireguard_ports.first + p as u32) as u16))
        };
        for name in &without_aid_ports {
            aid_ports.push((name.clone(), take_pair(name)?));
        }
        // Interconnects are counted in pairs of addresses.
        let mut ic4 = Pool::new(
            0,
            size4(s.interconnect_ipv4) / 2,
            kept.clone().filter_map(|a| offset4(s.interconnect_ipv4, a.interconnect_ipv4.network())).map(|o| o / 2),
        );
        let mut ic6 = Pool::new(
            0,
            size6(s.interconnect_ipv6) / 2,
            kept.filter_map(|a| offset6(s.interconnect_ipv6, a.interconnect_ipv6.network())).map(|o| o / 2),
        );
        for name in &new_segments {
            let exhausted = |what: &'static str, range: String| AllocError::Exhausted {
                what,
                range,
                object: format!("segment `{name}`"),
            };
            let table = tables.take().ok_or_else(|| {
                exhausted("routing_tables", format!("{}-{}", s.routing_tables.first, s.routing_tables.last))
            })?;
            let [port, second] = take_pair(name)?;
            let aided = intent.segments.get(*name).is_some_and(|s| !s.aid.is_empty());
            let aid = if aided { take_pair(name)? } else { [0, 0] };
            let i4 =
                ic4.take().ok_or_else(|| exhausted("interconnect_addresses.ipv4", s.interconnect_ipv4.to_string()))?;
            let i6 =
                ic6.take().ok_or_else(|| exhausted("interconnect_addresses.ipv6", s.interconnect_ipv6.to_string()))?;
            let a4 = Ipv4Addr::from(u32::from(s.interconnect_ipv4.network()) + (i4 * 2) as u32);
            let a6 = Ipv6Addr::from(u128::from(s.interconnect_ipv6.network()) + i6 * 2);
            #[allow(clippy::unwrap_used)] // /31 and /127 are valid prefix lengths
            segments.push((
                (*name).clone(),
                SegmentAllocation {
                    table: s.routing_tables.first + table as u32,
                    port,
                    second_port: second,
                    aid_ports: aid,
                    interconnect_ipv4: Ipv4Network::new(a4, 31).unwrap(),
                    interconnect_ipv6: Ipv6Network::new(a6, 127).unwrap(),
                },
            ));
        }
    }
    let mut sites = Vec::new();
    if !new_sites.is_empty() {
        let kept = alloc.sites.iter().filter(|(k, _)| intent.sites.contains_key(*k)).map(|(_, a)| a);
        // Offset 0 is the network address; IPv4 also loses its broadcast address.
        let mut t4 =
            Pool::new(1, size4(s.tunnel_ipv4) - 1, kept.clone().filter_map(|a| offset4(s.tunnel_ipv4, a.tunnel_ipv4)));
        let mut t6 = Pool::new(1, size6(s.tunnel_ipv6), kept.filter_map(|a| offset6(s.tunnel_ipv6, a.tunnel_ipv6)));
        for name in &new_sites {
            let exhausted = |what: &'static str, range: String| AllocError::Exhausted {
                what,
                range,
                object: format!("site `{name}`"),
            };
            let o4 = t4.take().ok_or_else(|| exhausted("tunnel_addresses.ipv4", s.tunnel_ipv4.to_string()))?;
            let o6 = t6.take().ok_or_else(|| exhausted("tunnel_addresses.ipv6", s.tunnel_ipv6.to_string()))?;
            sites.push((
                (*name).clone(),
                SiteAllocation {
                    tunnel_ipv4: Ipv4Addr::from(u32::from(s.tunnel_ipv4.network()) + o4 as u32),
                    tunnel_ipv6: Ipv6Addr::from(u128::from(s.tunnel_ipv6.network()) + o6),
                },
            ));
        }
    }
    // Everything succeeded: commit.
    for k in &gone_segments {
        Arc::make_mut(&mut alloc.segments).remove(k);
    }
    for k in &gone_sites {
        Arc::make_mut(&mut alloc.sites).remove(k);
    }
    for (name, port) in second_ports {
        if let Some(a) = Arc::make_mut(&mut alloc.segments).get_mut(&name) {
            a.second_port = port;
        }
    }
    for (name, ports) in aid_ports {
        if let Some(a) = Arc::make_mut(&mut alloc.segments).get_mut(&name) {
            a.aid_ports = ports;
        }
    }
    if !segments.is_empty() {
        Arc::make_mut(&mut alloc.segments).extend(segments);
    }
    if !sites.is_empty() {
        Arc::make_mut(&mut alloc.sites).extend(sites);
    }
    Ok(true)
}

impl AllocError {
    /// The Settings field whose range ran out.
    pub fn field(&self) -> &'static str {
        match self {
            AllocError::Exhausted { what, .. } => what,
        }
    }
}
