//! `musubi-agent`: runs on every site router. `run` enrols with a one-time
//! token, keeps a stream to the controller and reconciles the datapath;
//! `inspect` explains a compiled configuration; `simulate` runs a fleet of
//! agents with in-memory datapaths for scale measurements.

use musubi_process::{print, println};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use musubi_agent::client::{Agent, Settings};
use musubi_agent::datapath::Datapath;
use musubi_agent::datapath::fake::Fake;
use musubi_agent::datapath::linux::{self, DomainChoice, Linux, WireguardChoice};
use musubi_agent::failover::first_choices;
use musubi_agent::reconcile::{build_wanted, wanted};
use musubi_agent::simulate;
use musubi_agent::state::StateDir;
use musubi_agent::summary::summarise;
use musubi_proto::v1::SiteConfig;
use prost::Message;

#[derive(Parser, Debug)]
#[command(name = "musubi-agent", version, about = "Musubi site agent")]
struct Cli {
    /// Log lines as `text` or `json` (one object per line: timestamp,
    /// level, target, message, then the event's fields).
    #[arg(long, global = true, env = "MUSUBI_LOG_FORMAT", default_value = "text")]
    log_format: musubi_process::LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// Which kernel features the Linux datapath uses.
#[derive(clap::Args, Debug, Clone, Copy)]
struct Modes {
    /// WireGuard: `kernel`, `userspace` (wireguard-go) or `auto` (the
    /// kernel's where it has the module).
    #[arg(long, env = "MUSUBI_WIREGUARD", default_value = "auto")]
    wireguard: WireguardChoice,
    /// Segments kept apart by `vrf`s, by routing tables and rules (`table`),
    /// or `auto` (VRFs where the kernel has them).
    #[arg(long, env = "MUSUBI_DOMAINS", default_value = "auto")]
    domains: DomainChoice,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read a site configuration (protobuf `.pb` or proto3 JSON) and print
    /// the routing domains, tunnels, peers and routes it asks for.
    #[command(after_help = "Example:\n  musubi-agent inspect kita-hall.pb")]
    Inspect { file: PathBuf },
    /// Run the agent of one site.
    #[command(
        after_help = "Example:\n  musubi-agent run --site kita-hall --controller 10.0.0.1:7400,10.0.0.2:7400 --token-file /etc/musubi/token --ca /etc/musubi/ca.pem"
    )]
    Run {
        /// This router's site, as named in the intent.
        #[arg(long, env = "MUSUBI_SITE")]
        site: String,
        /// Controller addresses (`host:port`), tried in turn.
        #[arg(long = "controller", env = "MUSUBI_CONTROLLER", value_delimiter = ',', required = true)]
        controllers: Vec<String>,
        /// State directory: WireGuard keys, site certificate, last applied configuration.
        #[arg(long, default_value = "/var/lib/musubi-agent")]
        state: PathBuf,
        /// One-time join token (needed only until the agent has enrolled).
        #[arg(long, env = "MUSUBI_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// File holding the join token (instead of --token).
        #[arg(long, conflicts_with = "token")]
        token_file: Option<PathBuf>,
        /// The controller's CA certificate (needed for enrolment).
        #[arg(long, env = "MUSUBI_CA")]
        ca: Option<PathBuf>,
        /// Plain text without certificates, for a controller started with --insecure.
        #[arg(long)]
        insecure: bool,
        /// Datapath: `linux` (the kernel; modes found by trying, see `doctor`)
        /// or `fake` (in memory, kept in the state directory; for tests).
        #[arg(long, default_value = "linux")]
        datapath: String,
        /// Seconds between reconciles of the last applied configuration
        /// (what drifted is put back); 0: only when a configuration arrives.
        #[arg(long, default_value_t = 10.0)]
        upkeep_s: f64,
        /// Seconds a better route-group candidate or line must have been up
        /// before traffic moves back to it (no flapping).
        #[arg(long, env = "MUSUBI_HOLD_DOWN_S", default_value_t = 3.0, value_parser = hold_down)]
        hold_down_s: f64,
        /// Serve Prometheus metrics on this address (`GET /metrics`): each
        /// peer's and line path's health, moves, builds [default: off].
        #[arg(long, env = "MUSUBI_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Allow a metrics address that is not a loopback one.
        #[arg(long)]
        metrics_public: bool,
        /// The routing tables configurations may use, FIRST-LAST; one
        /// outside is refused [default: 256 to 2147483647].
        #[arg(long, env = "MUSUBI_TABLES", value_parser = musubi_agent::trust::parse_tables)]
        tables: Option<(u32, u32)>,
        /// The interfaces a segment may take as its LAN, comma-separated; a
        /// configuration naming another is refused [default: any interface
        /// that is not Musubi's and no line leaves on].
        #[arg(long, env = "MUSUBI_LAN_INTERFACES", value_delimiter = ',')]
        lan_interfaces: Option<Vec<String>>,
        #[command(flatten)]
        modes: Modes,
    },
    /// Report what this host offers the datapath (kernel WireGuard or
    /// wireguard-go, VRF or table mode, nftables, forwarding), which modes
    /// the choices give (`auto` by default), and advise.
    #[command(after_help = "Example:\n  musubi-agent doctor --wireguard auto --domains auto")]
    Doctor {
        #[command(flatten)]
        modes: Modes,
    },
    /// Apply a site configuration file once, without a controller, and
    /// report what was written (for bring-up, drills and tests).
    #[command(
        after_help = "Example:\n  musubi-agent apply --config kita-hall.json --state /var/lib/musubi --datapath fake"
    )]
    Apply {
        /// A site configuration (`.pb` protobuf or proto3 JSON).
        #[arg(long)]
        config: PathBuf,
        /// State directory (WireGuard keys live here).
        #[arg(long, default_value = "/var/lib/musubi-agent")]
        state: PathBuf,
        /// `linux` or `fake`.
        #[arg(long, default_value = "linux")]
        datapath: String,
        /// Reconcile this many times in a row (the later ones find nothing
        /// to do: how long a no-op reconcile takes).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
        /// Milliseconds between reconciles when repeating: the configuration
        /// is held, and anything that drifts from it is put back.
        #[arg(long, default_value_t = 0)]
        every: u64,
        #[command(flatten)]
        modes: Modes,
    },
    /// Run N simulated agents (in-memory datapaths, each enrolled with its
    /// own token and certificate) against a controller, report convergence.
    #[command(
        after_help = "Example:\n  musubi-agent simulate --sites 1000 --controller 127.0.0.1:7400 --ca ca.pem --cert admin.pem --key admin-key.pem --seconds 60"
    )]
    Simulate {
        #[arg(long)]
        sites: usize,
        #[arg(long, env = "MUSUBI_CONTROLLER", default_value = "127.0.0.1:7400")]
        controller: String,
        #[arg(long, env = "MUSUBI_CA")]
        ca: PathBuf,
        /// Operator certificate and key, to make the join tokens.
        #[arg(long, env = "MUSUBI_CERT")]
        cert: PathBuf,
        #[arg(long, env = "MUSUBI_KEY")]
        key: PathBuf,
        /// Where the agents' state directories go [default: a temporary
        /// directory, in /dev/shm where there is one].
        #[arg(long)]
        state: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    musubi_process::logs_as("info", cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", musubi_process::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { file } => {
            print!("{}", summarise(&read_config(&file)?)?);
            Ok(())
        }
        Command::Doctor { modes } => {
            print!("{}", linux::detect()?.report_for(modes.wireguard, modes.domains));
            Ok(())
        }
        Command::Apply { config, state, datapath, repeat, every, modes } => {
            let config = read_config(&config)?;
            let dir = StateDir::new(&state);
            let mut dp = open_datapath(&datapath, &state, modes)?;
            let started = Instant::now();
            // As a running agent starts: first choices, outer packets pinned.
            let hops = dp.hops(&musubi_agent::probe::paths(&config))?;
            let (keys, _) = dir.local_keys(config.segments.iter().map(|s| s.segment.as_str()))?;
            let (want, pins) = wanted(&config, &keys, &first_choices(&config, &hops), &hops)?;
            println!("site {}: desired state in {:.1} ms", config.site, started.elapsed().as_secs_f64() * 1e3);
            for i in 0..repeat.max(1) {
                if i > 0 && every > 0 {
                    tokio::time::sleep(Duration::from_millis(every)).await;
                }
                let (started, before) = (Instant::now(), dp.writes());
                let ops = build_wanted(&mut *dp, &want, &pins)?;
                println!(
                    "site {}: {} operations, {} writes in {:.1} ms",
                    config.site,
                    ops.len(),
                    dp.writes() - before,
                    started.elapsed().as_secs_f64() * 1e3
                );
            }
            Ok(())
        }
        Command::Run {
            site,
            controllers,
            state,
            token,
            token_file,
            ca,
            insecure,
            datapath,
            upkeep_s,
            hold_down_s,
            metrics,
            metrics_public,
            tables,
            lan_interfaces,
            modes,
        } => {
            let token = match token_file {
                Some(f) => Some(
                    std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?.trim().to_string(),
                ),
                None => token,
            };
            let dir = StateDir::new(&state);
            let mut settings = Settings::new(&site, controllers, dir);
            settings.token = token;
            settings.ca = ca;
            settings.insecure = insecure;
            settings.upkeep = (upkeep_s > 0.0).then(|| Duration::from_secs_f64(upkeep_s));
            settings.probe = datapath == "linux";
            settings.hold_down = Duration::from_secs_f64(hold_down_s);
            if let Some(tables) = tables {
                settings.trust.tables = tables;
            }
            settings.trust.lan_interfaces = lan_interfaces.map(|l| l.into_iter().collect());
            let agent = Agent::new(settings, open_datapath(&datapath, &state, modes)?)?;
            if let Some(addr) = metrics {
                musubi_process::metrics::serve(addr, metrics_public, std::sync::Arc::new(agent.metrics().registry()))
                    .await?;
            }
            tokio::select! {
                r = agent.run() => r?,
                _ = musubi_process::shutdown() => tracing::info!(site, "stopping; the datapath stays as it is"),
            }
            Ok(())
        }
        Command::Simulate { sites, controller, ca, cert, key, state, seconds } => {
            let operator = simulate::Operator { controller, ca, cert, key };
            let names = simulate::sites(&operator, sites).await?;
            let tmp = simulate::scratch()?;
            let root = state.unwrap_or_else(|| tmp.path().to_path_buf());
            let started = Instant::now();
            let mut fleet = simulate::start(&operator, names, &root).await?;
            println!("{} agents enrolling", fleet.sites.len());
            let progress = musubi_process::progress::Progress::new(fleet.sites.len() as u64, "agents applied");
            let mut applied = std::collections::HashSet::new();
            let counted = |a: &musubi_agent::client::Applied| {
                applied.insert(a.site.clone());
                progress.set(applied.len() as u64);
                true
            };
            let done = fleet.until(Duration::from_secs(seconds), counted).await;
            progress.finish();
            match done {
                Some((last, _)) => {
                    println!("every agent applied a configuration after {:.2} s", (last - started).as_secs_f64())
                }
                None => bail!("not every agent applied a configuration within {seconds} s"),
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
                _ = musubi_process::shutdown() => {}
            }
            Ok(())
        }
    }
}

fn read_config(file: &std::path::Path) -> Result<SiteConfig> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    if file.extension().is_some_and(|e| e == "pb") {
        SiteConfig::decode(bytes.as_slice()).with_context(|| format!("{} is not a SiteConfig", file.display()))
    } else {
        serde_json::from_slice(&bytes).with_context(|| format!("{} is not a SiteConfig in JSON", file.display()))
    }
}

fn open_datapath(kind: &str, state: &std::path::Path, modes: Modes) -> Result<Box<dyn Datapath>> {
    match kind {
        "linux" => Ok(Box::new(Linux::with(&state.join("log"), modes.wireguard, modes.domains)?)),
        "fake" => Ok(Box::new(Fake::persistent(state.join("datapath.json"))?)),
        other => bail!("unknown datapath `{other}`: `linux` or `fake`"),
    }
}

/// A hold-down: 0.1 to 600 seconds.
fn hold_down(text: &str) -> Result<f64, String> {
    let s: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.1..=600.0).contains(&s) { Ok(s) } else { Err(format!("{s} s is outside 0.1-600 s")) }
}
