//! An intent written back as YAML documents in the form operators write
//! (the form [`super::parse`] reads): settings, then tenants, segments, sites,
//! policies and operators, each by name. Reading the output gives the same intent.

use serde::Serialize;

use super::{Intent, Kind, NumRange, Probe, ProbeOverride, YamlName};

#[derive(Serialize)]
struct TenantDoc<'a> {
    kind: &'static str,
    name: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    national: bool,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

#[derive(Serialize)]
struct OperatorDoc<'a> {
    kind: &'static str,
    name: &'a str,
    roles: Vec<&'static str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tenants: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

#[derive(Serialize)]
struct SegmentDoc<'a> {
    kind: &'static str,
    name: &'a str,
    tenant: &'a str,
    prefixes: Vec<String>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    shared_with: &'a [String],
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    aid: Vec<AidDoc<'a>>,
}

#[derive(Serialize)]
struct AidDoc<'a> {
    name: &'a str,
    access_points: &'a [String],
    activation: &'static str,
    max_duration: String,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

#[derive(Serialize)]
struct SiteDoc<'a> {
    kind: &'static str,
    name: &'a str,
    tenant: &'a str,
    role: &'static str,
    region: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
    lines: Vec<LineDoc<'a>>,
    attachments: Vec<AttachmentDoc<'a>>,
}

#[derive(Serialize)]
struct LineDoc<'a> {
    name: &'a str,
    kind: &'static str,
    priority: u32,
    address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe: Option<ProbeOverride>,
}

#[derive(Serialize)]
struct AttachmentDoc<'a> {
    segment: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    interface: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    prefixes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    legacy: Option<LegacyDoc<'a>>,
}

#[derive(Serialize)]
struct LegacyDoc<'a> {
    interface: &'a str,
    via: String,
    sites: Vec<LegacySiteDoc<'a>>,
}

#[derive(Serialize)]
struct LegacySiteDoc<'a> {
    name: &'a str,
    prefixes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cutover_to: Option<&'a str>,
}

/// A single port as a number, a range as `"first-last"`.
#[derive(Serialize)]
#[serde(untagged)]
enum PortDoc {
    One(u32),
    Range(String),
}

#[derive(Serialize)]
struct PolicyDoc<'a> {
    kind: &'static str,
    name: &'a str,
    tenant: &'a str,
    from: &'a str,
    to: &'a str,
    protocol: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    ports: Vec<PortDoc>,
    #[serde(skip_serializing_if = "str::is_empty")]
    description: &'a str,
}

#[derive(Serialize)]
struct Pools {
    ipv4: String,
    ipv6: String,
}

#[derive(Serialize)]
struct SettingsDoc {
    kind: &'static str,
    probe: Probe,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    line_kinds: std::collections::BTreeMap<&'static str, ProbeOverride>,
    wireguard_ports: NumRange,
    routing_tables: NumRange,
    tunnel_addresses: Pools,
    interconnect_addresses: Pools,
}

