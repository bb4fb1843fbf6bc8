//! Fan-out: every site's desired configuration, kept current from the store
//! and handed to the agent streams as a per-site watch.
//!
//! Each controller replica runs one. It compiles everything once at start,
//! then follows the store: an intent revision is replayed from its change
//! records and recompiled incrementally; a new public key splices one peer
//! into the access points that need it; a revocation or a removed site ends
//! that site's feed. A site whose configuration did not change is not
//! touched, and a configuration equal (by digest) to the one already on the
//! feed is never published again.
//!
//! Peers whose public key is not known yet are delivered without one (an
//! agent builds nothing towards them); their tunnels come when the key
//! arrives.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use musubi_proto::v1::{self as pb, SiteConfig};
use prost::Message;
use prost::bytes::Bytes;
use tokio::sync::watch;

use crate::sites::{Revocation, revocations};
use crate::store::apply::BeforeCommit;
use crate::store::layout::{self, Stored};
use crate::store::watch::Revision;
use crate::store::{IntentStore, StoreError};
use musubi_core::compile::{CompileError, PublicKeys, compile, incremental};

/// How long the fan-out waits after a key or revocation change before
/// reading them, so that many agents enrolling at once cost one recompile.
const SETTLE: Duration = Duration::from_millis(250);

/// The longest pause between two reloads of keys and revocations (see
/// [`next_reload`]).
const RELOAD_GAP_MAX: Duration = Duration::from_secs(2);

/// A reload that republished more than this (an access point of some 7,000
/// peers, or several smaller ones) keeps the next one [`RELOAD_GAP_MAX`]
/// away, however quickly it ran.
const REPUBLISHED_LARGE: usize = 1 << 20;

/// How long access points' compiled structures are kept after the last
/// change that reached them; then only their encoding is, and a change
/// that splices a member into one decodes it back first (see
/// [`Fanout::freeze_idle`]). At 10,000 sites the ten access points'
/// structures are 57 MB of the controller's heap, their encodings 21 MB;
/// decoding one back costs a change about 10 ms, once after a quiet minute.
pub const FREEZE_AFTER: Duration = Duration::from_secs(60);

/// How often the fan-out looks for access points to set aside.
const FREEZE_CHECK: Duration = Duration::from_secs(10);

/// The last reload of keys and revocations: when it started, how long it
/// took, and how many bytes of configurations it republished.
#[derive(Debug, Clone, Copy)]
pub struct Reloaded {
    pub started: Instant,
    pub took: Duration,
    pub republished: usize,
}

