//! `musubi-controller`: keeps the operators' intent in a store and serves the
//! operator API; `compile-all` writes every site's configuration offline.

use musubi_process::println;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use musubi_controller::fanout::Fanout;
use musubi_controller::pki::{self, Authority, Paths};
use musubi_controller::server::agent::{AgentService, AgentSettings};
use musubi_controller::server::framed::AgentRoutes;
use musubi_controller::server::operator::{DEFAULT_MAX_INTENT_BYTES, OperatorService};
use musubi_controller::server::operator_auth;
use musubi_controller::store::any::{AnyStore, StoreUrl};
use musubi_controller::store::etcd::EtcdConfig;
use musubi_core::allocate::reallocate;
use musubi_core::compile::{PublicKeys, compile};
use musubi_core::diagnostic::render;
use musubi_core::{load, validate};
use musubi_proto::v1::operator_server::OperatorServer;
use prost::Message;

#[derive(Parser, Debug)]
#[command(name = "musubi-controller", version, about = "Musubi controller")]
struct Cli {
    /// Log lines as `text` or `json` (one object per line: timestamp,
    /// level, target, message, then the event's fields).
    #[arg(long, global = true, env = "MUSUBI_LOG_FORMAT", default_value = "text")]
    log_format: musubi_process::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the operator API from an intent store. Settings come from
    /// `--config FILE` (YAML) and flags; a flag wins over the file.
    #[command(
        after_help = "Example:\n  musubi-controller serve --config /etc/musubi/controller.yaml --listen 0.0.0.0:7400 --name ctl1"
    )]
    Serve {
        /// YAML file with any of: listen, store, insecure, max_intent_mib,
        /// etcd: {user, ca, client_cert, client_key}.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:7400].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// `file:///DIR` (embedded, one controller) or `etcd://HOST:PORT[,HOST:PORT…]`
        /// [default: file:///var/lib/musubi].
        #[arg(long, env = "MUSUBI_STORE")]
        store: Option<StoreUrl>,
        /// Serve plain-text gRPC without client certificates (no enrolment;
        /// the actor is `local`). Trusted networks and tests only: on an
        /// address that is not loopback it also needs `--insecure-public`.
        #[arg(long)]
        insecure: bool,
        /// Allow `--insecure` on an address other hosts can reach: anyone
        /// who reaches it may change the intent.
        #[arg(long, requires = "insecure")]
        insecure_public: bool,
        /// The PKI directory made by `musubi-controller init` (CA, server
        /// certificate) [default: /var/lib/musubi/pki].
        #[arg(long, env = "MUSUBI_PKI")]
        pki: Option<PathBuf>,
        /// Lifetime of the site certificates this controller issues, in seconds [default: 86400].
        #[arg(long)]
        site_cert_lifetime_s: Option<u64>,
        /// Seconds between keepalives on agent streams [default: 15].
        #[arg(long)]
        keepalive_s: Option<u64>,
        /// This replica's name in agents' status [default: the listen address].
        #[arg(long)]
        name: Option<String>,
        /// Largest intent (all documents together) an apply may send, in MiB [default: 32].
        #[arg(long)]
        max_intent_mib: Option<usize>,
        /// etcd user name; the password is read from MUSUBI_ETCD_PASSWORD.
        #[arg(long)]
        etcd_user: Option<String>,
        /// Seconds of etcd's own key history to keep; older revisions are
        /// compacted away [default: 60].
        #[arg(long)]
        etcd_history_s: Option<u64>,
        /// Rotate every site's WireGuard keys once they are this old
        /// (make before break, spread over the last quarter of the period):
        /// 30d, 12h, 90s; 0: only on demand [default: 30d].
        #[arg(long, value_parser = musubi_core::words::duration)]
        key_rotation_period: Option<Duration>,
        /// CA bundle of the etcd servers (enables TLS to etcd).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// Client certificate and key for etcd, PEM.
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
        etcd_client_cert: Option<Vec<PathBuf>>,
        /// Serve Prometheus metrics on this address (`GET /metrics`)
        /// [default: off].
        #[arg(long, env = "MUSUBI_METRICS")]
        metrics: Option<SocketAddr>,
        /// Allow a metrics address that is not a loopback one.
        #[arg(long)]
        metrics_public: bool,
        /// Serve the operations dashboard (read-only) on this address: in
        /// plain text on a loopback address, otherwise over TLS to clients
        /// holding an operator certificate [default: off].
        #[arg(long, env = "MUSUBI_DASHBOARD")]
        dashboard: Option<SocketAddr>,
        /// Serve the dashboard over TLS on a loopback address too.
        #[arg(long)]
        dashboard_tls: bool,
        /// A directory of drill reports (`musubi lab drill --out`) the
        /// dashboard lists.
        #[arg(long)]
        dashboard_reports: Option<PathBuf>,
    },
    /// Create the PKI directory: a CA (or adopt an external one), the
    /// controller's server certificate and an admin operator certificate.
    /// Private keys are written 0600.
    #[command(
        after_help = "Example:\n  musubi-controller init --pki /etc/musubi/pki --server-name ctl1.pref.example --server-name 10.0.0.1"
    )]
    Init {
        #[arg(long, default_value = "/var/lib/musubi/pki")]
        pki: PathBuf,
        /// Names and addresses agents and operators use to reach the
        /// controller (the server certificate's names).
        #[arg(long = "server-name", default_values = ["localhost", "127.0.0.1"])]
        server_names: Vec<String>,
        /// Name of the first operator certificate.
        #[arg(long, default_value = "admin")]
        admin: String,
        /// Use an external CA instead of making one: its certificate and key, PEM.
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
        ca: Option<Vec<PathBuf>>,
    },
    /// Issue another operator certificate from the CA in the PKI directory
    /// (`operator NAME`), or revoke an operator in the store every replica
    /// reads on every call (`operator revoke NAME`, without the API: for
    /// an etcd store, from any host that reaches it).
    #[command(
        after_help = "Examples:\n  musubi-controller operator noc-east --pki /etc/musubi/pki --days 90\n  musubi-controller operator revoke noc-east --config /etc/musubi/controller.yaml"
    )]
    Operator {
        /// NAME, or `revoke NAME`.
        #[arg(required = true, num_args = 1..=2, value_name = "NAME")]
        words: Vec<String>,
        #[arg(long, default_value = "/var/lib/musubi/pki")]
        pki: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// With `revoke`: lift the revocation (certificates issued before it stay refused).
        #[arg(long)]
        restore: bool,
        /// With `revoke`: the store, as `serve --store` (an embedded store
        /// is the running controller's own: use `musubi operator revoke`).
        #[arg(long, env = "MUSUBI_STORE")]
        store: Option<StoreUrl>,
        /// With `revoke`: the controller's configuration file (its store and etcd settings).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The offline root and the online issuing CA (see docs/security.md,
    /// "The CA ceremony").
    #[command(subcommand)]
    Ca(CaCommand),
    /// Validate an intent and write `<site>.pb` and `<site>.json` for every site.
    #[command(after_help = "Example:\n  musubi-controller compile-all topologies/prefecture.yaml --out configs/")]
    CompileAll {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        /// Allocations file, read if present and updated (keeps numbers stable).
        #[arg(long)]
        allocations: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Make a root CA (certificate and key) in DIR: on an offline machine.
    #[command(after_help = "Example:\n  musubi-controller ca root --dir /media/offline/musubi-root")]
    Root {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 7300)]
        days: u64,
    },
    /// Sign a new issuing CA with the root in ROOT and put it, with the
    /// root's certificate (never its key), into the PKI directory that
    /// replicas serve from.
    #[command(
        after_help = "Example:\n  musubi-controller ca issuing --root /media/offline/musubi-root --pki /media/transfer/pki --days 730"
    )]
    Issuing {
        #[arg(long)]
        root: PathBuf,
        #[arg(long, default_value = "/var/lib/musubi/pki")]
        pki: PathBuf,
        #[arg(long, default_value_t = 730)]
        days: u64,
    },
}

