//! The segment policy as an nftables table the agent owns, `inet musubi`,
//! written through nftables' JSON interface (the `nftables` crate runs
//! `nft -j`), replaced whole in one transaction when it changes.
//!
//! Its prerouting chain drops what a segment's tunnel carries with an inner
//! source that is not the segment's (nor a linked segment's, nor a peer's
//! tunnel address) — a tunnel with one peer accepts every address from it —
//! and marks what arrives over an interconnect. The hook sees the tunnel
//! itself in both modes: with VRFs the kernel moves a packet to the VRF
//! device only after this hook has seen it on the tunnel.
//!
//! Its forward chain, in order: a marked packet (it came over an
//! interconnect) never leaves over one (split horizon; with VRFs the forward
//! hook sees the VRF device as the input, hence the mark); traffic that stays inside a segment passes;
//! replies of allowed flows pass; each policy rule lets one flow from one
//! segment into another; everything else that enters or leaves a segment's
//! interface — into another segment or into the underlay — is counted and
//! dropped. Traffic that touches no segment (the underlay's own) is not
//! the agent's business and passes. Where the agent picks its peers' lines,
//! an input chain drops tunnel packets that come from their lines not in
//! use (see `PolicySpec::unused_lines`).

use nftables::helper;
use nftables::schema::Nftables;
use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::datapath::{DatapathError, Policy, PolicySpec};

pub const TABLE: &str = "musubi";
/// The comment of the rule that counts packets dropped between segments.
pub const DROP_COMMENT: &str = "musubi: between segments";
const MARK: &str = "musubi-policy ";
/// The packet mark bit of "came over an interconnect".
pub const INTERCONNECT_MARK: u32 = 0x0010_0000;
/// The comment of the rules that drop spoofed inner sources.
pub const SPOOF_COMMENT: &str = "musubi: not a source of the segment";

fn nft(what: &str, e: helper::NftablesError) -> DatapathError {
    DatapathError::Nft { what: what.into(), source: e }
}

fn apply(value: Value) -> Result<(), DatapathError> {
    // Typed by the crate's schema before it reaches nft.
    let ruleset: Nftables = serde_json::from_value(value)
        .map_err(|e| DatapathError::Internal(format!("building the nftables policy: {e}")))?;
    let payload = serde_json::to_string(&ruleset)
        .map_err(|e| DatapathError::Internal(format!("encoding the nftables policy: {e}")))?;
    run_nft(&payload).map_err(|e| nft("writing the policy", e))
}

