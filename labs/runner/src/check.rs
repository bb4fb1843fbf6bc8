//! `musubi lab check`: every pair of LAN hosts probed (ICMP, and each
//! policy's TCP port) against the matrix `musubi verify` derives.

use musubi_core::words::count;
use musubi_process::{print, println};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::lab::Lab;

/// One probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// As expected.
    Agrees,
    /// Expected to pass and did not (or the reply did not come back).
    Blocked,
    /// Expected not to pass and reached its host.
    Leaked,
    /// Delivered to another host with the same address.
    Misdelivered,
    /// The address also belongs to the sender itself or to an endpoint the
    /// sender may reach (overlapping segments): the probe cannot tell the
    /// two apart, and went where it should.
    SameAddress,
}

pub(crate) const PROBE_TABLE: &str = "table inet musubi-probe {
  chain input {
    type filter hook input priority 0; policy accept;
    icmp type echo-request counter
  }
}
";

/// Echo requests a host has received so far.
pub(crate) fn echoes(lab: &Lab, host: &str) -> u64 {
    lab.sh(host, "nft -j list table inet musubi-probe")
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| {
            v["nftables"].as_array().and_then(|a| {
                a.iter()
                    .filter_map(|o| o["rule"]["expr"].as_array())
                    .flatten()
                    .find_map(|e| e["counter"]["packets"].as_u64())
            })
        })
        .unwrap_or(0)
}

/// Echo requests each of `hosts` has received so far, read side by side
/// (one `nft` each: in the kernel lab's emulated guest a process takes
/// about a second to start).
fn every_echo(lab: &Lab, hosts: &[String]) -> Vec<u64> {
    std::thread::scope(|s| {
        let reads: Vec<_> = hosts.iter().map(|h| s.spawn(move || echoes(lab, h))).collect();
        reads.into_iter().map(|r| r.join().unwrap_or(0)).collect()
    })
}

