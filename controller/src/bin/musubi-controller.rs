//! `musubi-controller`: compiles the intent into each site's configuration.
//!
//! This version works offline: `compile-all` writes every site's
//! configuration to a directory (protobuf and JSON). The intent store, the
//! operator API and the agent stream build on the same core.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use musubi_controller::allocate::reallocate;
use musubi_controller::compile::{PublicKeys, compile};
use musubi_controller::diagnostic::render;
use musubi_controller::{load, validate};
use prost::Message;

#[derive(Parser, Debug)]
#[command(name = "musubi-controller", version, about = "Musubi controller")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let Command::CompileAll { paths, out, allocations } = cli.command;
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
