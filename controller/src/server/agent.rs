//! The `Agent` gRPC service: enrolment with one-time tokens, certificate
//! renewal, and the per-site Sync stream.
//!
//! Authorisation: the site a stream serves is the one in the client
//! certificate; a Hello naming another site is refused. A revoked site, or
//! one removed from the intent, has its stream ended by the fan-out (within
//! the store's notification delay) and is refused from then on.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use musubi_core::rotation;
use musubi_proto::v1 as pb;
use musubi_proto::wire::Outgoing;
use musubi_proto::wire::agent_server::Agent;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::fanout::{Delivery, Fanout, Feed};
use crate::pki::{self, Authority, Identity, now_ms};
use crate::sites::{self, TokenError};
use crate::store::IntentStore;

/// How the agent service runs.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    pub site_certificate_lifetime: Duration,
    pub keepalive: Duration,
    /// Time-to-live of an agent's presence record after its controller dies.
    pub presence_ttl: Duration,
    /// This replica's name in agents' status.
    pub controller: String,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            site_certificate_lifetime: Duration::from_secs(24 * 3600),
            keepalive: Duration::from_secs(15),
            presence_ttl: Duration::from_secs(10),
            controller: "controller".into(),
        }
    }
}

/// Each site's open stream on this replica: its number, and how to close it.
type OpenStreams = HashMap<String, (u64, tokio::sync::oneshot::Sender<()>)>;

#[derive(Debug)]
pub struct AgentService<S> {
    store: Arc<S>,
    fanout: Arc<Fanout>,
    /// `None` when serving without TLS (`--insecure`): no enrolment, and
    /// the Hello's site is believed.
    authority: Option<Arc<Authority>>,
    settings: AgentSettings,
    /// Becomes true when the controller shuts down: streams end so that
    /// agents move to another replica.
    stop: tokio::sync::watch::Receiver<bool>,
    /// The open stream of each site on this replica: a newer one closes it.
    open: Arc<std::sync::Mutex<OpenStreams>>,
    /// Join tokens are spent in batches, one audit entry each.
    redeemer: Arc<sites::Redeemer<S>>,
    /// New keys claimed, recorded and audited in batches.
    registrar: Arc<sites::Registrar<S>>,
}

// Not derived: that would ask `S: Clone`, and the store is shared behind an `Arc`.
impl<S> Clone for AgentService<S> {
    fn clone(&self) -> Self {
        AgentService {
            store: self.store.clone(),
            fanout: self.fanout.clone(),
            authority: self.authority.clone(),
            settings: self.settings.clone(),
            stop: self.stop.clone(),
            open: self.open.clone(),
            redeemer: self.redeemer.clone(),
            registrar: self.registrar.clone(),
        }
    }
}

impl<S: IntentStore + 'static> AgentService<S> {
    pub fn new(
        store: Arc<S>,
        fanout: Arc<Fanout>,
        authority: Option<Arc<Authority>>,
        settings: AgentSettings,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let redeemer = Arc::new(sites::Redeemer::new(store.clone()));
        let registrar = Arc::new(sites::Registrar::new(store.clone()));
        AgentService { store, fanout, authority, settings, stop, open: Arc::default(), redeemer, registrar }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(error = %e, "agent service failure");
    Status::unavailable(e.to_string())
}

/// The keys an agent reported, its next keys (a rotation's) among them
/// under their entries' names (`+next/<segment>`).
fn reported(keys: &[pb::InterfaceKey], next: &[pb::InterfaceKey]) -> Vec<pb::InterfaceKey> {
    let mut all = keys.to_vec();
    all.extend(next.iter().map(|k| pb::InterfaceKey { segment: rotation::next_entry(&k.segment), ..k.clone() }));
    all
}

/// A WireGuard public key: 32 bytes, base64.
fn valid_key(key: &str) -> bool {
    base64::engine::general_purpose::STANDARD.decode(key).is_ok_and(|b| b.len() == 32)
}

