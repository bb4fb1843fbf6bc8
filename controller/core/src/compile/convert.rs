//! The one place where intent types become protobuf types.

use ipnetwork::IpNetwork;
use musubi_proto::v1 as pb;

use crate::intent::{LineKind, NumRange, Probe, Protocol, Region, Role};

pub fn role(r: Role) -> pb::Role {
    match r {
        Role::Site => pb::Role::Site,
        Role::AccessPoint => pb::Role::AccessPoint,
    }
}

pub fn region(r: Region) -> pb::Region {
    match r {
        Region::East => pb::Region::East,
        Region::West => pb::Region::West,
    }
}

pub fn line_kind(k: LineKind) -> pb::LineKind {
    match k {
        LineKind::DarkFiber => pb::LineKind::DarkFiber,
        LineKind::WideAreaEthernet => pb::LineKind::WideAreaEthernet,
        LineKind::InternetVpn => pb::LineKind::InternetVpn,
        LineKind::Mobile => pb::LineKind::Mobile,
        LineKind::Satellite => pb::LineKind::Satellite,
    }
}

pub fn protocol(p: Protocol) -> pb::Protocol {
    match p {
        Protocol::Any => pb::Protocol::Any,
        Protocol::Tcp => pb::Protocol::Tcp,
        Protocol::Udp => pb::Protocol::Udp,
        Protocol::Icmp => pb::Protocol::Icmp,
    }
}

pub fn probe(p: Probe) -> pb::ProbeSettings {
    pb::ProbeSettings { interval_ms: p.interval_ms, multiplier: p.multiplier }
}

pub fn port_range(r: NumRange) -> pb::PortRange {
    pb::PortRange { first: r.first, last: r.last }
}

pub fn prefixes<'a>(nets: impl IntoIterator<Item = &'a IpNetwork>) -> Vec<String> {
    nets.into_iter().map(ToString::to_string).collect()
}