/// When the fan-out reads keys and revocations again after a change seen
/// at `now`: [`SETTLE`] after the change, and no sooner than four times
/// the last reload's cost after it started (at most [`RELOAD_GAP_MAX`]). A
/// reload reads every key and republishes the access points that changed
/// (ten of 10,000 peers at 10,000 sites: a hundred milliseconds or more);
/// while thousands of agents enrol it is kept to a quarter of the time
/// instead of running back to back. Its cost is also downstream: every
/// access point it republishes is sent whole to its agent, which applies
/// it again — after a reload that republished a megabyte or more the next
/// waits the whole gap (counting the reload alone, reloads made cheaper
/// ran more often and cost the agents more than they saved: 33 reloads
/// while 10,000 agents enrolled became 54, and the simulated agents' CPU
/// rose by a fifth). In a small deployment a reload costs milliseconds,
/// republishes kilobytes, and only the settle counts.
pub fn next_reload(now: Instant, last: Option<Reloaded>) -> Instant {
    let settled = now + SETTLE;
    match last {
        Some(Reloaded { republished, started, .. }) if republished >= REPUBLISHED_LARGE => {
            settled.max(started + RELOAD_GAP_MAX)
        }
        Some(Reloaded { started, took, .. }) => settled.max(started + (took * 4).min(RELOAD_GAP_MAX)),
        None => settled,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FanoutError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Undecodable(#[from] Undecodable),
}

/// A configuration ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The intent revision at which this configuration last changed.
    pub revision: u64,
    /// SHA-256 (hex) of the encoded configuration without its revision.
    pub digest: String,
    /// The configuration encoded, without its revision: encoded once, when
    /// it is published (the digest is of these bytes), and sent as it is.
    /// Not the structure: an access point's (10,000 peers) is patched in
    /// place by every member change, which a structure shared with the
    /// agents' sessions would turn into a copy each time; and a member
    /// site's encoded is a tenth of its structure's memory, 10,000 times.
    pub encoded: Bytes,
}

/// A kept configuration that no longer decodes. Never sent as an empty
/// configuration in its place: an agent that applied one would remove every
/// tunnel of its site.
#[derive(Debug, thiserror::Error)]
#[error("the configuration kept for revision {revision} does not decode")]
pub struct Undecodable {
    pub revision: u64,
    #[source]
    pub source: prost::DecodeError,
}

impl Delivery {
    pub fn to_pb(&self) -> Result<pb::ConfigUpdate, Undecodable> {
        let config = SiteConfig { revision: self.revision, ..self.decoded()? };
        Ok(pb::ConfigUpdate { revision: self.revision, digest: self.digest.clone(), config: Some(config) })
    }

    /// The configuration, decoded. Encoded by this process from a valid
    /// structure; should it not decode, the caller refuses to use it (a
    /// session ends with an error and the agent keeps what it has).
    pub fn decoded(&self) -> Result<SiteConfig, Undecodable> {
        SiteConfig::decode(self.encoded.clone()).map_err(|source| Undecodable { revision: self.revision, source })
    }
}

/// What a site's agent should have now.
#[derive(Debug, Clone, PartialEq)]
pub enum Feed {
    Config(Arc<Delivery>),
    /// The site may not be served any more (revoked, or removed from the intent).
    Gone(String),
}

/// The configuration an agent is sent: the compiled one without its
/// revision. Peers whose key is not known yet are in it (an agent builds
/// no tunnel, probe or route to them — the protocol's rule — but an access
/// point keeps answering the underlay probes of their lines: a member
/// whose keys were revoked, and that is making fresh ones, keeps its lines
/// meanwhile, instead of moving off every line and fencing the one its
/// access points then reach it on).
pub fn deliverable(raw: &SiteConfig) -> SiteConfig {
    SiteConfig { revision: 0, ..raw.clone() }
}

pub fn digest(config: &SiteConfig) -> String {
    digest_of(&config.encode_to_vec())
}

fn digest_of(encoded: &[u8]) -> String {
    musubi_core::audit::sha256_hex(encoded)
}

#[derive(Debug)]
struct State {
    stored: Stored,
    /// Compiled configurations the incremental compiler works on: every
    /// access point, and member sites only from their recompilation until
    /// they are published (then they move to `packed`). A member missing
    /// here is compiled afresh when a change reaches it, and found equal
    /// (by digest) to its feed if nothing changed for it.
    raw: BTreeMap<String, Arc<SiteConfig>>,
    /// Member sites' compiled configurations, encoded, keyless peers and all.
    packed: HashMap<String, Bytes>,
    feeds: HashMap<String, watch::Sender<Feed>>,
    revoked: BTreeMap<String, Revocation>,
    /// `stored.keys`, shared with this replica's applies, and how many times
    /// they changed.
    keys: Keys,
    /// Configurations this replica's apply compiled for a revision.
    primed: Option<Primed>,
    /// Access points no change reached for [`FREEZE_AFTER`]: only their
    /// encoding is kept, in `packed` (the bytes their agents are sent),
    /// until a change that splices a member into one decodes it back into
    /// `raw` ([`Thawing`]).
    frozen: BTreeSet<String>,
    /// When a change last reached `raw` (a revision followed, keys taken).
    changed_at: Instant,
}

/// An apply's compiled configurations on their way to the fan-out.
#[derive(Debug)]
pub struct Priming<'a> {
    fanout: &'a Fanout,
    keys_generation: u64,
}

impl BeforeCommit for Priming<'_> {
    fn compiled(
        &self,
        revision: u64,
        intent: &musubi_core::intent::Intent,
        allocations: &musubi_core::allocate::Allocations,
        configs: BTreeMap<String, SiteConfig>,
    ) {
        self.fanout.prime(Primed {
            revision,
            keys_generation: self.keys_generation,
            intent: intent.clone(),
            allocations: allocations.clone(),
            configs,
        });
    }

    fn held(&self, revision: u64, sites: &[&str]) -> Option<BTreeMap<String, SiteConfig>> {
        self.fanout.held(revision, self.keys_generation, sites)
    }
}