impl<S: IntentStore + 'static> AgentService<S> {
    /// The site a verified client certificate speaks for (`None` without TLS).
    fn site_of<T>(&self, request: &Request<T>) -> Result<Option<pki::Peer>, Status> {
        if self.authority.is_none() {
            return Ok(None);
        }
        let peer = request
            .peer_certs()
            .and_then(|certs| certs.first().and_then(|c| pki::peer(c)))
            .ok_or_else(|| Status::unauthenticated("a site certificate is required; enrol with a join token first"))?;
        match &peer.identity {
            Identity::Site(site) => {
                if let Some(r) = self.fanout.revocation(site)
                    && r.refuses(peer.issued_ms)
                {
                    tracing::warn!(site, "refused a revoked site certificate");
                    crate::metrics::get().refused("revoked");
                    return Err(Status::permission_denied(format!("the certificate of site `{site}` is revoked")));
                }
                Ok(Some(peer))
            }
            Identity::Operator(_) => Err(Status::permission_denied("an operator certificate cannot act as a site")),
        }
    }

    /// Stores the public keys an agent reported that are new, well-formed
    /// and for segments its site is attached to. Next keys (a rotation's,
    /// see [`reported`]) are taken only while the site's rotation prepares;
    /// while it switches, current keys are not taken (the rotation's end
    /// records the next keys as the site's), but current keys equal to every
    /// next key confirm the switch (`+switched`).
    async fn take_keys(&self, site: &str, keys: &[pb::InterfaceKey]) -> Result<(), Status> {
        let known = self.fanout.keys(site);
        let segments = self.fanout.segments(site);
        let under_way = rotation::site_rotation(&known);
        let phase = under_way.map(|r| r.phase);
        let mut switched = BTreeSet::new();
        let mut fresh = Vec::new();
        for k in keys {
            let (segment, next) = match k.segment.strip_prefix(rotation::NEXT) {
                Some(segment) => (segment, true),
                None => (k.segment.as_str(), false),
            };
            if !segments.contains(segment) {
                tracing::warn!(site, segment = %k.segment, "ignored a key for a segment the site is not attached to");
                continue;
            }
            if !valid_key(&k.public_key) {
                tracing::warn!(site, segment = %k.segment, "ignored a malformed WireGuard public key");
                continue;
            }
            if next && phase != Some(rotation::Phase::Prepare) {
                continue;
            }
            if !next && phase == Some(rotation::Phase::Switch) && known.contains_key(segment) {
                if known.get(&rotation::next_entry(segment)) == Some(&k.public_key) {
                    switched.insert(rotation::next_entry(segment));
                }
                continue;
            }
            if known.get(&k.segment) != Some(&k.public_key) {
                fresh.push((k.segment.clone(), k.public_key.clone()));
            }
        }
        // A key is one interface's: a site that reports another site's
        // would receive the traffic its peers encrypt for that one. Each key
        // is claimed once in the store; a revoked key's claim is the
        // revocation's.
        let now = now_ms();
        let switch = under_way.filter(|r| {
            r.phase == rotation::Phase::Switch
                && !switched.is_empty()
                && known.keys().filter(|e| e.starts_with(rotation::NEXT)).all(|e| switched.contains(e))
                && known.get(rotation::SWITCHED) != Some(&r.id.to_string())
        });
        // The site's entries to put beside its keys.
        let with_marks = |mut owned: Vec<(String, String)>| {
            if owned.iter().any(|(entry, _)| rotation::is_segment_key(entry)) {
                owned.push((rotation::SINCE.to_string(), now.to_string()));
            }
            if let Some(r) = switch {
                owned.push((rotation::SWITCHED.to_string(), r.id.to_string()));
            }
            owned
        };
        if let Some(r) = switch {
            tracing::info!(site, rotation = r.id, "the agent switched to its next keys");
        }
        // Usually every reported key is new: claimed, put and audited with
        // other agents' in one batched transaction.
        let marked = with_marks(fresh.clone());
        let puts = if !fresh.is_empty()
            && self.registrar.register(site, fresh.clone(), marked.clone(), now).await.map_err(internal)?
        {
            marked
        } else {
            // A key held already (or none new): each claimed on its own.
            let mut owned = Vec::with_capacity(fresh.len());
            let mut new = Vec::new();
            for (entry, key) in fresh {
                match sites::claim_key(&*self.store, &key, site, &entry).await.map_err(internal)? {
                    sites::Claim::New => {
                        new.push((entry.clone(), key.clone()));
                        owned.push((entry, key));
                    }
                    sites::Claim::Theirs => owned.push((entry, key)),
                    sites::Claim::Other(owner) => {
                        tracing::warn!(site, segment = %entry, owner = %owner,
                            "refused a WireGuard public key another site registered, or a revoked one");
                        crate::metrics::get().refused("duplicate_key");
                    }
                }
            }
            let puts = with_marks(owned);
            if !new.is_empty() {
                sites::keys_claimed(&*self.store, site, &new, now).await.map_err(internal)?;
            }
            if !puts.is_empty() {
                self.store.put_public_keys(site, &puts).await.map_err(internal)?;
            }
            puts
        };
        if !puts.is_empty() {
            let segments: Vec<&str> = puts.iter().map(|(s, _)| s.as_str()).collect();
            tracing::info!(site, segments = ?segments, "public keys recorded");
        }
        Ok(())
    }

    fn issue(&self, csr: &str, site: &str) -> Result<pb::EnrollResponse, Status> {
        let authority = self.authority.as_ref().ok_or_else(no_ca)?;
        let (certificate_pem, not_after_unix_ms) = authority
            .issue_site(csr, site, self.settings.site_certificate_lifetime)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(pb::EnrollResponse { certificate_pem, ca_pem: authority.ca_pem.clone(), not_after_unix_ms })
    }
}

