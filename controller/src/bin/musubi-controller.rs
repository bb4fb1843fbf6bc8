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
    /// Serve the operator API from an intent store.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// `file:///DIR` (embedded, one controller) or `etcd://HOST:PORT[,HOST:PORT…]`.
        #[arg(long, env = "MUSUBI_STORE", default_value = "file:///var/lib/musubi")]
        store: StoreUrl,
        /// Serve plain-text gRPC. Required until mutual TLS is configured; use
        /// only on a trusted network.
        #[arg(long)]
        insecure: bool,
        /// Largest intent (all documents together) an apply may send, in MiB.
        #[arg(long, default_value_t = DEFAULT_MAX_INTENT_BYTES / 1024 / 1024)]
        max_intent_mib: usize,
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

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let result = match Cli::parse().command {
        Command::Serve { listen, store, insecure, max_intent_mib, etcd_user, etcd_ca, etcd_client_cert } => {
            let etcd = EtcdConfig {
                endpoints: Vec::new(),
                user: etcd_user.map(|u| (u, std::env::var("MUSUBI_ETCD_PASSWORD").unwrap_or_default())),
                ca: etcd_ca,
                client_cert: etcd_client_cert.and_then(|v| Some((v.first()?.clone(), v.get(1)?.clone()))),
            };
            serve(listen, store, insecure, max_intent_mib, etcd).await
        }
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