/// `musubi-controller serve --config FILE`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "store_url")]
    store: Option<StoreUrl>,
    insecure: Option<bool>,
    insecure_public: Option<bool>,
    pki: Option<PathBuf>,
    max_intent_mib: Option<usize>,
    etcd: Option<EtcdFile>,
    metrics: Option<SocketAddr>,
    metrics_public: Option<bool>,
    dashboard: Option<SocketAddr>,
    dashboard_tls: Option<bool>,
    dashboard_reports: Option<PathBuf>,
    #[serde(default, deserialize_with = "period")]
    key_rotation_period: Option<Duration>,
}

/// `key_rotation_period: 30d` in `--config`.
fn period<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = serde::Deserialize::deserialize(d)?;
    text.map(|t| musubi_core::words::duration(&t).map_err(serde::de::Error::custom)).transpose()
}

/// How old WireGuard keys get before they are rotated.
const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(30 * 86_400);

/// Scheduled key rotations under way at once, fleet-wide (an access
/// point's puts a key beside one of every member's peers).
const ROTATIONS_AT_ONCE: usize = 4;

/// How often key rotations are moved on: a rotation's switch follows the
/// last peer's acknowledgement within this.
const ROTATION_STEP: Duration = Duration::from_millis(200);

/// What the controller serves beside its gRPC APIs.
#[derive(Debug)]
struct Extras {
    dashboard: Option<Dashboard>,
    /// Whether the metrics count the sites by state.
    count_states: bool,
    /// How much of etcd's own key history to keep.
    history: Duration,
    /// Scheduled key rotations.
    rotations: musubi_core::rotation::Schedule,
}