/// The agents' public keys as the fan-out holds them, at a generation
/// that moves whenever they change.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    pub generation: u64,
    pub keys: Arc<PublicKeys>,
}

/// What an apply compiled for the revision it wrote: used by the fan-out
/// when it follows that revision, if it finds the same intent, allocations
/// and keys there; otherwise it compiles as usual.
#[derive(Debug)]
pub struct Primed {
    pub revision: u64,
    pub keys_generation: u64,
    pub intent: musubi_core::intent::Intent,
    pub allocations: musubi_core::allocate::Allocations,
    pub configs: BTreeMap<String, SiteConfig>,
}

impl State {
    /// What a site's agent gets, encoded, with its digest; a member site's
    /// compiled configuration moves from `raw` to `packed` on the way.
    fn deliverable(&mut self, site: &str) -> Option<(String, Bytes)> {
        let member = self.stored.intent.sites.get(site).is_some_and(|s| !s.is_access_point());
        // A member's as its kept bytes (encoded once, when it leaves `raw`,
        // and never decoded here); an access point's encoded from the
        // structure its members' changes patch.
        let bytes = if member {
            if let Some(raw) = self.raw.remove(site) {
                self.packed.insert(site.to_string(), Bytes::from(raw.encode_to_vec()));
            }
            self.packed.get(site)?.clone()
        } else {
            match self.raw.get(site) {
                Some(raw) => {
                    self.packed.remove(site);
                    self.frozen.remove(site);
                    Bytes::from(raw.encode_to_vec())
                }
                // A member that became an access point, not recompiled yet.
                None => self.packed.get(site)?.clone(),
            }
        };
        Some((digest_of(&bytes), bytes))
    }

    /// Sets aside the structures of the access points if no change reached
    /// them since [`FREEZE_AFTER`] before `now`, keeping their encoding
    /// (shared with their delivery when it is the same); returns them.
    fn freeze_idle(&mut self, now: Instant) -> Vec<Arc<SiteConfig>> {
        if now.saturating_duration_since(self.changed_at) < FREEZE_AFTER {
            return Vec::new();
        }
        let aps: Vec<String> = self
            .raw
            .keys()
            .filter(|n| self.stored.intent.sites.get(*n).is_some_and(|s| s.is_access_point()))
            .cloned()
            .collect();
        let mut set_aside = Vec::with_capacity(aps.len());
        for name in aps {
            let Some(config) = self.raw.remove(&name) else { continue };
            let encoded = config.encode_to_vec();
            let digest = digest_of(&encoded);
            let bytes = match self.feeds.get(&name).map(|f| f.borrow().clone()) {
                Some(Feed::Config(d)) if d.digest == digest => d.encoded.clone(),
                _ => Bytes::from(encoded),
            };
            self.packed.insert(name.clone(), bytes);
            self.frozen.insert(name);
            set_aside.push(config);
        }
        set_aside
    }

    /// Puts the site's current configuration (or its refusal) on its feed,
    /// unless the feed already carries the same thing.
    fn publish(&mut self, site: &str) -> bool {
        let feed = if self.revoked.get(site).is_some_and(|r| r.active) {
            Feed::Gone(format!("site `{site}` is revoked"))
        } else if let Some((digest, encoded)) = self.deliverable(site) {
            if let Some(Feed::Config(d)) = self.feeds.get(site).map(|f| f.borrow().clone())
                && d.digest == digest
            {
                return false;
            }
            Feed::Config(Arc::new(Delivery { revision: self.stored.revision, digest, encoded }))
        } else {
            Feed::Gone(format!("site `{site}` is not in the intent"))
        };
        match self.feeds.get(site) {
            Some(tx) => tx.send_if_modified(|f| {
                let changed = *f != feed;
                *f = feed.clone();
                changed
            }),
            None => {
                self.feeds.insert(site.to_string(), watch::Sender::new(feed));
                true
            }
        }
    }
}

/// Decodes the access points set aside ([`Fanout::freeze_idle`]) that a
/// change splices a member into, and only those: a one-site change after a
/// quiet minute decodes its two access points, not every one.
struct Thawing<'a> {
    frozen: &'a mut BTreeSet<String>,
    packed: &'a HashMap<String, Bytes>,
    revision: u64,
    /// A kept encoding that did not decode (its access point was left as
    /// it was, and the change is not followed).
    failed: Option<Undecodable>,
}

