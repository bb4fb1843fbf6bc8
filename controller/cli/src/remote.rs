//! Commands that talk to a running controller over the operator API.

use musubi_process::{print, println};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use musubi_core::api;
use musubi_core::audit::{self, verify};
use musubi_core::diagnostic::render;
use musubi_core::intent::source::{SourceFile, SourceMap};
use musubi_core::{load, plan};
use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_client::OperatorClient;
use tonic::transport::Channel;

use crate::Reported;

pub type Client = OperatorClient<Channel>;

/// The operator's credentials.
#[derive(Debug, Default)]
pub struct Tls {
    pub ca: Option<PathBuf>,
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Plain text allowed (`--insecure`).
    pub insecure: bool,
}

/// The controller's URL: as written, else `https://` with a certificate and
/// `http://` only with `--insecure`; plain text is never chosen silently.
fn url(address: &str, tls: &Tls) -> Result<String> {
    let url = if address.contains("://") {
        address.to_string()
    } else if tls.identity.is_some() || !tls.insecure {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    if url.starts_with("http://") && !tls.insecure {
        bail!(
            "refusing plain text to {url}: use https:// with --ca, --cert and --key, or --insecure for a controller started with --insecure"
        );
    }
    if url.starts_with("https://") && tls.identity.is_none() {
        bail!(
            "no operator certificate for {url}: give --cert and --key (and --ca), or --insecure for a controller started with --insecure"
        );
    }
    Ok(url)
}

pub async fn connect(address: &str, tls: &Tls) -> Result<Client> {
    let url = url(address, tls)?;
    let mut endpoint = Channel::from_shared(url.clone()).with_context(|| format!("`{url}` is not a URL"))?;
    if url.starts_with("https://") {
        let ca = tls.ca.as_deref().context("an https:// controller needs --ca (or MUSUBI_CA)")?;
        let identity = tls.identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path()));
        endpoint = endpoint.tls_config(musubi_controller::pki::client_tls(ca, identity)?)?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the controller at {url} (set --controller or MUSUBI_CONTROLLER)"))?;
    Ok(OperatorClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX))
}

/// `90s`, `30m`, `1h`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    musubi_core::words::duration(s)
}

pub async fn token(client: &mut Client, sites: Vec<String>, ttl: std::time::Duration) -> Result<()> {
    if let [site] = &sites[..] {
        return one_token(client, site.clone(), ttl).await;
    }
    let mut made = 0;
    for batch in sites.chunks(100) {
        let req = pb::CreateTokensRequest { sites: batch.to_vec(), ttl_seconds: ttl.as_secs() };
        let resp = client.create_tokens(req).await.map_err(status)?.into_inner();
        for t in resp.tokens {
            println!("{} {}", t.site, t.token);
            made += 1;
        }
    }
    eprintln!(
        "{made} single-use join tokens (`site token` per line), valid for {} s; they are shown only once",
        ttl.as_secs()
    );
    Ok(())
}

async fn one_token(client: &mut Client, site: String, ttl: std::time::Duration) -> Result<()> {
    let resp = client
        .create_token(pb::CreateTokenRequest { site: site.clone(), ttl_seconds: ttl.as_secs() })
        .await
        .map_err(status)?
        .into_inner();
    println!("{}", resp.token);
    eprintln!("single-use join token for site `{site}`, valid for {} s; it is shown only once", ttl.as_secs());
    Ok(())
}

pub async fn revoke(client: &mut Client, site: String, restore: bool) -> Result<()> {
    client.revoke_site(pb::RevokeSiteRequest { site: site.clone(), restore }).await.map_err(status)?;
    if restore {
        println!("site `{site}` may enrol again with a new token; its earlier certificates stay refused");
    } else {
        println!("site `{site}` revoked: its agent is disconnected and its certificate refused");
    }
    Ok(())
}