/// Where and how the dashboard is served.
#[derive(Debug)]
struct Dashboard {
    addr: SocketAddr,
    tls: bool,
    reports: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EtcdFile {
    user: Option<String>,
    ca: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
}

fn store_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<StoreUrl>, D::Error> {
    let s: Option<String> = serde::Deserialize::deserialize(d)?;
    s.map(|s| s.parse().map_err(serde::de::Error::custom)).transpose()
}

/// The etcd client settings of a configuration file's `etcd:`, each
/// overridden by its flag when given (the password from
/// `MUSUBI_ETCD_PASSWORD`).
fn etcd_config(
    file: EtcdFile,
    user: Option<String>,
    ca: Option<PathBuf>,
    client_cert: Option<Vec<PathBuf>>,
) -> EtcdConfig {
    EtcdConfig {
        endpoints: Vec::new(),
        user: user.or(file.user).map(|u| (u, std::env::var("MUSUBI_ETCD_PASSWORD").unwrap_or_default())),
        ca: ca.or(file.ca),
        client_cert: client_cert
            .and_then(|v| Some((v.first()?.clone(), v.get(1)?.clone())))
            .or(file.client_cert.zip(file.client_key)),
    }
}

impl ServeFile {
    fn read(path: &std::path::Path) -> Result<ServeFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        yaml_serde::from_str(&text).with_context(|| format!("{} is not a controller configuration", path.display()))
    }
}