/// `nft -j -f -` with the ruleset on its standard input, capturing its
/// standard error: the crate's helper lets nft's own message go to the
/// agent's stderr and returns an empty one, so an operator saw only "did not
/// return successfully".
fn run_nft(payload: &str) -> Result<(), helper::NftablesError> {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let program = std::ffi::OsString::from("nft");
    let execution = |inner| helper::NftablesError::NftExecution { program: program.clone(), inner };
    let mut child = Command::new(&program)
        .args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(execution)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(payload.as_bytes()).map_err(execution)?;
    }
    let out = child.wait_with_output().map_err(execution)?;
    if out.status.success() {
        return Ok(());
    }
    Err(helper::NftablesError::NftFailed {
        program,
        hint: "applying ruleset".into(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

fn names(set: impl IntoIterator<Item = impl Into<String>>) -> Value {
    json!({ "set": set.into_iter().map(Into::into).collect::<Vec<String>>() })
}

fn meta(key: &str, right: Value) -> Value {
    json!({ "match": { "op": "==", "left": { "meta": { "key": key } }, "right": right } })
}

fn prefixes(list: &[String], v6: bool) -> Option<Value> {
    let items: Vec<Value> = list
        .iter()
        .filter(|p| p.contains(':') == v6)
        .filter_map(|p| p.split_once('/'))
        .map(|(addr, len)| json!({ "prefix": { "addr": addr, "len": len.parse::<u8>().unwrap_or(0) } }))
        .collect();
    (!items.is_empty()).then(|| json!({ "set": items }))
}

fn rule(expr: Vec<Value>, comment: Option<String>) -> Value {
    let mut r = json!({ "family": "inet", "table": TABLE, "chain": "forward", "expr": expr });
    if let Some(c) = comment {
        r["comment"] = json!(c);
    }
    json!({ "add": { "rule": r } })
}

/// The whole table for `policy`.
fn ruleset(policy: &Policy, spec: &PolicySpec) -> Value {
    let table = json!({ "table": { "family": "inet", "name": TABLE } });
    let mut cmds = vec![
        json!({ "add": table.clone() }),
        json!({ "delete": table.clone() }),
        json!({ "add": table }),
        json!({ "add": { "chain": {
            "family": "inet", "table": TABLE, "name": "forward",
            "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"
        } } }),
    ];
    let all: Vec<String> = spec.segments.values().flatten().cloned().collect();
    cmds.push(rule(vec![json!({ "counter": null })], Some(format!("{MARK}{}", policy.digest))));
    prerouting(spec, &mut cmds);
    if !spec.interconnects.is_empty() {
        cmds.push(rule(
            vec![
                json!({ "match": { "op": "==",
                    "left": { "&": [{ "meta": { "key": "mark" } }, INTERCONNECT_MARK] },
                    "right": INTERCONNECT_MARK } }),
                meta("oifname", names(spec.interconnects.iter().cloned())),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ],
            Some("musubi: split horizon".into()),
        ));
    }
    for (segment, interfaces) in &spec.segments {
        cmds.push(rule(
            vec![
                meta("iifname", names(interfaces.iter().cloned())),
                meta("oifname", names(interfaces.iter().cloned())),
                json!({ "accept": null }),
            ],
            Some(format!("within {segment}")),
        ));
    }
    cmds.push(rule(
        vec![
            meta("iifname", names(all.iter().cloned())),
            json!({ "match": { "op": "in", "left": { "ct": { "key": "state" } }, "right": ["established", "related"] } }),
            json!({ "accept": null }),
        ],
        Some("replies of allowed flows".into()),
    ));
    for allow in &spec.allow {
        let (Some(from), Some(to)) = (spec.segments.get(&allow.from_segment), spec.segments.get(&allow.to_segment))
        else {
            continue;
        };
        for v6 in [false, true] {
            let family = if v6 { "ip6" } else { "ip" };
            let (Some(src), Some(dst)) = (prefixes(&allow.from_prefixes, v6), prefixes(&allow.to_prefixes, v6)) else {
                continue;
            };
            let mut expr = vec![
                meta("iifname", names(from.iter().cloned())),
                meta("oifname", names(to.iter().cloned())),
                json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "saddr" } }, "right": src } }),
                json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "daddr" } }, "right": dst } }),
            ];
            match allow.protocol.as_str() {
                "tcp" | "udp" => {
                    expr.push(meta("l4proto", json!(allow.protocol)));
                    if !allow.ports.is_empty() {
                        expr.push(json!({ "match": { "op": "==",
                            "left": { "payload": { "protocol": allow.protocol, "field": "dport" } },
                            "right": port_set(&allow.ports) } }));
                    }
                }
                "icmp" => expr.push(meta("l4proto", json!(if v6 { "ipv6-icmp" } else { "icmp" }))),
                _ => {}
            }
            expr.push(json!({ "accept": null }));
            cmds.push(rule(expr, Some(format!("policy {}", allow.name))));
            for expr in replies(allow, from, to, v6, &src, &dst) {
                cmds.push(rule(expr, Some(format!("replies of policy {}", allow.name))));
            }
        }
    }
    for key in ["iifname", "oifname"] {
        cmds.push(rule(
            vec![meta(key, names(all.iter().cloned())), json!({ "counter": null }), json!({ "drop": null })],
            Some(DROP_COMMENT.into()),
        ));
    }
    if !spec.tunnel_ports.is_empty() {
        cmds.push(json!({ "add": { "chain": {
            "family": "inet", "table": TABLE, "name": "input",
            "type": "filter", "hook": "input", "prio": 0, "policy": "accept"
        } } }));
        let ports: Vec<Value> = spec.tunnel_ports.iter().map(|p| json!(p)).collect();
        for v6 in [false, true] {
            let (family, set, kind) = fence_set(v6);
            cmds.push(json!({ "add": { "set": { "family": "inet", "table": TABLE, "name": set, "type": kind } } }));
            let mut r = json!({ "family": "inet", "table": TABLE, "chain": "input", "expr": [
                json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "saddr" } }, "right": format!("@{set}") } }),
                meta("l4proto", json!("udp")),
                json!({ "match": { "op": "==", "left": { "payload": { "protocol": "udp", "field": "dport" } }, "right": { "set": ports } } }),
                json!({ "counter": null }),
                json!({ "drop": null }),
            ] });
            r["comment"] = json!("musubi: tunnel packets from a line not in use");
            cmds.push(json!({ "add": { "rule": r } }));
        }
        cmds.extend(fence_elements(&spec.unused_lines));
    }
    json!({ "nftables": cmds })
}