pub async fn rotate_keys(
    client: &mut Client,
    site: String,
    reason: String,
    wait: Option<std::time::Duration>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let resp =
        client.rotate_keys(pb::RotateKeysRequest { site: site.clone(), reason }).await.map_err(status)?.into_inner();
    println!(
        "key rotation {} of site `{site}` asked for: its agent makes the new keys, its peers take them first",
        resp.id
    );
    let Some(wait) = wait else { return Ok(()) };
    let mut last = String::new();
    while started.elapsed() < wait {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let state = client.status(pb::StatusRequest { site: site.clone() }).await.map_err(status)?.into_inner();
        let Some(s) = state.sites.first() else { continue };
        if s.key_rotation != last {
            last.clone_from(&s.key_rotation);
            if !last.is_empty() {
                println!("{:>6} ms  {last}", started.elapsed().as_millis());
            }
        }
        if s.key_rotation.is_empty() && s.keys_since_unix_ms >= resp.id {
            println!("{:>6} ms  done: site `{site}` holds its new keys", started.elapsed().as_millis());
            return Ok(());
        }
    }
    anyhow::bail!("the key rotation of site `{site}` was not done within {wait:?} (phase: {last})")
}

pub async fn revoke_keys(client: &mut Client, site: String, reason: String) -> Result<()> {
    let resp = client.revoke_keys(pb::RotateKeysRequest { site: site.clone(), reason }).await.map_err(status)?;
    println!(
        "WireGuard keys of site `{site}` revoked (rotation {}): its peers drop them now and refuse them from now on; \
         its agent makes fresh ones (`musubi site revoke {site}` keeps it out)",
        resp.into_inner().id
    );
    Ok(())
}

pub async fn aid(
    client: &mut Client,
    name: String,
    reason: String,
    duration: Option<std::time::Duration>,
    open: bool,
) -> Result<()> {
    let req = pb::AidRequest { name: name.clone(), reason, duration_s: duration.map_or(0, |d| d.as_secs()) };
    if !open {
        client.deactivate_aid(req).await.map_err(status)?;
        println!(
            "mutual aid `{name}` deactivated: the aiding access points carry the segment only if it opens on its own"
        );
        return Ok(());
    }
    let resp = client.activate_aid(req).await.map_err(status)?.into_inner();
    if resp.until_unix_ms == 0 {
        println!(
            "activation of mutual aid `{name}` asked for; it opens when an operator of {} asks too (within 15 min)",
            resp.waiting_for
        );
    } else {
        let left = resp.until_unix_ms.saturating_sub(now_unix_ms()) / 1000;
        println!(
            "mutual aid `{name}` active for {}: its sites use the aiding access points when their own do not answer",
            left_text(left.max(1))
        );
    }
    Ok(())
}