/// jemalloc gives memory that thousands of agent streams and large applies
/// leave behind back to the system; see README "Benchmarks". Its options
/// are built in (`.cargo/config.toml`): a background thread returns freed
/// pages within a second even while the controller is idle, and two arenas
/// for the two cores keep freed memory in fewer places.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    musubi_process::logs_as("info", cli.log_format);
    let result = match cli.command {
        serve @ Command::Serve { .. } => serve_command(serve).await,
        Command::CompileAll { paths, out, allocations } => compile_all(paths, out, allocations),
        Command::Init { pki, server_names, admin, ca } => init(pki, server_names, admin, ca),
        Command::Operator { words, pki, days, restore, store, config } => match words.as_slice() {
            [name] if !restore && store.is_none() && config.is_none() => operator(name, pki, days),
            [name] => Err(anyhow::anyhow!(
                "--restore, --store and --config go with `operator revoke {name}`; `operator {name}` issues a certificate"
            )),
            [verb, name] if verb == "revoke" => revoke_operator(name, restore, store, config, Some(pki)).await,
            [verb, _] => {
                Err(anyhow::anyhow!("unknown `operator {verb}`; expected `operator NAME` or `operator revoke NAME`"))
            }
            _ => Err(anyhow::anyhow!("expected `operator NAME` or `operator revoke NAME`")),
        },
        Command::Ca(CaCommand::Root { dir, days }) => ca_root(dir, days),
        Command::Ca(CaCommand::Issuing { root, pki, days }) => ca_issuing(root, pki, days),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", musubi_process::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Merges `--config FILE` with the flags (a flag wins), then serves.
async fn serve_command(command: Command) -> Result<()> {
    let Command::Serve {
        config,
        listen,
        store,
        insecure,
        insecure_public,
        pki,
        site_cert_lifetime_s,
        keepalive_s,
        name,
        max_intent_mib,
        etcd_user,
        etcd_history_s,
        key_rotation_period,
        etcd_ca,
        etcd_client_cert,
        metrics,
        metrics_public,
        dashboard,
        dashboard_tls,
        dashboard_reports,
    } = command
    else {
        bail!("not a serve command");
    };
    let file = config.as_deref().map(ServeFile::read).transpose()?.unwrap_or_default();
    let etcd = etcd_config(file.etcd.unwrap_or_default(), etcd_user, etcd_ca, etcd_client_cert);
    let store = match store.or(file.store) {
        Some(s) => s,
        None => "file:///var/lib/musubi".parse().map_err(anyhow::Error::msg)?,
    };
    let listen = listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400)));
    let insecure = insecure || file.insecure.unwrap_or(false);
    if insecure && !listen.ip().is_loopback() && !(insecure_public || file.insecure_public.unwrap_or(false)) {
        bail!(
            "refusing plain text on {listen}: anyone who reaches it could change the intent. Serve with the PKI \
             (drop --insecure), listen on a loopback address, or add --insecure-public if this network is trusted"
        );
    }
    let pki = (!insecure).then(|| pki.or(file.pki).unwrap_or_else(|| PathBuf::from("/var/lib/musubi/pki")));
    let mut agents = AgentSettings { controller: name.unwrap_or_else(|| listen.to_string()), ..Default::default() };
    if let Some(s) = site_cert_lifetime_s {
        agents.site_certificate_lifetime = Duration::from_secs(s.max(5));
    }
    if let Some(s) = keepalive_s {
        agents.keepalive = Duration::from_secs(s.max(1));
    }
    let max = max_intent_mib.or(file.max_intent_mib).unwrap_or(DEFAULT_MAX_INTENT_BYTES / 1024 / 1024);
    #[cfg(not(feature = "system-allocator"))]
    tokio::spawn(memory_report());
    let metrics = metrics.or(file.metrics);
    if let Some(addr) = metrics {
        let public = metrics_public || file.metrics_public.unwrap_or(false);
        musubi_process::metrics::serve(addr, public, musubi_controller::metrics::get().registry()).await?;
    }
    let dashboard = dashboard.or(file.dashboard).map(|addr| Dashboard {
        addr,
        tls: dashboard_tls || file.dashboard_tls.unwrap_or(false) || !addr.ip().is_loopback(),
        reports: dashboard_reports.or(file.dashboard_reports),
    });
    let history = etcd_history_s.map_or(musubi_controller::store::etcd::HISTORY, |s| Duration::from_secs(s.max(1)));
    let rotations = musubi_core::rotation::Schedule {
        period_ms: key_rotation_period
            .or(file.key_rotation_period)
            .unwrap_or(DEFAULT_KEY_ROTATION)
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
        at_once: ROTATIONS_AT_ONCE,
    };
    let extras = Extras { dashboard, count_states: metrics.is_some(), history, rotations };
    serve(listen, store, pki, max, etcd, agents, extras).await
}

#[cfg(not(feature = "system-allocator"))]
/// Logs the allocator's figures every 10 s at debug level (target
/// `memory`): what is allocated, what the allocator holds in use, and what
/// is resident.
async fn memory_report() {
    use tikv_jemalloc_ctl::{epoch, stats};
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        every.tick().await;
        if !tracing::enabled!(target: "memory", tracing::Level::DEBUG) || epoch::advance().is_err() {
            continue;
        }
        let mib = |v: Result<usize, tikv_jemalloc_ctl::Error>| v.map_or(0, |b| b / 1_048_576);
        tracing::debug!(
            target: "memory",
            allocated_mib = mib(stats::allocated::read()),
            active_mib = mib(stats::active::read()),
            resident_mib = mib(stats::resident::read()),
            retained_mib = mib(stats::retained::read()),
            "allocator"
        );
    }
}

