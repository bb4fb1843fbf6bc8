//! `musubi lab`: a containerlab topology (`.clab.yml`) brought up as network
//! namespaces on this host — one per node, routers with a mount namespace of
//! their own (their own `/var/run/wireguard/` and state), veth pairs for the
//! links, the nodes' `exec` commands run in them — with a controller, the
//! intent applied, and an agent on every router enrolled with a one-time
//! token. Everything a lab makes lives under one directory and one name
//! prefix, so `down` needs no memory and also clears a failed `up`.
//!
//! Musubi reads these containerlab labels:
//!
//! | label | on | meaning |
//! | --- | --- | --- |
//! | `musubi.role` | every node | `controller`, `router`, `carrier` (a line: a bridge) or `host` (a LAN host) |
//! | `musubi.site` | routers | the site of the intent this router is |
//! | `musubi.intent` | the controller | the intent file, relative to the topology |
//!
//! Nodes with `mgmt-ipv4` get `eth0` on the lab's management bridge (the
//! controller's address is what agents dial), as containerlab's management
//! network would give them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde::Deserialize;

mod drill;

/// Where labs keep their state unless `MUSUBI_LAB_DIR` says otherwise.
const ROOT: &str = "/run/musubi-lab";
const PORT: u16 = 7400;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Bring a lab up: namespaces, links, controller, intent, agents.
    Up {
        /// The topology [default: labs/prefecture/topology.clab.yml].
        topology: Option<PathBuf>,
        /// Run it under another name (several copies side by side).
        #[arg(long)]
        name: Option<String>,
        /// Seconds to wait for every agent to be in sync.
        #[arg(long, default_value_t = 90)]
        wait_s: u64,
        /// Keep the intent in a real etcd (Debian's etcd-server) started in
        /// the controller's node, instead of the embedded store.
        #[arg(long)]
        etcd: bool,
    },
    /// Remove everything of a lab: processes, namespaces, mounts, its directory.
    Down {
        /// The lab's name [default: the only one running].
        name: Option<String>,
    },
    /// The lab's nodes and processes, and `musubi status` from its controller.
    Status { name: Option<String> },
    /// Probe every pair of LAN hosts (ICMP, and each policy's TCP port) and
    /// compare with `musubi verify`'s matrix; exits 1 on any mismatch.
    Check { name: Option<String> },
    /// Start (or restart) a router's agent with a new one-time token: for a
    /// site added to the intent after `up`, or after a drill stopped it.
    Agent {
        #[arg(long)]
        lab: Option<String>,
        node: String,
    },
    /// The operator CLI against the lab's controller, as its admin:
    /// `musubi lab cli -- apply -f intent.yaml`, `musubi lab cli -- status --json`.
    Cli {
        #[arg(long)]
        lab: Option<String>,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Play a failure drill (labs/<lab>/drills/*.yaml) on the running lab:
    /// steady UDP streams between LAN hosts while lines are cut, nodes
    /// stopped and restored; prints a live timeline and the outage of each
    /// flow, writes JSON, Markdown and SVG reports. Exits 1 if it fails.
    Drill {
        file: PathBuf,
        #[arg(long)]
        lab: Option<String>,
        /// Where the reports go [default: the lab's directory, drills/].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run a command in a node: `musubi lab exec NODE -- CMD ARGS…`.
    Exec {
        #[arg(long)]
        lab: Option<String>,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
struct Clab {
    name: String,
    #[serde(default)]
    mgmt: Option<Mgmt>,
    topology: Topology,
}

#[derive(Debug, Deserialize)]
struct Mgmt {
    #[serde(rename = "ipv4-subnet")]
    ipv4_subnet: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Topology {
    nodes: BTreeMap<String, Node>,
    #[serde(default)]
    links: Vec<Link>,
}

#[derive(Debug, Deserialize)]
struct Node {
    #[serde(default)]
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    exec: Vec<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(rename = "mgmt-ipv4")]
    mgmt_ipv4: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Link {
    endpoints: Vec<String>,
}

impl Clab {
    /// The node labelled `musubi.role: controller`.
    fn controller(&self) -> Result<(&String, &Node)> {
        self.topology
            .nodes
            .iter()
            .find(|(_, n)| n.role() == "controller")
            .context("the topology has no node labelled musubi.role: controller")
    }
}

impl Node {
    fn role(&self) -> &str {
        self.labels.get("musubi.role").map(String::as_str).unwrap_or("host")
    }
}

fn root() -> PathBuf {
    std::env::var_os("MUSUBI_LAB_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(ROOT))
}

/// A lab's names and paths.
struct Lab {
    name: String,
    dir: PathBuf,
}

impl Lab {
    fn new(name: &str) -> Lab {
        Lab { name: name.to_string(), dir: root().join(name) }
    }

    /// The one running lab, or the named one.
    fn find(name: Option<String>) -> Result<Lab> {
        if let Some(n) = name {
            return Ok(Lab::new(&n));
        }
        let running: Vec<String> = std::fs::read_dir(root())
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
            .unwrap_or_default();
        match running.as_slice() {
            [one] => Ok(Lab::new(one)),
            [] => bail!("no lab is running (under {})", root().display()),
            many => bail!("several labs are running ({}): name one", many.join(", ")),
        }
    }

    fn ns(&self, node: &str) -> String {
        format!("ml-{}-{node}", self.name)
    }
    fn mnt(&self, node: &str) -> PathBuf {
        self.dir.join("mnt").join(node)
    }
    fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join("nodes").join(node)
    }
    fn topology(&self) -> Result<Clab> {
        read_topology(&self.dir.join("topology.clab.yml"))
    }

    /// A command run inside `node` (its network namespace, and its mount
    /// namespace when it has one).
    fn command(&self, node: &str, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns(node)));
        if self.mnt(node).exists() {
            cmd.arg(format!("--mount={}", self.mnt(node).display()));
        }
        cmd.arg("--").arg(program);
        cmd
    }

    fn sh(&self, node: &str, script: &str) -> Result<String> {
        let out = self.command(node, "/bin/sh").args(["-c", script]).output().context("nsenter")?;
        if !out.status.success() {
            bail!("in {node}: `{script}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// The operator CLI, run in the controller's namespace against it.
    fn musubi(&self, controller: &str) -> Command {
        let pki = self.dir.join("pki");
        let mut cmd = self.command(controller, &sibling("musubi").display().to_string());
        cmd.arg("--controller")
            .arg(format!("127.0.0.1:{PORT}"))
            .arg("--ca")
            .arg(pki.join("ca.pem"))
            .arg("--cert")
            .arg(pki.join("admin.pem"))
            .arg("--key")
            .arg(pki.join("admin-key.pem"));
        cmd
    }

    /// Starts a long-running process in `node`, detached from this one, its
    /// output in the node's directory and its PID recorded for `down`.
    fn spawn(&self, node: &str, what: &str, mut cmd: Command) -> Result<u32> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(self.node_dir(node))?;
        let log = std::fs::File::create(self.node_dir(node).join(format!("{what}.log")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {what} in {node}"))?;
        std::fs::create_dir_all(self.dir.join("pids"))?;
        std::fs::write(self.dir.join("pids").join(format!("{node}.{what}")), child.id().to_string())?;
        Ok(child.id())
    }
}

/// A binary installed next to this one.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join(name))).unwrap_or_else(|| name.into())
}

fn read_topology(path: &Path) -> Result<Clab> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let clab: Clab =
        yaml_serde::from_str(&text).with_context(|| format!("{} is not a containerlab topology", path.display()))?;
    Ok(clab)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args))
}

pub fn main(command: LabCommand) -> Result<()> {
    match command {
        LabCommand::Up { topology, name, wait_s, etcd } => {
            let path = topology.unwrap_or_else(|| PathBuf::from("labs/prefecture/topology.clab.yml"));
            let clab = read_topology(&path)?;
            let lab = Lab::new(name.as_deref().unwrap_or(&clab.name));
            if lab.dir.exists() {
                bail!("lab `{}` is already up (`musubi lab down {}` first)", lab.name, lab.name);
            }
            match up(&lab, &path, &clab, Duration::from_secs(wait_s), etcd) {
                Ok(()) => Ok(()),
                Err(e) => {
                    eprintln!("lab `{}` did not come up: {e:#}", lab.name);
                    eprintln!(
                        "logs are in {}; `musubi lab down {}` removes it",
                        lab.dir.join("nodes").display(),
                        lab.name
                    );
                    Err(e)
                }
            }
        }
        LabCommand::Down { name } => down(&Lab::find(name)?),
        LabCommand::Status { name } => status(&Lab::find(name)?),
        LabCommand::Check { name } => check(&Lab::find(name)?),
        LabCommand::Drill { file, lab, out } => drill::run(Lab::find(lab)?, &file, out),
        LabCommand::Cli { lab, args } => {
            let lab = Lab::find(lab)?;
            let clab = lab.topology()?;
            let (controller, _) = clab.controller()?;
            // Paths are read in the controller's mount namespace, which starts in `/`.
            let cwd = std::env::current_dir()?;
            let args: Vec<String> = args
                .into_iter()
                .map(|a| {
                    if Path::new(&a).is_relative() && cwd.join(&a).exists() {
                        cwd.join(&a).display().to_string()
                    } else {
                        a
                    }
                })
                .collect();
            let status = lab.musubi(controller).args(&args).status().context("nsenter")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCommand::Agent { lab, node } => {
            let lab = Lab::find(lab)?;
            let clab = lab.topology()?;
            let (controller, ctl) = clab.controller()?;
            let site = clab
                .topology
                .nodes
                .get(&node)
                .filter(|n| n.role() == "router")
                .and_then(|n| n.labels.get("musubi.site"))
                .with_context(|| format!("`{node}` is not a router of lab {}", lab.name))?;
            let ip = ctl.mgmt_ipv4.clone().context("the controller has no mgmt-ipv4")?;
            let pid = start_agent(&lab, controller, &ip, &node, site)?;
            println!("agent of {site} started in {node} (pid {pid})");
            Ok(())
        }
        LabCommand::Exec { lab, node, command } => {
            let lab = Lab::find(lab)?;
            let mut cmd = lab.command(&node, &command[0]);
            cmd.args(&command[1..]);
            let status = cmd.status().context("nsenter")?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn up(lab: &Lab, path: &Path, clab: &Clab, wait: Duration, etcd: bool) -> Result<()> {
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
    std::fs::copy(&intent, lab.dir.join("intent.yaml"))?;
    std::fs::create_dir_all("/var/run/wireguard")?;
    let mnt = lab.dir.join("mnt");
    run(Command::new("mount").arg("--bind").arg(&mnt).arg(&mnt))?;
    run(Command::new("mount").arg("--make-private").arg(&mnt))?;
    println!("lab {}: {} nodes, {} links", lab.name, nodes.len(), clab.topology.links.len());

    // Namespaces; routers and the controller with a mount namespace of their own.
    for (name, node) in nodes {
        ip(&["netns", "add", &lab.ns(name)])?;
        ip(&["-n", &lab.ns(name), "link", "set", "lo", "up"])?;
        if matches!(node.role(), "router" | "controller") {
            std::fs::write(lab.mnt(name), b"")?;
            run(Command::new("unshare").arg(format!("--mount={}", lab.mnt(name).display())).args([
                "--propagation",
                "private",
                "mount",
                "-t",
                "tmpfs",
                "tmpfs",
                "/var/run/wireguard",
            ]))?;
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
        ip(&["link", "add", ia, "netns", &lab.ns(na), "type", "veth", "peer", "name", ib, "netns", &lab.ns(nb)])?;
        ip(&["-n", &lab.ns(na), "link", "set", ia, "up"])?;
        ip(&["-n", &lab.ns(nb), "link", "set", ib, "up"])?;
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
            // Whole intents are committed in one transaction.
            .args(["--max-txn-ops", "100000", "--max-request-bytes", "67108864"])
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
    println!("{} agents started; waiting for them to be in sync", sites.len());
    // In sync, every tunnel up, and settled: every agent's key has reached
    // every configuration (the desired digests stop changing).
    let deadline = Instant::now() + wait;
    let mut settled: Option<(Vec<String>, Instant)> = None;
    loop {
        let out = lab.musubi(&controller).args(["status", "--json"]).output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let synced = sites.iter().filter(|s| in_sync(&status, s)).count();
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
            settled = None;
        }
        if Instant::now() > deadline {
            bail!("{synced} of {} agents in sync after {} s", sites.len(), wait.as_secs());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("lab {} up in {:.1} s: every agent in sync, every tunnel up", lab.name, started.elapsed().as_secs_f64());
    Ok(())
}

/// Starts (or restarts) the agent of router `node` for `site`, with a new
/// one-time token.
fn start_agent(lab: &Lab, controller: &str, controller_ip: &str, node: &str, site: &str) -> Result<u32> {
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
    agent
        .args(["run", "--site", site, "--controller", &format!("{controller_ip}:{PORT}"), "--state"])
        .arg(lab.node_dir(node).join("state"))
        .arg("--token-file")
        .arg(&token_file)
        .arg("--ca")
        .arg(lab.dir.join("pki").join("ca.pem"));
    lab.spawn(node, "agent", agent)
}

/// Whether `site`'s row of `musubi status --json` says connected, in sync
/// and every tunnel up.
fn in_sync(status: &serde_json::Value, site: &str) -> bool {
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

fn status(lab: &Lab) -> Result<()> {
    let clab = lab.topology()?;
    println!("lab {} ({})", lab.name, lab.dir.display());
    let namespaces = netns_list();
    for (name, node) in &clab.topology.nodes {
        let up = namespaces.contains(&lab.ns(name));
        let pids: Vec<String> = std::fs::read_dir(lab.dir.join("pids"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{name}.")))
                    .filter_map(|e| {
                        let what = e.file_name().to_string_lossy().split_once('.').map(|(_, w)| w.to_string())?;
                        let pid = std::fs::read_to_string(e.path()).ok()?;
                        let alive = Path::new(&format!("/proc/{}", pid.trim())).exists();
                        Some(format!("{what} {}", if alive { "running" } else { "stopped" }))
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!("  {name:<16} {:<10} {:<8} {}", node.role(), if up { "up" } else { "missing" }, pids.join(", "));
    }
    if let Ok((controller, _)) = clab.controller() {
        println!();
        let _ = lab.musubi(controller).arg("status").status();
    }
    Ok(())
}

fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Everything of the lab goes, whatever state `up` left it in.
fn down(lab: &Lab) -> Result<()> {
    // Recorded processes: asked to stop, then killed.
    let pids: Vec<String> = std::fs::read_dir(lab.dir.join("pids"))
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| std::fs::read_to_string(e.path()).ok()).collect())
        .unwrap_or_default();
    for pid in &pids {
        let _ = Command::new("kill").arg(pid.trim()).stderr(Stdio::null()).status();
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while pids.iter().any(|p| Path::new(&format!("/proc/{}", p.trim())).exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // Namespaces by name: whatever is left in them (wireguard-go) first.
    let prefix = lab.ns("");
    let mut removed = 0;
    for ns in netns_list().into_iter().filter(|n| n.starts_with(&prefix)) {
        let _ = Command::new("sh").args(["-c", &format!("ip netns pids {ns} | xargs -r kill -9")]).status();
        ip(&["netns", "del", &ns])?;
        removed += 1;
    }
    if let Ok(entries) = std::fs::read_dir(lab.dir.join("mnt")) {
        for e in entries.filter_map(|e| e.ok()) {
            let _ = Command::new("umount").arg(e.path()).stderr(Stdio::null()).status();
        }
    }
    let _ = Command::new("umount").arg(lab.dir.join("mnt")).stderr(Stdio::null()).status();
    if lab.dir.exists() {
        std::fs::remove_dir_all(&lab.dir).with_context(|| format!("removing {}", lab.dir.display()))?;
    }
    println!("lab {} down: {removed} namespaces and {} processes removed", lab.name, pids.len());
    Ok(())
}

/// One probe's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
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

const PROBE_TABLE: &str = "table inet musubi-probe {
  chain input {
    type filter hook input priority 0; policy accept;
    icmp type echo-request counter
  }
}
";

/// Echo requests a host has received so far.
fn echoes(lab: &Lab, host: &str) -> u64 {
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

fn check(lab: &Lab) -> Result<()> {
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
        let before: Vec<u64> = probed.iter().map(|&k| echoes(lab, &host(k))).collect();
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
        let after: Vec<u64> = probed.iter().map(|&k| echoes(lab, &host(k))).collect();
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
    // answers `ok`.
    let mut tcp = Vec::new();
    for &i in &probed {
        for &j in &probed {
            let Reach::Flows(flows) = &m.cells[i][j] else { continue };
            use musubi_core::intent::Protocol;
            let Some((udp, port)) = flows
                .iter()
                .filter(|f| matches!(f.protocol, Protocol::Tcp | Protocol::Udp))
                .find_map(|f| f.ports.first().map(|p| (f.protocol == Protocol::Udp, p.0)))
            else {
                continue;
            };
            let (listener, client) = if udp {
                (
                    format!(
                        "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(('0.0.0.0',{port}));s.settimeout(5);d,a=s.recvfrom(16);s.sendto(b'ok',a)"
                    ),
                    format!(
                        "import socket;c=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);c.settimeout(3);c.sendto(b'probe',('{}',{port}));print(c.recv(2).decode())",
                        addr(j)
                    ),
                )
            } else {
                (
                    format!(
                        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',{port}));s.listen();s.settimeout(5);c,_=s.accept();c.sendall(b'ok')"
                    ),
                    format!(
                        "import socket;c=socket.create_connection(('{}',{port}),timeout=3);print(c.recv(2).decode())",
                        addr(j)
                    ),
                )
            };
            let mut server = lab.command(&host(j), "python3");
            server.args(["-c", &listener]).stdout(Stdio::null()).stderr(Stdio::null());
            let mut server = server.spawn()?;
            std::thread::sleep(Duration::from_millis(200));
            let out = lab.command(&host(i), "python3").args(["-c", &client]).output()?;
            let _ = server.kill();
            let _ = server.wait();
            let ok = String::from_utf8_lossy(&out.stdout).trim() == "ok";
            tcp.push((i, j, format!("{}/{port}", if udp { "udp" } else { "tcp" }), ok));
        }
    }
    let mismatches: Vec<String> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Probe::Agrees | Probe::SameAddress))
        .map(|((i, j), r)| format!("{} → {}: {r:?} (ICMP)", m.endpoints[*i].label(), m.endpoints[*j].label()))
        .chain(tcp.iter().filter(|t| !t.3).map(|(i, j, flow, _)| {
            format!("{} → {}: {flow} blocked", m.endpoints[*i].label(), m.endpoints[*j].label())
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
        "\n{} ICMP probes and {} TCP/UDP probes in {:.1} s: {}",
        results.values().filter(|r| **r != Probe::SameAddress).count(),
        tcp.len(),
        started.elapsed().as_secs_f64(),
        if mismatches.is_empty() {
            "the network does what the intent says".to_string()
        } else {
            format!("{} mismatches", mismatches.len())
        }
    );
    for mm in &mismatches {
        println!("  ✗ {mm}");
    }
    if !mismatches.is_empty() {
        bail!("{} pairs differ from the intent", mismatches.len());
    }
    Ok(())
}