/// Seconds left, to the minute: "11h59m", "4m10s".
fn left_text(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub async fn revoke_operator(client: &mut Client, name: String, restore: bool) -> Result<()> {
    client.revoke_operator(pb::RevokeOperatorRequest { name: name.clone(), restore }).await.map_err(status)?;
    if restore {
        println!(
            "operator `{name}` may call again with a certificate issued from now on (musubi-controller operator {name}); \
             its earlier certificates stay refused"
        );
    } else {
        println!("operator `{name}` revoked: every replica refuses its certificate from its next call");
    }
    Ok(())
}

fn ago(ms: u64) -> String {
    let now = musubi_controller::pki::now_ms();
    if ms == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..120 => format!("{s}s ago"),
        120..7200 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

/// "registered 3d ago", with a rotation under way.
fn key_age(s: &pb::SiteState) -> String {
    let age = if s.keys_since_unix_ms == 0 {
        "age unknown".to_string()
    } else {
        let days = musubi_controller::pki::now_ms().saturating_sub(s.keys_since_unix_ms) / 86_400_000;
        if days == 0 { format!("registered {}", ago(s.keys_since_unix_ms)) } else { format!("{days} days old") }
    };
    match s.key_rotation.as_str() {
        "" => age,
        phase => format!("{age}, rotating ({phase})"),
    }
}

pub async fn site_status(client: &mut Client, site: Option<String>, json: bool) -> Result<()> {
    let resp =
        client.status(pb::StatusRequest { site: site.clone().unwrap_or_default() }).await.map_err(status)?.into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&resp)?);
        return Ok(());
    }
    if site.is_some() {
        for s in &resp.sites {
            let reported = s.reported.clone().unwrap_or_default();
            let st = reported.status.clone().unwrap_or_default();
            println!("site:        {}", s.site);
            println!(
                "connected:   {}{}",
                if s.connected { "yes" } else { "no" },
                if s.revoked { " (revoked)" } else { "" }
            );
            println!("controller:  {}", reported.controller);
            println!("agent:       {}", reported.agent_version);
            println!("last seen:   {}", ago(reported.last_seen_unix_ms));
            println!("keys:        {}", key_age(s));
            println!("desired:     r{} {}", s.desired_revision, short(&s.desired_digest));
            let sync = if in_sync(s) == Some(true) { " (in sync)" } else { " (not in sync)" };
            println!("applied:     r{} {}{}", st.applied_revision, short(&st.applied_digest), sync);
            for e in &st.errors {
                println!("error:       {e}");
            }
            for p in &st.peers {
                let state = match (p.judged, p.up) {
                    (false, _) => "?",
                    (true, true) => "up",
                    (true, false) => "DOWN",
                };
                let over = if p.path.is_empty() {
                    String::new()
                } else {
                    format!(", over {} (line moved {})", p.path, times(p.line_moves))
                };
                println!(
                    "peer:        {:<12} {:<24} {state:<4} rtt {} µs, loss {}‰{over}",
                    p.segment, p.peer, p.rtt_us, p.loss_permille
                );
            }
            if st.peers_up_omitted > 0 {
                println!("peer:        and {} more up, without loss, never moved", st.peers_up_omitted);
            }
            if st.peers_unjudged_omitted > 0 {
                println!("peer:        and {} more not judged yet", st.peers_unjudged_omitted);
            }
            for a in &st.active {
                println!(
                    "path:        {:<12} {:<24} via {} on {} (moved {})",
                    a.segment,
                    a.route_group,
                    a.peer,
                    a.local_line,
                    times(a.moves)
                );
            }
            if st.active_omitted > 0 {
                println!("path:        and {} more route groups on their own site, never moved", st.active_omitted);
            }
            for a in &st.aids_in_use {
                println!("aid:         {a} IN USE (another network's access points carry its segment)");
            }
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>8} {:>8} {:<8} {:<10} {:>8} {:>6} {:>6}  KEYS",
        "SITE", "CONNECTED", "APPLIED", "DESIRED", "SYNC", "SEEN", "TUNNELS", "MOVES", "ERRORS"
    );
    for s in &resp.sites {
        let reported = s.reported.clone().unwrap_or_default();
        let st = reported.status.clone().unwrap_or_default();
        let up = st.peers_up();
        let connected = if s.revoked {
            "revoked"
        } else if s.connected {
            "yes"
        } else {
            "no"
        };
        let sync = match in_sync(s) {
            None => "-",
            Some(true) => "yes",
            Some(false) => "no",
        };
        println!(
            "{:<24} {:<10} {:>8} {:>8} {:<8} {:<10} {:>8} {:>6} {:>6}  {}",
            s.site,
            connected,
            format!("r{}", st.applied_revision),
            format!("r{}", s.desired_revision),
            sync,
            ago(reported.last_seen_unix_ms),
            format!("{up}/{}", st.peers_total()),
            moves(&st),
            st.errors.len(),
            key_age(s)
        );
    }
    if !resp.aids.is_empty() {
        println!();
        println!(
            "{:<24} {:<16} {:<24} {:<10} {:<22} IN USE AT",
            "AID", "SEGMENT", "ACCESS POINTS", "OPENS", "ACTIVATED"
        );
        for a in &resp.aids {
            let activated = if a.active_until_unix_ms == 0 {
                "no".to_string()
            } else {
                let left = a.active_until_unix_ms.saturating_sub(now_unix_ms()) / 1000;
                format!("yes, {} left", left_text(left))
            };
            let in_use = if a.in_use_at.is_empty() { "-".to_string() } else { a.in_use_at.join(", ") };
            println!(
                "{:<24} {:<16} {:<24} {:<10} {:<22} {in_use}",
                a.name,
                a.segment,
                a.access_points.join(","),
                a.activation,
                activated
            );
        }
    }
    Ok(())
}

/// "never", "once", "N times".
fn times(n: u64) -> String {
    match n {
        0 => "never".into(),
        1 => "once".into(),
        n => format!("{n} times"),
    }
}

/// Moves of traffic an agent reported since it started: its route groups'
/// and its lines' (a line to a peer counts once, however many segments
/// reach that peer over it).
fn moves(st: &pb::Status) -> u64 {
    let groups: u64 = st.active.iter().map(|a| a.moves).sum();
    let lines: std::collections::BTreeMap<&str, u64> =
        st.peers.iter().map(|p| (p.peer.as_str(), p.line_moves)).collect();
    groups + lines.values().sum::<u64>()
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(12)]
}

