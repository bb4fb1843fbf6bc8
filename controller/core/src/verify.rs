//! What the intent says may reach what, and a check that the compiled
//! configurations cannot deliver anything else.
//!
//! The **reachability matrix** is over endpoints — a site's LAN in one
//! segment — and follows from the intent alone: two endpoints of one segment
//! reach each other with anything; an endpoint reaches one of another
//! segment only with the flows a policy allows from its segment into that
//! one; nothing else.
//!
//! The **isolation check** reads every compiled configuration: each prefix a
//! segment routes, accepts from a peer or imports must lie in that segment's
//! own prefixes or in those of a segment a policy links it to (or be a
//! tunnel address, which lies in no segment); imports and policy rules name
//! only linked segments; a segment's peers are the sites attached to it
//! (and the access points of its mutual aids).
//! The tunnels are checked as the agents build them: each belongs to its
//! segment by name; every peer is on one of its segment's tunnels; a tunnel
//! that faces an access point or the interconnect (whose one peer the
//! agent allows every address, routing choosing) holds exactly one peer,
//! an access point of the segment (or of its mutual aid).
//! A violation is a way a packet could cross into a segment it must not.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use ipnetwork::IpNetwork;
use musubi_proto::v1::SiteConfig;

use crate::allocate::Allocations;
use crate::compile::{Index, PublicKeys};
use crate::intent::{Intent, Protocol, TUNNEL_PREFIXES};

/// A site's LAN in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub site: String,
    pub segment: String,
    pub prefixes: Vec<IpNetwork>,
}

impl Endpoint {
    pub fn label(&self) -> String {
        format!("{}/{}", self.site, self.segment)
    }
}

/// A flow a policy allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub protocol: Protocol,
    /// Inclusive destination port ranges; empty: every port.
    pub ports: Vec<(u32, u32)>,
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.protocol {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        };
        let ports: Vec<String> =
            self.ports.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        if ports.is_empty() { write!(f, "{proto}") } else { write!(f, "{proto}/{}", ports.join(",")) }
    }
}

/// What one endpoint may send to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Same segment: anything.
    All,
    /// Another segment: only these flows.
    Flows(Vec<Flow>),
    None,
}

