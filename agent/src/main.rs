//! `musubi-agent`: runs on every site router. This first version reads a
//! compiled site configuration and explains what the agent will build from
//! it; the controller stream and the Linux datapath follow.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use musubi_agent::summary::summarise;
use musubi_proto::v1::SiteConfig;
use prost::Message;

#[derive(Parser, Debug)]
#[command(name = "musubi-agent", version, about = "Musubi site agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Read a site configuration (protobuf `.pb` or proto3 JSON) and print
    /// the routing domains, tunnels, peers and routes it asks for.
    Inspect { file: PathBuf },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { file } => {
            let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let config = if file.extension().is_some_and(|e| e == "pb") {
                SiteConfig::decode(bytes.as_slice())
                    .with_context(|| format!("{} is not a SiteConfig", file.display()))?
            } else {
                serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not a SiteConfig in JSON", file.display()))?
            };
            print!("{}", summarise(&config)?);
            Ok(())
        }
    }
}
