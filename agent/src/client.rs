//! The agent's side of the protocol: enrolment, the Sync stream with
//! reconnection, applying configurations, reporting status, renewing the
//! site certificate.
//!
//! Headless by design: while no controller answers, the agent keeps the
//! datapath as it is (it never tears anything down for lack of a
//! controller) and tries the controllers in turn with jittered exponential
//! backoff. On reconnect its Hello names the configuration it has applied,
//! so an unchanged configuration is not sent again and nothing is rewritten.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use musubi_proto::v1 as pb;
use musubi_proto::v1::agent_client::AgentClient;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::datapath::{Datapath, Hops};
use crate::probe::{Health, Key};
use crate::reconcile::{Choices, build, choose, first_choices, path, probes_lines};
use crate::state::{StateDir, StateError, write_file};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// How much earlier than its issue a certificate's validity starts (the
/// controller allows for clocks that disagree a little).
const CLOCK_SLACK_MS: u64 = 60_000;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("not enrolled: give a join token (--token) and the controller's CA (--ca)")]
    NoToken,
    #[error("enrolment refused: {0}")]
    Refused(String),
    #[error("cannot reach any controller for enrolment: {0}")]
    Unreachable(String),
    #[error("certificate: {0}")]
    Certificate(String),
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub site: String,
    /// `host:port` or `https://host:port` (`http://` only with `insecure`).
    pub controllers: Vec<String>,
    pub state: StateDir,
    /// One-time join token, used when the state directory holds no certificate.
    pub token: Option<String>,
    /// The controller's CA, for enrolment.
    pub ca: Option<PathBuf>,
    /// Plain text, no certificates (a controller started with `--insecure`).
    pub insecure: bool,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A stream with no message for this long is given up (three keepalives).
    pub silence: Duration,
    /// How often the last applied configuration is reconciled again, with or
    /// without a controller, so what drifted (a `wireguard-go` that died, a
    /// route deleted by hand) is put back. `None`: only when a configuration
    /// arrives.
    pub upkeep: Option<Duration>,
    /// Probe every peer through its tunnel and report its health (the
    /// Linux datapath); without it every configured peer counts as up.
    pub probe: bool,
    /// How long a better candidate must have been up before route groups
    /// move back to it (no flapping).
    pub hold_down: Duration,
}

impl Settings {
    pub fn new(site: &str, controllers: Vec<String>, state: StateDir) -> Self {
        Settings {
            site: site.to_string(),
            controllers,
            state,
            token: None,
            ca: None,
            insecure: false,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            silence: Duration::from_secs(45),
            upkeep: None,
            probe: false,
            hold_down: Duration::from_secs(3),
        }
    }
}

/// Something an agent did, for the fleet simulator and tests.
#[derive(Debug, Clone)]
pub struct Applied {
    pub site: String,
    pub revision: u64,
    pub digest: String,
    pub writes: u64,
    pub at: Instant,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A controller's URL: as given if it has a scheme, else `https://` (`http://`
/// for a plain-text controller).
pub(crate) fn url(address: &str, insecure: bool) -> String {
    if address.contains("://") {
        address.to_string()
    } else if insecure {
        format!("http://{address}")
    } else {
        format!("https://{address}")
    }
}

/// Validity of a PEM certificate: (not before, not after), Unix ms.
fn validity(pem: &str) -> Result<(u64, u64), AgentError> {
    let bad = |e: &dyn std::fmt::Display| AgentError::Certificate(e.to_string());
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(&e))?;
    let cert = parsed.parse_x509().map_err(|e| bad(&e))?;
    let v = cert.validity();
    Ok(((v.not_before.timestamp().max(0) as u64) * 1000, (v.not_after.timestamp().max(0) as u64) * 1000))
}

fn csr(site: &str) -> Result<(String, String), AgentError> {
    let bad = |e: rcgen::Error| AgentError::Certificate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, site);
    let request = params.serialize_request(&key).map_err(bad)?.pem().map_err(bad)?;
    Ok((request, key.serialize_pem()))
}

