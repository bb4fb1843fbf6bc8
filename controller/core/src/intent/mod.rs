//! The operators' intent: tenants, segments, sites (with their lines and
//! attachments), policies and settings, as declared in YAML.
//!
//! Plain data with no positions; see [`source`] for where each field came from
//! and [`parse`] for reading YAML.

pub mod export;
pub mod notable;
pub mod parse;
pub mod source;
pub mod tree;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// The kinds of object an intent document may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Kind {
    Tenant,
    Segment,
    Site,
    Policy,
    Settings,
    /// An operator identity's roles and tenants (see [`crate::access`]).
    Operator,
}

/// An enum spelt as a fixed word in YAML, both ways.
pub trait YamlName: Copy + 'static {
    const ALL: &'static [Self];

    /// The word used in YAML.
    fn yaml(self) -> &'static str;

    /// Every (word, value) pair, for readers.
    fn options() -> Vec<(&'static str, Self)> {
        Self::ALL.iter().map(|v| (v.yaml(), *v)).collect()
    }
}

impl YamlName for Kind {
    const ALL: &'static [Kind] =
        &[Kind::Tenant, Kind::Segment, Kind::Site, Kind::Policy, Kind::Settings, Kind::Operator];

    fn yaml(self) -> &'static str {
        match self {
            Kind::Tenant => "Tenant",
            Kind::Segment => "Segment",
            Kind::Site => "Site",
            Kind::Policy => "Policy",
            Kind::Settings => "Settings",
            Kind::Operator => "Operator",
        }
    }
}

impl Kind {
    /// A kind as an operator writes it: `Site`, `site` or `sites`.
    pub fn parse(word: &str) -> Option<Kind> {
        let wanted = word.to_lowercase();
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.yaml().to_lowercase() == wanted || k.word() == wanted.trim_end_matches('s'))
    }

    /// The word used in messages.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Tenant => "tenant",
            Kind::Segment => "segment",
            Kind::Site => "site",
            Kind::Policy => "policy",
            Kind::Settings => "settings",
            Kind::Operator => "operator",
        }
    }
}

/// A whole intent: every object, keyed by name.
///
/// Objects sit behind `Arc`, so a snapshot is cheap to clone and two
/// snapshots that share an unchanged object compare it by pointer: diffing a
/// 10,000-site intent after a one-site change costs microseconds. Change an
/// object with `Arc::make_mut`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Intent {
    pub settings: Settings,
    pub tenants: BTreeMap<String, Arc<Tenant>>,
    pub segments: BTreeMap<String, Arc<Segment>>,
    pub sites: BTreeMap<String, Arc<Site>>,
    pub policies: BTreeMap<String, Arc<Policy>>,
    /// Who may do what (empty: every operator certificate is an admin).
    #[serde(default)]
    pub operators: BTreeMap<String, Arc<Operator>>,
}

impl Intent {
    /// No tenant, segment, site or policy (settings alone make no network).
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty() && self.segments.is_empty() && self.sites.is_empty() && self.policies.is_empty()
    }
}

/// An organisation: a ministry, a prefecture, a municipality, an operator body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub name: String,
    /// A national body: its segments are national objects, changed by
    /// admins only.
    #[serde(default)]
    pub national: bool,
    pub description: String,
}

/// What an operator may do: every role is a set of rights over the
/// operator's tenants (admin and auditor: over everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperatorRole {
    /// Everything: national objects, operators, every tenant.
    Admin,
    /// Changes its tenants' objects; tokens and revocations for their sites.
    Operator,
    /// Reads its tenants' objects and their sites' status.
    Viewer,
    /// Reads everything and the history; changes nothing.
    Auditor,
}

impl YamlName for OperatorRole {
    const ALL: &'static [OperatorRole] =
        &[OperatorRole::Admin, OperatorRole::Operator, OperatorRole::Viewer, OperatorRole::Auditor];

    fn yaml(self) -> &'static str {
        match self {
            OperatorRole::Admin => "admin",
            OperatorRole::Operator => "operator",
            OperatorRole::Viewer => "viewer",
            OperatorRole::Auditor => "auditor",
        }
    }
}

