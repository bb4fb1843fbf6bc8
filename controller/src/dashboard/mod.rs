//! The operations centre's dashboard: a page served by the controller
//! (assets built into the binary, nothing fetched from elsewhere), fed by a
//! summary of every site and live changes over server-sent events.
//!
//! Read-only. On a loopback address in plain text; anywhere else (or with
//! `--dashboard-tls`) over TLS with the controller's certificate, to
//! clients holding an operator certificate of its CA (see [`tls`]).
//!
//! - `GET /` the page; `/app.js`, `/app.css` its code and style.
//! - `GET /api/summary` every site, one small row each (its state, peers up).
//! - `GET /api/events` server-sent events: `summary` (every row) once, then
//!   `changes` (only the rows that changed) as agents report.
//! - `GET /api/site/NAME` one site's whole state (lines, peers, paths, errors).
//! - `GET /api/history` the audit chain, newest first.
//! - `GET /api/segments` segments and what each may send to each other.
//! - `GET /api/drills`, `/drills/FILE` the drills' reports, when given a directory.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt as _;
use musubi_proto::v1 as pb;
use tokio::sync::watch;

pub mod tls;

use crate::fanout::Fanout;
use crate::store::{IntentStore, StoreError};

/// Why the dashboard could not be served.
#[derive(Debug, thiserror::Error)]
pub enum DashboardError {
    #[error(
        "the dashboard on {0}: not a loopback address, and this controller has no PKI for TLS (--insecure): serve it on a loopback address"
    )]
    NotLoopback(SocketAddr),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("the dashboard on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// One site on the map.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    pub site: String,
    pub tenant: String,
    /// `access-point` or `site`.
    pub role: &'static str,
    /// `east` or `west`.
    pub region: &'static str,
    /// `ok`, `degraded` (a peer down, errors, or not the configuration it
    /// should have), `down` (every peer down), `offline` (no stream open),
    /// `never` (never connected), `revoked`.
    pub state: &'static str,
    pub peers_up: usize,
    pub peers: usize,
    pub applied: u64,
    pub desired: u64,
}

/// Every site, and when.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub revision: u64,
    pub at_unix_ms: u64,
    pub rows: Vec<Row>,
}

/// Above this many sites, a page first receives only the access points and
/// the sites not ok (with every state's count); the rest on demand.
pub const SUMMARY_FIRST_ABOVE: usize = 400;

/// Sites by state.
pub fn counts(rows: &[Row]) -> std::collections::BTreeMap<&'static str, usize> {
    let mut out = std::collections::BTreeMap::new();
    for r in rows {
        *out.entry(r.state).or_insert(0) += 1;
    }
    out
}

/// What a page receives first: every row, or — above
/// [`SUMMARY_FIRST_ABOVE`] sites — the access points and the sites not ok,
/// with every state's count and the number of sites (`partial`).
pub fn opening(s: &Summary) -> serde_json::Value {
    let partial = s.rows.len() > SUMMARY_FIRST_ABOVE;
    let rows: Vec<&Row> = s.rows.iter().filter(|r| !partial || r.role == "access-point" || r.state != "ok").collect();
    serde_json::json!({
        "revision": s.revision,
        "at_unix_ms": s.at_unix_ms,
        "total": s.rows.len(),
        "partial": partial,
        "counts": counts(&s.rows),
        "rows": rows,
    })
}

/// A site's row from its state.
pub fn row(state: &pb::SiteState, tenant: &str, access_point: bool, region: &'static str) -> Row {
    let status = state.reported.as_ref().and_then(|r| r.status.as_ref());
    let peers = status.map_or(0, pb::Status::peers_total);
    let peers_up = status.map_or(0, pb::Status::peers_up);
    let applied = status.map_or(0, |s| s.applied_revision);
    let in_sync = status.is_some_and(|s| !state.desired_digest.is_empty() && s.applied_digest == state.desired_digest);
    let errors = status.is_some_and(|s| !s.errors.is_empty());
    let state_word = if state.revoked {
        "revoked"
    } else if state.reported.is_none() {
        "never"
    } else if !state.connected {
        "offline"
    } else if peers > 0 && peers_up == 0 {
        "down"
    } else if peers_up < peers || !in_sync || errors {
        "degraded"
    } else {
        "ok"
    };
    Row {
        site: state.site.clone(),
        tenant: tenant.to_string(),
        role: if access_point { "access-point" } else { "site" },
        region,
        state: state_word,
        peers_up,
        peers,
        applied,
        desired: state.desired_revision,
    }
}