fn save_certificate(state: &StateDir, response: &pb::EnrollResponse, key_pem: &str) -> Result<(), AgentError> {
    write_file(&state.cert_key(), key_pem.as_bytes(), true)?;
    write_file(&state.cert(), response.certificate_pem.as_bytes(), false)?;
    write_file(&state.ca(), response.ca_pem.as_bytes(), false)?;
    Ok(())
}

async fn channel(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| format!("`{url}` is not a controller address: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()))
}

/// Enrols with a join token if the state directory has no certificate.
pub async fn enrol(settings: &Settings) -> Result<(), AgentError> {
    if settings.insecure || settings.state.enrolled() {
        return Ok(());
    }
    let token = settings.token.clone().ok_or(AgentError::NoToken)?;
    let ca = settings.ca.as_ref().ok_or(AgentError::NoToken)?;
    let ca_pem = std::fs::read(ca).map_err(|e| AgentError::Certificate(format!("{}: {e}", ca.display())))?;
    let (request, key_pem) = csr(&settings.site)?;
    let mut last = String::from("no controller address");
    for address in &settings.controllers {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
        let channel = match channel(&url(address, false), Some(tls)).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{address}: {e}");
                continue;
            }
        };
        let req = pb::EnrollRequest { site: settings.site.clone(), token: token.clone(), csr_pem: request.clone() };
        match AgentClient::new(channel).enroll(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                save_certificate(&settings.state, &resp, &key_pem)?;
                tracing::info!(site = %settings.site, controller = %address, "enrolled");
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => last = format!("{address}: {}", s.message()),
            Err(s) => return Err(AgentError::Refused(s.message().to_string())),
        }
    }
    Err(AgentError::Unreachable(last))
}

/// One site's agent.
pub struct Agent {
    settings: Settings,
    datapath: Box<dyn Datapath>,
    applied: Option<pb::ConfigUpdate>,
    configs_received: u64,
    errors: Vec<String>,
    events: Option<mpsc::UnboundedSender<Applied>>,
    /// When the site certificate is due for renewal (Unix ms), read from it
    /// once rather than on every check.
    renew_at: Option<u64>,
    prober: Option<crate::probe::Prober>,
    /// How the outer packets of each underlay path leave (probing only).
    hops: Hops,
    /// What is built: each route group's active candidate and each picked
    /// peer's line.
    active: Choices,
}

/// How long a peer whose tunnel stopped answering keeps its route groups
/// while one of its lines still answers: the time for the line switch to
/// bring the tunnel back. After that it counts as down whatever its lines say.
const SWITCH_GRACE: Duration = Duration::from_secs(2);

/// How long an access point keeps a member site's prefixes on the site
/// after its tunnel stopped answering: the site picks its own lines, and
/// its first packet over a new one brings the tunnel back (WireGuard
/// follows it). Only a site gone for longer is sought over the interconnect.
const SITE_GRACE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("site", &self.settings.site).finish_non_exhaustive()
    }
}

enum End {
    /// The controller refused us (revoked, removed, wrong identity): wait long.
    Refused(String),
    /// The stream broke or could not be opened: try the next controller.
    Broken(String),
}

impl Agent {
    /// An agent that starts from the configuration it last applied, if any,
    /// and re-applies it (writing nothing when the datapath still matches).
    pub fn new(settings: Settings, datapath: Box<dyn Datapath>) -> Result<Self, AgentError> {
        let applied = settings.state.load_applied()?;
        let mut agent = Agent {
            settings,
            datapath,
            applied: None,
            configs_received: 0,
            errors: Vec::new(),
            events: None,
            renew_at: None,
            prober: None,
            hops: Default::default(),
            active: Default::default(),
        };
        if agent.settings.probe {
            agent.prober = Some(crate::probe::Prober::start());
        }
        if let Some(update) = applied {
            tracing::info!(site = %agent.settings.site, revision = update.revision, "restoring the last applied configuration");
            agent.apply(update);
        }
        Ok(agent)
    }

    pub fn with_events(mut self, events: mpsc::UnboundedSender<Applied>) -> Self {
        self.events = Some(events);
        self
    }