pub(crate) fn check(lab: &Lab) -> Result<()> {
    use musubi_core::verify::{Reach, matrix, render};
    let clab = lab.topology()?;
    let parsed = musubi_core::load::load(&[lab.dir.join("intent.yaml")])?;
    let m = matrix(&parsed.intent);
    // Each endpoint's host and its IPv4 address.
    let mut hosts: Vec<Option<(String, String)>> = vec![None; m.endpoints.len()];
    for (name, node) in clab.topology.nodes.iter().filter(|(_, n)| n.role() == "host") {
        let (Some(site), Some(seg)) = (node.labels.get("musubi.site"), node.labels.get("musubi.segment")) else {
            continue;
        };
        let Some(i) = m.endpoints.iter().position(|e| &e.site == site && &e.segment == seg) else { continue };
        let out = lab.sh(name, "ip -4 -o addr show dev eth1")?;
        let addr = out
            .split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .with_context(|| format!("host {name} has no IPv4 address on eth1"))?
            .to_string();
        let mut nft = lab.command(name, "nft");
        nft.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null());
        let mut child = nft.spawn()?;
        use std::io::Write as _;
        child.stdin.take().context("nft stdin")?.write_all(
            format!("add table inet musubi-probe\ndelete table inet musubi-probe\n{PROBE_TABLE}").as_bytes(),
        )?;
        if !child.wait()?.success() {
            bail!("cannot install the probe counter in {name}");
        }
        hosts[i] = Some((name.clone(), addr));
    }
    let probed: Vec<usize> = (0..m.endpoints.len()).filter(|i| hosts[*i].is_some()).collect();
    println!("lab {}: {} of {} endpoints have a host; probing every pair", lab.name, probed.len(), m.endpoints.len());

    // Rounds in which no address is probed twice, so a host's counter tells
    // which probe reached it.
    let mut pending: Vec<(usize, usize)> =
        probed.iter().flat_map(|&i| probed.iter().filter(move |&&j| j != i).map(move |&j| (i, j))).collect();
    let mut results: BTreeMap<(usize, usize), Probe> = BTreeMap::new();
    let started = Instant::now();
    let addr = |i: usize| hosts[i].as_ref().map(|h| h.1.clone()).unwrap_or_default();
    let host = |i: usize| hosts[i].as_ref().map(|h| h.0.clone()).unwrap_or_default();
    // Warm-up: every tunnel a probe may use completes its WireGuard handshake
    // first, so no echo is held back in a handshake and counted in a later round.
    std::thread::scope(|s| {
        for &(i, j) in pending.iter().filter(|&&(i, j)| m.cells[i][j].icmp()) {
            let (h, a) = (host(i), addr(j));
            s.spawn(move || {
                let _ = lab
                    .command(&h, "ping")
                    .args(["-c", "3", "-i", "0.3", "-W", "2", &a])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            });
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    while !pending.is_empty() {
        let mut round = Vec::new();
        let (mut targets, mut senders) = (BTreeSet::new(), BTreeSet::new());
        pending.retain(|&(i, j)| {
            if addr(i) == addr(j) {
                results.insert((i, j), Probe::SameAddress);
                return false;
            }
            if targets.contains(&addr(j)) || senders.contains(&i) {
                return true;
            }
            targets.insert(addr(j));
            senders.insert(i);
            round.push((i, j));
            false
        });
        let before = every_echo(lab, &probed.iter().map(|&k| host(k)).collect::<Vec<_>>());
        let replies: Vec<bool> = std::thread::scope(|s| {
            let pings: Vec<_> = round
                .iter()
                .map(|&(i, j)| {
                    let (h, a) = (host(i), addr(j));
                    s.spawn(move || {
                        lab.command(&h, "ping")
                            .args(["-c", "1", "-W", "1", &a])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()
                            .is_ok_and(|st| st.success())
                    })
                })
                .collect();
            pings.into_iter().map(|p| p.join().unwrap_or(false)).collect()
        });
        let after = every_echo(lab, &probed.iter().map(|&k| host(k)).collect::<Vec<_>>());
        let got = |k: usize| probed.iter().position(|&p| p == k).is_some_and(|x| after[x] > before[x]);
        for (&(i, j), reply) in round.iter().zip(replies) {
            let expected = m.cells[i][j].icmp();
            // Another host with the same address got it: fine if the sender may
            // reach that one (the address is also in the sender's segment).
            let elsewhere: Vec<usize> =
                probed.iter().copied().filter(|&k| k != j && k != i && addr(k) == addr(j) && got(k)).collect();
            let outcome = if elsewhere.iter().any(|&k| !m.cells[i][k].icmp()) {
                Probe::Misdelivered
            } else if !elsewhere.is_empty() {
                Probe::SameAddress
            } else if expected && !(got(j) && reply) {
                Probe::Blocked
            } else if !expected && got(j) {
                Probe::Leaked
            } else {
                Probe::Agrees
            };
            results.insert((i, j), outcome);
        }
    }
    // A busy host can hold an echo past its round: a pair that disagreed is
    // probed again on its own, with time to spare, before it counts.
    let doubtful: Vec<(usize, usize)> =
        results.iter().filter(|(_, r)| matches!(r, Probe::Blocked | Probe::Leaked)).map(|(p, _)| *p).collect();
    for (i, j) in doubtful {
        std::thread::sleep(Duration::from_millis(300));
        let before = echoes(lab, &host(j));
        let reply = lab
            .command(&host(i), "ping")
            .args(["-c", "2", "-i", "0.3", "-W", "2", &addr(j)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        let got = echoes(lab, &host(j)) > before;
        let expected = m.cells[i][j].icmp();
        let outcome = match (expected, got && reply, got) {
            (true, true, _) | (false, _, false) => Probe::Agrees,
            (true, false, _) => Probe::Blocked,
            (false, _, true) => Probe::Leaked,
        };
        results.insert((i, j), outcome);
    }
    // Each policy flow's first port, TCP or UDP: a listener at the receiver
    // answers `ok` to every sender that probes it. Listeners start together,
    // then every client at once: in the kernel lab's emulated guest a Python
    // start takes seconds, so probing them one after the other cost minutes.
    let mut flows: BTreeMap<(usize, bool, u32), Vec<usize>> = BTreeMap::new();
    for &i in &probed {
        for &j in &probed {
            let Reach::Flows(list) = &m.cells[i][j] else { continue };
            use musubi_core::intent::Protocol;
            if let Some((udp, port)) = list
                .iter()
                .filter(|f| matches!(f.protocol, Protocol::Tcp | Protocol::Udp))
                .find_map(|f| f.ports.first().map(|p| (f.protocol == Protocol::Udp, p.0)))
            {
                flows.entry((j, udp, port)).or_default().push(i);
            }
        }
    }
    let tcp = flow_probes(lab, &flows, &host, &addr)?;
    let mismatches: Vec<String> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Probe::Agrees | Probe::SameAddress))
        .map(|((i, j), r)| format!("{} → {}: {r:?} (ICMP)", m.endpoints[*i].label(), m.endpoints[*j].label()))
        .chain(tcp.iter().filter(|t| !t.3).map(|(i, j, flow, _, why)| {
            format!("{} → {}: {flow} blocked ({why})", m.endpoints[*i].label(), m.endpoints[*j].label())
        }))
        .collect();
    println!();
    print!(
        "{}",
        render(&m, &|i, j| {
            if !probed.contains(&i) || !probed.contains(&j) {
                return (i != j).then_some(' ');
            }
            let tcp_bad = tcp.iter().any(|t| t.0 == i && t.1 == j && !t.3);
            match results.get(&(i, j)) {
                Some(Probe::SameAddress) => Some('='),
                Some(Probe::Agrees) if !tcp_bad => None,
                Some(_) => Some('✗'),
                None => None,
            }
        })
    );
    println!(
        "✗ measured differs from the intent   = the address is also the sender's or one it reaches (overlapping segments)"
    );
    println!(
        "\n{} and {} in {:.1} s: {}",
        count(results.values().filter(|r| **r != Probe::SameAddress).count(), "ICMP probe"),
        count(tcp.len(), "TCP/UDP probe"),
        started.elapsed().as_secs_f64(),
        if mismatches.is_empty() {
            "the network does what the intent says".to_string()
        } else {
            count(mismatches.len(), "mismatch")
        }
    );
    for mm in &mismatches {
        println!("  ✗ {mm}");
    }
    if !mismatches.is_empty() {
        let n = mismatches.len();
        bail!("{n} {} from the intent", if n == 1 { "pair differs" } else { "pairs differ" });
    }
    Ok(())
}

/// (sender, receiver, `tcp/PORT` or `udp/PORT`, answered, why not).
type FlowProbe = (usize, usize, String, bool, String);

/// Probes every policy flow of `flows` ((receiver, UDP, port) → senders):
/// one listener per receiver and port answering each of its senders, the
/// clients all at once once every listener listens.
fn flow_probes(
    lab: &Lab,
    flows: &BTreeMap<(usize, bool, u32), Vec<usize>>,
    host: &dyn Fn(usize) -> String,
    addr: &dyn Fn(usize) -> String,
) -> Result<Vec<FlowProbe>> {
    let mut listeners = Vec::new();
    for (&(j, udp, port), senders) in flows {
        let n = senders.len();
        let listener = if udp {
            format!(
                "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',{port}));s.settimeout(60);print('ready',flush=True)\nfor _ in range({n}):\n d,a=s.recvfrom(16);s.sendto(b'ok',a)"
            )
        } else {
            format!(
                "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',{port}));s.listen();s.settimeout(60);print('ready',flush=True)\nfor _ in range({n}):\n c,_=s.accept();c.sendall(b'ok');c.close()"
            )
        };
        let mut server = lab.command(&host(j), "python3");
        server.args(["-c", &listener]).stdout(Stdio::piped()).stderr(Stdio::null());
        listeners.push(((j, udp, port), server.spawn()?));
    }
    // A client starts only once its listener says it listens (a listener
    // still starting under load would refuse it). Bounds are wide, and the
    // listeners are killed as soon as their clients are done.
    let ready: BTreeMap<(usize, bool, u32), bool> =
        listeners.iter_mut().map(|(key, server)| (*key, wait_for_ready(server, Duration::from_secs(60)))).collect();
    let probes: Vec<FlowProbe> = std::thread::scope(|s| {
        let clients: Vec<_> = flows
            .iter()
            .flat_map(|(key, senders)| senders.iter().map(move |&i| (*key, i)))
            .map(|((j, udp, port), i)| {
                let listening = ready.get(&(j, udp, port)).copied().unwrap_or(false);
                let (h, a) = (host(i), addr(j));
                s.spawn(move || {
                    let flow = format!("{}/{port}", if udp { "udp" } else { "tcp" });
                    if !listening {
                        return (i, j, flow, false, "the listener did not start".to_string());
                    }
                    let client = if udp {
                        format!(
                            "import socket;c=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);c.settimeout(3);c.sendto(b'probe',('{a}',{port}));print(c.recv(2).decode())"
                        )
                    } else {
                        format!("import socket;c=socket.create_connection(('{a}',{port}),timeout=3);print(c.recv(2).decode())")
                    };
                    match lab.command(&h, "python3").args(["-c", &client]).output() {
                        Ok(out) => {
                            let ok = String::from_utf8_lossy(&out.stdout).trim() == "ok";
                            let err = String::from_utf8_lossy(&out.stderr);
                            (i, j, flow, ok, err.lines().last().unwrap_or("no answer").trim().to_string())
                        }
                        Err(e) => (i, j, flow, false, format!("cannot run the client: {e}")),
                    }
                })
            })
            .collect();
        clients.into_iter().filter_map(|c| c.join().ok()).collect()
    });
    for (_, mut server) in listeners {
        let _ = server.kill();
        let _ = server.wait();
    }
    Ok(probes)
}

/// Waits until a listener prints its `ready` line (bounded by `limit`).
fn wait_for_ready(server: &mut std::process::Child, limit: Duration) -> bool {
    use std::io::BufRead;
    let Some(out) = server.stdout.take() else { return false };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line.trim() == "ready");
    });
    rx.recv_timeout(limit).unwrap_or(false)
}
