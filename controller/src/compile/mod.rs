//! Compilation: (intent, allocations, public keys) → one [`SiteConfig`] per
//! site. Pure and deterministic: every list is sorted or ordered by meaning,
//! so the same input serialises to the same bytes.
//!
//! The intent must have passed validation; a missing allocation is reported
//! as an error rather than guessed.

mod convert;
mod index;

pub use index::Index;

use std::collections::BTreeMap;

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::allocate::Allocations;
use crate::intent::{Intent, Probe, Region, Site, vrf_name, wireguard_name};

/// WireGuard public keys reported by agents, per (site, segment).
pub type PublicKeys = BTreeMap<(String, String), String>;

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
    intent
        .sites
        .keys()
        .map(|name| Ok((name.clone(), index.site(name)?)))
        .collect()
}

impl Index<'_> {
    /// One site's configuration.
    pub fn site(&self, name: &str) -> Result<SiteConfig, CompileError> {
        let site = self
            .intent
            .sites
            .get(name)
            .ok_or_else(|| CompileError::UnknownSite(name.to_string()))?;
        let mut lines: Vec<&crate::intent::Line> = site.lines.iter().collect();
        lines.sort_by_key(|l| l.priority);
        let settings = &self.intent.settings;
        let mut segments = Vec::with_capacity(site.attachments.len());
        for a in &site.attachments {
            segments.push(self.segment(site, &a.segment)?);
        }
        segments.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok(SiteConfig {
            site: site.name.clone(),
            tenant: site.tenant.clone(),
            role: convert::role(site.role).into(),
            region: convert::region(site.region).into(),
            revision: 0,
            lines: lines
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
        })
    }

    fn segment(&self, site: &Site, segment: &str) -> Result<pb::SegmentConfig, CompileError> {
        let seg = &self.intent.segments[segment];
        let sa =
            self.alloc
                .segments
                .get(segment)
                .ok_or_else(|| CompileError::MissingAllocation {
                    object: format!("segment `{segment}`"),
                })?;
        let own = self.tunnel(&site.name)?;
        let mut addresses = vec![
            format!("{}/32", own.tunnel_ipv4),
            format!("{}/128", own.tunnel_ipv6),
        ];
        let attachment = site.attachment(segment).and_then(|a| {
            a.interface.as_ref().map(|ifname| pb::Attachment {
                interface: ifname.clone(),
                prefixes: convert::prefixes(&a.prefixes),
            })
        });
        let (east, west) = self.access_points(segment);
        let mut peers = Vec::new();
        let mut route_groups = Vec::new();
        let mut policy = Vec::new();
        let mut imports = Vec::new();
        if site.is_access_point() {
            let (own_ic, other) = if site.region == Region::East {
                (0, west)
            } else {
                (1, east)
            };
            addresses.push(format!("{}/32", nth4(sa.interconnect_ipv4, own_ic)));
            addresses.push(format!(
                "{}/128",
                nth6(sa.interconnect_ipv6, u128::from(own_ic))
            ));
            for member in self.members(segment) {
                let m = &self.intent.sites[*member];
                peers.push(self.peer(site, m, segment, pb::PeerRole::Site, Vec::new())?);
                let prefixes = m
                    .attachment(segment)
                    .map(|a| convert::prefixes(&a.prefixes))
                    .unwrap_or_default();
                if !prefixes.is_empty() {
                    route_groups.push(pb::RouteGroup {
                        name: m.name.clone(),
                        prefixes,
                        candidates: [m.name.clone()]
                            .into_iter()
                            .chain(other.map(|o| o.name.clone()))
                            .collect(),
                    });
                }
            }
            if let Some(other) = other {
                let ic = 1 - own_ic;
                let extra = vec![
                    format!("{}/32", nth4(sa.interconnect_ipv4, ic)),
                    format!("{}/128", nth6(sa.interconnect_ipv6, u128::from(ic))),
                ];
                peers.push(self.peer(site, other, segment, pb::PeerRole::Interconnect, extra)?);
            }
            for p in self.policies(segment) {
                let (Some(from), Some(to)) = (
                    self.intent.segments.get(&p.from),
                    self.intent.segments.get(&p.to),
                ) else {
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
            for linked in self.linked_segments(segment) {
                let table = self
                    .alloc
                    .segments
                    .get(linked)
                    .ok_or_else(|| CompileError::MissingAllocation {
                        object: format!("segment `{linked}`"),
                    })?
                    .table;
                imports.push(pb::SegmentImport {
                    segment: linked.to_string(),
                    table,
                    prefixes: convert::prefixes(&self.intent.segments[linked].prefixes),
                });
            }
        } else {
            let (home, away) = if site.region == Region::East {
                (east, west)
            } else {
                (west, east)
            };
            let candidates: Vec<String> = [home, away]
                .into_iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect();
            for ap in [east, west].into_iter().flatten() {
                peers.push(self.peer(site, ap, segment, pb::PeerRole::AccessPoint, Vec::new())?);
            }
            route_groups.push(pb::RouteGroup {
                name: segment.to_string(),
                prefixes: convert::prefixes(&seg.prefixes),
                candidates: candidates.clone(),
            });
            for linked in self.linked_segments(segment) {
                route_groups.push(pb::RouteGroup {
                    name: linked.to_string(),
                    prefixes: convert::prefixes(&self.intent.segments[linked].prefixes),
                    candidates: candidates.clone(),
                });
            }
        }
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        route_groups.sort_by(|a, b| a.name.cmp(&b.name));
        policy.sort_by(|a, b| a.name.cmp(&b.name));
        imports.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok(pb::SegmentConfig {
            segment: segment.to_string(),
            owner: seg.tenant.clone(),
            domain: Some(pb::RoutingDomain {
                vrf: vrf_name(segment),
                table: sa.table,
            }),
            wireguard: Some(pb::WireguardInterface {
                name: wireguard_name(segment),
                listen_port: u32::from(sa.port),
                addresses,
            }),
            peers,
            route_groups,
            attachment,
            policy,
            imports,
        })
    }

    fn tunnel(&self, site: &str) -> Result<&crate::allocate::SiteAllocation, CompileError> {
        self.alloc
            .sites
            .get(site)
            .ok_or_else(|| CompileError::MissingAllocation {
                object: format!("site `{site}`"),
            })
    }

    fn peer(
        &self,
        local: &Site,
        remote: &Site,
        segment: &str,
        role: pb::PeerRole,
        extra: Vec<String>,
    ) -> Result<pb::Peer, CompileError> {
        let t = self.tunnel(&remote.name)?;
        let port = self.alloc.segments[segment].port;
        let mut allowed = vec![
            format!("{}/32", t.tunnel_ipv4),
            format!("{}/128", t.tunnel_ipv6),
        ];
        allowed.extend(extra);
        Ok(pb::Peer {
            name: remote.name.clone(),
            role: role.into(),
            public_key: self
                .keys
                .get(&(remote.name.clone(), segment.to_string()))
                .cloned()
                .unwrap_or_default(),
            endpoints: self.endpoints(local, remote, port),
            allowed_prefixes: allowed,
        })
    }

    /// Every (local line, remote line) pair of the same address family, best
    /// local line first, then best remote line.
    fn endpoints(&self, local: &Site, remote: &Site, port: u16) -> Vec<pb::Endpoint> {
        let settings = &self.intent.settings;
        let mut out = Vec::new();
        let mut locals: Vec<_> = local.lines.iter().collect();
        locals.sort_by_key(|l| l.priority);
        let mut remotes: Vec<_> = remote.lines.iter().collect();
        remotes.sort_by_key(|l| l.priority);
        for l in &locals {
            for r in remotes
                .iter()
                .filter(|r| r.address.is_ipv4() == l.address.is_ipv4())
            {
                let (pl, pr) = (settings.probe_for(l), settings.probe_for(r));
                let slower: Probe = if pr.detect_ms() > pl.detect_ms() {
                    pr
                } else {
                    pl
                };
                out.push(pb::Endpoint {
                    local_line: l.name.clone(),
                    remote_line: r.name.clone(),
                    address: r.address.to_string(),
                    port: u32::from(port),
                    kind: convert::line_kind(r.kind).into(),
                    probe: Some(convert::probe(slower)),
                });
            }
        }
        out
    }
}

fn nth4(net: ipnetwork::Ipv4Network, i: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(net.network()) + i)
}

fn nth6(net: ipnetwork::Ipv6Network, i: u128) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(net.network()) + i)
}