/// `text` made printable in place, at most `max` bytes of it (untouched,
/// without a copy, when it already is).
fn fit(text: &mut String, max: usize) {
    if let std::borrow::Cow::Owned(clean) = musubi_core::words::printable(text, max) {
        *text = clean;
    }
}

/// What an agent reports, made fit for an operator's terminal and the
/// store: control characters escaped, every text field and the list of
/// errors bounded. An agent is trusted with its own site's figures, not
/// with what the operations centre's screens print.
fn tidy(mut status: pb::Status) -> pb::Status {
    const ERRORS: usize = 32;
    status.errors.truncate(ERRORS);
    for e in &mut status.errors {
        fit(e, 1024);
    }
    fit(&mut status.applied_digest, 128);
    for p in &mut status.peers {
        for text in [&mut p.segment, &mut p.peer, &mut p.path] {
            fit(text, 256);
        }
    }
    for a in &mut status.active {
        for text in [&mut a.segment, &mut a.route_group, &mut a.peer, &mut a.local_line] {
            fit(text, 256);
        }
    }
    status
}

/// Join tokens are a few dozen bytes; a certificate request's PEM under 2 KiB.
const MAX_TOKEN_BYTES: usize = 256;
const MAX_CSR_BYTES: usize = 8 * 1024;