/// Whether the agent applied what it should have; `None` when nothing is desired.
fn in_sync(s: &pb::SiteState) -> Option<bool> {
    let applied = s.reported.as_ref().and_then(|r| r.status.as_ref()).map(|st| st.applied_digest.as_str());
    (!s.desired_digest.is_empty()).then(|| applied == Some(s.desired_digest.as_str()))
}

/// A gRPC failure in the operator's words.
fn status(e: tonic::Status) -> anyhow::Error {
    match e.code() {
        tonic::Code::Aborted => anyhow::anyhow!("{}", e.message()),
        tonic::Code::Unavailable if e.message().is_empty() => anyhow::anyhow!("the controller is unavailable"),
        _ => anyhow::anyhow!("the controller refused the request: {}", e.message()),
    }
}

fn sources(files: &[SourceFile]) -> SourceMap {
    let mut map = SourceMap::default();
    for f in files {
        map.add_file(f.clone());
    }
    map
}

/// Prints server diagnostics against the local files; true if there were any.
fn report(diags: &[pb::Diagnostic], files: &[SourceFile], color: bool) -> bool {
    if diags.is_empty() {
        return false;
    }
    let local: Vec<_> = diags.iter().map(|d| api::diagnostic_from_pb(d, files)).collect();
    eprint!("{}", render(&local, &sources(files), color && std::io::stderr().is_terminal()));
    true
}

fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        bail!("{question} Refusing without a terminal to ask on: pass --yes");
    }
    print!("{question} Only 'yes' is accepted: ");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(answer.trim() == "yes")
}

/// Objects of each kind named in a plan's intent changes (the others
/// counted: a first import adds 10,000 sites), and in a line of history or
/// of the changes waiting for approval.
const INTENT_CHANGES_SHOWN: usize = 20;
const HISTORY_SHOWN: usize = 5;

/// Prints the plan and the intent-level changes; false when nothing changes.
/// Some changes (a description) change no site's configuration yet are
/// changes of intent all the same.
fn show_plan(sites: &[pb::PlanChange], summary: &str, color: bool) -> bool {
    let p = api::plan_from_pb(sites);
    let intent_changes = summary != "no change" && !summary.is_empty();
    if p.is_empty() && intent_changes {
        println!("No site's configuration changes.");
    } else {
        print!("{}", plan::render(&p, color));
    }
    if intent_changes {
        println!("Intent changes: {}", musubi_core::words::condensed(summary, INTENT_CHANGES_SHOWN));
    }
    intent_changes
}

fn print_applied(r: &pb::ApplyResponse) {
    if !r.pending_id.is_empty() {
        println!(
            "Proposed as change {}: nothing applied yet. It touches national objects (or was proposed), so another \
             operator with their scope approves it: `musubi approve {}` (before {} UTC, and while the intent stays \
             at revision {}).",
            r.pending_id,
            r.pending_id,
            format_time(r.pending_expires_unix_ms / 1000),
            r.revision
        );
        return;
    }
    match &r.audit {
        Some(a) => {
            // One line of counts, however many objects changed (the
            // objects are in the plan above and in `musubi history`).
            println!(
                "Applied revision {}: {}; {} to send.",
                r.revision,
                musubi_core::words::change_counts(&a.summary),
                musubi_core::words::count(r.affected_sites.len(), "site configuration")
            );
        }
        None => println!("No changes. The intent stays at revision {}.", r.revision),
    }
}

/// How `musubi apply` goes about it.
#[derive(Debug, Clone, Copy)]
pub struct Apply<'a> {
    /// Without asking.
    pub yes: bool,
    /// Only show the plan.
    pub dry_run: bool,
    /// The files add or replace only the objects they declare.
    pub merge: bool,
    /// With `merge`: objects to remove (`Kind/name`).
    pub remove: &'a [String],
    /// Files that declare no object may replace the whole intent.
    pub allow_destroy_all: bool,
    /// Wait for a second operator's approval whatever the change touches.
    pub propose: bool,
}

