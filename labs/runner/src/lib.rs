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

use musubi_process::println;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

mod check;
mod down;
mod drill;
mod lab;
pub mod netns;
mod status;
mod topology;
mod up;

use crate::lab::Lab;
use crate::topology::read_topology;
use crate::up::start_agent;

/// Where labs keep their state unless `MUSUBI_LAB_DIR` says otherwise.
const ROOT: &str = "/run/musubi-lab";
const PORT: u16 = 7400;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Bring a lab up: namespaces, links, controller, intent, agents.
    #[command(after_help = "Example:\n  sudo musubi lab up labs/minimal/topology.clab.yml --etcd")]
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
        /// The routers' WireGuard: `kernel`, `userspace` or `auto` (passed
        /// to every agent, also those a drill restarts).
        #[arg(long, env = "MUSUBI_WIREGUARD", default_value = "auto")]
        wireguard: String,
        /// How the routers keep segments apart: `vrf`, `table` or `auto`.
        #[arg(long, env = "MUSUBI_DOMAINS", default_value = "auto")]
        domains: String,
    },
    /// Remove everything of a lab: processes, namespaces, mounts, its directory.
    #[command(after_help = "Example:\n  sudo musubi lab down minimal")]
    Down {
        /// The lab's name [default: the only one running].
        name: Option<String>,
    },
    /// The lab's nodes and processes, and `musubi status` from its controller.
    #[command(after_help = "Example:\n  sudo musubi lab status")]
    Status { name: Option<String> },
    /// Probe every pair of LAN hosts (ICMP, and each policy's TCP port) and
    /// compare with `musubi verify`'s matrix; exits 1 on any mismatch.
    #[command(after_help = "Example:\n  sudo musubi lab check minimal")]
    Check { name: Option<String> },
    /// Start (or restart) a router's agent with a new one-time token: for a
    /// site added to the intent after `up`, or after a drill stopped it.
    #[command(after_help = "Example:\n  sudo musubi lab agent office-a")]
    Agent {
        #[arg(long)]
        lab: Option<String>,
        node: String,
    },
    /// The operator CLI against the lab's controller, as its admin:
    /// `musubi lab cli -- apply -f intent.yaml`, `musubi lab cli -- status --json`.
    #[command(after_help = "Example:\n  sudo musubi lab cli -- status --json")]
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
    #[command(after_help = "Example:\n  sudo musubi lab drill labs/minimal/drills/east-ap-outage.yaml --out reports/")]
    Drill {
        file: PathBuf,
        #[arg(long)]
        lab: Option<String>,
        /// Where the reports go [default: the lab's directory, drills/].
        #[arg(long)]
        out: Option<PathBuf>,
        /// Packets per second of every stream, instead of the drill's own
        /// (an emulated kernel carries a tenth of the host's rate).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        rate: Option<u32>,
        /// Multiply the drill's times (waits, flaps, the outage allowed) by
        /// this, for a lab whose probe timers and agents' hold-down were
        /// multiplied as much (a lab under software emulation).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        time_scale: u32,
    },
    /// Run a command in a node: `musubi lab exec NODE -- CMD ARGS…`.
    #[command(after_help = "Example:\n  sudo musubi lab exec host-a -- ping -c 3 10.10.2.10")]
    Exec {
        #[arg(long)]
        lab: Option<String>,
        node: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Bring the lab controller's dashboard to this host: its page on
    /// `--listen` (a loopback address), until interrupted.
    #[command(
        after_help = "Example:\n  sudo musubi lab dashboard --listen 127.0.0.1:7480   # then open http://127.0.0.1:7480/"
    )]
    Dashboard {
        #[arg(long)]
        lab: Option<String>,
        #[arg(long, default_value = "127.0.0.1:7480")]
        listen: std::net::SocketAddr,
    },
}

/// The niceness a lab runs at: its controller, agents, their WireGuard and
/// a drill's traffic (`MUSUBI_LAB_NICENESS` sets another).
pub const NICENESS: i32 = -10;

/// Raises this thread's CPU priority to [`NICENESS`] (or
/// `MUSUBI_LAB_NICENESS`): the processes and threads it starts inherit it.
/// A router runs its control plane above other work; a lab shares its host
/// with builds and emulators, and without this a stalled probe answer or
/// stream sender on a busy host reads as an outage of the network. Needs
/// root, as a lab does; without it the lab runs at the priority it was
/// given. With kernel WireGuard the datapath runs in the kernel's workers
/// at niceness 0, and a CPU-starved machine (the kernel lab's emulated
/// guest) should not put the agents above them: it sets 0.
fn prioritise() {
    let niceness = match std::env::var("MUSUBI_LAB_NICENESS") {
        Ok(v) => match v.trim().parse::<i32>() {
            Ok(n) if (-20..=19).contains(&n) => n,
            _ => {
                eprintln!("note: MUSUBI_LAB_NICENESS={v:?} is not a niceness from -20 to 19; using {NICENESS}");
                NICENESS
            }
        },
        Err(_) => NICENESS,
    };
    if niceness == 0 {
        return;
    }
    if let Err(e) = rustix::process::setpriority_process(None, niceness) {
        eprintln!("note: the lab runs at normal CPU priority (cannot set niceness {niceness}: {e})");
    }
}

pub fn main(command: LabCommand) -> Result<()> {
    if matches!(
        command,
        LabCommand::Up { .. } | LabCommand::Check { .. } | LabCommand::Drill { .. } | LabCommand::Agent { .. }
    ) {
        prioritise();
    }
    match command {
        LabCommand::Up { topology, name, wait_s, etcd, wireguard, domains } => {
            let path = topology.unwrap_or_else(|| PathBuf::from("labs/prefecture/topology.clab.yml"));
            let clab = read_topology(&path)?;
            let lab = Lab::new(name.as_deref().unwrap_or(&clab.name));
            if lab.dir.exists() {
                bail!("lab `{}` is already up (`musubi lab down {}` first)", lab.name, lab.name);
            }
            let modes = up::Modes { wireguard, domains };
            match up::up(&lab, &path, &clab, Duration::from_secs(wait_s), etcd, &modes) {
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
        LabCommand::Down { name } => down::down(&Lab::find(name)?),
        LabCommand::Status { name } => status::status(&Lab::find(name)?),
        LabCommand::Check { name } => check::check(&Lab::find(name)?),
        LabCommand::Drill { file, lab, out, rate, time_scale } => {
            drill::run(Lab::find(lab)?, &file, out, rate, time_scale)
        }
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
            let site =
                clab.router_site(&node).with_context(|| format!("`{node}` is not a router of lab {}", lab.name))?;
            let ip = ctl.mgmt_ipv4.clone().context("the controller has no mgmt-ipv4")?;
            let pid = start_agent(&lab, controller, &ip, &node, site)?;
            println!("agent of {site} started in {node} (pid {pid})");
            Ok(())
        }
        LabCommand::Dashboard { lab, listen } => {
            let lab = Lab::find(lab)?;
            let controller = lab.topology()?.controller()?.0.clone();
            println!("the dashboard of lab {}: http://{listen}/ (Ctrl-C ends)", lab.name);
            netns::forward(listen, &lab.ns(&controller), crate::up::DASHBOARD)?;
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