fn no_ca() -> Status {
    Status::failed_precondition("this controller runs without a CA (--insecure): there is nothing to enrol with")
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<Outgoing, Status>> + Send>>;

/// What a session hands to its stream, turned into a message only as the
/// stream sends it. Kept to a pointer's size: tokio's channel allocates its
/// slots 32 at a time, and the controller holds a channel per site.
enum Out {
    Config(Arc<Delivery>),
    Keepalive,
    End(Box<Status>),
}

impl Out {
    fn end(status: Status) -> Out {
        Out::End(Box::new(status))
    }

    /// The message as the stream writes it: a configuration goes as the
    /// bytes the fan-out keeps (a member site's), or encoded once here (an
    /// access point's, kept as a structure), never decoded on the way.
    fn into_message(self) -> Result<Outgoing, Status> {
        match self {
            Out::Config(d) => {
                Ok(Outgoing::Config { revision: d.revision, digest: d.digest.clone(), config: d.encoded.clone() })
            }
            Out::Keepalive => Ok(Outgoing::Keepalive(pb::Keepalive { unix_ms: now_ms() })),
            Out::End(status) => Err(*status),
        }
    }
}

#[tonic::async_trait]
impl<S: IntentStore + 'static> Agent for AgentService<S> {
    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        if self.authority.is_none() {
            return Err(no_ca());
        }
        let req = request.into_inner();
        // Looked at before anything is looked up or logged: a name an intent
        // could hold, a token and a request of a few KiB.
        if !musubi_core::validate::object_name_ok(&req.site) {
            crate::metrics::get().refused("bad_request");
            tracing::warn!(site = %musubi_core::words::printable(&req.site, 64), "enrolment refused: not a site name");
            return Err(Status::invalid_argument("not a site name: lowercase letters, digits and dashes, at most 63"));
        }
        if req.token.len() > MAX_TOKEN_BYTES || req.csr_pem.len() > MAX_CSR_BYTES {
            crate::metrics::get().refused("bad_request");
            tracing::warn!(site = req.site, "enrolment refused: token or request too large");
            return Err(Status::invalid_argument(format!(
                "a join token is at most {MAX_TOKEN_BYTES} bytes and a certificate request at most {MAX_CSR_BYTES}"
            )));
        }
        let site = req.site.as_str();
        let refuse = |reason: &'static str, status: Status| {
            tracing::warn!(site, reason = %status.message(), "enrolment refused");
            crate::metrics::get().refused(reason);
            Err(status)
        };
        if self.fanout.subscribe(site).is_none() {
            return refuse("unknown_site", Status::not_found(format!("site `{site}` is not in the intent")));
        }
        if self.fanout.revocation(site).is_some_and(|r| r.active) {
            return refuse("revoked", Status::permission_denied(format!("site `{site}` is revoked")));
        }
        // The certificate is made before the token is spent: a request that
        // does not parse leaves the token as it was. It is given out only
        // once the token is spent.
        let response = self.issue(&req.csr_pem, site)?;
        match self.redeemer.redeem(&req.token, site, now_ms()).await {
            Ok(()) => {}
            Err(TokenError::Store(e)) => return Err(internal(e)),
            Err(e) => return refuse("bad_token", Status::permission_denied(e.to_string())),
        }
        crate::metrics::get().enrolments.inc();
        tracing::info!(site, not_after_ms = response.not_after_unix_ms, "site enrolled");
        Ok(Response::new(response))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let Some(peer) = self.site_of(&request)? else { return Err(no_ca()) };
        let Identity::Site(site) = peer.identity else { return Err(Status::permission_denied("not a site")) };
        if request.get_ref().csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument(format!("a certificate request is at most {MAX_CSR_BYTES} bytes")));
        }
        // A site removed from the intent gets no new certificate.
        if self.fanout.desired(&site).is_none() {
            tracing::warn!(site, "renewal refused: the site is no longer served");
            crate::metrics::get().refused("unknown_site");
            return Err(Status::permission_denied(format!("site `{site}` is no longer served")));
        }
        let response = self.issue(&request.get_ref().csr_pem, &site)?;
        tracing::info!(site, not_after_ms = response.not_after_unix_ms, "site certificate renewed");
        crate::metrics::get().renewals.inc();
        Ok(Response::new(response))
    }

    type SyncStream = SyncStream;

    async fn sync(&self, request: Request<Streaming<pb::AgentMessage>>) -> Result<Response<SyncStream>, Status> {
        let certified = self.site_of(&request)?.map(|p| match p.identity {
            Identity::Site(s) => s,
            Identity::Operator(o) => o,
        });
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within 10 s"))??;
        let Some(pb::AgentMessage { body: Some(pb::agent_message::Body::Hello(hello)) }) = first else {
            return Err(Status::invalid_argument("the stream must open with a Hello"));
        };
        if let Some(certified) = &certified
            && *certified != hello.site
        {
            tracing::warn!(certificate = %certified, hello = %hello.site, "refused a Hello naming another site");
            crate::metrics::get().refused("wrong_site");
            return Err(Status::permission_denied(format!(
                "this certificate is for site `{certified}`; it cannot speak for `{}`",
                hello.site
            )));
        }
        let site = hello.site.clone();
        let Some(feed) = self.fanout.subscribe(&site) else {
            tracing::warn!(site, "refused an agent for a site not in the intent");
            crate::metrics::get().refused("unknown_site");
            return Err(Status::not_found(format!("site `{site}` is not in the intent")));
        };
        if let Feed::Gone(reason) = &*feed.borrow() {
            tracing::warn!(site, reason, "refused an agent");
            crate::metrics::get().refused("removed");
            return Err(Status::permission_denied(reason.clone()));
        }
        // A store that refuses for a moment (overloaded while thousands of
        // agents reconnect) does not turn the agent away: its keys are
        // recorded again from the session, its presence asked again.
        let hello_keys = reported(&hello.keys, &hello.next_keys);
        let unrecorded = match self.take_keys(&site, &hello_keys).await {
            Ok(()) => Vec::new(),
            Err(e) if e.code() == tonic::Code::Internal => {
                tracing::warn!(site, error = %e.message(), "cannot record keys yet; trying again from the session");
                hello_keys
            }
            Err(e) => return Err(e),
        };
        let mut attempt = 1;
        let presence = loop {
            match self.store.announce(&site, self.settings.presence_ttl).await {
                Ok(p) => break p,
                Err(e) if attempt < ANNOUNCE_ATTEMPTS => {
                    tracing::debug!(site, attempt, error = %e, "presence not announced; again");
                    attempt += 1;
                    tokio::time::sleep(ANNOUNCE_PAUSE).await;
                }
                Err(e) => return Err(internal(e)),
            }
        };
        // One stream per site: the newest stays (an agent that reconnects
        // before its old stream timed out must not be locked out).
        let (replace, replaced) = tokio::sync::oneshot::channel();
        static STREAMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let stream = STREAMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((_, older)) =
            self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(site.clone(), (stream, replace))
        {
            let _ = older.send(());
        }
        let (tx, rx) = mpsc::channel(8);
        let mut hello = hello;
        for text in [&mut hello.agent_version, &mut hello.applied_digest] {
            fit(text, 128);
        }
        let session = Session {
            service: self.clone(),
            status: pb::SiteStatus {
                site: site.clone(),
                agent_version: hello.agent_version.clone(),
                controller: self.settings.controller.clone(),
                connected_unix_ms: now_ms(),
                last_seen_unix_ms: now_ms(),
                status: Some(pb::Status {
                    applied_revision: hello.applied_revision,
                    applied_digest: hello.applied_digest.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            },
            counted_in_sync: false,
            status_every: STATUS_EVERY,
            unrecorded,
        };
        tracing::info!(site, version = %hello.agent_version, applied = hello.applied_revision, "agent connected");
        tokio::spawn(session.run(inbound, feed, tx, presence, hello.applied_digest, (stream, replaced)));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Out::into_message))))
    }
}

