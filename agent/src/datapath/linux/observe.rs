//! Observation: what the agent owns in the kernel now (its domains,
//! tunnels, LAN memberships, routes and policy), read back through netlink,
//! the WireGuard UAPI and nft, and kept while no notification says it changed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::netlink::{self, Link};
use super::runtime::block_on;
use super::{CACHE_LIFE, DOMAIN_PREFIX, DomainMode, Linux, nft, tunnel_segment, wireguard};
use crate::datapath::{DatapathError, Domain, Owned, Route, Tunnel};

impl Linux {
    pub(super) fn observe_all(&mut self) -> Result<Owned, DatapathError> {
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
        // The main table and the lines' tables hold only the underlay pins
        // (see `pin`), kept apart.
        let routes: Vec<_> =
            routes.into_iter().filter(|r| r.table != netlink::MAIN_TABLE && !super::is_line_table(r.table)).collect();
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
                // What table mode left behind (a kernel that gained VRFs, an
                // agent asked for VRF mode): its tables, closed by the agent's
                // unreachable defaults, and its per-interface rules, seen as
                // domains nobody wants, so they are deleted with their rules.
                let vrf_tables: BTreeSet<u32> = owned.domains.values().map(|d| d.table).collect();
                let left: BTreeSet<u32> = routes
                    .iter()
                    .filter(|r| r.oif.is_none() && r.prefix.ends_with("/0"))
                    .map(|r| r.table)
                    .chain(rules.iter().map(|r| r.table))
                    .filter(|t| !vrf_tables.contains(t))
                    .collect();
                for table in left {
                    let name = format!("table-{table}");
                    owned.domains.insert(name.clone(), Domain { name, table });
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
                        && let Some(segment) = tunnel_segment(name)
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
        for l in links.iter().filter(|l| tunnel_segment(&l.name).is_some()) {
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
            if tunnel_segment(name).is_none() && !name.starts_with(DOMAIN_PREFIX) {
                owned.lans.insert(name.clone(), domain.clone());
            }
        }
        for r in routes.iter().filter(|r| r.oif.is_some()) {
            let interface = r.oif.and_then(|i| by_index.get(&i)).map(|l| l.name.clone()).unwrap_or_default();
            owned.routes.insert(Route { table: r.table, prefix: r.prefix.clone(), interface, via: r.via.clone() });
        }
        let nft_started = std::time::Instant::now();
        owned.policy = match (&self.policy_seen, self.trust_policy) {
            (Some(seen), true) => seen.clone(),
            _ => nft::observe()?,
        };
        self.policy_seen = Some(owned.policy.clone());
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

    /// The kept observation if it can still be trusted (the policy table,
    /// which raises no notification here, read again), else a new one.
    pub(super) fn current(&mut self) -> Result<&Owned, DatapathError> {
        let fresh = self.cache.as_ref().is_some_and(|(_, at)| at.elapsed() < CACHE_LIFE);
        if fresh && self.quiet() {
            if !self.trust_policy {
                let policy = nft::observe()?;
                self.policy_seen = Some(policy.clone());
                if let Some((owned, _)) = self.cache.as_mut() {
                    owned.policy = policy;
                }
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