    pub fn writes(&self) -> u64 {
        self.datapath.writes()
    }

    /// Applies a configuration; on failure keeps the previous one and reports.
    fn apply(&mut self, update: pb::ConfigUpdate) -> Vec<pb::InterfaceKey> {
        let Some(config) = &update.config else { return Vec::new() };
        let mut new_keys = Vec::new();
        for seg in &config.segments {
            match self.settings.state.ensure_key(&seg.segment) {
                Ok((public_key, true)) => new_keys.push(pb::InterfaceKey {
                    segment: seg.segment.clone(),
                    interface: seg.wireguard.as_ref().map(|w| w.name.clone()).unwrap_or_default(),
                    public_key,
                }),
                Ok(_) => {}
                Err(e) => self.errors.push(e.to_string()),
            }
        }
        self.resolve(crate::probe::paths(config));
        let active = self.choices(config);
        let result = build(&mut *self.datapath, config, &self.settings.state, &active, &self.hops);
        match result {
            Ok(ops) => {
                tracing::info!(site = %self.settings.site, revision = update.revision, writes = ops.len(), "configuration applied");
                self.errors.clear();
                if let Err(e) = self.settings.state.save_applied(&update) {
                    self.errors.push(e.to_string());
                }
                if let Some(p) = &self.prober {
                    p.set_for(config, &self.hops);
                }
                self.active = active;
                if let Some(events) = &self.events {
                    let _ = events.send(Applied {
                        site: self.settings.site.clone(),
                        revision: update.revision,
                        digest: update.digest.clone(),
                        writes: self.datapath.writes(),
                        at: Instant::now(),
                    });
                }
                self.applied = Some(update);
            }
            Err(e) => {
                tracing::error!(site = %self.settings.site, revision = update.revision, error = %e, "configuration not applied");
                self.errors = vec![e.to_string()];
            }
        }
        new_keys
    }

    /// The configuration applied last.
    fn config(&self) -> Option<&pb::SiteConfig> {
        self.applied.as_ref().and_then(|a| a.config.as_ref())
    }

    /// Reconciles the last applied configuration again; true when something
    /// had drifted and was put back (or could not be).
    fn upkeep(&mut self) -> bool {
        let Some(config) = self.applied.as_ref().and_then(|a| a.config.as_ref()) else { return false };
        let active = self.choices(config);
        let mut moved: Vec<String> = active
            .groups
            .iter()
            .filter(|(k, v)| self.active.groups.get(*k) != Some(*v))
            .map(|((seg, group), peer)| format!("{seg}/{group} → {peer}"))
            .collect();
        moved.extend(
            active
                .paths
                .iter()
                .filter(|(k, v)| self.active.paths.get(*k) != Some(*v))
                .map(|(peer, (local, remote))| format!("{peer} over {local}→{remote}")),
        );
        let result = build(&mut *self.datapath, config, &self.settings.state, &active, &self.hops);
        if result.is_ok() {
            // What is built now, whether or not it took writes.
            self.active = active;
        }
        match result {
            Ok(ops) if ops.is_empty() => false,
            Ok(ops) if !moved.is_empty() => {
                tracing::warn!(site = %self.settings.site, operations = ops.len(), moved = %moved.join(", "), "traffic moved");
                true
            }
            Ok(ops) => {
                tracing::warn!(site = %self.settings.site, operations = ops.len(), "the datapath had drifted; put back");
                true
            }
            Err(e) => {
                tracing::error!(site = %self.settings.site, error = %e, "the datapath has drifted and cannot be put back");
                self.errors = vec![e.to_string()];
                true
            }
        }
    }

    /// Finds how each underlay path's outer packets would leave (probing
    /// only: without health there is nothing to choose between lines);
    /// true when that changed.
    fn resolve(&mut self, paths: Vec<(std::net::IpAddr, std::net::IpAddr)>) -> bool {
        if self.prober.is_none() {
            return false;
        }
        match self.datapath.hops(&paths) {
            Ok(h) if h != self.hops => {
                self.hops = h;
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::warn!(site = %self.settings.site, error = %e, "underlay paths not resolved");
                false
            }
        }
    }

