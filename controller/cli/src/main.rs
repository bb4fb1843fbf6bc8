//! `musubi`: the operator's command-line tool.

use musubi_lab as lab;
use musubi_process::{print, println};
mod remote;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use musubi_core::allocate::{Allocations, allocate};
use musubi_core::compile::{PublicKeys, compile};
use musubi_core::diagnostic::{Diagnostic, render};
use musubi_core::intent::source::{ObjectRef, SourceMap};
use musubi_core::intent::{Intent, Kind};
use musubi_core::words::count;
use musubi_core::{generate, load, plan, validate, verify};

#[derive(Parser, Debug)]
#[command(
    name = "musubi",
    version,
    about = "Operate a Musubi network: validate, plan, compile and apply intent",
    after_help = "Example:\n  musubi validate topologies/prefecture.yaml && musubi plan topologies/prefecture.yaml"
)]
struct Cli {
    /// Colour output: auto (on a terminal unless NO_COLOR is set), always, never.
    #[arg(long, global = true, default_value = "auto")]
    color: ColorChoice,
    /// The controller's operator API.
    /// (`https://` when a certificate is given and no scheme is written).
    #[arg(long, global = true, env = "MUSUBI_CONTROLLER", default_value = "127.0.0.1:7400")]
    controller: String,
    /// CA certificate that signed the controller's certificate (PEM).
    #[arg(long, global = true, env = "MUSUBI_CA")]
    ca: Option<PathBuf>,
    /// Operator certificate and key (PEM) from `musubi-controller init`; the
    /// certificate's name is recorded in the audit chain.
    #[arg(long, global = true, env = "MUSUBI_CERT", requires = "key")]
    cert: Option<PathBuf>,
    #[arg(long, global = true, env = "MUSUBI_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Talk plain text (`http://`) to a controller started with `--insecure`.
    /// Without it the CLI never sends anything unencrypted.
    #[arg(long, global = true, env = "MUSUBI_INSECURE")]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    Yaml,
    Json,
}