/// Ends a stream with `status`, unless its agent has stopped reading for a
/// second (the stream is closed either way once the session drops `tx`).
async fn end(tx: &mpsc::Sender<Out>, status: Status) {
    let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), tx.send(Out::end(status)))).await;
}

/// The shortest time between two writes of one agent's status.
const STATUS_EVERY: Duration = Duration::from_millis(100);

/// Attempts at announcing an agent's presence before its stream is
/// refused, and the pause between them.
const ANNOUNCE_ATTEMPTS: u32 = 3;
const ANNOUNCE_PAUSE: Duration = Duration::from_millis(300);

/// How soon a status or keys the store refused are written again.
const STATUS_RETRY: Duration = Duration::from_secs(1);

/// The shortest time between two writes of a status record of `bytes`:
/// [`STATUS_EVERY`], and a second per megabyte — an access point's record
/// while thousands of its members enrol (each acknowledged configuration a
/// new record) is written at most about a megabyte a second.
fn status_every(bytes: usize) -> Duration {
    STATUS_EVERY.max(Duration::from_micros(bytes as u64))
}

struct Session<S> {
    service: AgentService<S>,
    status: pb::SiteStatus,
    /// Whether this session is counted in `agents_in_sync`.
    counted_in_sync: bool,
    /// The shortest time to the next status write (see [`status_every`]).
    status_every: Duration,
    /// Keys from the agent's hello that the store did not take yet.
    unrecorded: Vec<pb::InterfaceKey>,
}