impl Thawing<'_> {
    fn load(&mut self, name: &str) -> Option<SiteConfig> {
        if !self.frozen.remove(name) {
            return None;
        }
        match SiteConfig::decode(self.packed.get(name)?.clone()) {
            Ok(config) => Some(config),
            Err(source) => {
                self.failed = Some(Undecodable { revision: self.revision, source });
                None
            }
        }
    }

    fn done(self) -> Result<(), Undecodable> {
        self.failed.map_or(Ok(()), Err)
    }
}

/// The fan-out of one controller replica.
#[derive(Debug)]
pub struct Fanout {
    state: Mutex<State>,
    /// Configurations published since start (each one is sent to at most one agent).
    published: std::sync::atomic::AtomicU64,
}

impl Fanout {
    /// Compiles every site from the store's current state and follows the
    /// store from there until the returned handle is dropped.
    pub async fn start<S: IntentStore + 'static>(store: Arc<S>) -> Result<Arc<Fanout>, FanoutError> {
        let mut sites_changed = store.subscribe_sites().await?;
        let stored = store.load().await?;
        let revoked = revocations(&*store).await?;
        let raw = compile(&stored.intent, &stored.allocations, &stored.keys)?
            .into_iter()
            .map(|(k, v)| (k, Arc::new(v)))
            .collect();
        let from = stored.revision;
        let keys = Keys { generation: 0, keys: Arc::new(stored.keys.clone()) };
        let mut state = State {
            stored,
            raw,
            packed: HashMap::new(),
            feeds: HashMap::new(),
            revoked,
            keys,
            primed: None,
            frozen: BTreeSet::new(),
            changed_at: Instant::now(),
        };
        let names: Vec<String> = state.raw.keys().cloned().collect();
        for site in names {
            state.publish(&site);
        }
        let fanout = Arc::new(Fanout { state: Mutex::new(state), published: 0.into() });
        let mut revisions = crate::store::watch::watch(store.clone(), from).await?;
        let weak = Arc::downgrade(&fanout);
        tokio::spawn(async move {
            let mut last_reload: Option<Reloaded> = None;
            let mut freeze = tokio::time::interval(FREEZE_CHECK);
            freeze.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = freeze.tick() => {
                        let Some(f) = weak.upgrade() else { return };
                        // Encoding and hashing ten large configurations: off
                        // the threads that serve the agents' streams.
                        let _ = tokio::task::spawn_blocking(move || f.freeze_idle(Instant::now())).await;
                    }
                    r = revisions.recv() => match r {
                        Some(Ok(rev)) => {
                            let Some(f) = weak.upgrade() else { return };
                            // A change of settings recompiles every site (most
                            // of a second at 10,000): off the threads that
                            // serve the agents' streams.
                            let followed = tokio::task::spawn_blocking(move || {
                                f.apply_revision(&rev).map_err(|e| (rev.revision, e))
                            });
                            match followed.await {
                                Ok(Ok(())) => {}
                                Ok(Err((revision, e))) => {
                                    tracing::error!(revision, error = %e, "cannot follow the intent");
                                }
                                Err(e) => tracing::error!(error = %e, "following the intent failed"),
                            }
                        }
                        Some(Err(e)) => {
                            // Keep serving what we have, and follow again from where we are.
                            tracing::error!(error = %e, "the intent watch failed; following again");
                            loop {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                let Some(at) = weak.upgrade().map(|f| f.revision()) else { return };
                                match crate::store::watch::watch(store.clone(), at).await {
                                    Ok(again) => {
                                        revisions = again;
                                        break;
                                    }
                                    Err(e) => tracing::error!(error = %e, "cannot watch the intent; retrying"),
                                }
                            }
                        }
                        None => return,
                    },
                    changed = sites_changed.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Let a burst of enrolments land, then read them all at once.
                        tokio::time::sleep_until(next_reload(Instant::now(), last_reload).into()).await;
                        sites_changed.borrow_and_update();
                        let Some(f) = weak.upgrade() else { return };
                        let started = Instant::now();
                        let republished = match f.reload_sites(&*store).await {
                            Ok(bytes) => bytes,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read public keys and revocations");
                                0
                            }
                        };
                        last_reload = Some(Reloaded { started, took: started.elapsed(), republished });
                    }
                }
            }
        });
        Ok(fanout)
    }

    /// What `actor` may do under the bindings of the intent followed last.
    pub fn rights(&self, actor: &str) -> musubi_core::access::Rights {
        musubi_core::access::rights(&self.lock().stored.intent, actor)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, n: usize) {
        self.published.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Replays one revision and republishes the sites it changed.
    pub fn apply_revision(&self, rev: &Revision) -> Result<(), FanoutError> {
        let started = Instant::now();
        let mut state = self.lock();
        if rev.revision <= state.stored.revision {
            return Ok(());
        }
        state.changed_at = started;
        let old = state.stored.intent.clone();
        for c in &rev.changes {
            layout::set_state_key(&mut state.stored, &c.key, c.current.as_deref().map(str::as_bytes))?;
        }
        state.stored.revision = rev.revision;
        let primed = state.primed.take().filter(|p| {
            p.revision == rev.revision
                && p.keys_generation == state.keys.generation
                && p.allocations == state.stored.allocations
                && p.intent == state.stored.intent
        });
        // The apply's intent, equal to the one just read back from the
        // store, is kept instead of it: its sites are shared with the
        // intent the operator service keeps for the next merge, not held
        // twice (11.5 MB at 10,000 sites).
        let mut read_back = None;
        let compiled = primed.map(|p| {
            read_back = Some(std::mem::replace(&mut state.stored.intent, p.intent));
            p.configs
        });
        let changed = {
            let State { stored, raw, packed, frozen, .. } = &mut *state;
            let mut thawing = Thawing { frozen, packed, revision: stored.revision, failed: None };
            let changed = incremental::recompile_with(
                &old,
                &stored.intent,
                &stored.allocations,
                &stored.keys,
                raw,
                compiled,
                &mut |name| thawing.load(name),
            )?;
            thawing.done()?;
            changed
        };
        let mut sent = 0;
        for site in &changed {
            sent += usize::from(state.publish(site));
        }
        // Side by side, not 10,000 look-ups per revision.
        let removed: Vec<String> =
            musubi_core::sorted::removed(&old.sites, &state.stored.intent.sites).into_iter().cloned().collect();
        // The replaced intent is freed off the agents' path.
        let sites = old.sites.len();
        musubi_core::par::free((old, read_back), sites);
        for site in removed {
            state.packed.remove(&site);
            if let Some(tx) = state.feeds.remove(&site) {
                tx.send_replace(Feed::Gone(format!("site `{site}` was removed from the intent")));
            }
        }
        tracing::info!(
            revision = rev.revision,
            recompiled = changed.len(),
            published = sent,
            took_ms = started.elapsed().as_millis() as u64,
            "intent revision followed"
        );
        let metrics = crate::metrics::get();
        metrics.follow_duration.observe(started.elapsed().as_secs_f64());
        metrics.sites.set(i64::try_from(state.stored.intent.sites.len()).unwrap_or(i64::MAX));
        self.count(sent);
        Ok(())
    }

    /// Rereads public keys and revocations and republishes what they change
    /// (off the threads that serve the agents' streams: access points'
    /// configurations are spliced, encoded and hashed).
    async fn reload_sites<S: IntentStore>(self: &Arc<Self>, store: &S) -> Result<usize, FanoutError> {
        let pairs = store.list(layout::KEYS).await?;
        let revoked = revocations(store).await?;
        let fanout = self.clone();
        match tokio::task::spawn_blocking(move || {
            let keys = layout::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?.keys;
            drop(pairs);
            fanout.update_sites(keys, revoked)
        })
        .await
        {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Ok(0), // the runtime is shutting down
        }
    }

    /// Takes new public keys and revocations; returns the size of the
    /// configurations it republished, in bytes.
    pub fn update_sites(&self, keys: PublicKeys, revoked: BTreeMap<String, Revocation>) -> Result<usize, FanoutError> {
        let mut state = self.lock();
        let mut changed_keys = BTreeSet::new();
        for (site, segs) in &keys {
            for (seg, key) in segs {
                if state.stored.keys.get(site).and_then(|s| s.get(seg)) != Some(key) {
                    changed_keys.insert((site.clone(), seg.clone()));
                }
            }
        }
        for (site, segs) in &state.stored.keys {
            for seg in segs.keys() {
                if keys.get(site).is_none_or(|s| !s.contains_key(seg)) {
                    changed_keys.insert((site.clone(), seg.clone()));
                }
            }
        }
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for site in revoked.keys().chain(state.revoked.keys()) {
            if revoked.get(site) != state.revoked.get(site) {
                touched.insert(site.clone());
            }
        }
        state.revoked = revoked;
        if !changed_keys.is_empty() {
            state.changed_at = Instant::now();
            state.keys = Keys { generation: state.keys.generation + 1, keys: Arc::new(keys.clone()) };
            state.stored.keys = keys;
            let State { stored, raw, packed, frozen, .. } = &mut *state;
            let mut thawing = Thawing { frozen, packed, revision: stored.revision, failed: None };
            touched.extend(incremental::rekey(
                &stored.intent,
                &stored.allocations,
                &stored.keys,
                &changed_keys,
                raw,
                &mut |name| thawing.load(name),
            )?);
            thawing.done()?;
        }
        let (mut sent, mut bytes) = (0, 0);
        for site in &touched {
            if state.stored.intent.sites.contains_key(site) && state.publish(site) {
                sent += 1;
                if let Some(Feed::Config(d)) = state.feeds.get(site).map(|f| f.borrow().clone()) {
                    bytes += d.encoded.len();
                }
            }
        }
        if !touched.is_empty() {
            tracing::info!(keys = changed_keys.len(), published = sent, bytes, "public keys or revocations followed");
        }
        self.count(sent);
        Ok(bytes)
    }

    /// Sets aside the access points' compiled structures if no change
    /// reached them for [`FREEZE_AFTER`] before `now` (only their encoding
    /// is kept, the bytes their agents are sent); a change that splices a
    /// member into one decodes that one back first. Returns how many were
    /// set aside.
    pub fn freeze_idle(&self, now: Instant) -> usize {
        let set_aside = self.lock().freeze_idle(now);
        let n = set_aside.len();
        if n > 0 {
            tracing::debug!(access_points = n, "access points' configurations kept encoded only while no change comes");
            let peers = set_aside.iter().flat_map(|c| &c.segments).map(|s| s.peers.len()).sum();
            musubi_core::par::free(set_aside, peers);
        }
        n
    }

    /// When a change last reached the compiled configurations (see
    /// [`Fanout::freeze_idle`]).
    pub fn changed_at(&self) -> Instant {
        self.lock().changed_at
    }

    /// The public keys to compile with, at their generation.
    pub fn public_keys(&self) -> Keys {
        self.lock().keys.clone()
    }

    /// Hands over what an apply compiled for `primed.revision` (kept until
    /// the fan-out follows that revision; an older one is dropped).
    pub fn prime(&self, primed: Primed) {
        let mut state = self.lock();
        let unused = if primed.revision > state.stored.revision { state.primed.replace(primed) } else { Some(primed) };
        drop(state);
        if let Some(unused) = unused {
            let n = unused.configs.len();
            musubi_core::par::free(unused, n);
        }
    }

    /// The compiled configurations of `sites` (peers without a key
    /// included), if this fan-out is at `revision` with keys of
    /// `generation` and holds every one of them. Taken under the lock as
    /// pointers; members' are decoded after it, on every core.
    fn held(&self, revision: u64, generation: u64, sites: &[&str]) -> Option<BTreeMap<String, SiteConfig>> {
        let held: Vec<(&str, Result<Arc<SiteConfig>, Bytes>)> = {
            let state = self.lock();
            if state.stored.revision != revision || state.keys.generation != generation {
                return None;
            }
            sites
                .iter()
                .map(|s| match state.raw.get(*s) {
                    Some(c) => Some((*s, Ok(c.clone()))),
                    None => Some((*s, Err(state.packed.get(*s)?.clone()))),
                })
                .collect::<Option<_>>()?
        };
        let configs = musubi_core::par::map(&held, |(name, c)| {
            let config = match c {
                Ok(whole) => (**whole).clone(),
                Err(packed) => SiteConfig::decode(packed.clone()).ok()?,
            };
            Some((name.to_string(), config))
        });
        configs.into_iter().collect()
    }

    /// What an apply at these keys hands over before its commit.
    pub fn priming(&self, keys: &Keys) -> Priming<'_> {
        Priming { fanout: self, keys_generation: keys.generation }
    }

    /// The feed of one site, or `None` when the site is not in the intent.
    pub fn subscribe(&self, site: &str) -> Option<watch::Receiver<Feed>> {
        self.lock().feeds.get(site).map(|tx| tx.subscribe())
    }

    /// What the site should have now.
    pub fn desired(&self, site: &str) -> Option<Arc<Delivery>> {
        match &*self.lock().feeds.get(site)?.borrow() {
            Feed::Config(d) => Some(d.clone()),
            Feed::Gone(_) => None,
        }
    }

    pub fn keys(&self, site: &str) -> BTreeMap<String, String> {
        self.lock().stored.keys.get(site).cloned().unwrap_or_default()
    }

    /// The segments a site is attached to.
    pub fn segments(&self, site: &str) -> BTreeSet<String> {
        let state = self.lock();
        state
            .stored
            .intent
            .sites
            .get(site)
            .map(|s| {
                // An access point also keys the segments it aids.
                let aided = state.stored.intent.aided_by(site).map(str::to_string);
                s.attachments.iter().map(|a| a.segment.clone()).chain(aided).collect()
            })
            .unwrap_or_default()
    }

    /// The segments that declare mutual aid, as an intent of their own
    /// (what the aid operations look names up in; cheap to take).
    pub fn aid_intent(&self) -> musubi_core::intent::Intent {
        let state = self.lock();
        let segments = state
            .stored
            .intent
            .segments
            .iter()
            .filter(|(_, s)| !s.aid.is_empty())
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
        musubi_core::intent::Intent { segments, ..Default::default() }
    }

    pub fn revocation(&self, site: &str) -> Option<Revocation> {
        self.lock().revoked.get(site).copied()
    }

    /// Every site of the intent.
    pub fn sites(&self) -> Vec<String> {
        self.lock().stored.intent.sites.keys().cloned().collect()
    }

    /// `f` of the intent as this replica follows it.
    pub fn with_intent<T>(&self, f: impl FnOnce(&musubi_core::intent::Intent) -> T) -> T {
        f(&self.lock().stored.intent)
    }

    /// Each site of the intent: (name, tenant, access point, region).
    pub fn site_facts(&self) -> Vec<(String, String, bool, musubi_core::intent::Region)> {
        self.lock()
            .stored
            .intent
            .sites
            .values()
            .map(|s| (s.name.clone(), s.tenant.clone(), s.is_access_point(), s.region))
            .collect()
    }

    pub fn revision(&self) -> u64 {
        self.lock().stored.revision
    }

    pub fn published(&self) -> u64 {
        self.published.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_digest_is_the_sha256_in_lowercase_hex() {
        assert_eq!(digest_of(b"abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn keys_are_reloaded_after_the_settle_and_no_more_than_a_quarter_of_the_time() {
        let t = Instant::now();
        let last = |took, republished| Some(Reloaded { started: t, took: ms(took), republished });
        // The first change, and one after a cheap reload: the settle alone.
        assert_eq!(next_reload(t, None), t + SETTLE);
        assert_eq!(next_reload(t + ms(300), last(5, 40_000)), t + ms(300) + SETTLE);
        // Back to back after a reload of 400 ms: 1.6 s after it started.
        assert_eq!(next_reload(t + ms(400), last(400, 0)), t + ms(1600));
        // A change long after an expensive reload waits only the settle.
        assert_eq!(next_reload(t + ms(5000), last(400, 0)), t + ms(5000) + SETTLE);
        // However slow the last reload was, the next comes within the cap.
        assert_eq!(next_reload(t + ms(100), last(3000, 0)), t + RELOAD_GAP_MAX);
        // A quick reload that republished megabytes (access points of
        // thousands of peers, sent whole to their agents): the whole gap.
        assert_eq!(next_reload(t + ms(150), last(100, 15 << 20)), t + RELOAD_GAP_MAX);
        assert_eq!(next_reload(t + ms(150), last(100, (1 << 20) - 1)), t + ms(400));
        // ... but a change long after it waits only the settle.
        assert_eq!(next_reload(t + ms(5000), last(100, 15 << 20)), t + ms(5000) + SETTLE);
    }
}
