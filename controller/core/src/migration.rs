//! Where each segment stands in its phased migration: which of its sites
//! are on Musubi, which are still on their old dedicated network (legacy
//! sites behind a migration gateway) and which are being cut over (declared
//! on Musubi beside their legacy entry, `cutover_to`). Read by `musubi
//! migration status` from the intent and what the agents report.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::intent::Intent;

/// What the controller knows of a Musubi site's agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Seen {
    pub connected: bool,
    /// It applied the configuration the controller holds for it now.
    pub in_sync: bool,
}

/// A site's stage in its segment's migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// A Musubi site of the segment whose agent has connected.
    OnMusubi,
    /// Declared on Musubi, its agent never connected yet.
    Declared,
    /// A legacy site with a Musubi site declared for it: the site runs
    /// beside the old network, its prefixes still through the gateway
    /// until the legacy entry is removed.
    CuttingOver,
    /// Still on the old network, reached through the gateway only.
    Legacy,
}

impl Stage {
    pub fn words(self) -> &'static str {
        match self {
            Stage::OnMusubi => "on Musubi",
            Stage::Declared => "declared",
            Stage::CuttingOver => "cutting over",
            Stage::Legacy => "legacy",
        }
    }
}

/// One site of one segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub tenant: String,
    pub segment: String,
    pub site: String,
    pub stage: Stage,
    /// The Musubi site a legacy site is being cut over to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cutover_to: Option<String>,
    /// The migration gateway a legacy site is reached through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    pub detail: String,
}

/// One segment's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub on_musubi: usize,
    pub declared: usize,
    pub cutting_over: usize,
    pub legacy: usize,
}

impl Tally {
    pub fn total(&self) -> usize {
        self.on_musubi + self.declared + self.cutting_over + self.legacy
    }
}

fn agent(seen: Option<Seen>) -> &'static str {
    match seen {
        Some(Seen { connected: true, in_sync: true }) => "in sync",
        Some(Seen { connected: true, in_sync: false }) => "connected, not in sync yet",
        Some(Seen { connected: false, .. }) => "agent not connected",
        None => "agent never connected",
    }
}

