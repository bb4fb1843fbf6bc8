//! `musubi-controller`: keeps the operators' intent in a store and serves the
//! operator API; `compile-all` writes every site's configuration offline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use musubi_controller::allocate::reallocate;
use musubi_controller::compile::{PublicKeys, compile};
use musubi_controller::diagnostic::render;
use musubi_controller::server::operator::{DEFAULT_MAX_INTENT_BYTES, OperatorService};
use musubi_controller::store::any::{AnyStore, StoreUrl};
use musubi_controller::store::etcd::EtcdConfig;
use musubi_controller::{load, validate};
use musubi_proto::v1::operator_server::OperatorServer;
use prost::Message;

#[derive(Parser, Debug)]
#[command(name = "musubi-controller", version, about = "Musubi controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the operator API from an intent store. Settings come from
    /// `--config FILE` (YAML) and flags; a flag wins over the file.
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
        /// Serve plain-text gRPC. Required until mutual TLS is configured; use
        /// only on a trusted network.
        #[arg(long)]
        insecure: bool,
        /// Largest intent (all documents together) an apply may send, in MiB [default: 32].
        #[arg(long)]
        max_intent_mib: Option<usize>,
        /// etcd user name; the password is read from MUSUBI_ETCD_PASSWORD.
        #[arg(long)]
        etcd_user: Option<String>,
        /// CA bundle of the etcd servers (enables TLS to etcd).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
        /// Client certificate and key for etcd, PEM.
        #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
        etcd_client_cert: Option<Vec<PathBuf>>,
    },
    /// Validate an intent and write `<site>.pb` and `<site>.json` for every site.
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

/// `musubi-controller serve --config FILE`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ServeFile {
    listen: Option<SocketAddr>,
    #[serde(default, deserialize_with = "store_url")]
    store: Option<StoreUrl>,
    insecure: Option<bool>,
    max_intent_mib: Option<usize>,
    etcd: Option<EtcdFile>,
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

impl ServeFile {
    fn read(path: &std::path::Path) -> Result<ServeFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        yaml_serde::from_str(&text).with_context(|| format!("{} is not a controller configuration", path.display()))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let result = match Cli::parse().command {
        serve @ Command::Serve { .. } => serve_command(serve).await,
        Command::CompileAll { paths, out, allocations } => compile_all(paths, out, allocations),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Merges `--config FILE` with the flags (a flag wins), then serves.
async fn serve_command(command: Command) -> Result<()> {
    let Command::Serve { config, listen, store, insecure, max_intent_mib, etcd_user, etcd_ca, etcd_client_cert } =
        command
    else {
        bail!("not a serve command");
    };
    let file = config.as_deref().map(ServeFile::read).transpose()?.unwrap_or_default();
    let etcd_file = file.etcd.unwrap_or_default();
    let etcd = EtcdConfig {
        endpoints: Vec::new(),
        user: etcd_user.or(etcd_file.user).map(|u| (u, std::env::var("MUSUBI_ETCD_PASSWORD").unwrap_or_default())),
        ca: etcd_ca.or(etcd_file.ca),
        client_cert: etcd_client_cert
            .and_then(|v| Some((v.first()?.clone(), v.get(1)?.clone())))
            .or(etcd_file.client_cert.zip(etcd_file.client_key)),
    };
    let store = match store.or(file.store) {
        Some(s) => s,
        None => "file:///var/lib/musubi".parse().map_err(anyhow::Error::msg)?,
    };
    serve(
        listen.or(file.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7400))),
        store,
        insecure || file.insecure.unwrap_or(false),
        max_intent_mib.or(file.max_intent_mib).unwrap_or(DEFAULT_MAX_INTENT_BYTES / 1024 / 1024),
        etcd,
    )
    .await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}

async fn serve(
    listen: SocketAddr,
    url: StoreUrl,
    insecure: bool,
    max_intent_mib: usize,
    etcd: EtcdConfig,
) -> Result<()> {
    if !insecure {
        bail!(
            "mutual TLS is not configured yet; start with --insecure to serve plain text (trusted networks and tests only)"
        );
    }
    let store = AnyStore::open(&url, etcd).await.with_context(|| format!("opening the store {url:?}"))?;
    let revision = musubi_controller::store::IntentStore::load(&store).await?.revision;
    let max = max_intent_mib * 1024 * 1024;
    let service = OperatorServer::new(OperatorService::new(Arc::new(store), max))
        .max_decoding_message_size(max + 1024 * 1024)
        .max_encoding_message_size(usize::MAX);
    tracing::info!(%listen, store = ?url, revision, "serving the operator API (plain text: --insecure)");
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_shutdown(listen, shutdown_signal())
        .await
        .context("serving the operator API")?;
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
