//! Ranges in Settings must hold one routing table and two ports per segment,
//! one tunnel address per site, one interconnect network per segment.

use crate::diagnostic::Diagnostic;
use crate::intent::Intent;
use crate::intent::source::{ObjectRef, SourceMap};

fn host_capacity(prefix_bits: u32, total_bits: u32) -> u128 {
    let host = total_bits - prefix_bits;
    if host >= 127 { u128::MAX } else { (1u128 << host).saturating_sub(2) }
}

pub(super) fn check(intent: &Intent, sources: &SourceMap, out: &mut Vec<Diagnostic>) {
    let s = &intent.settings;
    let obj = ObjectRef::new(crate::intent::Kind::Settings, "settings");
    let segments = intent.segments.len() as u128;
    let sites = intent.sites.len() as u128;
    let mut need = |field: &str, what: &str, have: u128, want: u128| {
        if want > have {
            out.push(
                Diagnostic::at(
                    sources,
                    &obj,
                    field,
                    format!("{field} is exhausted: {want} {what} needed, {have} available"),
                )
                .expected(format!("a range with room for at least {want} {what}")),
            );
        }
    };
    need("routing_tables", "routing tables (one per segment)", u128::from(s.routing_tables.len()), segments);
    need("wireguard_ports", "ports (two per segment)", u128::from(s.wireguard_ports.len()), 2 * segments);
    need(
        "tunnel_addresses.ipv4",
        "addresses (one per site)",
        host_capacity(u32::from(s.tunnel_ipv4.prefix()), 32),
        sites,
    );
    need(
        "tunnel_addresses.ipv6",
        "addresses (one per site)",
        host_capacity(u32::from(s.tunnel_ipv6.prefix()), 128),
        sites,
    );
    let pairs4 = 1u128 << (31 - u32::from(s.interconnect_ipv4.prefix()).min(31));
    need("interconnect_addresses.ipv4", "/31 networks (one per segment)", pairs4, segments);
    let bits6 = (127 - u32::from(s.interconnect_ipv6.prefix()).min(127)).min(100);
    need("interconnect_addresses.ipv6", "/127 networks (one per segment)", 1u128 << bits6, segments);
}