pub async fn apply(client: &mut Client, paths: &[PathBuf], how: Apply<'_>, color: bool) -> Result<()> {
    let Apply { yes, dry_run, merge, remove, allow_destroy_all, propose } = how;
    let remove = remove.to_vec();
    let files = load::read_sources(paths)?;
    let documents = api::documents(&files);
    let planned = client
        .plan(pb::PlanRequest { documents: documents.clone(), merge, remove: remove.clone() })
        .await
        .map_err(status)?
        .into_inner();
    if report(&planned.diagnostics, &files, color) {
        return Err(Reported.into());
    }
    if !show_plan(&planned.sites, &planned.summary, color) || dry_run {
        return Ok(());
    }
    // The whole intent replaced by files that declare nothing: every
    // object goes (an empty file, the wrong directory). Only on purpose.
    if !merge && !allow_destroy_all && musubi_core::intent::parse::parse_files(files.clone()).intent.is_empty() {
        bail!(
            "the files declare no tenant, segment, site or policy: applying them removes every object of the \
             controller's intent (the plan above); nothing applied. Pass --allow-destroy-all if that is what you want"
        );
    }
    if !yes && !confirm(&format!("Apply this plan to revision {}?", planned.revision))? {
        println!("Nothing applied.");
        return Ok(());
    }
    let request =
        pb::ApplyRequest { documents, expected_revision: planned.revision, dry_run: false, merge, remove, propose };
    let applied = client.apply(request).await.map_err(status)?.into_inner();
    if report(&applied.diagnostics, &files, color) {
        return Err(Reported.into());
    }
    print_applied(&applied);
    Ok(())
}

pub async fn get(client: &mut Client, kind: Option<String>, name: Option<String>) -> Result<()> {
    let request = pb::GetRequest { kind: kind.unwrap_or_default(), name: name.unwrap_or_default() };
    let r = client.get(request).await.map_err(status)?.into_inner();
    println!("# revision {}, {} object(s)", r.revision, r.count);
    print!("{}", r.yaml);
    Ok(())
}

pub async fn history(
    client: &mut Client,
    check: bool,
    remembered: Option<PathBuf>,
    ca: Option<&std::path::Path>,
) -> Result<()> {
    let r = client.history(pb::HistoryRequest { with_changes: check }).await.map_err(status)?.into_inner();
    for e in r.entries.iter().map(api::audit_from_pb) {
        let secs = e.time_ms / 1000;
        println!(
            "{:>8}  {}  {:<20}  {}",
            e.label(),
            format_time(secs),
            e.actor,
            musubi_core::words::printable(&musubi_core::words::condensed(&e.summary, HISTORY_SHOWN), 4096)
        );
    }
    if check {
        let chain: Vec<_> = r.entries.iter().map(api::audit_from_pb).collect();
        let records: std::collections::BTreeMap<u64, Vec<u8>> =
            r.changes.into_iter().map(|c| (c.revision, c.records)).collect();
        if let Err(e) = verify(&chain).and_then(|()| audit::verify_changes(&chain, &records)) {
            bail!("audit chain broken: {e}");
        }
        // The intent each change left, replayed from the change records,
        // and the one the store holds now.
        let stored = (!r.intent_digest.is_empty()).then_some(r.intent_digest.as_str());
        let replayed = match audit::verify_intent(&chain, &records, stored) {
            Ok(done) => done,
            Err(e) => bail!("audit chain broken: {e}"),
        };
        // Signatures, against the CA this CLI trusts (none in plain text).
        let signed = match ca {
            Some(path) => {
                let ca = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let signers = r.signers.into_iter().collect();
                match musubi_controller::signing::verify(&chain, &signers, &ca) {
                    Ok(n) => Some(n),
                    Err(e) => bail!("audit chain broken: {e}"),
                }
            }
            None => None,
        };
        // The head verified last time must still be in the chain.
        let earlier = remembered.as_deref().and_then(|p| std::fs::read_to_string(p).ok());
        if let Some((revision, hash)) = earlier.as_deref().and_then(|t| t.trim().split_once(' '))
            && let Ok(revision) = revision.parse::<u64>()
            && let Err(e) = audit::extends(&chain, revision, hash)
        {
            bail!("audit chain broken: {e}");
        }
        if let (Some(path), Some(head)) = (&remembered, chain.last()) {
            let _ = path.parent().map(std::fs::create_dir_all);
            std::fs::write(path, format!("{} {}\n", head.revision, head.hash))
                .with_context(|| format!("remembering the verified head in {}", path.display()))?;
        }
        let covered = chain.iter().filter(|e| !e.changes.is_empty()).count();
        let events = chain.iter().filter(|e| e.event != 0).count();
        let signatures = match signed {
            Some(n) => format!("{n} signed by a controller of this CA"),
            None => "signatures not checked (no CA)".to_string(),
        };
        let intent = if replayed {
            "the intent replayed from them matches every digest and the store"
        } else {
            "the intent not replayed (change records of early revisions missing)"
        };
        println!(
            "audit chain verified: {} ({} beside the intent; {signatures}), change records of {} checked, {intent}, head {}",
            musubi_core::words::count(chain.len(), "entry"),
            musubi_core::words::count(events, "event"),
            musubi_core::words::count(covered, "revision"),
            chain.last().map_or("-", |e| &e.hash[..16])
        );
    }
    Ok(())
}