/// An operator identity (the name in its certificate) and what it may do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    pub name: String,
    pub roles: Vec<OperatorRole>,
    /// The tenants its operator and viewer roles act for.
    pub tenants: Vec<String>,
    pub description: String,
}

/// A business-specific logical network with its own address space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub name: String,
    /// The owner tenant.
    pub tenant: String,
    pub prefixes: Vec<IpNetwork>,
    /// Other tenants whose sites may attach to this segment.
    pub shared_with: Vec<String>,
    pub description: String,
    /// Mutual aid: another network's access points this segment may use in
    /// an emergency, declared in peacetime.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aid: Vec<Aid>,
}

/// Mutual aid (相互乗り入れ): when a segment's own access points cannot be
/// reached, its sites may use another network's pair. Pre-staged on every
/// site and on the aiding pair (a disaster may cut the controller off too),
/// dormant until its condition holds, isolated like any segment there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aid {
    /// Unique across the intent: `musubi aid activate NAME`.
    pub name: String,
    /// The aiding pair: an east and a west access point of another network.
    pub access_points: Vec<String>,
    pub activation: Activation,
    /// How long one activation lasts at most, in seconds; then isolation
    /// is restored.
    pub max_duration_s: u64,
    pub description: String,
}

/// When an aid is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// On its own, at a site that reaches neither of the segment's access
    /// points, for as long as that lasts (at most the aid's duration).
    #[default]
    Automatic,
    /// Only after an operator activates it (`musubi aid activate`).
    Manual,
}

impl YamlName for Activation {
    const ALL: &'static [Activation] = &[Activation::Automatic, Activation::Manual];

    fn yaml(self) -> &'static str {
        match self {
            Activation::Automatic => "automatic",
            Activation::Manual => "manual",
        }
    }
}

impl Intent {
    /// The segments whose aid names `ap`.
    pub fn aided_by<'a>(&'a self, ap: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.segments.values().filter(move |s| s.aided_by(ap)).map(|s| s.name.as_str())
    }

    /// An aid by name, with its segment.
    pub fn aid(&self, name: &str) -> Option<(&Segment, &Aid)> {
        self.segments.values().find_map(|s| s.aid.iter().find(|a| a.name == name).map(|a| (&**s, a)))
    }
}

impl Segment {
    /// May sites and policies of `tenant` use this segment?
    pub fn usable_by(&self, tenant: &str) -> bool {
        self.tenant == tenant || self.shared_with.iter().any(|t| t == tenant)
    }

    /// Does one of this segment's aids name access point `ap`?
    pub fn aided_by(&self, ap: &str) -> bool {
        self.aid.iter().any(|a| a.access_points.iter().any(|n| n == ap))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    #[default]
    Site,
    AccessPoint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Region {
    #[default]
    East,
    West,
}

impl YamlName for Role {
    const ALL: &'static [Role] = &[Role::Site, Role::AccessPoint];

    fn yaml(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::AccessPoint => "access-point",
        }
    }
}

impl YamlName for Region {
    const ALL: &'static [Region] = &[Region::East, Region::West];

    fn yaml(self) -> &'static str {
        match self {
            Region::East => "east",
            Region::West => "west",
        }
    }
}

impl Region {
    pub fn other(self) -> Region {
        match self {
            Region::East => Region::West,
            Region::West => Region::East,
        }
    }
}

/// A place with a site router running `musubi-agent`; an access point is a
/// hub site of one region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub name: String,
    pub tenant: String,
    pub role: Role,
    /// For a site: the region whose access point it prefers. For an access
    /// point: the region it serves.
    pub region: Region,
    pub lines: Vec<Line>,
    pub attachments: Vec<Attachment>,
    pub description: String,
}

impl Site {
    pub fn attachment(&self, segment: &str) -> Option<&Attachment> {
        self.attachments.iter().find(|a| a.segment == segment)
    }

    pub fn is_access_point(&self) -> bool {
        self.role == Role::AccessPoint
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LineKind {
    DarkFiber,
    WideAreaEthernet,
    InternetVpn,
    Mobile,
    Satellite,
}

impl YamlName for LineKind {
    const ALL: &'static [LineKind] = &[
        LineKind::DarkFiber,
        LineKind::WideAreaEthernet,
        LineKind::InternetVpn,
        LineKind::Mobile,
        LineKind::Satellite,
    ];

    fn yaml(self) -> &'static str {
        match self {
            LineKind::DarkFiber => "dark-fiber",
            LineKind::WideAreaEthernet => "wide-area-ethernet",
            LineKind::InternetVpn => "internet-vpn",
            LineKind::Mobile => "mobile",
            LineKind::Satellite => "satellite",
        }
    }
}