/// Commands that talk to a running controller.
#[derive(Subcommand, Debug)]
enum RemoteCommand {
    /// Apply intent files to the controller: show the plan, ask, write atomically.
    #[command(
        after_help = "Example:\n  musubi apply -f topologies/prefecture.yaml --ca pki/ca.pem --cert pki/admin.pem --key pki/admin-key.pem"
    )]
    Apply {
        #[arg(short = 'f', long = "file", required_unless_present = "remove")]
        files: Vec<PathBuf>,
        /// Apply without asking.
        #[arg(long)]
        yes: bool,
        /// Show the plan against the controller's intent and stop.
        #[arg(long)]
        dry_run: bool,
        /// The files add or replace only the objects they declare; every
        /// other object of the controller's intent stays (without it, the
        /// files are the whole intent and what they leave out is removed).
        #[arg(long)]
        merge: bool,
        /// With --merge: an object to remove, as KIND/NAME (`site/kita-hall`); repeatable.
        #[arg(long, requires = "merge")]
        remove: Vec<String>,
        /// Let files that declare no tenant, segment, site or policy replace
        /// the whole intent (removing every object); refused without it.
        #[arg(long)]
        allow_destroy_all: bool,
        /// Wait for a second operator's approval even if no national object
        /// changes (a national change always waits, once operators are bound).
        #[arg(long)]
        propose: bool,
    },
    /// Changes waiting for a second operator's approval.
    #[command(after_help = "Example:\n  musubi pending")]
    Pending,
    /// Show the plan a pending change applies now, then approve and apply it
    /// (another operator than its proposer, with the scope of what it changes).
    #[command(after_help = "Example:\n  musubi approve 3f9c2a7d41e0b5c8")]
    Approve {
        id: String,
        #[arg(long)]
        yes: bool,
        /// Show the plan and stop.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show objects of the controller's intent as YAML: all, a kind, or one object.
    #[command(after_help = "Example:\n  musubi get site kita-hall")]
    Get { kind: Option<String>, name: Option<String> },
    /// The audit chain: who changed what, when, at which revision.
    #[command(after_help = "Example:\n  musubi history --verify")]
    History {
        /// Check every link of the chain and every revision's change records
        /// against it, and that the chain still holds the head verified last
        /// time (remembered under MUSUBI_STATE_DIR, else ~/.local/state/musubi);
        /// exit 1 and name the first broken one.
        #[arg(long)]
        verify: bool,
    },
    /// Make the intent of an earlier revision current again (a new revision).
    #[command(after_help = "Example:\n  musubi rollback --to 7 --dry-run")]
    Rollback {
        #[arg(long)]
        to: u64,
        #[arg(long)]
        yes: bool,
        #[arg(long)]
        dry_run: bool,
        /// Wait for a second operator's approval (as `apply --propose`).
        #[arg(long)]
        propose: bool,
    },
    /// The controller's whole intent as YAML (apply it elsewhere, or keep it).
    #[command(after_help = "Example:\n  musubi export > intent-backup.yaml")]
    Export,
    /// One-time join tokens for agents.
    #[command(subcommand)]
    #[command(after_help = "Example:\n  musubi token create --site kita-hall --ttl 1h")]
    Token(TokenCommand),
    /// Sites' credentials.
    #[command(subcommand)]
    #[command(after_help = "Example:\n  musubi site revoke kita-hall")]
    Site(SiteCommand),
    /// Mutual aid between networks: open a declared aid (a segment's `aid`)
    /// for a while, or close it. With operators' roles declared, an
    /// activation needs an operator of each network (the aided segment's and
    /// the aiding access points'); `musubi status` shows every aid.
    #[command(subcommand)]
    #[command(
        after_help = "Example:\n  musubi aid activate pref-via-national --reason \"typhoon: local APs flooded\" --for 12h"
    )]
    Aid(AidCommand),
    /// Phased migration from old dedicated networks.
    #[command(subcommand)]
    #[command(after_help = "Example:\n  musubi migration status")]
    Migration(MigrationCommand),
    /// Operators' credentials (admins only).
    #[command(subcommand)]
    #[command(after_help = "Example:\n  musubi operator revoke kita-ops")]
    Operator(OperatorCommand),
    /// Sites and their agents: connected, applied and desired configuration,
    /// last seen, tunnel health. With a site name, the detail.
    #[command(after_help = "Example:\n  musubi status kita-hall")]
    Status {
        site: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a single-use token that lets one site's agent enrol (for
    /// several sites: one token each, one audit entry per hundred).
    #[command(
        after_help = "Example:\n  musubi token create --site kita-hall --ttl 30m\n  musubi token create --site kita-hall --site minami-school --ttl 2d > tokens.txt"
    )]
    Create {
        /// The site; repeat for several (printed as `site token` lines).
        #[arg(long, required = true)]
        site: Vec<String>,
        /// How long the token stays valid: 90s, 30m, 1h, 2d.
        #[arg(long, default_value = "1h", value_parser = remote::parse_duration)]
        ttl: std::time::Duration,
    },
}