/// Where the CLI remembers the last head it verified of the deployment at
/// `address` (one file per CA and address) under `MUSUBI_STATE_DIR`, else
/// `$XDG_STATE_HOME/musubi` or `~/.local/state/musubi`; `None` with an empty
/// `MUSUBI_STATE_DIR`.
pub fn verified_head_file(address: &str, tls: &Tls) -> Option<PathBuf> {
    let dir = match std::env::var_os("MUSUBI_STATE_DIR") {
        Some(d) if d.is_empty() => return None,
        Some(d) => PathBuf::from(d),
        None => match std::env::var_os("XDG_STATE_HOME") {
            Some(d) if !d.is_empty() => PathBuf::from(d).join("musubi"),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".local/state/musubi"),
        },
    };
    let ca = tls.ca.as_deref().and_then(|p| std::fs::read(p).ok()).unwrap_or_default();
    let mut id = ca;
    id.extend_from_slice(address.as_bytes());
    Some(dir.join(format!("verified-head-{}", &audit::sha256_hex(&id)[..16])))
}

/// UTC `YYYY-MM-DD hh:mm:ss` without a calendar crate (civil-from-days).
fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

pub async fn rollback(
    client: &mut Client,
    to: u64,
    yes: bool,
    dry_run: bool,
    propose: bool,
    color: bool,
) -> Result<()> {
    let planned = client
        .rollback(pb::RollbackRequest { to_revision: to, expected_revision: 0, dry_run: true, propose: false })
        .await
        .map_err(status)?
        .into_inner();
    if report(&planned.diagnostics, &[], color) {
        return Err(Reported.into());
    }
    if !show_plan(&planned.sites, &planned.summary, color) || dry_run {
        return Ok(());
    }
    if !yes && !confirm(&format!("Roll back to the intent of revision {to}?"))? {
        println!("Nothing applied.");
        return Ok(());
    }
    let request = pb::RollbackRequest { to_revision: to, expected_revision: planned.revision, dry_run: false, propose };
    let applied = client.rollback(request).await.map_err(status)?.into_inner();
    print_applied(&applied);
    Ok(())
}

/// The changes waiting for a second operator.
pub async fn pending(client: &mut Client) -> Result<()> {
    let r = client.list_pending(pb::ListPendingRequest {}).await.map_err(status)?.into_inner();
    if r.changes.is_empty() {
        println!("No change waits for approval.");
    }
    for p in &r.changes {
        println!(
            "{}  proposed {} by {:<20}  at revision {}, expires {}  {}",
            p.id,
            format_time(p.created_unix_ms / 1000),
            p.proposer,
            p.revision,
            format_time(p.expires_unix_ms / 1000),
            musubi_core::words::condensed(&p.summary, HISTORY_SHOWN)
        );
    }
    Ok(())
}

/// Shows the plan a pending change applies now, asks, and approves it.
pub async fn approve(client: &mut Client, id: String, yes: bool, dry_run: bool, color: bool) -> Result<()> {
    let planned =
        client.approve(pb::ApproveRequest { id: id.clone(), dry_run: true }).await.map_err(status)?.into_inner();
    if report(&planned.diagnostics, &[], color) {
        return Err(Reported.into());
    }
    if !show_plan(&planned.sites, &planned.summary, color) || dry_run {
        return Ok(());
    }
    if !yes && !confirm(&format!("Approve change {id} and apply it to revision {}?", planned.revision))? {
        println!("Nothing approved.");
        return Ok(());
    }
    let applied = client.approve(pb::ApproveRequest { id, dry_run: false }).await.map_err(status)?.into_inner();
    print_applied(&applied);
    Ok(())
}

