//! Compilation: (intent, allocations, public keys) → one [`SiteConfig`] per
//! site. Pure and deterministic: every list is sorted or ordered by meaning,
//! so the same input serialises to the same bytes.
//!
//! The intent must have passed validation; a missing allocation is reported
//! as an error rather than guessed. [`incremental`] recompiles only what a
//! change touches.

mod convert;
pub mod incremental;
mod index;

pub use index::Index;

use std::collections::BTreeMap;

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::allocate::{Allocations, SegmentAllocation, SiteAllocation};
use crate::intent::{Intent, Line, Probe, Region, Site, Tunnel, tunnel_name, vrf_name};

/// WireGuard public keys reported by agents: site → segment → base64 key.
pub type PublicKeys = BTreeMap<String, BTreeMap<String, String>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("{object} has no allocation; allocate before compiling")]
    MissingAllocation { object: String },
    #[error("site `{0}` is not in the intent")]
    UnknownSite(String),
}

/// Every site's configuration.
pub fn compile(
    intent: &Intent,
    alloc: &Allocations,
    keys: &PublicKeys,
) -> Result<BTreeMap<String, SiteConfig>, CompileError> {
    let index = Index::new(intent, alloc, keys);
    let names: Vec<&str> = intent.sites.keys().map(String::as_str).collect();
    Ok(index.sites(&names)?.into_iter().collect())
}

impl Index<'_> {
    /// The configurations of `names`, in that order. Many sites (a change
    /// of settings, a segment, a policy) are compiled on every core.
    pub fn sites(&self, names: &[&str]) -> Result<Vec<(String, SiteConfig)>, CompileError> {
        if names.len() >= crate::par::PARALLEL_FROM {
            self.write_out_addresses();
        }
        crate::par::map(names, |name| Ok((name.to_string(), self.site(name)?))).into_iter().collect()
    }
}

fn by_priority(lines: &[Line]) -> Vec<&Line> {
    let mut v: Vec<&Line> = lines.iter().collect();
    v.sort_by_key(|l| l.priority);
    v
}

pub(crate) fn host_prefixes(t: &SiteAllocation) -> Vec<String> {
    vec![format!("{}/32", t.tunnel_ipv4), format!("{}/128", t.tunnel_ipv6)]
}

/// Host prefixes of the east (0) or west (1) end of a segment's interconnect.
fn interconnect(sa: &SegmentAllocation, end: u8) -> [String; 2] {
    let v4 = std::net::Ipv4Addr::from(u32::from(sa.interconnect_ipv4.network()) + u32::from(end));
    let v6 = std::net::Ipv6Addr::from(u128::from(sa.interconnect_ipv6.network()) + u128::from(end));
    [format!("{v4}/32"), format!("{v6}/128")]
}