/// The fence's set for one family: (payload protocol, set name, set type).
fn fence_set(v6: bool) -> (&'static str, &'static str, &'static str) {
    if v6 { ("ip6", "unused6", "ipv6_addr") } else { ("ip", "unused4", "ipv4_addr") }
}

/// Commands that add `fence`'s addresses to the fence's sets.
fn fence_elements(fence: &BTreeSet<std::net::IpAddr>) -> Vec<Value> {
    [false, true]
        .into_iter()
        .filter_map(|v6| {
            let (_, set, _) = fence_set(v6);
            let elem: Vec<String> = fence.iter().filter(|a| a.is_ipv6() == v6).map(ToString::to_string).collect();
            (!elem.is_empty()).then(
                || json!({ "add": { "element": { "family": "inet", "table": TABLE, "name": set, "elem": elem } } }),
            )
        })
        .collect()
}

/// Rewrites only the fence: both sets emptied and filled in one
/// transaction (the table and its rules must be there).
pub fn set_fence(fence: &BTreeSet<std::net::IpAddr>) -> Result<(), DatapathError> {
    apply(json!({ "nftables": fence_update(fence) }))
}

fn fence_update(fence: &BTreeSet<std::net::IpAddr>) -> Vec<Value> {
    let mut cmds: Vec<Value> = [false, true]
        .into_iter()
        .map(|v6| {
            let (_, name, kind) = fence_set(v6);
            json!({ "flush": { "set": { "family": "inet", "table": TABLE, "name": name, "type": kind } } })
        })
        .collect();
    cmds.extend(fence_elements(fence));
    cmds
}

/// A set of inclusive port ranges, a single port as itself.
fn port_set(ports: &[(u16, u16)]) -> Value {
    let items: Vec<Value> =
        ports.iter().map(|(a, b)| if a == b { json!(a) } else { json!({ "range": [a, b] }) }).collect();
    json!({ "set": items })
}

/// The replies of a policy's flow, without state: an access point that
/// carries only the reply direction (the request crossed the other one:
/// each site sends through its own region's access point, and each access
/// point reaches a member directly) has no connection to match them to. A
/// reply goes from the policy's destination back to its source: TCP from
/// the allowed ports and never a connection's opening (SYN without ACK),
/// UDP from the allowed ports, ICMP echo replies; a rule for any protocol
/// lets back those three. What this opens in the reverse direction is what
/// a stateless router's "established" filter opens: no connection can be
/// started from the destination side.
fn replies(
    allow: &crate::datapath::Allow,
    from: &BTreeSet<String>,
    to: &BTreeSet<String>,
    v6: bool,
    src: &Value,
    dst: &Value,
) -> Vec<Vec<Value>> {
    let family = if v6 { "ip6" } else { "ip" };
    let base = || {
        vec![
            meta("iifname", names(to.iter().cloned())),
            meta("oifname", names(from.iter().cloned())),
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "saddr" } }, "right": dst } }),
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": family, "field": "daddr" } }, "right": src } }),
        ]
    };
    let sports = |protocol: &str| -> Option<Value> {
        (!allow.ports.is_empty()).then(|| {
            json!({ "match": { "op": "==", "left": { "payload": { "protocol": protocol, "field": "sport" } }, "right": port_set(&allow.ports) } })
        })
    };
    let tcp = || {
        let mut e = base();
        e.push(meta("l4proto", json!("tcp")));
        e.extend(sports("tcp"));
        e.push(json!({ "match": { "op": "!=",
            "left": { "&": [{ "payload": { "protocol": "tcp", "field": "flags" } }, { "|": ["syn", "ack"] }] },
            "right": "syn" } }));
        e.push(json!({ "accept": null }));
        e
    };
    let udp = || {
        let mut e = base();
        e.push(meta("l4proto", json!("udp")));
        e.extend(sports("udp"));
        e.push(json!({ "accept": null }));
        e
    };
    let icmp = || {
        let (proto, kind) = if v6 { ("icmpv6", "echo-reply") } else { ("icmp", "echo-reply") };
        let mut e = base();
        e.push(meta("l4proto", json!(if v6 { "ipv6-icmp" } else { "icmp" })));
        e.push(json!({ "match": { "op": "==", "left": { "payload": { "protocol": proto, "field": "type" } }, "right": kind } }));
        e.push(json!({ "accept": null }));
        e
    };
    match allow.protocol.as_str() {
        "tcp" => vec![tcp()],
        "udp" => vec![udp()],
        "icmp" => vec![icmp()],
        _ => vec![tcp(), udp(), icmp()],
    }
}