/// `musubi migration status`: the intent the caller may read and what its
/// sites' agents report, as [`musubi_core::migration`] sees them.
pub async fn migration_status(client: &mut Client, json: bool) -> Result<()> {
    use musubi_core::migration::{self, Seen};
    let got = client.get(pb::GetRequest::default()).await.map_err(status)?.into_inner();
    let parsed = musubi_core::intent::parse::parse_str("intent", &got.yaml);
    if let Some(d) = parsed.diagnostics.first() {
        bail!("the controller's intent did not read back: {}", d.message);
    }
    let sites = client.status(pb::StatusRequest::default()).await.map_err(status)?.into_inner().sites;
    let seen: std::collections::HashMap<&str, Seen> = sites
        .iter()
        .filter(|s| s.reported.is_some())
        .map(|s| (s.site.as_str(), Seen { connected: s.connected, in_sync: in_sync(s) == Some(true) }))
        .collect();
    let rows = migration::report(&parsed.intent, &|site| seen.get(site).copied());
    let tally = migration::tally(&rows);
    if json {
        let segments: Vec<serde_json::Value> = tally
            .iter()
            .map(|((tenant, segment), t)| serde_json::json!({"tenant": tenant, "segment": segment, "counts": t}))
            .collect();
        let out = serde_json::json!({"revision": got.revision, "sites": rows, "segments": segments});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("# revision {}", got.revision);
    let w = |f: fn(&migration::Row) -> &str, head: &str| {
        rows.iter().map(|r| f(r).chars().count()).chain([head.len()]).max().unwrap_or(0)
    };
    let (wt, ws, wi) = (w(|r| &r.tenant, "TENANT"), w(|r| &r.segment, "SEGMENT"), w(|r| &r.site, "SITE"));
    println!("{:<wt$}  {:<ws$}  {:<wi$}  {:<12}  DETAIL", "TENANT", "SEGMENT", "SITE", "STAGE");
    for r in &rows {
        println!("{:<wt$}  {:<ws$}  {:<wi$}  {:<12}  {}", r.tenant, r.segment, r.site, r.stage.words(), r.detail);
    }
    println!();
    for ((tenant, segment), t) in &tally {
        let done = if t.total() == 0 { 100 } else { (t.on_musubi * 200 + t.total()) / (2 * t.total()) };
        println!(
            "{tenant}/{segment}: {} of {} on Musubi ({done}%), {} declared (agent never connected), {} cutting over, {} legacy",
            t.on_musubi,
            musubi_core::words::count(t.total(), "site"),
            t.declared,
            t.cutting_over,
            t.legacy
        );
    }
    Ok(())
}

pub async fn export(client: &mut Client) -> Result<()> {
    let r = client.export(pb::ExportRequest {}).await.map_err(status)?.into_inner();
    println!("# Exported from musubi-controller at revision {}", r.revision);
    print!("{}", r.yaml);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{Tls, format_time, url};

    #[test]
    fn plain_text_only_with_insecure() {
        let cert =
            Tls { ca: Some("ca.pem".into()), identity: Some(("a.pem".into(), "a-key.pem".into())), insecure: false };
        let none = Tls { ca: None, identity: None, insecure: false };
        let insecure = Tls { insecure: true, ..Tls::default() };
        assert_eq!(url("ctl:7400", &cert).ok().as_deref(), Some("https://ctl:7400"));
        assert_eq!(url("ctl:7400", &insecure).ok().as_deref(), Some("http://ctl:7400"));
        assert_eq!(url("http://ctl:7400", &insecure).ok().as_deref(), Some("http://ctl:7400"));
        let refused = url("http://ctl:7400", &cert).expect_err("http:// without --insecure");
        assert!(refused.to_string().starts_with("refusing plain text to http://ctl:7400"), "{refused}");
        let refused = url("ctl:7400", &none).expect_err("no certificate, no --insecure");
        assert!(refused.to_string().contains("no operator certificate"), "{refused}");
    }

    #[test]
    fn formats_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_790_000_000), "2026-09-21 14:13:20Z");
    }
}