fn prefixes(p: &[ipnetwork::IpNetwork]) -> String {
    p.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// Every member site of every segment (access points apart: they carry
/// segments, they are not their sites), by tenant, segment and site.
/// A site being cut over appears once, under its legacy name, naming the
/// Musubi site it moves to.
pub fn report(intent: &Intent, seen: &dyn Fn(&str) -> Option<Seen>) -> Vec<Row> {
    let mut rows = Vec::new();
    for seg in intent.segments.values() {
        // Legacy sites of this segment, with their gateways.
        let mut targets: BTreeMap<&str, &str> = BTreeMap::new();
        for site in intent.sites.values() {
            let Some(legacy) = site.attachment(&seg.name).and_then(|a| a.legacy.as_ref()) else { continue };
            for l in &legacy.sites {
                let (stage, cutover_to, detail) = match &l.cutover_to {
                    Some(to) => {
                        targets.insert(to.as_str(), l.name.as_str());
                        let detail = format!(
                            "to {to} ({}); {} still through {} until the legacy entry is removed",
                            agent(seen(to)),
                            prefixes(&l.prefixes),
                            site.name
                        );
                        (Stage::CuttingOver, Some(to.clone()), detail)
                    }
                    None => {
                        let detail = format!(
                            "{} through {} ({}, via {})",
                            prefixes(&l.prefixes),
                            site.name,
                            legacy.interface,
                            legacy.via
                        );
                        (Stage::Legacy, None, detail)
                    }
                };
                rows.push(Row {
                    tenant: seg.tenant.clone(),
                    segment: seg.name.clone(),
                    site: l.name.clone(),
                    stage,
                    cutover_to,
                    gateway: Some(site.name.clone()),
                    detail,
                });
            }
        }
        for site in intent.sites.values() {
            if site.is_access_point() || targets.contains_key(site.name.as_str()) {
                continue;
            }
            let Some(a) = site.attachment(&seg.name) else { continue };
            let state = seen(&site.name);
            let mut detail = agent(state).to_string();
            if let Some(legacy) = &a.legacy {
                detail.push_str(&format!(
                    "; migration gateway for {} legacy site{} on {}",
                    legacy.sites.len(),
                    if legacy.sites.len() == 1 { "" } else { "s" },
                    legacy.interface
                ));
            }
            rows.push(Row {
                tenant: seg.tenant.clone(),
                segment: seg.name.clone(),
                site: site.name.clone(),
                stage: if state.is_some() { Stage::OnMusubi } else { Stage::Declared },
                cutover_to: None,
                gateway: None,
                detail,
            });
        }
    }
    rows.sort_by(|a, b| (&a.tenant, &a.segment, &a.site).cmp(&(&b.tenant, &b.segment, &b.site)));
    rows
}

/// Counts per (tenant, segment).
pub fn tally(rows: &[Row]) -> BTreeMap<(String, String), Tally> {
    let mut out: BTreeMap<(String, String), Tally> = BTreeMap::new();
    for r in rows {
        let t = out.entry((r.tenant.clone(), r.segment.clone())).or_default();
        match r.stage {
            Stage::OnMusubi => t.on_musubi += 1,
            Stage::Declared => t.declared += 1,
            Stage::CuttingOver => t.cutting_over += 1,
            Stage::Legacy => t.legacy += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intent::parse::parse_str;

    const INTENT: &str = r#"
kind: Tenant
name: city
---
kind: Segment
name: office
tenant: city
prefixes: [10.10.0.0/16]
---
kind: Site
name: ap
tenant: city
role: access-point
region: east
lines: [{name: f, kind: dark-fiber, priority: 1, address: 192.0.2.1}]
attachments: [{segment: office}]
---
kind: Site
name: hq
tenant: city
region: east
lines: [{name: f, kind: dark-fiber, priority: 1, address: 192.0.2.11}]
attachments:
  - segment: office
    interface: eth1
    prefixes: [10.10.1.0/24]
    legacy:
      interface: eth4
      via: 172.16.9.1
      sites:
        - {name: old-a, prefixes: [10.10.8.0/24]}
        - {name: old-b, prefixes: [10.10.9.0/24], cutover_to: branch}
---
kind: Site
name: branch
tenant: city
region: east
lines: [{name: f, kind: dark-fiber, priority: 1, address: 192.0.2.13}]
attachments: [{segment: office, interface: eth1, prefixes: [10.10.9.0/24]}]
---
kind: Site
name: new
tenant: city
region: west
lines: [{name: f, kind: dark-fiber, priority: 1, address: 192.0.2.14}]
attachments: [{segment: office, interface: eth1, prefixes: [10.10.10.0/24]}]
"#;

    #[test]
    fn stages_come_from_the_intent_and_the_agents() {
        let parsed = parse_str("intent.yaml", INTENT);
        assert!(parsed.diagnostics.is_empty(), "{:?}", parsed.diagnostics);
        let seen = |s: &str| match s {
            "hq" => Some(Seen { connected: true, in_sync: true }),
            "branch" => Some(Seen { connected: true, in_sync: false }),
            _ => None,
        };
        let rows = report(&parsed.intent, &seen);
        let got: Vec<(&str, Stage)> = rows.iter().map(|r| (r.site.as_str(), r.stage)).collect();
        assert_eq!(
            got,
            [
                ("hq", Stage::OnMusubi),
                ("new", Stage::Declared),
                ("old-a", Stage::Legacy),
                ("old-b", Stage::CuttingOver)
            ]
        );
        assert_eq!(rows[0].detail, "in sync; migration gateway for 2 legacy sites on eth4");
        assert_eq!(rows[1].detail, "agent never connected");
        assert_eq!(rows[2].detail, "10.10.8.0/24 through hq (eth4, via 172.16.9.1)");
        assert_eq!(rows[2].gateway.as_deref(), Some("hq"));
        assert_eq!(
            rows[3].detail,
            "to branch (connected, not in sync yet); 10.10.9.0/24 still through hq until the legacy entry is removed"
        );
        let t = &tally(&rows)[&("city".to_string(), "office".to_string())];
        assert_eq!((t.on_musubi, t.declared, t.cutting_over, t.legacy, t.total()), (1, 1, 1, 1, 4));

        // The cutover completed: the entry gone, the branch a site like any other.
        let done = INTENT.replace("        - {name: old-b, prefixes: [10.10.9.0/24], cutover_to: branch}\n", "");
        let parsed = parse_str("intent.yaml", &done);
        let rows = report(&parsed.intent, &seen);
        let got: Vec<(&str, Stage, &str)> =
            rows.iter().map(|r| (r.site.as_str(), r.stage, r.detail.as_str())).collect();
        assert_eq!(got[0].0, "branch");
        assert_eq!((got[0].1, got[0].2), (Stage::OnMusubi, "connected, not in sync yet"));
        assert_eq!(rows.iter().filter(|r| r.stage == Stage::Legacy).count(), 1);
    }
}