async fn serve(
    listen: SocketAddr,
    url: StoreUrl,
    pki: Option<PathBuf>,
    max_intent_mib: usize,
    etcd: EtcdConfig,
    agents: AgentSettings,
    extras: Extras,
) -> Result<()> {
    // Limits per connection: an agent holds one stream and an operator's
    // call a few; a peer that opens many, or goes silent under an open
    // connection, is cut off instead of holding the controller's memory.
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .concurrency_limit_per_connection(MAX_STREAMS_PER_CONNECTION as usize)
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    let authority = match &pki {
        Some(dir) => {
            let paths = Paths::new(dir);
            if !paths.ca().exists() {
                bail!(
                    "no CA in {}: run `musubi-controller init --pki {}` first (or serve --insecure on a trusted network)",
                    dir.display(),
                    dir.display()
                );
            }
            builder = builder.tls_config(pki::server_tls(&paths)?).context("configuring TLS")?;
            Some(Arc::new(Authority::load(&paths)?))
        }
        None => None,
    };
    let store = Arc::new(AnyStore::open(&url, etcd).await.with_context(|| format!("opening the store {url:?}"))?);
    if let AnyStore::Etcd(etcd) = &*store {
        etcd.compact_history(extras.history);
    }
    if let Some(dir) = &pki {
        // Audit entries this replica writes are signed with its server key.
        let signer = musubi_controller::signing::install_from(&*store, &Paths::new(dir)).await?;
        tracing::info!(%signer, "audit entries are signed with the server key");
    }
    let fanout = Fanout::start(store.clone()).await.context("compiling the sites' configurations")?;
    musubi_controller::metrics::get().sites.set(i64::try_from(fanout.sites().len()).unwrap_or(i64::MAX));
    tokio::spawn(musubi_controller::rotation::drive(
        store.clone(),
        Arc::downgrade(&fanout),
        ROTATION_STEP,
        extras.rotations,
    ));
    // Operators' aid activations close when they expire (a second late at most).
    tokio::spawn(musubi_controller::aid::drive(store.clone(), Arc::downgrade(&fanout), Duration::from_secs(1)));
    if extras.count_states {
        let every = Duration::from_secs(10);
        tokio::spawn(musubi_controller::metrics::count_states(store.clone(), fanout.clone(), every));
    }
    if let Some(d) = extras.dashboard {
        let every = Duration::from_millis(500);
        let paths = pki.as_deref().map(Paths::new);
        let tls = match (&paths, d.tls) {
            (Some(p), true) => Some(p),
            (None, true) if !d.addr.ip().is_loopback() => {
                bail!(
                    "the dashboard on {} needs TLS, and this controller runs --insecure: use a loopback address",
                    d.addr
                )
            }
            (None, true) => bail!("--dashboard-tls needs the controller's PKI (it runs --insecure)"),
            (_, false) => None,
        };
        musubi_controller::dashboard::serve(d.addr, tls, store.clone(), fanout.clone(), d.reports, every).await?;
    }
    let max = max_intent_mib * 1024 * 1024;
    let operator = tonic::service::interceptor::InterceptedService::new(
        OperatorServer::new(OperatorService::new(store.clone(), max, fanout.clone()))
            .max_decoding_message_size(max + 1024 * 1024)
            .max_encoding_message_size(usize::MAX),
        operator_auth(authority.is_some()),
    );
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent =
        AgentRoutes::new(AgentService::new(store, fanout.clone(), authority.clone(), agents, stopped), 16 << 20);
    let mode = if authority.is_some() { "mutual TLS" } else { "plain text: --insecure" };
    tracing::info!(%listen, store = ?url, revision = fanout.revision(), sites = fanout.sites().len(), mode, "serving");
    builder
        .add_service(operator)
        .add_service(agent)
        .serve_with_shutdown(listen, async move {
            musubi_process::shutdown().await;
            // End the agents' streams, or the graceful shutdown would wait for them.
            stop.send_replace(true);
        })
        .await
        .context("serving")?;
    Ok(())
}

/// Streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 32;

fn init(dir: PathBuf, server_names: Vec<String>, admin: String, ca: Option<Vec<PathBuf>>) -> Result<()> {
    let external = ca.as_ref().and_then(|v| Some((v.first()?.as_path(), v.get(1)?.as_path())));
    let made = pki::init(&dir, &server_names, &admin, external)?;
    let p = &made.paths;
    if made.external_ca {
        println!("CA:          {} (external)", p.ca().display());
        println!("CA key:      {} (0600)", p.ca_key().display());
    } else {
        println!("root CA:     {} (what agents and operators trust)", p.ca().display());
        if p.ca_key().exists() {
            println!(
                "root key:    {} (0600): move it offline; only `musubi-controller ca issuing` needs it",
                p.ca_key().display()
            );
        }
        println!(
            "issuing CA:  {} + {} (0600){}: what this replica signs with",
            p.issuing().display(),
            p.issuing_key().display(),
            if made.prepared { ", prepared by `ca issuing`" } else { "" }
        );
    }
    println!("server:      {} for {}", p.server().display(), server_names.join(", "));
    println!(
        "operator:    {} + {} (0600), identity operator:{admin}",
        p.operator(&admin).display(),
        p.operator_key(&admin).display()
    );
    println!("\nServe with: musubi-controller serve --pki {}", dir.display());
    Ok(())
}