    /// Resolves the paths again (every upkeep period): the operator's
    /// underlay routes may have changed under the agent.
    fn refresh_hops(&mut self) {
        let Some(paths) = self.config().map(crate::probe::paths) else { return };
        if self.resolve(paths) {
            tracing::info!(site = %self.settings.site, "the underlay routes changed; paths resolved again");
            if let (Some(p), Some(c)) = (&self.prober, self.config()) {
                p.set_for(c, &self.hops);
            }
        }
    }

    /// The route groups' candidates and the peers' paths, by health: a
    /// route group stays with a peer that is up (or not judged yet) and goes
    /// to a better one only after it has been up for the hold-down; a peer
    /// whose tunnel stopped answering keeps its groups for
    /// [`SWITCH_GRACE`] if one of its lines answered after the tunnel last
    /// did (the line switch is bringing it back), and as long after one of
    /// its lines came back. On an access point, a member site keeps its
    /// prefixes for [`SITE_GRACE`] after going quiet and gets them back as
    /// soon as it answers. A path is chosen the same way among the peer's
    /// endpoints, best line first; a path the router has no route for is
    /// used only when nothing else is.
    fn choices(&self, config: &pb::SiteConfig) -> Choices {
        let Some(prober) = &self.prober else { return first_choices(config, &self.hops) };
        let hold_down = self.settings.hold_down;
        let settled = |h: &Health, current: bool| current || h.since.is_none_or(|s| s.elapsed() >= hold_down);
        let path_key = |e: &pb::Endpoint| -> Option<Key> {
            let (local, remote) = path(config, e)?;
            self.hops.contains_key(&(local, remote)).then_some(Key::Path { local, remote })
        };
        // Whether a line to `peer` answered after its tunnel went quiet (more
        // than one tunnel probe after its last answer): the line under the
        // tunnel failed, not the peer, and a line switch is bringing the
        // tunnel back. (When the peer itself is gone, no line answers after
        // the tunnel went quiet, however slow its probes.) Gives when the
        // most recent such line came up.
        let line_outlived_tunnel = |peer: &str, tunnel: &Health| {
            config
                .segments
                .iter()
                .flat_map(|s| s.peers.iter().filter(|p| p.name == peer && probes_lines(p)))
                .flat_map(|p| &p.endpoints)
                .filter_map(path_key)
                .filter_map(|k| prober.get(&k))
                .filter(|h| {
                    // An answer within one tunnel probe of the tunnel's last
                    // one is not later: the peer may have died in between.
                    let after = tunnel.last_reply.map(|t| t + tunnel.interval);
                    h.up && h.last_reply.is_some_and(|l| after.is_none_or(|t| l > t))
                })
                .filter_map(|h| h.since)
                .max()
        };
        // The health of the path a peer is reached over, when the agent picks it.
        let active_path_health = |peer: &str, local: &str, remote: &str| {
            config
                .segments
                .iter()
                .flat_map(|s| s.peers.iter().filter(|p| p.name == peer))
                .flat_map(|p| &p.endpoints)
                .find(|e| e.local_line == local && e.remote_line == remote)
                .and_then(path_key)
                .and_then(|k| prober.get(&k))
        };
        let members: BTreeSet<&str> = config
            .segments
            .iter()
            .flat_map(|s| s.peers.iter().filter(|p| p.role() == pb::PeerRole::Site).map(|p| p.name.as_str()))
            .collect();
        let group_rank = |seg: &str, group: &str, peer: &str| {
            let current = self.active.groups.get(&(seg.to_string(), group.to_string())).is_some_and(|c| c == peer);
            let down_for = |h: &Health| h.since.map_or(Duration::MAX, |s| s.elapsed());
            match prober.get(&Key::tunnel(seg, peer)) {
                None => 0,
                // A member site is the only way in to itself: back at once.
                Some(h) if h.up && members.contains(peer) => 0,
                Some(h) if h.up => u8::from(!settled(&h, current)),
                // A member site that went quiet may be switching lines.
                Some(h) if members.contains(peer) => {
                    if current && down_for(&h) < SITE_GRACE {
                        0
                    } else {
                        2
                    }
                }
                Some(h) => {
                    // Only a line that failed is switched: while the path in
                    // use still answers, a quiet tunnel is the peer's own
                    // (its WireGuard died before the rest of it).
                    let path_failed = self
                        .active
                        .paths
                        .get(peer)
                        .and_then(|(l, r)| active_path_health(peer, l, r))
                        .is_none_or(|p| !p.up);
                    // The grace runs from the tunnel going quiet, or from a
                    // line coming back (a site whose lines all return).
                    let switching = path_failed
                        && line_outlived_tunnel(peer, &h)
                            .is_some_and(|line_up| down_for(&h) < SWITCH_GRACE || line_up.elapsed() < SWITCH_GRACE);
                    if switching && current { 0 } else { 2 }
                }
            }
        };
        let path_rank = |peer: &str, e: &pb::Endpoint| {
            let Some(key) = path_key(e) else { return 3 };
            let current = self.active.paths.get(peer).is_some_and(|(l, r)| *l == e.local_line && *r == e.remote_line);
            match prober.get(&key) {
                None => 0,
                Some(h) if h.up => u8::from(!settled(&h, current)),
                Some(_) => 2,
            }
        };
        choose(config, &group_rank, &path_rank)
    }

