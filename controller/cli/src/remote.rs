//! Commands that talk to a running controller over the operator API.

use musubi_process::{print, println};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use musubi_core::api;
use musubi_core::audit::verify;
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
}

pub async fn connect(address: &str, tls: &Tls) -> Result<Client> {
    let url = if address.contains("://") {
        address.to_string()
    } else if tls.identity.is_some() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
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
    let (number, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = number.parse().map_err(|_| format!("`{s}` is not a duration (like 90s, 30m, 1h, 2d)"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`; use s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(n * factor))
}

pub async fn token(client: &mut Client, site: String, ttl: std::time::Duration) -> Result<()> {
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
        }
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:>8} {:>8} {:<8} {:<10} {:>8} {:>6} {:>6}",
        "SITE", "CONNECTED", "APPLIED", "DESIRED", "SYNC", "SEEN", "TUNNELS", "MOVES", "ERRORS"
    );
    for s in &resp.sites {
        let reported = s.reported.clone().unwrap_or_default();
        let st = reported.status.clone().unwrap_or_default();
        let up = st.peers.iter().filter(|p| p.up).count();
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
            "{:<24} {:<10} {:>8} {:>8} {:<8} {:<10} {:>8} {:>6} {:>6}",
            s.site,
            connected,
            format!("r{}", st.applied_revision),
            format!("r{}", s.desired_revision),
            sync,
            ago(reported.last_seen_unix_ms),
            format!("{up}/{}", st.peers.len()),
            moves(&st),
            st.errors.len()
        );
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
        println!("Intent changes: {summary}");
    }
    intent_changes
}

fn print_applied(r: &pb::ApplyResponse) {
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
}

pub async fn apply(client: &mut Client, paths: &[PathBuf], how: Apply<'_>, color: bool) -> Result<()> {
    let Apply { yes, dry_run, merge, remove, allow_destroy_all } = how;
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
    let request = pb::ApplyRequest { documents, expected_revision: planned.revision, dry_run: false, merge, remove };
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

pub async fn history(client: &mut Client, check: bool) -> Result<()> {
    let r = client.history(pb::HistoryRequest {}).await.map_err(status)?.into_inner();
    for e in &r.entries {
        let secs = e.time_ms / 1000;
        println!("{:>6}  {}  {:<20}  {}", e.revision, format_time(secs), e.actor, e.summary);
    }
    if check {
        let chain: Vec<_> = r.entries.iter().map(api::audit_from_pb).collect();
        match verify(&chain) {
            Ok(()) => println!(
                "audit chain verified: {}, head {}",
                musubi_core::words::count(chain.len(), "entry"),
                chain.last().map_or("-", |e| &e.hash[..16])
            ),
            Err(e) => bail!("audit chain broken: {e}"),
        }
    }
    Ok(())
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

pub async fn rollback(client: &mut Client, to: u64, yes: bool, dry_run: bool, color: bool) -> Result<()> {
    let planned = client
        .rollback(pb::RollbackRequest { to_revision: to, expected_revision: 0, dry_run: true })
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
    let request = pb::RollbackRequest { to_revision: to, expected_revision: planned.revision, dry_run: false };
    let applied = client.rollback(request).await.map_err(status)?.into_inner();
    print_applied(&applied);
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
    use super::format_time;

    #[test]
    fn formats_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(1_790_000_000), "2026-09-21 14:13:20Z");
    }
}