impl<S: IntentStore + 'static> Session<S> {
    /// Counts this session's agent among those in sync while it is
    /// (`None`: the session ends).
    fn in_sync(&mut self, now: Option<bool>) {
        let now = now.unwrap_or(false);
        if now != self.counted_in_sync {
            let gauge = &crate::metrics::get().in_sync;
            if now {
                gauge.inc()
            } else {
                gauge.dec()
            };
            self.counted_in_sync = now;
        }
    }

    /// Audits a change of the mutual aids the site uses (an automatic
    /// activation happens on the site; this is where it becomes an entry).
    /// A failed write is logged: the site's status shows the aid either way.
    async fn audit_aids(&self, site: &str, before: Option<&[String]>, now: &[String]) {
        let intent = self.service.fanout.aid_intent();
        for summary in crate::aid::reported(&intent, site, before, now) {
            tracing::warn!(site, "{summary}");
            let event = crate::store::Event { time_ms: now_ms(), actor: format!("site:{site}"), summary };
            if let Err(e) = self.service.store.record(event, Vec::new()).await {
                tracing::warn!(site, error = %e, "cannot audit a mutual aid's use");
            }
        }
    }

    /// Stores the agent's status with what the site should have (from the
    /// site's own feed: the fan-out's lock may be held by a recompile).
    /// Records the keys the agent reported unless they were already (a
    /// failure is tried again with the next status write). Says whether
    /// they are recorded.
    async fn record_keys(
        &mut self,
        site: &str,
        reported: &[pb::InterfaceKey],
        taken: &mut Vec<pb::InterfaceKey>,
    ) -> bool {
        if reported == taken.as_slice() {
            return true;
        }
        // Boxed, as every store write the session awaits: the session's
        // own future (one per connected agent, held for the connection's
        // life) is as large as the largest thing it awaits — 12.9 KB before.
        match Box::pin(self.service.take_keys(site, reported)).await {
            Ok(()) => {
                taken.clear();
                taken.extend_from_slice(reported);
                true
            }
            Err(e) => {
                tracing::warn!(site, error = %e, "cannot record keys; trying again");
                false
            }
        }
    }

    /// Says whether it was written.
    async fn publish_status(
        &mut self,
        presence: &crate::store::presence::Presence,
        feed: &watch::Receiver<Feed>,
    ) -> bool {
        if let Feed::Config(d) = &*feed.borrow() {
            self.status.desired_revision = d.revision;
            self.status.desired_digest.clone_from(&d.digest);
        }
        self.status.last_seen_unix_ms = now_ms();
        let in_sync =
            self.status.status.as_ref().is_some_and(|s| {
                !self.status.desired_digest.is_empty() && s.applied_digest == self.status.desired_digest
            });
        self.in_sync(Some(in_sync));
        let record = sites::encode_status(&self.status);
        self.status_every = status_every(record.len());
        match Box::pin(presence.set(record)).await {
            Ok(()) => true,
            Err(e) => {
                // Kept and written again (the store may be overloaded for a
                // moment): a status written once per configuration that is
                // lost leaves the site shown as never connected.
                tracing::warn!(site = %self.status.site, error = %e, "cannot store agent status; trying again");
                self.status_every = self.status_every.max(STATUS_RETRY);
                false
            }
        }
    }

    async fn run(
        mut self,
        mut inbound: Streaming<pb::AgentMessage>,
        mut feed: tokio::sync::watch::Receiver<Feed>,
        tx: mpsc::Sender<Out>,
        presence: crate::store::presence::Presence,
        mut sent_digest: String,
        (stream, mut replaced): (u64, tokio::sync::oneshot::Receiver<()>),
    ) {
        use pb::agent_message::Body as In;
        let site = self.status.site.clone();
        let _session = crate::metrics::Held::new(&crate::metrics::get().sessions);
        let mut stop = self.service.stop.clone();
        let mut keepalive = tokio::time::interval(self.service.settings.keepalive);
        keepalive.tick().await;
        let mut unwritten = !self.publish_status(&presence, &feed).await;
        let mut sent = 0u64;
        let mut taken_keys: Vec<pb::InterfaceKey> = Vec::new();
        let mut reported_keys: Vec<pb::InterfaceKey> = std::mem::take(&mut self.unrecorded);
        unwritten |= !reported_keys.is_empty();
        // The newest configuration not yet handed to the stream. The
        // session keeps reading the agent while the stream is full (an
        // access point's agent may be sending its own large status at the
        // same moment), and a configuration overtaken by a newer one before
        // it left is never sent.
        let mut pending: Option<Arc<Delivery>>;
        // At most one status write per `status_every` for each agent: a report
        // arriving sooner is kept and written when the interval is up (the
        // newest one wins), so an agent that floods loses nothing but the
        // store and the replicas are spared.
        let mut published = tokio::time::Instant::now();
        loop {
            let current = feed.borrow_and_update().clone();
            match current {
                Feed::Gone(reason) => {
                    tracing::warn!(site, reason, "disconnecting agent");
                    end(&tx, Status::permission_denied(reason)).await;
                    break;
                }
                Feed::Config(d) => pending = (d.digest != sent_digest).then_some(d),
            }
            tokio::select! {
                permit = tx.reserve(), if pending.is_some() => {
                    let (Ok(permit), Some(d)) = (permit, pending.take()) else { break };
                    let metrics = crate::metrics::get();
                    metrics.configurations_sent.inc();
                    metrics.configuration_bytes.inc_by(d.encoded.len() as u64);
                    permit.send(Out::Config(d.clone()));
                    sent += 1;
                    tracing::debug!(site, revision = d.revision, digest = %d.digest, "configuration sent");
                    sent_digest = d.digest.clone();
                    // Written with the agent's acknowledgement, which comes
                    // within the interval: one write per change, not two.
                    if !unwritten && published.elapsed() >= self.status_every {
                        published = tokio::time::Instant::now();
                    }
                    unwritten = true;
                }
                _ = tokio::time::sleep_until(published + self.status_every), if unwritten => {
                    let keys = self.record_keys(&site, &reported_keys, &mut taken_keys).await;
                    unwritten = !self.publish_status(&presence, &feed).await || !keys;
                    published = tokio::time::Instant::now();
                    if !keys {
                        self.status_every = self.status_every.max(STATUS_RETRY);
                    }
                }
                changed = feed.changed() => if changed.is_err() {
                    end(&tx, Status::permission_denied(format!("site `{site}` is no longer served"))).await;
                    break;
                },
                message = inbound.message() => match message {
                    Ok(Some(pb::AgentMessage { body: Some(In::Status(status)) })) => {
                        // Keys the agent reported before, and that were taken, are not looked at again.
                        reported_keys = reported(&status.keys, &status.next_keys);
                        let keys = self.record_keys(&site, &reported_keys, &mut taken_keys).await;
                        let before = self.status.status.as_ref().map(|s| s.aids_in_use.clone());
                        if before.as_deref().unwrap_or(&[]) != status.aids_in_use.as_slice() {
                            Box::pin(self.audit_aids(&site, before.as_deref(), &status.aids_in_use)).await;
                        }
                        let mut status = tidy(status);
                        sites::condense(&mut status);
                        self.status.status = Some(status);
                        if published.elapsed() >= self.status_every {
                            unwritten = !self.publish_status(&presence, &feed).await || !keys;
                            published = tokio::time::Instant::now();
                            if !keys {
                                self.status_every = self.status_every.max(STATUS_RETRY);
                            }
                        } else {
                            if unwritten {
                                crate::metrics::get().statuses_coalesced.inc();
                            }
                            unwritten = true;
                        }
                    }
                    Ok(Some(_)) => {} // a second Hello or an unknown message: ignored
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(site, error = %e, "agent stream broke");
                        break;
                    }
                },
                _ = keepalive.tick() => {
                    // A full stream is traffic enough.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(Out::Keepalive) {
                        break;
                    }
                }
                _ = tx.closed() => break,
                _ = &mut replaced => {
                    tracing::warn!(site, "another agent of this site connected; closing the older stream");
                    end(&tx, Status::already_exists(format!(
                        "another agent of site `{site}` connected; this stream is closed"
                    ))).await;
                    break;
                }
                _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
                    end(&tx, Status::unavailable("the controller is shutting down")).await;
                    break;
                }
            }
        }
        self.status.last_seen_unix_ms = now_ms();
        let status = sites::encode_status(&self.status);
        if let Err(e) = Box::pin(sites::record_seen(&*self.service.store, &site, &status)).await {
            tracing::warn!(site, error = %e, "cannot record last status");
        }
        drop(presence);
        self.in_sync(None);
        {
            let mut open = self.service.open.lock().unwrap_or_else(|p| p.into_inner());
            if open.get(&site).is_some_and(|(s, _)| *s == stream) {
                open.remove(&site);
            }
        }
        tracing::info!(site, configurations = sent, "agent disconnected");
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// A session's future lives as long as its agent's connection, one per
    /// connected agent: the store writes it awaits are boxed, so that it
    /// stays a few kilobytes: 12.9 KB with them inline (etcd's client calls
    /// are in the controller's store type), 3.3 KB boxed.
    #[tokio::test]
    async fn a_sessions_future_stays_small() {
        use tonic::codec::Codec;
        let dir = tempfile::tempdir().expect("tmp");
        // The controller's store type: either backend's futures are in it
        // (etcd's client calls are the large ones).
        let embedded = crate::store::embedded::Embedded::open(dir.path()).expect("store");
        let store = Arc::new(crate::store::any::AnyStore::Embedded(embedded));
        let fanout = Fanout::start(store.clone()).await.expect("fan-out");
        let (_stop, stop) = watch::channel(false);
        let service = AgentService::new(store.clone(), fanout, None, AgentSettings::default(), stop);
        let session = Session {
            service,
            status: pb::SiteStatus::default(),
            counted_in_sync: false,
            status_every: STATUS_EVERY,
            unrecorded: Vec::new(),
        };
        let decoder = musubi_proto::codec::Lean::<pb::ControllerMessage, pb::AgentMessage>::default().decoder();
        let inbound = Streaming::new_request(decoder, tonic::body::Body::empty(), None, None);
        let (_feed, feed) = watch::channel(Feed::Gone(String::new()));
        let (tx, _rx) = mpsc::channel(8);
        let presence = store.announce("office-a", Duration::from_secs(10)).await.expect("presence");
        let (_replace, replaced) = tokio::sync::oneshot::channel();
        let run = session.run(inbound, feed, tx, presence, String::new(), (0, replaced));
        let size = std::mem::size_of_val(&run);
        eprintln!("a session's future: {size} bytes");
        assert!(size <= 6 * 1024, "a session's future is {size} bytes");
    }

    /// A small record may be written every 100 ms; a megabyte one (an
    /// access point's while its members enrol) once a second.
    #[test]
    fn large_status_records_are_written_less_often() {
        assert_eq!(status_every(300), STATUS_EVERY);
        assert_eq!(status_every(15_000), STATUS_EVERY);
        assert_eq!(status_every(1_500_000), Duration::from_millis(1_500));
    }

    fn delivery(encoded: prost::bytes::Bytes) -> Arc<Delivery> {
        Arc::new(Delivery { revision: 7, digest: "d".into(), encoded })
    }

    /// A kept configuration that does not decode ends the session with an
    /// error; it is never sent as an empty configuration, which an agent
    /// would apply by removing every tunnel.
    #[test]
    fn what_an_agent_reports_is_tidied_before_an_operator_sees_it() {
        let status = pb::Status {
            errors: (0..100).map(|i| format!("error {i}\u{1b}]0;owned\u{7}{}", "x".repeat(5000))).collect(),
            peers: vec![pb::PeerHealth { peer: "ap-east\r\u{1b}[2K".into(), ..Default::default() }],
            active: vec![pb::ActivePath { local_line: "\u{9b}31m".into(), ..Default::default() }],
            ..Default::default()
        };
        let tidy = tidy(status);
        assert_eq!(tidy.errors.len(), 32);
        assert!(tidy.errors.iter().all(|e| e.len() < 1100 && !e.chars().any(char::is_control)));
        assert!(tidy.errors[0].starts_with("error 0\\u{1b}]0;owned\\u{7}xxx"), "{}", &tidy.errors[0][..40]);
        assert_eq!(tidy.peers[0].peer, "ap-east\\u{d}\\u{1b}[2K");
        assert_eq!(tidy.active[0].local_line, "\\u{9b}31m");
    }

    /// What an agent decodes from a sent configuration, kept encoded or
    /// whole: the configuration with the delivery's revision. Bytes that
    /// do not decode are sent as they are and fail the agent's decoding;
    /// they never reach it as an empty configuration, which it would apply
    /// by removing every tunnel.
    #[test]
    fn a_configuration_is_sent_as_kept_with_its_revision() {
        let config = pb::SiteConfig { site: "office-a".into(), tenant: "t".into(), ..Default::default() };
        let out = Out::Config(delivery(config.encode_to_vec().into())).into_message().expect("a message");
        let read = pb::ControllerMessage::decode(out.encode_to_vec().as_slice()).expect("decodes");
        let Some(pb::controller_message::Body::Config(update)) = read.body else { panic!("no configuration") };
        let sent = update.config.expect("a configuration");
        assert_eq!((sent.site.as_str(), sent.revision, update.revision), ("office-a", 7, 7));
        assert_eq!(pb::SiteConfig { revision: 0, ..sent }, config);
        // A field 1 (string) whose length runs past the end.
        let broken = Out::Config(delivery(prost::bytes::Bytes::from_static(&[0x0a, 0x40, b'x'])));
        let out = broken.into_message().expect("sent as kept").encode_to_vec();
        assert!(pb::ControllerMessage::decode(out.as_slice()).is_err(), "an agent cannot read it");
    }
}
