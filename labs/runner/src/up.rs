//! `musubi lab up`: namespaces, links, the controller, the intent, an agent
//! per router, and the wait until every agent is in sync.

use musubi_core::words::count;
use musubi_process::println;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::PORT;
use crate::lab::{Lab, ip, run, sibling};
use crate::netns;
use crate::topology::Clab;

/// The datapath modes every router's agent is started with.
#[derive(Debug, Clone)]
pub(crate) struct Modes {
    pub(crate) wireguard: String,
    pub(crate) domains: String,
}

impl Modes {
    const FILE: &'static str = "modes";

    fn save(&self, lab: &Lab) -> Result<()> {
        Ok(std::fs::write(lab.dir.join(Self::FILE), format!("{} {}\n", self.wireguard, self.domains))?)
    }

    /// The lab's modes (`auto auto` for a lab made before they were kept).
    fn of(lab: &Lab) -> Modes {
        let text = std::fs::read_to_string(lab.dir.join(Self::FILE)).unwrap_or_default();
        let mut words = text.split_whitespace().map(str::to_string);
        Modes {
            wireguard: words.next().unwrap_or_else(|| "auto".into()),
            domains: words.next().unwrap_or_else(|| "auto".into()),
        }
    }
}

pub(crate) fn up(lab: &Lab, path: &Path, clab: &Clab, wait: Duration, etcd: bool, modes: &Modes) -> Result<()> {
    let started = Instant::now();
    let nodes = &clab.topology.nodes;
    let controller = clab.controller()?.0.clone();
    let controller_ip = nodes[&controller]
        .mgmt_ipv4
        .clone()
        .context("the controller node needs a mgmt-ipv4 address (agents dial it)")?;
    let intent = nodes[&controller]
        .labels
        .get("musubi.intent")
        .map(|i| path.parent().unwrap_or(Path::new(".")).join(i))
        .context("the controller node needs a musubi.intent label")?;
    // Commands in a node's mount namespace start in `/`.
    let intent = std::fs::canonicalize(&intent).with_context(|| format!("intent {}", intent.display()))?;

    std::fs::create_dir_all(lab.dir.join("mnt"))?;
    std::fs::copy(path, lab.dir.join("topology.clab.yml"))?;
    modes.save(lab)?;
    std::fs::copy(&intent, lab.dir.join("intent.yaml"))?;
    netns::private_mounts(&lab.dir.join("mnt"))?;
    println!("lab {}: {}, {}", lab.name, count(nodes.len(), "node"), count(clab.topology.links.len(), "link"));

    // Namespaces; routers and the controller with a mount namespace of their own.
    for (name, node) in nodes {
        netns::add(&lab.ns(name))?;
        if matches!(node.role(), "router" | "controller") {
            netns::own_mounts(&lab.mnt(name))?;
        }
    }
    // The management network: a bridge in a namespace of its own.
    let mgmt = lab.ns("mgmt");
    ip(&["netns", "add", &mgmt])?;
    ip(&["-n", &mgmt, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &mgmt, "link", "set", "br0", "up"])?;
    let prefix_len = clab
        .mgmt
        .as_ref()
        .and_then(|m| m.ipv4_subnet.as_ref())
        .and_then(|s| s.split_once('/').map(|(_, l)| l.to_string()))
        .unwrap_or_else(|| "24".into());
    for (i, (name, node)) in nodes.iter().enumerate() {
        let Some(addr) = &node.mgmt_ipv4 else { continue };
        let port = format!("m{i}");
        ip(&["link", "add", "eth0", "netns", &lab.ns(name), "type", "veth", "peer", "name", &port, "netns", &mgmt])?;
        ip(&["-n", &mgmt, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", &lab.ns(name), "addr", "add", &format!("{addr}/{prefix_len}"), "dev", "eth0"])?;
        ip(&["-n", &lab.ns(name), "link", "set", "eth0", "up"])?;
    }
    // Links.
    for link in &clab.topology.links {
        let [a, b] = link.endpoints.as_slice() else { bail!("a link needs two endpoints: {:?}", link.endpoints) };
        let (Some((na, ia)), Some((nb, ib))) = (a.split_once(':'), b.split_once(':')) else {
            bail!("endpoints are `node:interface`: {a}, {b}")
        };
        for n in [na, nb] {
            if !nodes.contains_key(n) {
                bail!("link {a} — {b}: there is no node `{n}`");
            }
        }
        netns::veth(&lab.ns(na), ia, &lab.ns(nb), ib)?;
    }
    // Each node's own set-up, as containerlab runs it.
    for (name, node) in nodes {
        for line in &node.exec {
            lab.sh(name, line)?;
        }
    }

    // The controller: PKI, store, serve, intent.
    let pki = lab.dir.join("pki");
    run(Command::new(sibling("musubi-controller"))
        .args(["init", "--pki"])
        .arg(&pki)
        .args(["--server-name", "localhost", "--server-name", "127.0.0.1", "--server-name", &controller_ip])
        .stdout(Stdio::null()))?;
    let store = if etcd {
        let mut server = lab.command(&controller, "etcd");
        server
            .args(["--name", "lab", "--data-dir"])
            .arg(lab.dir.join("etcd"))
            .args(["--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379"])
            .args([
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
            ])
            .args(["--initial-cluster", "lab=http://127.0.0.1:2380"])
            .args(["--logger", "zap", "--log-level", "error"]);
        lab.spawn(&controller, "etcd", server)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = "python3 -c \"import socket; socket.create_connection(('127.0.0.1', 2379), 1)\"";
        while lab.sh(&controller, probe).is_err() {
            if Instant::now() > deadline {
                bail!("etcd did not listen; see {}", lab.node_dir(&controller).join("etcd.log").display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        "etcd://127.0.0.1:2379".to_string()
    } else {
        format!("file://{}", lab.dir.join("store").display())
    };
    let mut serve = lab.command(&controller, &sibling("musubi-controller").display().to_string());
    serve.args(["serve", "--pki"]).arg(&pki).arg("--store").arg(&store).args(["--listen", &format!("0.0.0.0:{PORT}")]);
    // The dashboard and metrics on the controller's own loopback (`musubi
    // lab dashboard` brings the dashboard to this host's).
    serve
        .args(["--dashboard", &DASHBOARD.to_string(), "--dashboard-reports"])
        .arg(lab.dir.join("drills"))
        .args(["--metrics", &CONTROLLER_METRICS.to_string()]);
    lab.spawn(&controller, "controller", serve)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.musubi(&controller).arg("history").stdout(Stdio::null()).stderr(Stdio::null()).status()?.code() != Some(0)
    {
        if Instant::now() > deadline {
            bail!("the controller did not answer; see {}", lab.node_dir(&controller).join("controller.log").display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    run(lab.musubi(&controller).arg("apply").arg("-f").arg(&intent).arg("--yes").stdout(Stdio::null()))?;
    println!("controller up at {controller_ip}:{PORT} (store {store}), intent {} applied", intent.display());

    // An agent per router of a site the intent has, enrolled with its own token.
    let known = musubi_core::load::load(std::slice::from_ref(&intent))?.intent;
    let mut sites: Vec<&String> = Vec::new();
    for (name, node) in nodes.iter().filter(|(_, n)| n.role() == "router") {
        let site =
            node.labels.get("musubi.site").with_context(|| format!("router `{name}` needs a musubi.site label"))?;
        if !known.sites.contains_key(site) {
            println!("router {name}: site {site} is not in the intent yet; no agent (`musubi lab agent {name}` later)");
            continue;
        }
        start_agent(lab, &controller, &controller_ip, name, site)?;
        sites.push(site);
    }
    println!("{} started; waiting for them to be in sync", count(sites.len(), "agent"));
    // In sync, every tunnel up, and settled: every agent's key has reached
    // every configuration (the desired digests stop changing).
    let deadline = Instant::now() + wait;
    let mut settled: Option<(Vec<String>, Instant)> = None;
    // How often every agent was in sync and then one was not again: an
    // agent whose tunnels keep going down is not "still coming up".
    let mut lost = 0u32;
    let progress = musubi_process::progress::Progress::new(sites.len() as u64, "agents in sync");
    loop {
        let out = lab.musubi(&controller).args(["status", "--json"]).output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let synced = sites.iter().filter(|s| in_sync(&status, s)).count();
        progress.set(synced as u64);
        if synced == sites.len() {
            let digests: Vec<String> = status["sites"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| r["desired_digest"].as_str().unwrap_or_default().to_string())
                .collect();
            match &settled {
                Some((d, since)) if *d == digests => {
                    if since.elapsed() >= Duration::from_millis(750) {
                        break;
                    }
                }
                _ => settled = Some((digests, Instant::now())),
            }
        } else {
            lost += u32::from(settled.is_some());
            settled = None;
        }
        if Instant::now() > deadline {
            if lost > 0 {
                bail!(
                    "{synced} of {} agents in sync after {} s, but never every one of them for 0.75 s together \
                     (in sync, every tunnel up, configurations unchanged): {} a tunnel went down or a \
                     configuration changed again (the agents' logs say `traffic moved` when a path failed)",
                    sites.len(),
                    wait.as_secs(),
                    count(lost as usize, "time")
                );
            }
            bail!("{synced} of {} agents in sync after {} s", sites.len(), wait.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    progress.finish();
    println!("lab {} up in {:.1} s: every agent in sync, every tunnel up", lab.name, started.elapsed().as_secs_f64());
    Ok(())
}

/// Where the lab's controller serves its dashboard and its metrics, on its
/// node's own loopback.
pub(crate) const DASHBOARD: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 7480));
pub(crate) const CONTROLLER_METRICS: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9463));

/// Where each lab agent serves its metrics, on its router's own loopback.
pub(crate) const AGENT_METRICS: std::net::SocketAddr =
    std::net::SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9464));

/// Starts (or restarts) the agent of router `node` for `site`, with a new
/// one-time token.
pub(crate) fn start_agent(lab: &Lab, controller: &str, controller_ip: &str, node: &str, site: &str) -> Result<u32> {
    let pid_file = lab.dir.join("pids").join(format!("{node}.agent"));
    if let Ok(pid) = std::fs::read_to_string(&pid_file) {
        let _ = Command::new("kill").arg(pid.trim()).stderr(Stdio::null()).status();
    }
    let out = lab.musubi(controller).args(["token", "create", "--site", site, "--ttl", "10m"]).output()?;
    if !out.status.success() {
        bail!("token for {site}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let token_file = lab.node_dir(node).join("token");
    std::fs::create_dir_all(lab.node_dir(node))?;
    std::fs::write(&token_file, String::from_utf8_lossy(&out.stdout).trim())?;
    let mut agent = lab.command(node, &sibling("musubi-agent").display().to_string());
    let modes = Modes::of(lab);
    agent
        .args(["run", "--site", site, "--controller", &format!("{controller_ip}:{PORT}"), "--state"])
        .arg(lab.node_dir(node).join("state"))
        .arg("--token-file")
        .arg(&token_file)
        .arg("--ca")
        .arg(lab.dir.join("pki").join("ca.pem"))
        .args(["--wireguard", &modes.wireguard, "--domains", &modes.domains])
        .args(["--metrics", &AGENT_METRICS.to_string()]);
    // Every router of a lab shares this machine's cores, and each of the
    // agents' wireguard-go processes (one per tunnel, a dozen per router)
    // would run a Go scheduler per core: one each (the operator's own
    // setting wins). During a drill's streams the two cores were 0-3 % idle
    // with 35-45 threads runnable; with one scheduler each, 3-10 % idle
    // and 10-20 runnable.
    if std::env::var_os("GOMAXPROCS").is_none() {
        agent.env("GOMAXPROCS", "1");
    }
    lab.spawn(node, "agent", agent)
}

/// Whether `site`'s row of `musubi status --json` says connected, in sync
/// and every tunnel up.
pub(crate) fn in_sync(status: &serde_json::Value, site: &str) -> bool {
    status["sites"].as_array().into_iter().flatten().any(|row| {
        row["site"] == site
            && row["connected"] == true
            && row["desired_digest"].as_str().is_some_and(|d| !d.is_empty())
            && row["reported"]["status"]["applied_digest"] == row["desired_digest"]
            && row["reported"]["status"]["peers"]
                .as_array()
                .is_some_and(|p| !p.is_empty() && p.iter().all(|p| p["up"] == true))
    })
}