fn strings<T: ToString>(v: &[T]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

fn doc<T: Serialize>(out: &mut String, value: &T) -> Result<(), yaml_serde::Error> {
    out.push_str("---\n");
    out.push_str(&yaml_serde::to_string(value)?);
    Ok(())
}

/// The whole intent as YAML.
pub fn to_yaml(intent: &Intent) -> Result<String, yaml_serde::Error> {
    Ok(select(intent, |_, _| true)?.0)
}

/// The objects `keep` accepts (by kind and name) as YAML, and how many.
pub fn select(intent: &Intent, keep: impl Fn(Kind, &str) -> bool) -> Result<(String, usize), yaml_serde::Error> {
    let mut out = String::new();
    let mut count = 0;
    let s = &intent.settings;
    if keep(Kind::Settings, "settings") {
        count += 1;
        doc(
            &mut out,
            &SettingsDoc {
                kind: "Settings",
                probe: s.probe,
                line_kinds: s.line_kind_probe.iter().map(|(k, v)| (k.yaml(), *v)).collect(),
                wireguard_ports: s.wireguard_ports,
                routing_tables: s.routing_tables,
                tunnel_addresses: Pools { ipv4: s.tunnel_ipv4.to_string(), ipv6: s.tunnel_ipv6.to_string() },
                interconnect_addresses: Pools {
                    ipv4: s.interconnect_ipv4.to_string(),
                    ipv6: s.interconnect_ipv6.to_string(),
                },
            },
        )?;
    }
    for t in intent.tenants.values().filter(|t| keep(Kind::Tenant, &t.name)) {
        count += 1;
        doc(&mut out, &TenantDoc { kind: "Tenant", name: &t.name, national: t.national, description: &t.description })?;
    }
    for g in intent.segments.values().filter(|g| keep(Kind::Segment, &g.name)) {
        count += 1;
        doc(
            &mut out,
            &SegmentDoc {
                kind: "Segment",
                name: &g.name,
                tenant: &g.tenant,
                prefixes: strings(&g.prefixes),
                shared_with: &g.shared_with,
                description: &g.description,
                aid: g
                    .aid
                    .iter()
                    .map(|a| AidDoc {
                        name: &a.name,
                        access_points: &a.access_points,
                        activation: a.activation.yaml(),
                        max_duration: crate::words::duration_text(a.max_duration_s),
                        description: &a.description,
                    })
                    .collect(),
            },
        )?;
    }
    for site in intent.sites.values().filter(|s| keep(Kind::Site, &s.name)) {
        count += 1;
        doc(
            &mut out,
            &SiteDoc {
                kind: "Site",
                name: &site.name,
                tenant: &site.tenant,
                role: site.role.yaml(),
                region: site.region.yaml(),
                description: &site.description,
                lines: site
                    .lines
                    .iter()
                    .map(|l| LineDoc {
                        name: &l.name,
                        kind: l.kind.yaml(),
                        priority: l.priority,
                        address: l.address.to_string(),
                        probe: (l.probe != ProbeOverride::default()).then_some(l.probe),
                    })
                    .collect(),
                attachments: site
                    .attachments
                    .iter()
                    .map(|a| AttachmentDoc {
                        segment: &a.segment,
                        interface: a.interface.as_deref(),
                        prefixes: strings(&a.prefixes),
                        legacy: a.legacy.as_ref().map(|l| LegacyDoc {
                            interface: &l.interface,
                            via: l.via.to_string(),
                            sites: l
                                .sites
                                .iter()
                                .map(|s| LegacySiteDoc {
                                    name: &s.name,
                                    prefixes: strings(&s.prefixes),
                                    cutover_to: s.cutover_to.as_deref(),
                                })
                                .collect(),
                        }),
                    })
                    .collect(),
            },
        )?;
    }
    for p in intent.policies.values().filter(|p| keep(Kind::Policy, &p.name)) {
        count += 1;
        doc(
            &mut out,
            &PolicyDoc {
                kind: "Policy",
                name: &p.name,
                tenant: &p.tenant,
                from: &p.from,
                to: &p.to,
                protocol: p.protocol.yaml(),
                ports: p
                    .ports
                    .iter()
                    .map(|r| {
                        if r.first == r.last {
                            PortDoc::One(r.first)
                        } else {
                            PortDoc::Range(format!("{}-{}", r.first, r.last))
                        }
                    })
                    .collect(),
                description: &p.description,
            },
        )?;
    }
    for o in intent.operators.values().filter(|o| keep(Kind::Operator, &o.name)) {
        count += 1;
        doc(
            &mut out,
            &OperatorDoc {
                kind: "Operator",
                name: &o.name,
                roles: o.roles.iter().map(|r| r.yaml()).collect(),
                tenants: &o.tenants,
                description: &o.description,
            },
        )?;
    }
    Ok((out, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::parse::parse_str;

    #[test]
    fn shipped_topologies_survive_a_round_trip() {
        for path in ["minimal.yaml", "prefecture.yaml", "two-cities.yaml"] {
            let text = std::fs::read_to_string(format!("{}/../../topologies/{path}", env!("CARGO_MANIFEST_DIR")))
                .expect("read");
            let first = parse_str(path, &text);
            assert!(first.diagnostics.is_empty(), "{path}: {:?}", first.diagnostics);
            let exported = to_yaml(&first.intent).expect("export");
            let second = parse_str("exported.yaml", &exported);
            assert!(
                second.diagnostics.is_empty(),
                "{path} export does not read back: {:?}\n{exported}",
                second.diagnostics
            );
            assert_eq!(first.intent, second.intent, "{path} changed in the round trip:\n{exported}");
            assert_eq!(to_yaml(&second.intent).expect("export"), exported, "export is stable");
        }
    }
}