    /// The local line of a peer's active path (its first, if the agent does
    /// not pick it).
    fn local_line(&self, segment: &str, peer: &str) -> String {
        if let Some((local, _)) = self.active.paths.get(peer) {
            return local.clone();
        }
        self.config()
            .and_then(|c| c.segments.iter().find(|s| s.segment == segment))
            .and_then(|s| s.peers.iter().find(|p| p.name == peer))
            .and_then(|p| p.endpoints.first())
            .map(|e| e.local_line.clone())
            .unwrap_or_default()
    }

    /// The path a peer is reached over, `local→remote`, when the agent picks it.
    fn path_of(&self, peer: &str) -> String {
        self.active.paths.get(peer).map(|(l, r)| format!("{l}→{r}")).unwrap_or_default()
    }

    fn choices_changed(&self) -> bool {
        let Some(config) = self.config() else { return false };
        self.prober.is_some() && self.choices(config) != self.active
    }

    fn status(&self, keys: Vec<pb::InterfaceKey>) -> pb::AgentMessage {
        let (applied_revision, applied_digest) =
            self.applied.as_ref().map_or((0, String::new()), |a| (a.revision, a.digest.clone()));
        let peers = self
            .applied
            .as_ref()
            .and_then(|a| a.config.as_ref())
            .map(|c| {
                c.segments
                    .iter()
                    .flat_map(|s| {
                        s.peers.iter().map(|p| match &self.prober {
                            Some(prober) => {
                                let h = prober.get(&Key::tunnel(&s.segment, &p.name));
                                let judged = h.is_some();
                                let h = h.unwrap_or_default();
                                pb::PeerHealth {
                                    segment: s.segment.clone(),
                                    peer: p.name.clone(),
                                    up: h.up,
                                    rtt_us: h.rtt_us,
                                    loss_permille: h.loss_permille,
                                    path: self.path_of(&p.name),
                                    judged,
                                }
                            }
                            // Not probed: a configured peer counts as up.
                            None => pb::PeerHealth {
                                segment: s.segment.clone(),
                                peer: p.name.clone(),
                                up: true,
                                judged: true,
                                ..Default::default()
                            },
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::AgentMessage {
            body: Some(pb::agent_message::Body::Status(pb::Status {
                applied_revision,
                applied_digest,
                peers,
                active: self
                    .active
                    .groups
                    .iter()
                    .map(|((segment, group), peer)| pb::ActivePath {
                        segment: segment.clone(),
                        route_group: group.clone(),
                        peer: peer.clone(),
                        local_line: self.local_line(segment, peer),
                    })
                    .collect(),
                errors: self.errors.clone(),
                keys,
                at_unix_ms: now_ms(),
                configs_received: self.configs_received,
                datapath_writes: self.datapath.writes(),
            })),
        }
    }

    fn hello(&self) -> Result<pb::AgentMessage, AgentError> {
        let keys = self
            .settings
            .state
            .public_keys()?
            .into_iter()
            .map(|(segment, public_key)| pb::InterfaceKey { interface: format!("mw-{segment}"), segment, public_key })
            .collect();
        let (applied_revision, applied_digest) =
            self.applied.as_ref().map_or((0, String::new()), |a| (a.revision, a.digest.clone()));
        Ok(pb::AgentMessage {
            body: Some(pb::agent_message::Body::Hello(pb::Hello {
                site: self.settings.site.clone(),
                agent_version: VERSION.to_string(),
                keys,
                applied_revision,
                applied_digest,
            })),
        })
    }

    fn tls(&self) -> Result<Option<ClientTlsConfig>, AgentError> {
        if self.settings.insecure {
            return Ok(None);
        }
        let read = |p: PathBuf| std::fs::read(&p).map_err(|e| AgentError::Certificate(format!("{}: {e}", p.display())));
        let s = &self.settings.state;
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(s.ca())?))
                .identity(Identity::from_pem(read(s.cert())?, read(s.cert_key())?)),
        ))
    }

    /// Runs until the process ends: enrol if needed, then keep a stream to
    /// some controller open.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut attempt: u32 = 0;
        let mut next = 0usize;
        loop {
            if let Err(e) = enrol(&self.settings).await {
                match e {
                    AgentError::Unreachable(_) => {
                        tracing::warn!(site = %self.settings.site, error = %e, "enrolment failed; retrying")
                    }
                    other => return Err(other),
                }
            } else {
                let address = self.settings.controllers[next % self.settings.controllers.len().max(1)].clone();
                let started = Instant::now();
                match self.session(&address).await {
                    Ok(()) => {}
                    Err(End::Refused(reason)) => {
                        tracing::error!(site = %self.settings.site, controller = %address, reason, "refused by the controller");
                        attempt = attempt.max(16);
                    }
                    Err(End::Broken(reason)) => {
                        tracing::warn!(site = %self.settings.site, controller = %address, reason, "no stream; keeping the datapath as it is");
                    }
                }
                if started.elapsed() > Duration::from_secs(10) {
                    attempt = 0;
                }
                next += 1;
            }
            // Headless between attempts, but still upkeeping.
            let until = tokio::time::Instant::now() + self.backoff(attempt);
            let changed = self.prober.as_ref().map(|p| p.changed.clone());
            let mut last = tokio::time::Instant::now();
            while let Some(period) = self.settings.upkeep {
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                // Failover goes on without a controller.
                let step = if changed.is_some() { period.min(Duration::from_millis(500)) } else { period };
                tokio::select! {
                    _ = tokio::time::sleep(step.min(until - now)) => {
                        if tokio::time::Instant::now() < until && (self.choices_changed() || last.elapsed() >= period) {
                            if last.elapsed() >= period {
                                self.refresh_hops();
                            }
                            self.upkeep();
                            last = tokio::time::Instant::now();
                        }
                    }
                    _ = health_changed(&changed) => {
                        settle().await;
                        self.upkeep();
                    }
                }
            }
            tokio::time::sleep_until(until).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// `initial × 2^attempt`, at most `max`, times a random factor in [0.5, 1.5).
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.settings.backoff_initial.saturating_mul(1u32 << attempt.min(16)).min(self.settings.backoff_max);
        base.mul_f64(rand::rng().random_range(0.5..1.5))
    }

    async fn session(&mut self, address: &str) -> Result<(), End> {
        let broken = |e: &dyn std::fmt::Display| End::Broken(e.to_string());
        let tls = self.tls().map_err(|e| broken(&e))?;
        let channel = channel(&url(address, self.settings.insecure), tls).await.map_err(|e| broken(&e))?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(8);
        tx.send(self.hello().map_err(|e| broken(&e))?).await.map_err(|e| broken(&e))?;
        let mut inbound = match client.sync(ReceiverStream::new(rx)).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(ended(s)),
        };
        tracing::info!(site = %self.settings.site, controller = %address, "stream open");
        // Report where we stand (the controller may not send anything).
        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
        let renewal = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(renewal);
        let changed = self.prober.as_ref().map(|p| p.changed.clone());
        let mut upkeep = tokio::time::interval(self.settings.upkeep.unwrap_or(Duration::from_secs(3600)));
        upkeep.reset();
        let mut failback = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = upkeep.tick(), if self.settings.upkeep.is_some() => {
                    self.refresh_hops();
                    // With probing, also to refresh round-trip times and loss.
                    if self.upkeep() || self.prober.is_some() {
                        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                    }
                }
                _ = health_changed(&changed) => {
                    settle().await;
                    self.upkeep();
                    tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                }
                _ = failback.tick(), if self.prober.is_some() => {
                    if self.choices_changed() {
                        self.upkeep();
                        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                    }
                }
                message = tokio::time::timeout(self.settings.silence, inbound.message()) => {
                    let message = message.map_err(|_| End::Broken("the controller went silent".into()))?;
                    match message {
                        Ok(Some(pb::ControllerMessage { body: Some(pb::controller_message::Body::Config(update)) })) => {
                            self.configs_received += 1;
                            let keys = self.apply(update);
                            tx.send(self.status(keys)).await.map_err(|e| broken(&e))?;
                        }
                        Ok(Some(_)) => {} // keepalive, or a message this version does not know
                        Ok(None) => return Err(End::Broken("the controller closed the stream".into())),
                        Err(s) => return Err(ended(s)),
                    }
                }
                _ = &mut renewal => {
                    if let Err(e) = self.renew_if_due(&mut client).await {
                        tracing::warn!(site = %self.settings.site, error = %e, "certificate renewal failed; will retry");
                    }
                    renewal.as_mut().reset(tokio::time::Instant::now() + self.until_renewal());
                }
            }
        }
    }

    /// How long until the renewal is due: at most a minute (the wall clock
    /// may jump), a second while the due time is not known yet or a
    /// renewal failed.
    fn until_renewal(&self) -> Duration {
        let (soon, late) = (Duration::from_secs(1), Duration::from_secs(60));
        match self.renew_at {
            _ if self.settings.insecure => late,
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).clamp(soon, late),
            None => soon,
        }
    }

    /// Renews the site certificate once two thirds of its lifetime are gone.
    async fn renew_if_due(&mut self, client: &mut AgentClient<Channel>) -> Result<(), AgentError> {
        if self.settings.insecure {
            return Ok(());
        }
        let renew_at = match self.renew_at {
            Some(at) => at,
            None => {
                let pem = std::fs::read_to_string(self.settings.state.cert())
                    .map_err(|e| AgentError::Certificate(e.to_string()))?;
                let (from, until) = validity(&pem)?;
                // Certificates start a minute early for clock skew; count from issue.
                let issued = (from + CLOCK_SLACK_MS).min(until);
                *self.renew_at.insert(issued + (until - issued) * 2 / 3)
            }
        };
        if now_ms() < renew_at {
            return Ok(());
        }
        let (request, key_pem) = csr(&self.settings.site)?;
        let resp = client
            .renew(pb::RenewRequest { csr_pem: request })
            .await
            .map_err(|s| AgentError::Refused(s.message().to_string()))?
            .into_inner();
        save_certificate(&self.settings.state, &resp, &key_pem)?;
        self.renew_at = None;
        tracing::info!(site = %self.settings.site, not_after_ms = resp.not_after_unix_ms, "site certificate renewed");
        Ok(())
    }
}

/// A moment for the flips that come together (a line's tunnels, every peer
/// behind it) to be seen together before choosing.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A peer went up or down (never, without probing).
async fn health_changed(changed: &Option<std::sync::Arc<tokio::sync::Notify>>) {
    match changed {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

fn ended(s: tonic::Status) -> End {
    match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists => End::Refused(s.message().to_string()),
        _ => End::Broken(format!("{:?}: {}", s.code(), s.message())),
    }
}