impl Reach {
    /// Whether an ICMP echo may pass.
    pub fn icmp(&self) -> bool {
        match self {
            Reach::All => true,
            Reach::Flows(f) => f.iter().any(|f| matches!(f.protocol, Protocol::Any | Protocol::Icmp)),
            Reach::None => false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Matrix {
    pub endpoints: Vec<Endpoint>,
    /// `cells[from][to]`.
    pub cells: Vec<Vec<Reach>>,
}

/// The expected reachability between every two endpoints.
pub fn matrix(intent: &Intent) -> Matrix {
    // A legacy site behind a migration gateway is an endpoint of its
    // segment too: the two worlds reach each other through the gateway.
    let endpoints: Vec<Endpoint> = intent
        .sites
        .values()
        .flat_map(|s| {
            s.attachments.iter().flat_map(|a| {
                let own = (!a.prefixes.is_empty()).then(|| Endpoint {
                    site: s.name.clone(),
                    segment: a.segment.clone(),
                    prefixes: a.prefixes.clone(),
                });
                let legacy = a.legacy.iter().flat_map(|l| &l.sites).map(|l| Endpoint {
                    site: l.name.clone(),
                    segment: a.segment.clone(),
                    prefixes: l.prefixes.clone(),
                });
                own.into_iter().chain(legacy)
            })
        })
        .collect();
    let cells = endpoints
        .iter()
        .map(|a| {
            endpoints
                .iter()
                .map(|b| {
                    if a.segment == b.segment {
                        return Reach::All;
                    }
                    let flows: Vec<Flow> = intent
                        .policies
                        .values()
                        .filter(|p| p.from == a.segment && p.to == b.segment)
                        .map(|p| Flow {
                            protocol: p.protocol,
                            ports: p.ports.iter().map(|r| (r.first, r.last)).collect(),
                        })
                        .collect();
                    if flows.is_empty() { Reach::None } else { Reach::Flows(flows) }
                })
                .collect()
        })
        .collect();
    Matrix { endpoints, cells }
}

/// The matrix as text: one row per sender, one column per receiver
/// (numbered), `●` anything, `◐` some flows (listed below), `·` nothing.
/// `mark` may replace a cell's symbol (the lab's check marks mismatches).
pub fn render(m: &Matrix, mark: &dyn Fn(usize, usize) -> Option<char>) -> String {
    let mut out = String::new();
    let width = m.endpoints.iter().map(|e| e.label().len()).max().unwrap_or(0);
    let _ = write!(out, "{:>w$}    ", "from \\ to", w = width + 4);
    for j in 0..m.endpoints.len() {
        let _ = write!(out, "{:>3}", j + 1);
    }
    out.push('\n');
    let mut flows = BTreeSet::new();
    for (i, e) in m.endpoints.iter().enumerate() {
        let _ = write!(out, "{:>3} {:<w$}    ", i + 1, e.label(), w = width);
        for j in 0..m.endpoints.len() {
            let symbol = match &m.cells[i][j] {
                _ if i == j => '-',
                Reach::All => '●',
                Reach::Flows(f) => {
                    flows.insert(format!(
                        "{} → {}: {}",
                        e.segment,
                        m.endpoints[j].segment,
                        f.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
                    ));
                    '◐'
                }
                Reach::None => '·',
            };
            let _ = write!(out, "{:>3}", mark(i, j).unwrap_or(symbol));
        }
        out.push('\n');
    }
    out.push_str("● anything (same segment)   ◐ only the flows a policy allows   · nothing\n");
    for f in flows {
        let _ = writeln!(out, "◐ {f}");
    }
    out
}

fn within(p: &IpNetwork, nets: &[IpNetwork]) -> bool {
    nets.iter().any(|n| n.is_ipv4() == p.is_ipv4() && n.prefix() <= p.prefix() && n.contains(p.network()))
}

fn overlaps(p: &IpNetwork, n: &IpNetwork) -> bool {
    p.is_ipv4() == n.is_ipv4() && (n.contains(p.network()) || p.contains(n.network()))
}

/// Every way a compiled configuration could deliver across segments; empty
/// when isolation holds.
pub fn isolation(intent: &Intent, configs: &BTreeMap<String, SiteConfig>) -> Vec<String> {
    let mut problems = Vec::new();
    // Policy links as compilation sees them (keys and allocations play no part).
    let (alloc, keys) = (Allocations::default(), PublicKeys::new());
    let index = Index::new(intent, &alloc, &keys);
    for (site, config) in configs {
        for seg in &config.segments {
            let Some(own) = intent.segments.get(&seg.segment) else {
                problems.push(format!("{site}: segment `{}` is not in the intent", seg.segment));
                continue;
            };
            let links = index.linked_segments(&seg.segment);
            let mut allowed: Vec<IpNetwork> = own.prefixes.clone();
            for l in &links {
                allowed.extend(intent.segments.get(*l).map(|s| s.prefixes.clone()).unwrap_or_default());
            }
            let check = |what: String, text: &str, problems: &mut Vec<String>| {
                let Ok(p) = text.parse::<IpNetwork>() else {
                    problems.push(format!("{site}/{}: {what} `{text}` is not a prefix", seg.segment));
                    return;
                };
                if within(&p, &allowed) {
                    return;
                }
                // Not in this segment's space: only a tunnel address, which no segment owns, may be.
                if let Some(other) = intent.segments.values().find(|s| s.prefixes.iter().any(|n| overlaps(&p, n))) {
                    problems.push(format!(
                        "{site}/{}: {what} {p} lies in segment `{}`, which no policy links to `{}`",
                        seg.segment, other.name, seg.segment
                    ));
                }
            };
            for g in &seg.route_groups {
                for p in &g.prefixes {
                    check(format!("route group `{}`", g.name), p, &mut problems);
                }
            }
            for peer in &seg.peers {
                for p in &peer.allowed_prefixes {
                    check(format!("peer `{}`", peer.name), p, &mut problems);
                }
                let attached = intent.sites.get(&peer.name).and_then(|s| s.attachment(&seg.segment)).is_some();
                let aiding = intent.segments.get(&seg.segment).is_some_and(|s| s.aided_by(&peer.name));
                if !attached && !aiding {
                    problems
                        .push(format!("{site}/{}: peer `{}` is not attached to the segment", seg.segment, peer.name));
                }
            }
            if let Some(a) = &seg.attachment {
                for p in &a.prefixes {
                    check("LAN".into(), p, &mut problems);
                }
            }
            for p in seg.legacy.iter().flat_map(|l| &l.prefixes) {
                check("legacy network".into(), p, &mut problems);
            }
            tunnels(intent, site, seg, &mut problems);
            for import in &seg.imports {
                if !links.contains(import.segment.as_str()) {
                    problems.push(format!(
                        "{site}/{}: imports segment `{}`, which no policy links to it",
                        seg.segment, import.segment
                    ));
                }
                for p in &import.prefixes {
                    check(format!("import of `{}`", import.segment), p, &mut problems);
                }
            }
            for rule in &seg.policy {
                let declared = intent.policies.values().any(|p| p.from == rule.from_segment && p.to == rule.to_segment);
                if !declared {
                    problems.push(format!(
                        "{site}/{}: policy rule `{}` from `{}` to `{}` is not in the intent",
                        seg.segment, rule.name, rule.from_segment, rule.to_segment
                    ));
                }
            }
        }
    }
    problems
}

/// The tunnel rules of the module's description, for one segment of `site`.
fn tunnels(intent: &Intent, site: &str, seg: &musubi_proto::v1::SegmentConfig, problems: &mut Vec<String>) {
    use musubi_proto::v1::PeerRole;
    let at = format!("{site}/{}", seg.segment);
    for t in &seg.tunnels {
        if !TUNNEL_PREFIXES.iter().any(|p| t.name.strip_prefix(p) == Some(seg.segment.as_str())) {
            problems.push(format!("{at}: tunnel `{}` is not named for the segment", t.name));
        }
        let on: Vec<&musubi_proto::v1::Peer> = seg.peers.iter().filter(|p| p.interface == t.name).collect();
        if t.faces() == PeerRole::Site {
            continue;
        }
        if on.len() != 1 {
            problems.push(format!(
                "{at}: tunnel `{}` faces one peer and is allowed every address from it, but holds {}",
                t.name,
                on.len()
            ));
        }
        for p in on {
            if !intent.sites.get(&p.name).is_some_and(|s| s.is_access_point()) {
                problems.push(format!("{at}: tunnel `{}` holds `{}`, which is not an access point", t.name, p.name));
            }
        }
    }
    for p in &seg.peers {
        if !seg.tunnels.iter().any(|t| t.name == p.interface) {
            problems.push(format!("{at}: peer `{}` is on `{}`, not one of the segment's tunnels", p.name, p.interface));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocate::{Allocations, allocate};
    use crate::compile::{PublicKeys, compile};
    use crate::intent::parse::parse_str;

    fn prefecture() -> Intent {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../topologies/prefecture.yaml");
        parse_str("prefecture.yaml", &std::fs::read_to_string(path).expect("prefecture")).intent
    }

    #[test]
    fn the_matrix_follows_segments_and_policies() {
        let intent = prefecture();
        let m = matrix(&intent);
        let at = |site: &str, seg: &str| {
            m.endpoints.iter().position(|e| e.site == site && e.segment == seg).expect("endpoint")
        };
        assert_eq!(m.cells[at("kita-hall", "juki")][at("nishi-hall", "juki")], Reach::All);
        assert_eq!(m.cells[at("kita-hall", "kita-inet")][at("minami-hall", "minami-inet")], Reach::None);
        let Reach::Flows(f) = &m.cells[at("kita-hall", "lgwan")][at("pref-hq", "mynumber")] else {
            panic!("lgwan → mynumber is a policy flow")
        };
        assert_eq!(f[0].to_string(), "tcp/22");
        assert_eq!(m.cells[at("pref-hq", "mynumber")][at("kita-hall", "lgwan")], Reach::None, "not the other way");
    }

    #[test]
    fn compiled_configurations_are_isolated_and_a_leak_is_found() {
        let intent = prefecture();
        let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
        let mut configs = compile(&intent, &alloc, &PublicKeys::new()).expect("compile");
        assert_eq!(isolation(&intent, &configs), Vec::<String>::new());
        // A route into Minami's internet segment inside Kita's.
        let kita = configs.get_mut("kita-hall").expect("kita-hall");
        let seg = kita.segments.iter_mut().find(|s| s.segment == "kita-inet").expect("kita-inet");
        seg.route_groups[0].prefixes.push("10.3.0.0/16".into());
        let problems = isolation(&intent, &configs);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("lies in segment `mynumber`"), "{}", problems[0]);
    }

    /// Two access points on one of a site's tunnels: each would be allowed
    /// every address on it, and WireGuard would give all of them to one.
    #[test]
    fn a_tunnel_allowed_every_address_holds_one_access_point() {
        let intent = prefecture();
        let alloc = allocate(&intent, &Allocations::default()).expect("allocate");
        let mut configs = compile(&intent, &alloc, &PublicKeys::new()).expect("compile");
        let kita = configs.get_mut("kita-hall").expect("kita-hall");
        let seg = kita.segments.iter_mut().find(|s| s.segment == "kita-inet").expect("kita-inet");
        assert_eq!(seg.tunnels.len(), 2, "a tunnel per access point");
        let first = seg.tunnels[0].name.clone();
        for p in &mut seg.peers {
            p.interface = first.clone();
        }
        let problems = isolation(&intent, &configs);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("holds 2")), "{problems:?}");
        assert!(problems.iter().any(|p| p.contains("holds 0")), "{problems:?}");
    }
}