/// Computes the summary from the store and the fan-out.
pub async fn summarise<S: IntentStore>(store: &S, fanout: &Fanout) -> Result<Summary, StoreError> {
    let facts: HashMap<String, (String, bool, &'static str)> = fanout
        .site_facts()
        .into_iter()
        .map(|(name, tenant, ap, region)| {
            let region = match region {
                musubi_core::intent::Region::East => "east",
                musubi_core::intent::Region::West => "west",
            };
            (name, (tenant, ap, region))
        })
        .collect();
    let states = crate::server::operator::site_states(store, fanout, None).await?;
    let rows = states
        .iter()
        .filter_map(|s| facts.get(&s.site).map(|(tenant, ap, region)| row(s, tenant, *ap, region)))
        .collect();
    Ok(Summary { revision: fanout.revision(), at_unix_ms: now_ms(), rows })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

struct Shared<S> {
    store: Arc<S>,
    fanout: Arc<Fanout>,
    summary: watch::Sender<Arc<Summary>>,
    reports: Option<PathBuf>,
}

/// Binds `addr` (a loopback address) and serves the dashboard until the
/// process ends; the address bound. The summary is recomputed every
/// `every` while a page listens for changes.
pub async fn serve<S: IntentStore + 'static>(
    addr: SocketAddr,
    tls: Option<&crate::pki::Paths>,
    store: Arc<S>,
    fanout: Arc<Fanout>,
    reports: Option<PathBuf>,
    every: Duration,
) -> Result<SocketAddr, DashboardError> {
    if tls.is_none() && !addr.ip().is_loopback() {
        return Err(DashboardError::NotLoopback(addr));
    }
    let tls = tls.map(tls::config).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| DashboardError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| DashboardError::Bind { addr, source })?;
    let (summary, _) = watch::channel(Arc::new(Summary::default()));
    // The dashboard shows every site: once operators are bound, only those
    // who may read everything (admins, auditors) are served it.
    let rights = fanout.clone();
    let reads_everything: tls::Allowed =
        Arc::new(move |name: &str| rights.rights(&format!("operator:{name}")).reads_everything());
    let shared = Arc::new(Shared { store, fanout, summary, reports });
    tokio::spawn(follow(shared.clone(), every));
    let app = axum::Router::new()
        .route("/", get(|| async { asset("text/html; charset=utf-8", include_str!("index.html")) }))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", include_str!("app.js")) }))
        .route("/app.css", get(|| async { asset("text/css; charset=utf-8", include_str!("app.css")) }))
        .route("/api/summary", get(summary_api::<S>))
        .route("/api/events", get(events::<S>))
        .route("/api/site/{name}", get(site::<S>))
        .route("/api/history", get(history::<S>))
        .route("/api/segments", get(segments::<S>))
        .route("/api/drills", get(drills::<S>))
        .route("/drills/{file}", get(drill_file::<S>))
        .with_state(shared);
    let over = if tls.is_some() { "TLS, operator certificates" } else { "plain text" };
    tokio::spawn(async move {
        let served = match tls {
            Some(config) => {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let listener = tls::Listener { tcp: listener, acceptor, allowed: reads_everything };
                axum::serve(listener, app).await
            }
            None => axum::serve(listener, app).await,
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the dashboard stopped");
        }
    });
    tracing::info!(%bound, over, "serving the dashboard");
    Ok(bound)
}