#[derive(Subcommand, Debug)]
enum AidCommand {
    /// Let the aided segment's sites use the aiding access points now
    /// (after their own pair), until it expires or is deactivated.
    #[command(after_help = "Example:\n  musubi aid activate pref-via-national --reason \"drill\" --for 30m")]
    Activate {
        name: String,
        /// Why, for the audit log.
        #[arg(long, required = true)]
        reason: String,
        /// How long (at most the aid's max_duration, which is the default).
        #[arg(long = "for", value_parser = remote::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// Close an operator's activation before its time (automatic use still
    /// follows the sites' own view of their access points).
    #[command(after_help = "Example:\n  musubi aid deactivate pref-via-national --reason \"local APs back\"")]
    Deactivate {
        name: String,
        /// Why, for the audit log.
        #[arg(long, required = true)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum MigrationCommand {
    /// Per tenant and segment, which sites are on Musubi, which are still
    /// legacy (behind a migration gateway) and which are being cut over;
    /// only what the caller may read.
    #[command(after_help = "Example:\n  musubi migration status --json")]
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum OperatorCommand {
    /// Refuse an operator's certificate from its next call, on every replica.
    #[command(after_help = "Example:\n  musubi operator revoke kita-ops --restore")]
    Revoke {
        name: String,
        /// Let certificates issued from now on in again; the earlier ones stay refused.
        #[arg(long)]
        restore: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SiteCommand {
    /// Disconnect a site's agent at once and refuse its certificate.
    #[command(after_help = "Example:\n  musubi site revoke kita-hall --restore")]
    Revoke {
        name: String,
        /// Let the site enrol again (with a new token); its old certificates stay refused.
        #[arg(long)]
        restore: bool,
    },
    /// Rotate a site's WireGuard keys, make before break: its agent makes
    /// new keys on the site, every peer holds them before they are used.
    #[command(after_help = "Example:\n  musubi site rotate-keys kita-hall --reason \"yearly\" --wait 60s")]
    RotateKeys {
        name: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Wait until the rotation is done, at most this long (30s, 2m).
        #[arg(long, value_parser = remote::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// Revoke a site's WireGuard keys at once (a compromised router): its
    /// peers drop them and refuse them from then on; its agent makes fresh
    /// ones. With `musubi site revoke` as well, the site stays out.
    #[command(after_help = "Example:\n  musubi site revoke-keys kita-hall --reason \"router stolen\"")]
    RevokeKeys {
        name: String,
        /// Why, for the audit log.
        #[arg(long, required = true)]
        reason: String,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    #[command(flatten)]
    Local(LocalCommand),
    #[command(flatten)]
    Remote(RemoteCommand),
    /// Network labs on this host (root): a containerlab topology as network
    /// namespaces, with a controller and an agent per router.
    #[command(subcommand)]
    #[command(after_help = "Example:\n  sudo musubi lab up labs/minimal/topology.clab.yml")]
    Lab(lab::LabCommand),
}

/// `verify` for each mutual aid: the matrix and the isolation check again,
/// on configurations compiled with the aid open (what the sites hold while
/// an operator's activation lasts; an automatic one uses the same entries).
fn verify_aids(intent: &musubi_core::intent::Intent, alloc: &Allocations, without: &verify::Matrix) -> Result<()> {
    for seg in intent.segments.values() {
        for aid in &seg.aid {
            let mut keys = PublicKeys::new();
            keys.entry(musubi_core::aid::ACTIVATIONS.to_string()).or_default().insert(
                aid.name.clone(),
                musubi_core::aid::Activation { until_unix_ms: u64::MAX, reason: String::new() }.text(),
            );
            let configs = compile(intent, alloc, &keys)?;
            println!(
                "\nWith aid {} open (segment {} through {}, {}):\n",
                aid.name,
                seg.name,
                aid.access_points.join(" and "),
                musubi_core::intent::YamlName::yaml(aid.activation)
            );
            // What may reach what follows from segments and policies: an
            // aid moves where its segment's traffic enters, nothing else.
            let with = verify::matrix(intent);
            print!("{}", verify::render(&with, &|_, _| None));
            let same = with.endpoints == without.endpoints && with.cells == without.cells;
            println!("{}", if same { "the same as without it" } else { "DIFFERENT from without it" });
            let problems = verify::isolation(intent, &configs);
            for p in &problems {
                println!("isolation violated with aid {}: {p}", aid.name);
            }
            if !problems.is_empty() {
                bail!("{} across segments with aid {} open", count(problems.len(), "way"), aid.name);
            }
            let carriers: Vec<String> = aid
                .access_points
                .iter()
                .filter_map(|ap| {
                    let c = configs.get(ap)?;
                    let s = c.segments.iter().find(|s| s.segment == seg.name)?;
                    let others: Vec<&str> =
                        c.segments.iter().filter(|o| o.segment != seg.name).map(|o| o.segment.as_str()).collect();
                    Some(format!(
                        "{ap} carries it in routing table {} of its own (beside {}), {} member peers, no policy into another segment",
                        s.domain.as_ref().map_or(0, |d| d.table),
                        if others.is_empty() { "nothing".to_string() } else { others.join(", ") },
                        s.peers.iter().filter(|p| p.role() == musubi_proto::v1::PeerRole::Site).count()
                    ))
                })
                .collect();
            for c in carriers {
                println!("{c}");
            }
            println!("Isolation holds with the aid open: {}", count(configs.len(), "site"));
        }
    }
    Ok(())
}

/// Commands that work on local files.
#[derive(Subcommand, Debug)]
enum LocalCommand {
    /// Check intents; print every problem with its file, line and column.
    #[command(after_help = "Example:\n  musubi validate topologies/prefecture.yaml")]
    Validate {
        /// Each path is one intent: a YAML file, or a directory whose *.yaml
        /// files together form one intent.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Show what each site would change, from an older intent (or nothing) to this one.
    #[command(after_help = "Example:\n  musubi plan topologies/prefecture.yaml --against deployed/")]
    Plan {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// The intent currently deployed; without it every site is new.
        #[arg(long, num_args = 1..)]
        against: Vec<PathBuf>,
        /// Allocations currently deployed (JSON, as written by `musubi compile --allocations`).
        #[arg(long)]
        allocations: Option<PathBuf>,
        /// Print the plan as JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Exit 2 when the plan has changes (0 when none, 1 on errors), for scripts.
        #[arg(long)]
        detailed_exitcode: bool,
    },
    /// Print the configuration one site's agent would receive.
    #[command(after_help = "Example:\n  musubi compile topologies/prefecture.yaml --site kita-hall")]
    Compile {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        site: String,
        #[arg(long, default_value = "yaml")]
        format: Format,
        /// Allocations file: read if it exists, then written back with any new
        /// allocations, so numbers stay stable from one run to the next.
        #[arg(long)]
        allocations: Option<PathBuf>,
        /// Public keys reported by agents: YAML `site: {segment: key}`.
        #[arg(long)]
        keys: Option<PathBuf>,
    },
    /// From intent alone: which site's LAN in which segment may reach which
    /// (a matrix), and a check of every compiled configuration that nothing
    /// could be delivered across segments. Exits 1 on a violation.
    #[command(after_help = "Example:\n  musubi verify topologies/prefecture.yaml")]
    Verify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Shell completion for musubi, to stdout: bash, zsh, fish, elvish or powershell.
    #[command(
        after_help = "Example:\n  musubi completion bash | sudo tee /usr/share/bash-completion/completions/musubi"
    )]
    Completion { shell: clap_complete::Shell },
    /// Manual pages for musubi and each of its commands, written to DIR.
    #[command(after_help = "Example:\n  sudo musubi man /usr/local/share/man/man1 && man musubi-apply")]
    Man { dir: PathBuf },
    /// Write a synthetic national-scale intent (for benchmarks) to stdout or a file.
    #[command(after_help = "Example:\n  musubi generate --sites 2000 --segments 5 -o national.yaml")]
    Generate {
        #[arg(long)]
        sites: usize,
        #[arg(long, default_value_t = 5)]
        segments: usize,
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// A failure already explained to the user on stderr.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("errors reported above")
    }
}

impl std::error::Error for Reported {}

/// `plan --detailed-exitcode` found changes.
#[derive(Debug)]
struct HasChanges;

impl std::fmt::Display for HasChanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the plan has changes")
    }
}

impl std::error::Error for HasChanges {}

fn main() -> ExitCode {
    musubi_process::logs("warn");
    let cli = Cli::parse();
    let color = match cli.color {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => std::env::var_os("NO_COLOR").is_none() && std::io::stdout().is_terminal(),
    };
    let result = match cli.command {
        Command::Remote(command) => {
            let tls = remote::Tls { ca: cli.ca, identity: cli.cert.zip(cli.key), insecure: cli.insecure };
            remote(command, &cli.controller, &tls, color)
        }
        Command::Local(command) => run(command, color),
        Command::Lab(command) => lab::main(command),
    };

    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Reported>() => ExitCode::FAILURE,
        Err(e) if e.is::<HasChanges>() => ExitCode::from(2),
        Err(e) => {
            eprintln!("error: {}", musubi_process::error_text(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn remote(command: RemoteCommand, controller: &str, tls: &remote::Tls, color: bool) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut client = remote::connect(controller, tls).await?;
        match command {
            RemoteCommand::Apply { files, yes, dry_run, merge, remove, allow_destroy_all, propose } => {
                let how = remote::Apply { yes, dry_run, merge, remove: &remove, allow_destroy_all, propose };
                remote::apply(&mut client, &files, how, color).await
            }
            RemoteCommand::Pending => remote::pending(&mut client).await,
            RemoteCommand::Approve { id, yes, dry_run } => remote::approve(&mut client, id, yes, dry_run, color).await,
            RemoteCommand::Get { kind, name } => remote::get(&mut client, kind, name).await,
            RemoteCommand::History { verify } => {
                remote::history(&mut client, verify, remote::verified_head_file(controller, tls), tls.ca.as_deref())
                    .await
            }
            RemoteCommand::Rollback { to, yes, dry_run, propose } => {
                remote::rollback(&mut client, to, yes, dry_run, propose, color).await
            }
            RemoteCommand::Export => remote::export(&mut client).await,
            RemoteCommand::Token(TokenCommand::Create { site, ttl }) => remote::token(&mut client, site, ttl).await,
            RemoteCommand::Site(SiteCommand::Revoke { name, restore }) => {
                remote::revoke(&mut client, name, restore).await
            }
            RemoteCommand::Site(SiteCommand::RotateKeys { name, reason, wait }) => {
                remote::rotate_keys(&mut client, name, reason, wait).await
            }
            RemoteCommand::Site(SiteCommand::RevokeKeys { name, reason }) => {
                remote::revoke_keys(&mut client, name, reason).await
            }
            RemoteCommand::Aid(AidCommand::Activate { name, reason, duration }) => {
                remote::aid(&mut client, name, reason, duration, true).await
            }
            RemoteCommand::Aid(AidCommand::Deactivate { name, reason }) => {
                remote::aid(&mut client, name, reason, None, false).await
            }
            RemoteCommand::Migration(MigrationCommand::Status { json }) => {
                remote::migration_status(&mut client, json).await
            }
            RemoteCommand::Operator(OperatorCommand::Revoke { name, restore }) => {
                remote::revoke_operator(&mut client, name, restore).await
            }
            RemoteCommand::Status { site, json } => remote::site_status(&mut client, site, json).await,
        }
    })
}

/// A compiled configuration as operators write intent: enum values in the
/// intent's spellings (`kind: dark-fiber`, `role: access-point`, `region:
/// east`, `protocol: tcp`) instead of protobuf's names (`LINE_KIND_DARK_FIBER`).
/// Only for reading: the JSON format stays protobuf's JSON mapping, which
/// `musubi-agent apply` reads.
fn intent_spellings(value: yaml_serde::Value) -> yaml_serde::Value {
    use yaml_serde::Value;
    const ENUMS: [&str; 5] = ["PEER_ROLE_", "LINE_KIND_", "ROLE_", "REGION_", "PROTOCOL_"];
    match value {
        Value::String(s) if s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_') => {
            match ENUMS.iter().find_map(|p| s.strip_prefix(p)) {
                Some(rest) => Value::String(rest.to_ascii_lowercase().replace('_', "-")),
                None => Value::String(s),
            }
        }
        Value::Sequence(items) => Value::Sequence(items.into_iter().map(intent_spellings).collect()),
        Value::Mapping(map) => Value::Mapping(map.into_iter().map(|(k, v)| (k, intent_spellings(v))).collect()),
        other => other,
    }
}

fn run(command: LocalCommand, color: bool) -> Result<()> {
    match command {
        LocalCommand::Completion { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "musubi", &mut out);
            print!("{}", String::from_utf8_lossy(&out));
            Ok(())
        }
        LocalCommand::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir).with_context(|| format!("writing to {}", dir.display()))?;
            let pages = std::fs::read_dir(&dir)?.flatten().filter(|e| e.path().extension().is_some_and(|x| x == "1"));
            println!("{} in {}", count(pages.count(), "manual page"), dir.display());
            Ok(())
        }
        LocalCommand::Validate { paths } => {
            let mut failed = false;
            for path in &paths {
                match checked(std::slice::from_ref(path), color) {
                    Ok((intent, _)) if intent.is_empty() => eprintln!(
                        "warning: {}: valid but declares no tenant, segment, site or policy (applied, it would remove every object; `musubi apply` asks for --allow-destroy-all)",
                        path.display()
                    ),
                    Ok((intent, _)) => println!(
                        "{}: valid ({}, {}, {}, {})",
                        path.display(),
                        count(intent.tenants.len(), "tenant"),
                        count(intent.segments.len(), "segment"),
                        count(intent.sites.len(), "site"),
                        count(intent.policies.len(), "policy")
                    ),
                    Err(e) if e.is::<Reported>() => failed = true,
                    Err(e) => return Err(e),
                }
            }
            if failed { Err(Reported.into()) } else { Ok(()) }
        }
        LocalCommand::Plan { paths, against, allocations, json, detailed_exitcode } => {
            let previous = read_allocations(allocations.as_deref())?;
            let (old_intent, old_alloc) = if against.is_empty() {
                (Intent::default(), previous)
            } else {
                let (old, sources) = checked(&against, color)?;
                let alloc = allocated(&old, &sources, &previous, color)?;
                (old, alloc)
            };
            let (new_intent, sources) = checked(&paths, color)?;
            let new_alloc = allocated(&new_intent, &sources, &old_alloc, color)?;
            let keys = PublicKeys::new();
            let old = compile(&old_intent, &old_alloc, &keys)?;
            let new = compile(&new_intent, &new_alloc, &keys)?;
            let p = plan::diff(&old, &new);
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", plan::render(&p, color));
            }
            if detailed_exitcode && !p.is_empty() {
                return Err(HasChanges.into());
            }
            Ok(())
        }
        LocalCommand::Compile { paths, site, format, allocations, keys } => {
            let (intent, sources) = checked(&paths, color)?;
            if !intent.sites.contains_key(&site) {
                let known: Vec<&str> = intent.sites.keys().map(String::as_str).take(20).collect();
                bail!("site `{site}` is not in the intent; expected one of: {}", known.join(", "));
            }
            let previous = read_allocations(allocations.as_deref())?;
            let alloc = allocated(&intent, &sources, &previous, color)?;
            let keys = read_keys(keys.as_deref())?;
            let index = musubi_core::compile::Index::new(&intent, &alloc, &keys);
            let config = index.site(&site)?;
            if let Some(path) = &allocations
                && alloc != previous
            {
                load::write_allocations(path, &alloc)?;
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&config)?),
                Format::Yaml => print!("{}", yaml_serde::to_string(&intent_spellings(yaml_serde::to_value(&config)?))?),
            }
            Ok(())
        }
        LocalCommand::Verify { paths } => {
            let (intent, sources) = checked(&paths, color)?;
            let alloc = allocated(&intent, &sources, &Allocations::default(), color)?;
            let m = musubi_core::verify::matrix(&intent);
            println!("Reachability ({} endpoints: a site's LAN in a segment)\n", m.endpoints.len());
            print!("{}", musubi_core::verify::render(&m, &|_, _| None));
            let configs = compile(&intent, &alloc, &PublicKeys::new())?;
            let problems = musubi_core::verify::isolation(&intent, &configs);
            println!();
            if problems.is_empty() {
                let segments: usize = configs.values().map(|c| c.segments.len()).sum();
                println!(
                    "Isolation holds: {}, {}; every route, peer, import and policy rule stays within its segment or a policy's link",
                    count(configs.len(), "site"),
                    count(segments, "segment configuration")
                );
                verify_aids(&intent, &alloc, &m)
            } else {
                for p in &problems {
                    println!("isolation violated: {p}");
                }
                bail!("{} across segments", count(problems.len(), "way"))
            }
        }
        LocalCommand::Generate { sites, segments, output } => {
            let text = generate::generate(sites, segments);
            match output {
                Some(path) => std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(())
        }
    }
}