/// The prerouting chain: anti-spoofing per segment, the interconnects' mark.
fn prerouting(spec: &PolicySpec, cmds: &mut Vec<Value>) {
    if spec.sources.is_empty() && spec.interconnects.is_empty() {
        return;
    }
    cmds.push(json!({ "add": { "chain": {
        "family": "inet", "table": TABLE, "name": "prerouting",
        "type": "filter", "hook": "prerouting", "prio": -150, "policy": "accept"
    } } }));
    let add = |cmds: &mut Vec<Value>, expr: Vec<Value>, comment: &str| {
        cmds.push(json!({ "add": { "rule": {
            "family": "inet", "table": TABLE, "chain": "prerouting", "expr": expr, "comment": comment
        } } }));
    };
    for (segment, sources) in &spec.sources {
        if sources.tunnels.is_empty() {
            continue;
        }
        let list: Vec<String> = sources.prefixes.iter().cloned().collect();
        for v6 in [false, true] {
            let family = if v6 { "ip6" } else { "ip" };
            let mut expr = vec![
                meta("iifname", names(sources.tunnels.iter().cloned())),
                meta("nfproto", json!(if v6 { "ipv6" } else { "ipv4" })),
            ];
            if let Some(set) = prefixes(&list, v6) {
                expr.push(json!({ "match": { "op": "!=",
                    "left": { "payload": { "protocol": family, "field": "saddr" } }, "right": set } }));
            }
            expr.push(json!({ "counter": null }));
            expr.push(json!({ "drop": null }));
            add(cmds, expr, &format!("{SPOOF_COMMENT} {segment}"));
        }
    }
    if !spec.interconnects.is_empty() {
        add(
            cmds,
            vec![
                meta("iifname", names(spec.interconnects.iter().cloned())),
                json!({ "mangle": { "key": { "meta": { "key": "mark" } },
                    "value": { "|": [{ "meta": { "key": "mark" } }, INTERCONNECT_MARK] } } }),
            ],
            "musubi: came over an interconnect",
        );
    }
}

pub fn set(policy: &Policy) -> Result<(), DatapathError> {
    let spec =
        policy.spec.as_ref().ok_or_else(|| DatapathError::Invalid("a policy without its specification".into()))?;
    apply(ruleset(policy, spec))
}

pub fn delete() -> Result<(), DatapathError> {
    let table = json!({ "table": { "family": "inet", "name": TABLE } });
    apply(json!({ "nftables": [{ "add": table.clone() }, { "delete": table }] }))
}

/// The table's JSON listing, `None` when there is no table.
pub fn list() -> Result<Option<Value>, DatapathError> {
    match helper::get_current_ruleset_raw(helper::DEFAULT_NFT, ["list", "table", "inet", TABLE]) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| DatapathError::Internal(format!("reading nft's output: {e}"))),
        Err(helper::NftablesError::NftFailed { stderr, .. }) if stderr.contains("No such file") => Ok(None),
        Err(e) => Err(nft("reading the policy", e)),
    }
}