/// Recomputes the summary every `every` while a page listens, publishing it
/// when a row changed.
async fn follow<S: IntentStore + 'static>(shared: Arc<Shared<S>>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shared.summary.receiver_count() == 0 {
            continue;
        }
        match summarise(&*shared.store, &shared.fanout).await {
            Ok(s) => {
                shared.summary.send_if_modified(|old| {
                    let changed = old.rows != s.rows || old.revision != s.revision;
                    if changed {
                        *old = Arc::new(s);
                    }
                    changed
                });
            }
            Err(e) => tracing::warn!(error = %e, "the dashboard's summary"),
        }
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

fn json(value: &impl serde::Serialize) -> Response {
    match serde_json::to_string(value) {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn to_json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}

fn failed(e: impl std::fmt::Display) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
}

async fn summary_api<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>) -> Response {
    match summarise(&*shared.store, &shared.fanout).await {
        Ok(s) => json(&s),
        Err(e) => failed(e),
    }
}

/// `summary` with every row at once, then `changes` with the rows that
/// changed (by site), as the summary is recomputed.
async fn events<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>) -> Response {
    let first = match summarise(&*shared.store, &shared.fanout).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let rx = shared.summary.subscribe();
    let sent: HashMap<String, Row> = first.rows.iter().map(|r| (r.site.clone(), r.clone())).collect();
    let opening = Ok::<_, std::convert::Infallible>(Event::default().event("summary").data(to_json(&opening(&first))));
    let stream = futures::stream::once(async move { opening }).chain(futures::stream::unfold(
        (rx, sent),
        |(mut rx, mut sent)| async move {
            loop {
                rx.changed().await.ok()?;
                let now = rx.borrow_and_update().clone();
                let changed: Vec<&Row> = now.rows.iter().filter(|r| sent.get(&r.site) != Some(*r)).collect();
                if changed.is_empty() {
                    continue;
                }
                let event = Ok(Event::default().event("changes").data(to_json(&serde_json::json!({
                    "revision": now.revision,
                    "at_unix_ms": now.at_unix_ms,
                    "counts": counts(&now.rows),
                    "rows": changed,
                }))));
                for r in &now.rows {
                    sent.insert(r.site.clone(), r.clone());
                }
                return Some((event, (rx, sent)));
            }
        },
    ));
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

async fn site<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>, Path(name): Path<String>) -> Response {
    if !shared.fanout.sites().contains(&name) {
        return (StatusCode::NOT_FOUND, format!("site `{name}` is not in the intent")).into_response();
    }
    match crate::server::operator::site_states(&*shared.store, &shared.fanout, Some(&name)).await {
        Ok(rows) => json(&rows.first()),
        Err(e) => failed(e),
    }
}

async fn history<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>) -> Response {
    match shared.store.history().await {
        Ok(mut entries) => {
            entries.reverse();
            entries.truncate(200);
            json(&entries)
        }
        Err(e) => failed(e),
    }
}

/// Segments, and for each pair what the first may send to the second:
/// `all` within a segment, the policies' flows between two.
async fn segments<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>) -> Response {
    let value = shared.fanout.with_intent(|intent| {
        let names: Vec<&String> = intent.segments.keys().collect();
        let flows: Vec<serde_json::Value> = intent
            .policies
            .values()
            .map(|p| {
                let flow = musubi_core::verify::Flow {
                    protocol: p.protocol,
                    ports: p.ports.iter().map(|r| (r.first, r.last)).collect(),
                };
                serde_json::json!({ "policy": p.name, "from": p.from, "to": p.to, "flow": flow.to_string() })
            })
            .collect();
        serde_json::json!({ "segments": names, "policies": flows })
    });
    json(&value)
}

/// The drills' reports in the directory given: name, pass, worst outage.
async fn drills<S: IntentStore + 'static>(State(shared): State<Arc<Shared<S>>>) -> Response {
    let Some(dir) = &shared.reports else { return json(&Vec::<()>::new()) };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let Some(report) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        else {
            continue;
        };
        let worst = report["flows"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["outage_ms"].as_f64())
            .fold(0.0, f64::max);
        out.push(serde_json::json!({
            "drill": report["drill"],
            "pass": report["pass"],
            "worst_outage_ms": worst,
            "file": path.file_stem().and_then(|s| s.to_str()),
        }));
    }
    json(&out)
}