/// `operator revoke NAME`: written to the store directly, with its audit
/// entry; every replica reads it on the operator's next call.
async fn revoke_operator(
    name: &str,
    restore: bool,
    store: Option<StoreUrl>,
    config: Option<PathBuf>,
    pki: Option<PathBuf>,
) -> Result<()> {
    if let Some(why) = musubi_core::access::operator_name_problem(name) {
        bail!("`{}`: {why}", musubi_core::words::quoted(name));
    }
    let file = config.as_deref().map(ServeFile::read).transpose()?.unwrap_or_default();
    let etcd = etcd_config(file.etcd.unwrap_or_default(), None, None, None);
    let Some(url) = store.or(file.store) else {
        bail!("which store? --store etcd://HOST:PORT or --config FILE (the controller's)");
    };
    let store = AnyStore::open(&url, etcd).await.context("opening the store")?;
    if let Some(dir) = pki.filter(|d| Paths::new(d).server_key().exists()) {
        // Signed like a replica's entries: a chain signed so far stays whole.
        musubi_controller::signing::install_from(&store, &Paths::new(&dir)).await?;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let actor = format!("local:{user}");
    let at = musubi_controller::sites::revoke_operator(&store, name, &actor, pki::now_ms(), restore).await?;
    if restore {
        println!("operator {name}: revocation lifted; certificates issued before {at} (Unix ms) stay refused");
    } else {
        println!("operator {name}: revoked at {at} (Unix ms); every replica refuses it from its next call");
    }
    Ok(())
}

fn ca_root(dir: PathBuf, days: u64) -> Result<()> {
    let made = pki::make_root(&dir, Duration::from_secs(days * 86_400))?;
    println!(
        "root CA {} + {} (0600): keep the key offline; it signs issuing CAs only (musubi-controller ca issuing)",
        made.ca().display(),
        made.ca_key().display()
    );
    Ok(())
}

fn ca_issuing(root: PathBuf, dir: PathBuf, days: u64) -> Result<()> {
    let paths = pki::make_issuing(&Paths::new(&root), &dir, Duration::from_secs(days * 86_400))?;
    println!(
        "issuing CA {} + {} (0600), root certificate {}: replicas sign with the issuing CA; the root's key stays where it is",
        paths.issuing().display(),
        paths.issuing_key().display(),
        paths.ca().display()
    );
    Ok(())
}

fn operator(name: &str, dir: PathBuf, days: u64) -> Result<()> {
    let paths = Paths::new(&dir);
    let authority = Authority::load(&paths)?;
    let (cert, key) = authority.issue_operator(name, Duration::from_secs(days * 86_400))?;
    pki::write(&paths.operator_key(name), &key, true)?;
    pki::write(&paths.operator(name), &cert, false)?;
    println!(
        "{} + {} (0600), identity operator:{name}",
        paths.operator(name).display(),
        paths.operator_key(name).display()
    );
    Ok(())
}

fn compile_all(paths: Vec<PathBuf>, out: PathBuf, allocations: Option<PathBuf>) -> Result<()> {
    let parsed = load::load(&paths)?;
    let diags = validate::check(&parsed);
    if !diags.is_empty() {
        eprint!("{}", render(&diags, &parsed.sources, false));
        bail!("the intent is invalid; nothing was written");
    }
    let mut alloc = allocations.as_deref().map(load::read_allocations).transpose()?.unwrap_or_default();
    let changed = reallocate(&parsed.intent, &mut alloc)?;
    let configs = compile(&parsed.intent, &alloc, &PublicKeys::new())?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    for (site, config) in &configs {
        std::fs::write(out.join(format!("{site}.pb")), config.encode_to_vec())?;
        std::fs::write(out.join(format!("{site}.json")), serde_json::to_string_pretty(config)? + "\n")?;
    }
    if let Some(p) = &allocations
        && changed
    {
        load::write_allocations(p, &alloc)?;
    }
    tracing::info!(sites = configs.len(), out = %out.display(), "compiled every site");
    Ok(())
}