/// A physical uplink of a site, shared by all of its segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub name: String,
    pub kind: LineKind,
    /// 1 is the first choice.
    pub priority: u32,
    /// Underlay address: the outer address of tunnels over this line.
    pub address: IpAddr,
    pub probe: ProbeOverride,
}

/// Probe timing; unset fields inherit from the line kind, then the settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOverride {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<u32>,
}

/// Resolved probe timing: a peer is down after `multiplier` missed probes
/// sent every `interval_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub interval_ms: u32,
    pub multiplier: u32,
}

impl Probe {
    pub fn with(self, o: ProbeOverride) -> Probe {
        Probe {
            interval_ms: o.interval_ms.unwrap_or(self.interval_ms),
            multiplier: o.multiplier.unwrap_or(self.multiplier),
        }
    }

    /// Time to declare a path dead.
    pub fn detect_ms(self) -> u64 {
        u64::from(self.interval_ms) * u64::from(self.multiplier)
    }
}

/// A segment present at a site: its LAN interface and prefixes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub segment: String,
    /// LAN interface; optional on access points (a pure hub has no LAN).
    pub interface: Option<String>,
    pub prefixes: Vec<IpNetwork>,
    /// Phased migration: this site is the segment's migration gateway to
    /// an old dedicated network, whose sites are still on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy: Option<Legacy>,
}

/// The old network behind a migration gateway: reached on one of the
/// gateway's interfaces (bound to the segment), through the old network's
/// router; its sites' prefixes are routed there, and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Legacy {
    pub interface: String,
    /// The old network's router on that interface.
    pub via: IpAddr,
    pub sites: Vec<LegacySite>,
}

/// A site still on the old network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacySite {
    pub name: String,
    pub prefixes: Vec<IpNetwork>,
    /// Being cut over to this Musubi site: the site is declared (same
    /// prefixes) and comes up beside the old network, while its prefixes
    /// still go through the gateway; removing this legacy entry completes
    /// the cutover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_to: Option<String>,
}

impl Attachment {
    /// Every prefix reached through this attachment: its LAN's and its
    /// legacy sites'.
    pub fn all_prefixes(&self) -> impl Iterator<Item = &IpNetwork> {
        self.prefixes.iter().chain(self.legacy.iter().flat_map(|l| &l.sites).flat_map(|s| &s.prefixes))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Icmp,
}

impl YamlName for Protocol {
    const ALL: &'static [Protocol] = &[Protocol::Any, Protocol::Tcp, Protocol::Udp, Protocol::Icmp];

    fn yaml(self) -> &'static str {
        match self {
            Protocol::Any => "any",
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Icmp => "icmp",
        }
    }
}

impl Protocol {
    pub fn has_ports(self) -> bool {
        matches!(self, Protocol::Tcp | Protocol::Udp)
    }
}

/// An inclusive range of ports or ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NumRange {
    pub first: u32,
    pub last: u32,
}

impl NumRange {
    pub fn new(first: u32, last: u32) -> Self {
        Self { first, last }
    }

    pub fn len(self) -> u64 {
        if self.last < self.first { 0 } else { u64::from(self.last - self.first) + 1 }
    }

    pub fn is_empty(self) -> bool {
        self.len() == 0
    }

    pub fn contains(self, v: u32) -> bool {
        self.first <= v && v <= self.last
    }
}

/// An allowed flow from one segment to another, enforced at the access
/// points. Everything between segments that no policy allows is denied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub name: String,
    /// The tenant that declares the policy; it must be allowed to use both segments.
    pub tenant: String,
    pub from: String,
    pub to: String,
    pub protocol: Protocol,
    pub ports: Vec<NumRange>,
    pub description: String,
}