/// Loads and validates an intent, printing every diagnostic on failure.
fn checked(paths: &[PathBuf], color: bool) -> Result<(Intent, SourceMap)> {
    let parsed = load::load(paths)?;
    let diags = validate::check(&parsed);
    if diags.is_empty() {
        return Ok((parsed.intent, parsed.sources));
    }
    report(&diags, &parsed.sources, color);
    Err(Reported.into())
}

fn report(diags: &[Diagnostic], sources: &SourceMap, color: bool) {
    let color = color && std::io::stderr().is_terminal();
    eprint!("{}", render(diags, sources, color));
}

fn allocated(intent: &Intent, sources: &SourceMap, previous: &Allocations, color: bool) -> Result<Allocations> {
    allocate(intent, previous).map_err(|e| {
        let settings = ObjectRef::new(Kind::Settings, "settings");
        report(
            &[Diagnostic::at(sources, &settings, e.field(), e.to_string()).expected("a larger range in Settings")],
            sources,
            color,
        );
        Reported.into()
    })
}

fn read_allocations(path: Option<&Path>) -> Result<Allocations> {
    Ok(path.map(load::read_allocations).transpose()?.unwrap_or_default())
}

fn read_keys(path: Option<&Path>) -> Result<PublicKeys> {
    let Some(p) = path else {
        return Ok(PublicKeys::new());
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let by_site: PublicKeys = yaml_serde::from_str(&text)
        .with_context(|| format!("{}: expected `site: {{segment: public-key}}`", p.display()))?;
    Ok(by_site)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command and subcommand's `--help` ends with an example that
    /// runs that very command.
    #[test]
    fn every_command_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let here = if path.is_empty() { cmd.get_name().to_string() } else { format!("{path} {}", cmd.get_name()) };
            let help = cmd.get_after_help().map(ToString::to_string).unwrap_or_default();
            let words: Vec<&str> = here.split(' ').collect();
            let example = help.lines().skip_while(|l| *l != "Example:").nth(1).unwrap_or_default();
            if !words.iter().all(|w| example.split_whitespace().any(|e| e == *w)) {
                missing.push(here.clone());
            }
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "commands without an example of themselves: {missing:?}");
    }

    #[test]
    fn compiled_configurations_read_in_the_intents_spellings() {
        let value: yaml_serde::Value = yaml_serde::from_str(
            "role: ROLE_ACCESS_POINT\nregion: REGION_EAST\nlines: [{kind: LINE_KIND_DARK_FIBER, name: FIBRE_A}]\n\
             peers: [{role: PEER_ROLE_INTERCONNECT}]\nprotocol: PROTOCOL_TCP\n",
        )
        .expect("yaml");
        let text = yaml_serde::to_string(&intent_spellings(value)).expect("yaml");
        for want in ["role: access-point", "region: east", "kind: dark-fiber", "role: interconnect", "protocol: tcp"] {
            assert!(text.contains(want), "{want} in {text}");
        }
        // A name that merely looks like a constant stays as written.
        assert!(text.contains("name: FIBRE_A"), "{text}");
    }
}