/// The policy the table holds (its digest), if the agent wrote one.
pub fn observe() -> Result<Option<Policy>, DatapathError> {
    let Some(listing) = list()? else { return Ok(None) };
    let digest =
        rules(&listing).find_map(|r| r["comment"].as_str().and_then(|c| c.strip_prefix(MARK)).map(String::from));
    let fence = listing["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o.get("set"))
        .filter(|s| matches!(s["name"].as_str(), Some("unused4" | "unused6")))
        .flat_map(|s| s["elem"].as_array().into_iter().flatten())
        .filter_map(|e| e.as_str().and_then(|a| a.parse().ok()))
        .collect();
    // A table without the mark is not one the agent finished: replace it.
    Ok(Some(Policy::observed(digest.unwrap_or_default(), fence)))
}

fn rules(listing: &Value) -> impl Iterator<Item = &Value> {
    listing["nftables"].as_array().into_iter().flatten().filter_map(|o| o.get("rule"))
}

/// Packets dropped between segments so far (both drop rules).
pub fn dropped(listing: &Value) -> u64 {
    rules(listing)
        .filter(|r| r["comment"].as_str() == Some(DROP_COMMENT))
        .flat_map(|r| r["expr"].as_array().into_iter().flatten())
        .filter_map(|e| e["counter"]["packets"].as_u64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::Sources;

    /// An access point's policy with every kind of rule: the typed schema
    /// takes it, and nft checks it (`nft -c`, nothing written) when it is
    /// installed and the test runs as root.
    #[test]
    fn anti_spoofing_and_split_horizon_are_a_ruleset_nft_takes() {
        let mut spec = PolicySpec::default();
        spec.segments.insert("office".into(), ["mv-office", "mm-office", "mi-office"].map(String::from).into());
        spec.sources.insert(
            "office".into(),
            Sources {
                tunnels: ["mm-office", "mi-office"].map(String::from).into(),
                prefixes: ["10.1.0.0/16", "100.64.0.1/32", "fd00::/64"].map(String::from).into(),
            },
        );
        spec.sources.insert(
            "v4only".into(),
            Sources {
                tunnels: ["me-v4only"].map(String::from).into(),
                prefixes: ["10.2.0.0/16"].map(String::from).into(),
            },
        );
        spec.interconnects.insert("mi-office".into());
        spec.segments.insert("other".into(), ["mv-other", "mm-other"].map(String::from).into());
        for (protocol, ports) in [("tcp", vec![(22, 22), (8000, 8080)]), ("any", vec![]), ("udp", vec![(53, 53)])] {
            spec.allow.push(crate::datapath::Allow {
                name: format!("office-{protocol}"),
                from_segment: "office".into(),
                to_segment: "other".into(),
                from_prefixes: vec!["10.1.0.0/16".into(), "fd00::/64".into()],
                to_prefixes: vec!["10.9.0.0/16".into(), "fd09::/64".into()],
                protocol: protocol.into(),
                ports,
            });
        }
        spec.tunnel_ports = [51820, 51821].into();
        spec.unused_lines = ["192.0.2.1".parse().expect("ip"), "2001:db8::1".parse().expect("ip")].into();
        let policy = Policy::new(spec.clone());
        let mut value = ruleset(&policy, &spec);
        // A line move's fence rewrite after it, in the same transaction.
        let moved: BTreeSet<std::net::IpAddr> = ["198.51.100.1".parse().expect("ip")].into();
        value["nftables"].as_array_mut().expect("commands").extend(fence_update(&moved));
        let typed: Nftables = serde_json::from_value(value).expect("the crate's schema takes it");
        let text = serde_json::to_string(&typed).expect("encodes");
        assert!(text.contains("@unused4") && text.contains("@unused6") && text.contains("198.51.100.1"), "{text}");
        assert!(text.contains(SPOOF_COMMENT) && text.contains("split horizon"), "{text}");
        assert!(text.contains("replies of policy office-tcp") && text.contains("sport"), "{text}");
        // The segment without IPv6 prefixes drops every IPv6 packet of its tunnel.
        assert!(text.contains("ipv6"), "{text}");
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
        if !root || std::process::Command::new("nft").arg("--version").output().is_err() {
            eprintln!("not checked by nft: needs root and nft");
            return;
        }
        use std::io::Write as _;
        let mut child = std::process::Command::new("nft")
            .args(["-c", "-j", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("nft runs");
        child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("written");
        let out = child.wait_with_output().expect("nft ends");
        assert!(out.status.success(), "nft refused it: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// nft's own words reach the error: a rule for a table that is not
    /// there is refused, and the message says why (not only "did not
    /// return successfully"). Changes nothing in the kernel.
    #[test]
    fn a_refused_ruleset_says_what_nft_said() {
        if std::process::Command::new("nft").arg("--version").output().is_err() {
            eprintln!("skipped: nft is not installed");
            return;
        }
        let rule = json!({ "nftables": [{ "add": { "rule": {
            "family": "inet", "table": "musubi-test-absent", "chain": "forward", "expr": [{ "accept": null }]
        } } }] });
        let e = run_nft(&rule.to_string()).expect_err("a rule without its table");
        let text = nft("writing the policy", e).to_string();
        assert!(text.starts_with("writing the policy: ") && text.contains("Error: "), "{text}");
    }
}