impl Index<'_> {
    /// One site's configuration.
    pub fn site(&self, name: &str) -> Result<SiteConfig, CompileError> {
        let site = self.intent.sites.get(name).ok_or_else(|| CompileError::UnknownSite(name.to_string()))?;
        let settings = &self.intent.settings;
        let mut segments =
            self.carried(site).into_iter().map(|seg| self.segment(site, seg)).collect::<Result<Vec<_>, _>>()?;
        segments.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok(SiteConfig {
            site: site.name.clone(),
            tenant: site.tenant.clone(),
            role: convert::role(site.role).into(),
            region: convert::region(site.region).into(),
            revision: 0,
            lines: by_priority(&site.lines)
                .iter()
                .map(|l| pb::Line {
                    name: l.name.clone(),
                    kind: convert::line_kind(l.kind).into(),
                    priority: l.priority,
                    address: l.address.to_string(),
                    probe: Some(convert::probe(settings.probe_for(l))),
                })
                .collect(),
            segments,
            probe: Some(convert::probe(settings.probe)),
            key_rotation: crate::rotation::rotation(self.keys, name).map(|r| pb::KeyRotation {
                id: r.id,
                phase: match r.phase {
                    crate::rotation::Phase::Prepare => pb::KeyPhase::Prepare,
                    crate::rotation::Phase::Switch => pb::KeyPhase::Switch,
                    crate::rotation::Phase::Fresh => pb::KeyPhase::Fresh,
                }
                .into(),
                switch_at_unix_ms: r.switch_at.unwrap_or(0),
            }),
        })
    }

    fn segment_alloc(&self, segment: &str) -> Result<&SegmentAllocation, CompileError> {
        self.alloc
            .segments
            .get(segment)
            .ok_or_else(|| CompileError::MissingAllocation { object: format!("segment `{segment}`") })
    }

    /// A site's tunnel addresses as host prefixes.
    fn host_prefixes_of(&self, site: &str) -> Result<Vec<String>, CompileError> {
        match self.text(site) {
            Some(t) => Ok(t.host.clone()),
            None => Ok(host_prefixes(self.tunnel(site)?)),
        }
    }

    fn tunnel(&self, site: &str) -> Result<&SiteAllocation, CompileError> {
        self.alloc.sites.get(site).ok_or_else(|| CompileError::MissingAllocation { object: format!("site `{site}`") })
    }

    fn segment(&self, site: &Site, segment: &str) -> Result<pb::SegmentConfig, CompileError> {
        let seg = &self.intent.segments[segment];
        let sa = self.segment_alloc(segment)?;
        let own = self.host_prefixes_of(&site.name)?;
        let attachment = site.attachment(segment).and_then(|a| {
            a.interface
                .as_ref()
                .map(|ifname| pb::Attachment { interface: ifname.clone(), prefixes: convert::prefixes(&a.prefixes) })
        });
        let (east, west) =
            if site.is_access_point() { self.pair_of(site, segment) } else { self.access_points(segment) };
        // An access point aiding the segment carries its members, not its policy.
        let aiding = site.is_access_point() && site.attachment(segment).is_none();
        let aids = if site.is_access_point() { &[][..] } else { self.aids(segment) };
        let mut tunnels = Vec::new();
        let mut tunnel = |kind: Tunnel, port: u16, addresses: Vec<String>, faces: pb::PeerRole| {
            tunnels.push(pb::WireguardInterface {
                name: tunnel_name(kind, segment),
                listen_port: u32::from(port),
                addresses,
                faces: faces.into(),
            });
        };
        let mut peers = Vec::new();
        let mut route_groups = Vec::new();
        let mut policy = Vec::new();
        let mut imports = Vec::new();
        let mut aid_configs = Vec::new();
        if site.is_access_point() {
            let (own_end, other) = if site.region == Region::East { (0, west) } else { (1, east) };
            tunnel(Tunnel::Members, sa.port, own.clone(), pb::PeerRole::Site);
            for member in self.members(segment) {
                let (peer, group) = self.member_entries(site, &self.intent.sites[*member], segment)?;
                peers.push(peer);
                route_groups.extend(group);
            }
            if let Some(other) = other {
                let mut addresses = own.clone();
                addresses.extend(interconnect(sa, own_end));
                tunnel(Tunnel::Interconnect, sa.second_port, addresses, pb::PeerRole::Interconnect);
                let extra = interconnect(sa, 1 - own_end).to_vec();
                peers.push(self.peer(site, other, segment, pb::PeerRole::Interconnect, extra)?);
                // The other access point's own LAN in this segment, if it has one.
                if let Some(lan) = other.attachment(segment).filter(|a| !a.prefixes.is_empty()) {
                    route_groups.push(pb::RouteGroup {
                        name: other.name.clone(),
                        prefixes: convert::prefixes(&lan.prefixes),
                        candidates: vec![other.name.clone()],
                    });
                }
            }
            for p in self.policies(segment).iter().filter(|_| !aiding) {
                let (Some(from), Some(to)) = (self.intent.segments.get(&p.from), self.intent.segments.get(&p.to))
                else {
                    continue;
                };
                if p.from == segment {
                    policy.push(pb::PolicyRule {
                        name: p.name.clone(),
                        from_segment: p.from.clone(),
                        to_segment: p.to.clone(),
                        from_prefixes: convert::prefixes(&from.prefixes),
                        to_prefixes: convert::prefixes(&to.prefixes),
                        protocol: convert::protocol(p.protocol).into(),
                        ports: p.ports.iter().map(|r| convert::port_range(*r)).collect(),
                    });
                }
            }
            for linked in self.linked_segments(segment).into_iter().filter(|_| !aiding) {
                imports.push(pb::SegmentImport {
                    segment: linked.to_string(),
                    table: self.segment_alloc(linked)?.table,
                    prefixes: convert::prefixes(&self.intent.segments[linked].prefixes),
                });
            }
        } else {
            let east_home = site.region == Region::East;
            fn home_first<T>(east_home: bool, e: T, w: T) -> [T; 2] {
                if east_home { [e, w] } else { [w, e] }
            }
            // The segment's own pair first, then its aid's, each access
            // point on a tunnel of its own.
            let mut candidates: Vec<String> =
                home_first(east_home, east, west).into_iter().flatten().map(|s| s.name.clone()).collect();
            let mut aps: Vec<&Site> = [east, west].into_iter().flatten().collect();
            for (aid, ae, aw) in aids {
                candidates.extend(home_first(east_home, *ae, *aw).into_iter().flatten().map(|s| s.name.clone()));
                aps.extend([ae, aw].into_iter().flatten().copied());
                if ae.is_some() {
                    tunnel(Tunnel::EastAid, sa.aid_ports[0], own.clone(), pb::PeerRole::AccessPoint);
                }
                if aw.is_some() {
                    tunnel(Tunnel::WestAid, sa.aid_ports[1], own.clone(), pb::PeerRole::AccessPoint);
                }
                aid_configs.push(pb::AidConfig {
                    name: aid.name.clone(),
                    access_points: [ae, aw].into_iter().flatten().map(|s| s.name.clone()).collect(),
                    automatic: aid.activation == crate::intent::Activation::Automatic,
                    active: self.keys.get(crate::aid::ACTIVATIONS).is_some_and(|a| a.contains_key(&aid.name)),
                    max_duration_ms: aid.max_duration_s.saturating_mul(1000),
                });
            }
            if east.is_some() {
                tunnel(Tunnel::EastAccessPoint, sa.port, own.clone(), pb::PeerRole::AccessPoint);
            }
            if west.is_some() {
                tunnel(Tunnel::WestAccessPoint, sa.second_port, own.clone(), pb::PeerRole::AccessPoint);
            }
            for ap in aps {
                peers.push(self.peer(site, ap, segment, pb::PeerRole::AccessPoint, Vec::new())?);
            }
            for routed in std::iter::once(segment).chain(self.linked_segments(segment)) {
                route_groups.push(pb::RouteGroup {
                    name: routed.to_string(),
                    prefixes: convert::prefixes(&self.intent.segments[routed].prefixes),
                    candidates: candidates.clone(),
                });
            }
        }
        tunnels.sort_by(|a, b| a.name.cmp(&b.name));
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        route_groups.sort_by(|a, b| a.name.cmp(&b.name));
        policy.sort_by(|a, b| a.name.cmp(&b.name));
        imports.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok(pb::SegmentConfig {
            segment: segment.to_string(),
            owner: seg.tenant.clone(),
            domain: Some(pb::RoutingDomain { vrf: vrf_name(segment), table: sa.table }),
            tunnels,
            peers,
            route_groups,
            attachment,
            policy,
            imports,
            aids: aid_configs,
            legacy: site.attachment(segment).and_then(|a| a.legacy.as_ref()).map(|l| pb::LegacyNetwork {
                interface: l.interface.clone(),
                via: l.via.to_string(),
                prefixes: convert::prefixes(l.sites.iter().flat_map(|s| &s.prefixes)),
            }),
        })
    }

    /// What an access point holds for one member site of a segment: its peer,
    /// and a route group for its LAN prefixes: the site directly while its
    /// tunnel to this access point answers, else over the interconnect (a
    /// site accepts its segment's traffic from either access point, so the
    /// two may disagree about where it is without dropping anything).
    pub(crate) fn member_entries(
        &self,
        ap: &Site,
        member: &Site,
        segment: &str,
    ) -> Result<(pb::Peer, Option<pb::RouteGroup>), CompileError> {
        let peer = self.peer(ap, member, segment, pb::PeerRole::Site, Vec::new())?;
        // A migration gateway's legacy sites are reached through it; a site
        // being cut over is not reached at its prefixes yet (the gateway is).
        let pending = self.cutting_over(&member.name, segment);
        let prefixes = member
            .attachment(segment)
            .map(|a| convert::prefixes(a.all_prefixes().filter(|p| !pending.contains(p))))
            .unwrap_or_default();
        let (east, west) = self.pair_of(ap, segment);
        let other = if ap.region == Region::East { west } else { east };
        let candidates = std::iter::once(member.name.clone()).chain(other.map(|o| o.name.clone())).collect();
        let group = (!prefixes.is_empty()).then(|| pb::RouteGroup { name: member.name.clone(), prefixes, candidates });
        Ok((peer, group))
    }

    /// `remote` as a peer of `local`'s tunnel that faces it. The tunnel
    /// and its port on either side follow from the two roles: a site's
    /// tunnel to the east access point and an access point's to its members
    /// listen on the segment's port; a site's tunnel to the west access point
    /// and the interconnects on its second port.
    fn peer(
        &self,
        local: &Site,
        remote: &Site,
        segment: &str,
        role: pb::PeerRole,
        extra: Vec<String>,
    ) -> Result<pb::Peer, CompileError> {
        let sa = self.segment_alloc(segment)?;
        // An access point that aids the segment (it is not attached): a
        // site's tunnel to it is one of the aid's, on the aid's ports.
        let aids = |ap: &Site| ap.attachment(segment).is_none();
        let (interface, port) = match role {
            pb::PeerRole::AccessPoint if aids(remote) && remote.region == Region::West => (Tunnel::WestAid, sa.port),
            pb::PeerRole::AccessPoint if aids(remote) => (Tunnel::EastAid, sa.port),
            pb::PeerRole::AccessPoint if remote.region == Region::West => (Tunnel::WestAccessPoint, sa.port),
            pb::PeerRole::AccessPoint => (Tunnel::EastAccessPoint, sa.port),
            pb::PeerRole::Site if aids(local) && local.region == Region::West => (Tunnel::Members, sa.aid_ports[1]),
            pb::PeerRole::Site if aids(local) => (Tunnel::Members, sa.aid_ports[0]),
            pb::PeerRole::Site if local.region == Region::West => (Tunnel::Members, sa.second_port),
            pb::PeerRole::Site => (Tunnel::Members, sa.port),
            pb::PeerRole::Interconnect | pb::PeerRole::Unspecified => (Tunnel::Interconnect, sa.second_port),
        };
        let mut allowed = self.host_prefixes_of(&remote.name)?;
        allowed.extend(extra);
        let keys = self.keys.get(&remote.name);
        let public_key = keys.and_then(|k| k.get(segment)).cloned().unwrap_or_default();
        let next_public_key = keys
            .and_then(|k| crate::rotation::next_key(k, segment))
            .filter(|next| **next != public_key)
            .cloned()
            .unwrap_or_default();
        let switch_at_unix_ms = keys.filter(|_| !next_public_key.is_empty()).map_or(0, crate::rotation::peer_switch_at);
        Ok(pb::Peer {
            name: remote.name.clone(),
            role: role.into(),
            public_key,
            next_public_key,
            switch_at_unix_ms,
            endpoints: self.endpoints(local, remote, port),
            allowed_prefixes: allowed,
            interface: tunnel_name(interface, segment),
        })
    }

    /// Every (local line, remote line) pair of the same address family, best
    /// local line first, then best remote line.
    fn endpoints(&self, local: &Site, remote: &Site, port: u16) -> Vec<pb::Endpoint> {
        let settings = &self.intent.settings;
        let mut remotes: Vec<(usize, &Line)> = remote.lines.iter().enumerate().collect();
        remotes.sort_by_key(|(_, l)| l.priority);
        let written = self.text(&remote.name);
        // Sized exactly: an access point keeps its configuration's
        // structure, 10,000 peers' endpoints, and a vector grown by pushes
        // holds room for four.
        let pairs = local
            .lines
            .iter()
            .map(|l| remotes.iter().filter(|(_, r)| r.address.is_ipv4() == l.address.is_ipv4()).count())
            .sum();
        let mut out = Vec::with_capacity(pairs);
        for l in by_priority(&local.lines) {
            for (i, r) in remotes.iter().filter(|(_, r)| r.address.is_ipv4() == l.address.is_ipv4()) {
                let (pl, pr) = (settings.probe_for(l), settings.probe_for(r));
                let slower: Probe = if pr.detect_ms() > pl.detect_ms() { pr } else { pl };
                out.push(pb::Endpoint {
                    local_line: l.name.clone(),
                    remote_line: r.name.clone(),
                    address: written.and_then(|t| t.lines.get(*i)).map_or_else(|| r.address.to_string(), Clone::clone),
                    port: u32::from(port),
                    kind: convert::line_kind(r.kind).into(),
                    probe: Some(convert::probe(slower)),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiling many sites at once writes each site's addresses out once
    /// and hands them to every peer; a site compiled alone writes its own.
    /// The configurations are the same either way.
    #[test]
    fn addresses_written_out_once_make_the_same_configurations() {
        let intent = crate::intent::parse::parse_str("gen.yaml", &crate::generate::generate(600, 3)).intent;
        let alloc = crate::allocate::allocate(&intent, &Allocations::default()).expect("allocate");
        let keys = PublicKeys::new();
        let names: Vec<&str> = intent.sites.keys().map(String::as_str).collect();
        assert!(names.len() >= crate::par::PARALLEL_FROM, "{} sites: too few to write out", names.len());
        let together = Index::new(&intent, &alloc, &keys).sites(&names).expect("compile");
        let alone = Index::new(&intent, &alloc, &keys);
        let mut endpoints = 0;
        for (name, config) in &together {
            assert_eq!(config, &alone.site(name).expect("compile"), "{name}");
            endpoints += config.segments.iter().flat_map(|s| &s.peers).map(|p| p.endpoints.len()).sum::<usize>();
        }
        assert!(alone.text(names[0]).is_none(), "a site compiled alone wrote out every site's addresses");
        assert!(endpoints > 1000, "{endpoints} endpoints compared");
    }
}
