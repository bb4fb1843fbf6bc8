//! Lines and paths: which peers' lines this router picks, the underlay path
//! of each endpoint, and the pinned routes that keep a peer's outer packets
//! on the chosen line.

use std::collections::BTreeSet;

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::datapath::{Hops, Pin};
use crate::failover::Choices;

/// Whether this router picks the line to `peer`, or follows the peer
/// wherever its packets come from: a site picks its lines to the access
/// points, and each access point follows its member sites. Between the two
/// access points one side must pick (WireGuard roams both ways): the east
/// one.
pub fn picks_line(config: &SiteConfig, peer: &pb::Peer) -> bool {
    match peer.role() {
        pb::PeerRole::AccessPoint => true,
        pb::PeerRole::Interconnect => config.region() == pb::Region::East,
        _ => false,
    }
}

/// Whether this router probes the underlay paths to `peer` (those to an
/// access point: whether a line still answers tells a line failure from the
/// access point's), whichever side picks the line.
pub fn probes_lines(peer: &pb::Peer) -> bool {
    matches!(peer.role(), pb::PeerRole::AccessPoint | pb::PeerRole::Interconnect)
}

/// The endpoint of `peer` on the chosen path, else its first.
pub fn active_endpoint<'a>(peer: &'a pb::Peer, choices: &Choices) -> Option<&'a pb::Endpoint> {
    let chosen = choices.paths.get(&peer.name);
    chosen
        .and_then(|(l, r)| peer.endpoints.iter().find(|e| &e.local_line == l && &e.remote_line == r))
        .or_else(|| peer.endpoints.first())
}

/// A line's underlay address by name.
pub fn line_address(config: &SiteConfig, line: &str) -> Option<std::net::IpAddr> {
    config.lines.iter().find(|l| l.name == line).and_then(|l| l.address.parse().ok())
}

/// The underlay path of an endpoint: (local line address, peer line address).
pub fn path(config: &SiteConfig, e: &pb::Endpoint) -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    Some((line_address(config, &e.local_line)?, e.address.parse().ok()?))
}

/// The underlay routes that send each peer's outer packets over its active
/// path (where the path's hop is known), and for the peers this router
/// follows, each of their paths pinned by its source (see [`Pin`]).
pub fn pins(config: &SiteConfig, choices: &Choices, hops: &Hops) -> BTreeSet<Pin> {
    let mut out = BTreeSet::new();
    for seg in &config.segments {
        for p in &seg.peers {
            if picks_line(config, p) {
                let Some((source, destination)) = active_endpoint(p, choices).and_then(|e| path(config, e)) else {
                    continue;
                };
                if let Some(hop) = hops.get(&(source, destination)) {
                    out.insert(Pin { destination, source, hop: hop.clone(), follow: false });
                }
            } else {
                for (source, destination) in p.endpoints.iter().filter_map(|e| path(config, e)) {
                    if let Some(hop) = hops.get(&(source, destination)) {
                        out.insert(Pin { destination, source, hop: hop.clone(), follow: true });
                    }
                }
            }
        }
    }
    out
}

/// The (local line address, peer line address) pairs of the peers this
/// router follows, whose hops its source pins need.
pub fn followed_paths(config: &SiteConfig) -> impl Iterator<Item = (std::net::IpAddr, std::net::IpAddr)> + '_ {
    config
        .segments
        .iter()
        .flat_map(|s| s.peers.iter().filter(|p| !picks_line(config, p)))
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| path(config, e))
}