/// Deployment-wide settings. At most one `Settings` document per intent;
/// every field has a default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub probe: Probe,
    /// Probe timing per line kind (e.g. slower on satellite).
    pub line_kind_probe: BTreeMap<LineKind, ProbeOverride>,
    /// Two WireGuard listen ports per segment are taken from here (see
    /// [`crate::allocate::SegmentAllocation`]).
    pub wireguard_ports: NumRange,
    /// One routing table id per segment is taken from here.
    pub routing_tables: NumRange,
    /// Per-site tunnel addresses.
    pub tunnel_ipv4: Ipv4Network,
    pub tunnel_ipv6: Ipv6Network,
    /// Per-segment AP-to-AP interconnect networks (/31 and /127).
    pub interconnect_ipv4: Ipv4Network,
    pub interconnect_ipv6: Ipv6Network,
}

impl Default for Settings {
    fn default() -> Self {
        #[allow(clippy::unwrap_used)] // constant, valid networks
        Settings {
            probe: Probe { interval_ms: 100, multiplier: 3 },
            line_kind_probe: BTreeMap::new(),
            wireguard_ports: NumRange::new(51820, 52819),
            routing_tables: NumRange::new(1000, 1999),
            tunnel_ipv4: "100.64.0.0/11".parse().unwrap(),
            tunnel_ipv6: "fd6d:7573:6269::/64".parse().unwrap(),
            interconnect_ipv4: "100.127.0.0/16".parse().unwrap(),
            interconnect_ipv6: "fd6d:7573:6269:ffff::/64".parse().unwrap(),
        }
    }
}

impl Settings {
    /// Probe timing for a line: its own override, else its kind's, else the default.
    pub fn probe_for(&self, line: &Line) -> Probe {
        let by_kind = self.line_kind_probe.get(&line.kind).copied().unwrap_or_default();
        self.probe.with(by_kind).with(line.probe)
    }
}

/// Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Prefix of the WireGuard interface a site has to a segment's west access
/// point (and the prefix the length rule of segment names quotes).
pub const WG_PREFIX: &str = "mw-";
/// Prefixes of every WireGuard interface Musubi owns, by what it faces: a
/// site's tunnel to the east access point, to the west one; an access
/// point's tunnel to its member sites, to the other access point; a site's
/// tunnel to its segment's mutual aid's east and west access point. All the
/// same length, so one rule of segment-name length covers them.
pub const TUNNEL_PREFIXES: [&str; 6] = ["me-", WG_PREFIX, "mm-", "mi-", "ae-", "aw-"];
/// Prefix of every VRF device Musubi owns.
pub const VRF_PREFIX: &str = "mv-";
/// Longest segment name that still fits in an interface name.
pub const SEGMENT_NAME_MAX: usize = IFNAME_MAX - 3;

/// What a WireGuard interface of a segment faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// A site's tunnel to the segment's east access point.
    EastAccessPoint,
    /// A site's tunnel to the segment's west access point.
    WestAccessPoint,
    /// An access point's tunnel to its member sites.
    Members,
    /// An access point's tunnel to the other access point.
    Interconnect,
    /// A site's tunnel to its segment's mutual aid's east access point.
    EastAid,
    /// … and to its west one.
    WestAid,
}

/// The interface name of a segment's tunnel.
pub fn tunnel_name(tunnel: Tunnel, segment: &str) -> String {
    let prefix = match tunnel {
        Tunnel::EastAccessPoint => TUNNEL_PREFIXES[0],
        Tunnel::WestAccessPoint => TUNNEL_PREFIXES[1],
        Tunnel::Members => TUNNEL_PREFIXES[2],
        Tunnel::Interconnect => TUNNEL_PREFIXES[3],
        Tunnel::EastAid => TUNNEL_PREFIXES[4],
        Tunnel::WestAid => TUNNEL_PREFIXES[5],
    };
    format!("{prefix}{segment}")
}

pub fn vrf_name(segment: &str) -> String {
    format!("{VRF_PREFIX}{segment}")
}

/// Does this network contain that one (same family, at least as wide)?
pub fn net_contains(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4() && outer.prefix() <= inner.prefix() && outer.contains(inner.network())
}

/// Do two networks share any address?
pub fn nets_overlap(a: &IpNetwork, b: &IpNetwork) -> bool {
    net_contains(a, b) || net_contains(b, a)
}