async fn drill_file<S: IntentStore + 'static>(
    State(shared): State<Arc<Shared<S>>>,
    Path(file): Path<String>,
) -> Response {
    let Some(dir) = &shared.reports else { return StatusCode::NOT_FOUND.into_response() };
    // A plain file name of a report, nothing else.
    let plain =
        file.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) && !file.starts_with('.');
    let kind = match file.rsplit_once('.').map(|(_, e)| e) {
        Some("svg") => "image/svg+xml",
        Some("json") => "application/json",
        Some("md") => "text/markdown; charset=utf-8",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    if !plain {
        return StatusCode::NOT_FOUND.into_response();
    }
    match std::fs::read(dir.join(&file)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, kind)], bytes).into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(connected: bool, peers: &[bool], applied: &str, desired: &str) -> pb::SiteState {
        pb::SiteState {
            site: "kita-hall".into(),
            connected,
            desired_digest: desired.into(),
            desired_revision: 7,
            reported: Some(pb::SiteStatus {
                site: "kita-hall".into(),
                status: Some(pb::Status {
                    applied_revision: 7,
                    applied_digest: applied.into(),
                    peers: peers.iter().map(|&up| pb::PeerHealth { up, ..Default::default() }).collect(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Above 400 sites a page first receives the access points and the
    /// sites not ok, and every state's count; below, every row.
    #[test]
    fn a_large_fleets_opening_holds_what_is_not_ok_and_every_count() {
        let mk = |site: String, role: &'static str, state: &'static str| Row {
            site,
            tenant: "t".into(),
            role,
            region: "east",
            state,
            peers_up: 0,
            peers: 0,
            applied: 1,
            desired: 1,
        };
        let mut rows: Vec<Row> =
            (0..500).map(|i| mk(format!("s{i}"), "site", if i % 100 == 0 { "down" } else { "ok" })).collect();
        rows.push(mk("ap-east".into(), "access-point", "ok"));
        let s = Summary { revision: 3, at_unix_ms: 0, rows };
        let o = opening(&s);
        assert_eq!(o["partial"], true);
        assert_eq!(o["total"], 501);
        assert_eq!(o["counts"]["ok"], 496);
        assert_eq!(o["counts"]["down"], 5);
        let sent: Vec<&str> = o["rows"].as_array().expect("rows").iter().filter_map(|r| r["site"].as_str()).collect();
        assert_eq!(sent, ["s0", "s100", "s200", "s300", "s400", "ap-east"]);
        let small = Summary { revision: 3, at_unix_ms: 0, rows: s.rows[..10].to_vec() };
        assert_eq!(opening(&small)["rows"].as_array().map(Vec::len), Some(10));
    }

    /// A site's colour on the map follows what its agent last reported.
    #[test]
    fn a_rows_state_follows_the_report() {
        let word = |s: &pb::SiteState| row(s, "city-kita", false, "east").state;
        assert_eq!(word(&state(true, &[true, true], "d", "d")), "ok");
        assert_eq!(word(&state(true, &[true, false], "d", "d")), "degraded");
        assert_eq!(word(&state(true, &[true, true], "old", "d")), "degraded", "not the configuration it should have");
        assert_eq!(word(&state(true, &[false, false], "d", "d")), "down");
        assert_eq!(word(&state(false, &[true, true], "d", "d")), "offline");
        assert_eq!(word(&pb::SiteState { site: "x".into(), ..Default::default() }), "never");
        let revoked = pb::SiteState { revoked: true, ..state(true, &[true], "d", "d") };
        assert_eq!(word(&revoked), "revoked");
        let r = row(&state(true, &[true, false, true], "d", "d"), "city-kita", true, "west");
        assert_eq!((r.peers_up, r.peers, r.role, r.region, r.applied, r.desired), (2, 3, "access-point", "west", 7, 7));
    }
}
