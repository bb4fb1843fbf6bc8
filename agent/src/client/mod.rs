//! The agent's side of the protocol: enrolment, the Sync stream with
//! reconnection, applying configurations, reporting status, renewing the
//! site certificate.
//!
//! Headless by design: while no controller answers, the agent keeps the
//! datapath as it is (it never tears anything down for lack of a
//! controller) and tries the controllers in turn with jittered exponential
//! backoff. On reconnect its Hello names the configuration it has applied,
//! so an unchanged configuration is not sent again and nothing is rewritten.

mod enrol;
mod session;
mod settings;
mod status;
pub mod supervisor;
mod switch;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use musubi_proto::v1 as pb;
use tokio::sync::mpsc;

pub use self::enrol::enrol;
pub(crate) use self::settings::url;
pub use self::settings::{AgentError, Applied, Settings, VERSION};
use crate::datapath::{Datapath, Hops, off_workers};
use crate::failover::Choices;
use crate::failover::machine::{Action, Event, Machine};
use crate::probe::{Health, Key};
use crate::reconcile::{LocalKeys, build};

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
    /// The failover state machine: what is built (each route group's active
    /// candidate, each picked peer's line) and why.
    machine: Machine,
    /// When the machine asked to be woken (a grace or hold-down ends).
    wake_at: Option<Instant>,
    /// When a key rotation's switch is due (this site's or a peer's).
    switch_at: Option<Instant>,
    /// Whether this site's own switch waits for its instant.
    own_switch_waits: bool,
    /// The peers' key switches prepared when the configuration was
    /// applied, by tunnel and next key (see [`Agent::switch_due`]).
    switch_ops: Option<BTreeMap<(String, String), [crate::datapath::Op; 2]>>,
    /// The interfaces' keys, read (or made) when a configuration is applied.
    keys: LocalKeys,
    /// The next keys of a key rotation that prepares, reported with every
    /// status until the switch.
    next_keys: Vec<pb::InterfaceKey>,
    metrics: crate::metrics::Metrics,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("site", &self.settings.site).finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent that starts from the configuration it last applied, if any,
    /// and re-applies it (writing nothing when the datapath still matches).
    pub fn new(settings: Settings, datapath: Box<dyn Datapath>) -> Result<Self, AgentError> {
        if let Some(plain) =
            settings.controllers.iter().find(|c| c.starts_with("http://")).filter(|_| !settings.insecure)
        {
            return Err(AgentError::PlainText(plain.clone()));
        }
        let applied = settings.state.load_applied()?;
        let machine = Machine::new(settings.hold_down, settings.probe);
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
            machine,
            wake_at: None,
            switch_at: None,
            own_switch_waits: false,
            switch_ops: None,
            keys: Default::default(),
            next_keys: Vec::new(),
            metrics: Default::default(),
        };
        if agent.settings.probe {
            let prober = crate::probe::Prober::start();
            agent.metrics.watch_health(prober.health.clone());
            agent.prober = Some(prober);
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

    /// The agent's metrics (see [`crate::metrics`]).
    pub fn metrics(&self) -> crate::metrics::Metrics {
        self.metrics.clone()
    }

    /// Applies a configuration; on failure keeps the previous one and reports.
    /// A configuration that names a segment no intent could hold is refused
    /// before anything touches the disk or the kernel.
    fn apply(&mut self, mut update: pb::ConfigUpdate) -> Vec<pb::InterfaceKey> {
        // Peers whose key switch came take their next keys.
        let now_ms = settings::now_ms();
        let ahead = update.config.as_mut().and_then(|c| switch::settle(c, now_ms).ahead);
        let Some(config) = &update.config else { return Vec::new() };
        // The interfaces the site's lines leave on, read from the kernel
        // (nothing written): a LAN is never one of them.
        let resolved = self.look_up(&crate::probe::paths(config));
        let lines: std::collections::BTreeSet<String> =
            resolved.iter().flatten().flat_map(|h| h.values().map(|hop| hop.interface.clone())).collect();
        // What this site trusts its controller with (names, tables, LANs):
        // a configuration reaching outside it is refused whole, before the
        // disk or the kernel is touched; the one applied stays.
        if let Err(e) = crate::trust::check(config, &self.settings.trust, &lines) {
            tracing::error!(site = %self.settings.site, revision = update.revision, error = %e, "configuration refused");
            self.errors = vec![e.to_string()];
            return Vec::new();
        }
        self.switch_at = at_instant(ahead, now_ms);
        let mut new_keys = Vec::new();
        let segments: Vec<&str> = config.segments.iter().map(|s| s.segment.as_str()).collect();
        // A key rotation: the next keys made (prepare), taken (switch, at
        // its instant) or fresh ones made (after a revocation), before the
        // keys are read.
        let mut rotated = Vec::new();
        self.next_keys.clear();
        self.own_switch_waits = false;
        if let Some(r) = &config.key_rotation {
            let waits = r.phase() == pb::KeyPhase::Switch && !switch::own_switch_due(config, now_ms);
            self.own_switch_waits = waits;
            let acted = if waits { Ok(Vec::new()) } else { self.settings.state.rotate(r.id, r.phase(), &segments) };
            match acted {
                Ok(changed) => {
                    if !changed.is_empty() {
                        tracing::info!(site = %self.settings.site, rotation = r.id, phase = r.phase().as_str_name(),
                            segments = ?changed, "WireGuard keys rotated");
                    }
                    rotated = changed;
                }
                Err(e) => self.errors.push(e.to_string()),
            }
            if r.phase() == pb::KeyPhase::Prepare || waits {
                match self.settings.state.next_public_keys(&segments) {
                    Ok(next) => {
                        self.next_keys = next
                            .into_iter()
                            .map(|(segment, public_key)| pb::InterfaceKey {
                                segment,
                                interface: String::new(),
                                public_key,
                            })
                            .collect()
                    }
                    Err(e) => self.errors.push(e.to_string()),
                }
            }
        }
        match self.settings.state.local_keys(segments.iter().copied()) {
            Ok((keys, new)) => {
                for seg in config.segments.iter().filter(|s| new.contains(&s.segment) || rotated.contains(&s.segment)) {
                    new_keys.push(pb::InterfaceKey {
                        segment: seg.segment.clone(),
                        interface: String::new(),
                        public_key: keys.get(&seg.segment).map(|k| k.public_key.clone()).unwrap_or_default(),
                    });
                }
                self.keys = keys;
            }
            Err(e) => self.errors.push(e.to_string()),
        }
        self.take_hops(resolved);
        let actions = self.machine.step(
            Event::Configured { config: std::sync::Arc::new(config.clone()), hops: self.hops.clone() },
            Instant::now(),
        );
        self.wake_at = wake(&actions);
        let active = self.machine.active().clone();
        let started = Instant::now();
        let result =
            off_workers(self.datapath.blocks(), || build(&mut *self.datapath, config, &self.keys, &active, &self.hops));
        self.metrics.built(&active, self.datapath.writes(), started.elapsed());
        match result {
            Ok(ops) => {
                tracing::info!(site = %self.settings.site, revision = update.revision, writes = ops.len(), "configuration applied");
                self.metrics.revision.set(i64::try_from(update.revision).unwrap_or(i64::MAX));
                // Peers that switch keys at an instant ahead: their first
                // writes prepared now, not when the instant comes.
                self.switch_ops = switch::peers_switch(config)
                    .then(|| crate::reconcile::switch_ops(config, &self.keys, &active))
                    .and_then(|r| {
                        r.map_err(
                            |e| tracing::warn!(site = %self.settings.site, error = %e, "a key switch not prepared"),
                        )
                        .ok()
                    });
                self.errors.clear();
                if let Err(e) = self.settings.state.save_applied(&update) {
                    self.errors.push(e.to_string());
                }
                if let Some(p) = &self.prober {
                    p.set_for(config, &self.hops);
                    // New keys: every peer's session starts now (see
                    // `Prober::probe_all_now`).
                    if !rotated.is_empty() {
                        p.probe_all_now();
                    }
                }
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
                if !ops.is_empty() {
                    self.prepare();
                }
            }
            Err(e) => {
                tracing::error!(site = %self.settings.site, revision = update.revision, error = %e, "configuration not applied");
                self.errors = vec![e.to_string()];
                self.switch_ops = None;
                // The machine goes on from the configuration still applied.
                if let Some(kept) = self.config().cloned() {
                    let hops = self.hops.clone();
                    let actions = self
                        .machine
                        .step(Event::Configured { config: std::sync::Arc::new(kept), hops }, Instant::now());
                    self.wake_at = wake(&actions);
                }
            }
        }
        new_keys
    }

    /// A key rotation's switch is due (see [`switch`]). This site's own:
    /// its next keys set on its tunnels in place at once and every peer
    /// probed (each new session starts now). Peers that switch: the
    /// operations prepared when the configuration was applied
    /// ([`crate::reconcile::switch_ops`]) written at once, without
    /// observing. Then the configuration is applied again whole.
    fn switch_due(&mut self) -> Vec<pb::InterfaceKey> {
        self.switch_at = None;
        let Some(mut update) = self.applied.take() else { return Vec::new() };
        let Some(config) = update.config.as_mut() else {
            self.applied = Some(update);
            return Vec::new();
        };
        let now_ms = settings::now_ms();
        let rotated = match &config.key_rotation {
            Some(r) if self.own_switch_waits && switch::own_switch_due(config, now_ms) => {
                self.own_switch_waits = false;
                self.switch_own(config, r.id)
            }
            _ => Vec::new(),
        };
        let settled = switch::settle(config, now_ms);
        if !settled.switched.is_empty() {
            let prepared = self.switch_ops.as_ref();
            let pick = |i: usize| {
                settled
                    .switched
                    .iter()
                    .filter_map(move |(t, _, new)| prepared?.get(&(t.clone(), new.clone())))
                    .map(move |ops| ops[i].clone())
            };
            // Every next key takes its addresses before an old key goes.
            let ops: Vec<crate::datapath::Op> = pick(0).chain(pick(1)).collect();
            let started = Instant::now();
            let written = off_workers(self.datapath.blocks(), || self.datapath.apply(&ops));
            match written {
                Ok(()) => {
                    tracing::info!(site = %self.settings.site, peers = settled.switched.len(), operations = ops.len(),
                    took_us = started.elapsed().as_micros() as u64, "peers switched to their next keys")
                }
                Err(e) => tracing::warn!(site = %self.settings.site, error = %e, "peers' next keys not set first"),
            }
        }
        if settled.switched.is_empty() && rotated.is_empty() {
            self.applied = Some(update);
            self.switch_at = at_instant(settled.ahead, now_ms);
            return Vec::new();
        }
        // Kept while the configuration is applied again (a failure keeps
        // the one applied).
        self.applied = Some(update.clone());
        let mut keys = self.apply(update);
        keys.extend(self.keys_of(&rotated));
        keys
    }

    /// This site's own switch, first: its next keys become its keys and are
    /// set on its tunnels in place, every peer probed; the segments switched.
    fn switch_own(&mut self, config: &pb::SiteConfig, id: u64) -> Vec<String> {
        let segments: Vec<&str> = config.segments.iter().map(|s| s.segment.as_str()).collect();
        let rotated = match self.settings.state.rotate(id, pb::KeyPhase::Switch, &segments) {
            Ok(rotated) => rotated,
            Err(e) => {
                self.errors.push(e.to_string());
                return Vec::new();
            }
        };
        match self.settings.state.local_keys(segments.iter().copied()) {
            Ok((keys, _)) => self.keys = keys,
            Err(e) => self.errors.push(e.to_string()),
        }
        let ops: Vec<crate::datapath::Op> = config
            .segments
            .iter()
            .filter(|s| rotated.contains(&s.segment))
            .filter_map(|s| Some((s, self.keys.get(&s.segment)?)))
            .flat_map(|(s, key)| {
                s.tunnels.iter().map(|t| crate::datapath::Op::SetKey {
                    tunnel: t.name.clone(),
                    public_key: key.public_key.clone(),
                    key_file: key.file.clone(),
                })
            })
            .collect();
        let started = Instant::now();
        let written = off_workers(self.datapath.blocks(), || self.datapath.apply(&ops));
        match written {
            Ok(()) => tracing::info!(site = %self.settings.site, rotation = id, segments = ?rotated,
                took_us = started.elapsed().as_micros() as u64, "WireGuard keys switched"),
            Err(e) => tracing::warn!(site = %self.settings.site, error = %e, "the new keys not set first"),
        }
        if let Some(p) = &self.prober {
            p.probe_all_now();
        }
        rotated
    }

    /// The public keys of `segments`, to report.
    fn keys_of(&self, segments: &[String]) -> Vec<pb::InterfaceKey> {
        segments
            .iter()
            .filter_map(|s| {
                Some(pb::InterfaceKey {
                    segment: s.clone(),
                    interface: String::new(),
                    public_key: self.keys.get(s)?.public_key.clone(),
                })
            })
            .collect()
    }

    /// The configuration applied last.
    fn config(&self) -> Option<&pb::SiteConfig> {
        self.applied.as_ref().and_then(|a| a.config.as_ref())
    }

    /// Reconciles the last applied configuration again with the choices
    /// made; true when something had drifted and was put back (or could
    /// not be).
    fn upkeep(&mut self) -> bool {
        // A site observes afresh: a peer's endpoint that WireGuard moved
        // (roamed) raises no notification, and the kept observation would
        // hide it until it expires (a tunnel to an access point dead for
        // 35 s in a drill). A site's few objects cost little to read; an
        // access point's member sites roam by design.
        if self.config().is_some_and(|c| c.role() == pb::Role::Site) {
            self.prepare();
        }
        self.reconcile(&[])
    }

    /// Builds the machine's choices; `moved` says what moved, for the log.
    fn reconcile(&mut self, moved: &[String]) -> bool {
        let active = self.machine.active().clone();
        self.reconcile_with(&active, moved, 0)
    }

    /// Builds `choices`; `earlier` operations towards them were written by
    /// a failover's first steps (logged here, with the whole move).
    fn reconcile_with(&mut self, choices: &Choices, moved: &[String], earlier: usize) -> bool {
        // A failover's build takes the policy as last read or written (a
        // process less on the way to the new path); the upkeep reads it.
        let Some(result) = self.build_now(choices, !moved.is_empty()) else { return false };
        match result {
            Ok(ops) if ops.is_empty() && earlier == 0 => false,
            Ok(ops) if !moved.is_empty() => {
                tracing::warn!(site = %self.settings.site, operations = earlier + ops.len(), moved = %moved.join(", "), "traffic moved");
                true
            }
            Ok(ops) => {
                tracing::warn!(site = %self.settings.site, operations = earlier + ops.len(), "the datapath had drifted; put back");
                true
            }
            Err(e) => {
                tracing::error!(site = %self.settings.site, error = %e, "the datapath has drifted and cannot be put back");
                self.errors = vec![e.to_string()];
                true
            }
        }
    }

    /// Builds `choices` on the applied configuration (`None` without one),
    /// trusting the policy as last read or written when `trust_policy`.
    fn build_now(
        &mut self,
        choices: &Choices,
        trust_policy: bool,
    ) -> Option<Result<Vec<crate::datapath::Op>, crate::reconcile::ReconcileError>> {
        let config = self.applied.as_ref().and_then(|a| a.config.as_ref())?;
        self.datapath.trust_policy(trust_policy);
        let started = Instant::now();
        let result =
            off_workers(self.datapath.blocks(), || build(&mut *self.datapath, config, &self.keys, choices, &self.hops));
        self.datapath.trust_policy(false);
        self.metrics.built(choices, self.datapath.writes(), started.elapsed());
        Some(result)
    }

    /// A failover's first step when route groups move: their routes
    /// replaced in place (see [`crate::reconcile::move_groups`]); the
    /// operations written. A failure is left to the full build that follows.
    fn move_groups(&mut self, before: &Choices, after: &Choices) -> usize {
        let Some(config) = self.applied.as_ref().and_then(|a| a.config.as_ref()) else { return 0 };
        let keys = &self.keys;
        let result = off_workers(self.datapath.blocks(), || {
            crate::reconcile::move_groups(&mut *self.datapath, config, keys, before, after)
        });
        result.map_or_else(
            |e| {
                tracing::warn!(site = %self.settings.site, error = %e, "a failover's route groups not moved first");
                0
            },
            |ops| ops.len(),
        )
    }

    /// The probes' health if a target flipped since `seen` (judged while
    /// the agent was writing), to decide again.
    fn flipped_since(&self, seen: &BTreeMap<Key, Health>) -> Option<BTreeMap<Key, Health>> {
        let prober = self.prober.as_ref()?;
        let now = prober.snapshot();
        let flipped = now
            .iter()
            .filter(|(k, _)| !matches!(k, Key::Heard { .. }))
            .any(|(k, h)| seen.get(k).is_none_or(|s| s.up != h.up));
        flipped.then_some(now)
    }

    /// Observes the datapath after a configuration is applied, so that a
    /// failover's first build plans without observing first. (Not after a
    /// failover's own builds: a failure's decisions come one after the
    /// other, and in the kernel lab an observation between them cost
    /// seconds; the upkeep observes again.)
    fn prepare(&mut self) {
        if let Err(e) = off_workers(self.datapath.blocks(), || self.datapath.prepare()) {
            tracing::debug!(site = %self.settings.site, error = %e, "datapath not observed after the build");
        }
    }

    /// Feeds the failover machine an event and does what it answers; true
    /// when traffic moved (or the datapath was written).
    ///
    /// Traffic first: what a decision moves is written at once, by itself —
    /// route groups as a route replaced per prefix, a line whose path failed
    /// as its pins, fence and endpoints (see [`crate::reconcile::move_lines`];
    /// a few milliseconds, no nft process, no observation). Flips judged
    /// while that was written — an access point's segments go quiet a few
    /// milliseconds apart, a line's paths to two access points too — are
    /// decided next, and moved the same way, before the full build that
    /// checks everything (it observes: tens of milliseconds, and a group
    /// whose tunnel went quiet just after the first decision waited for it
    /// — a 460 ms outage in one of ten east-ap-outage runs; 1,044 ms in CI).
    fn failover(&mut self, event: Event) -> bool {
        let before = self.machine.active().clone();
        let mut seen = match &event {
            Event::Probed(health) => Some(health.clone()),
            _ => None,
        };
        if tracing::enabled!(tracing::Level::DEBUG)
            && let Some(health) = &seen
        {
            tracing::debug!(site = %self.settings.site, health = %crate::probe::describe(health, Instant::now()), "probes changed");
        }
        let mut actions = self.machine.step(event, Instant::now());
        let mut moved = Vec::new();
        // What is written so far.
        let mut done = before.clone();
        let mut earlier = 0;
        let mut decided = false;
        // The peers whose failed line's first step probed every tunnel after it.
        let mut probed: BTreeSet<String> = BTreeSet::new();
        // Bounded: each round needs a flip judged during the one before.
        for _ in 0..8 {
            self.wake_at = wake(&actions);
            for action in &actions {
                if let Action::Build { moved: m, .. } = action {
                    decided = true;
                    tracing::debug!(site = %self.settings.site, moved = %m.join(", "), "decided");
                    moved.extend(m.iter().cloned());
                }
            }
            let after = self.machine.active().clone();
            if after == done {
                break;
            }
            // Counted as written: a group that left and came back within
            // one failover (a judgment undone at once) moved twice, as the
            // log says.
            self.metrics.moved(&done, &after);
            if let Some(config) = self.config().filter(|c| c.segments.iter().any(|s| !s.aids.is_empty())) {
                let (was, now) =
                    (crate::failover::aids_in_use(config, &done), crate::failover::aids_in_use(config, &after));
                for aid in now.difference(&was) {
                    tracing::warn!(site = %self.settings.site, aid = %aid, "mutual aid in use: another network's access points carry this segment");
                }
                for aid in was.difference(&now) {
                    tracing::info!(site = %self.settings.site, aid = %aid, "mutual aid no longer in use");
                }
            }
            if after.groups != done.groups {
                earlier += self.move_groups(&done, &after);
            }
            if after.paths != done.paths {
                let (ops, moved) = self.move_failed_lines(&done, &after);
                earlier += ops;
                probed.extend(moved);
            }
            done = after;
            let Some(fresh) = seen.as_ref().and_then(|s| self.flipped_since(s)) else { break };
            seen = Some(fresh.clone());
            actions = self.machine.step(Event::Probed(fresh), Instant::now());
        }
        if !decided {
            return false;
        }
        let after = self.machine.active().clone();
        let built = self.reconcile_with(&after, &moved, earlier);
        // A line moved back (not a failed one, whose first step probed
        // already): the access point the site sends nothing but probes to
        // follows it at its next probe, up to an interval later — 26–59 ms
        // without traffic towards the site on every return to its
        // preferred line in primary-line-cut. Probed now, it follows now.
        let unprobed =
            after.paths.iter().any(|(peer, path)| before.paths.get(peer) != Some(path) && !probed.contains(peer));
        if unprobed && let Some(p) = &self.prober {
            p.probe_now();
        }
        built
    }

    /// Moves the lines that moved from `before` to `after` because the path
    /// in use failed, by themselves; the operations written, and the peers
    /// moved (every tunnel is probed after them).
    fn move_failed_lines(&mut self, before: &Choices, after: &Choices) -> (usize, BTreeSet<String>) {
        let (Some(config), Some(prober)) = (self.applied.as_ref().and_then(|a| a.config.as_ref()), &self.prober) else {
            return (0, BTreeSet::new());
        };
        let failed = {
            let health = prober.health.lock().unwrap_or_else(|e| e.into_inner());
            crate::failover::failed_lines(config, before, after, &|k| health.get(k).cloned())
        };
        if failed.is_empty() {
            return (0, BTreeSet::new());
        }
        let (keys, hops) = (&self.keys, &self.hops);
        let result = off_workers(self.datapath.blocks(), || {
            crate::reconcile::move_lines(&mut *self.datapath, config, keys, after, hops, &failed)
        });
        match result {
            Ok(ops) => {
                prober.probe_now();
                (ops.len(), failed)
            }
            Err(e) => {
                // The full build that follows tries again.
                tracing::warn!(site = %self.settings.site, error = %e, "a failed line's peers not moved first");
                (0, BTreeSet::new())
            }
        }
    }

    /// The probes' health changed.
    fn probed(&mut self) -> bool {
        let Some(health) = self.prober.as_ref().map(crate::probe::Prober::snapshot) else {
            return false;
        };
        self.failover(Event::Probed(health))
    }

    /// Finds how each underlay path's outer packets would leave (probing
    /// only: without health there is nothing to choose between lines);
    /// true when that changed.
    fn resolve(&mut self, paths: Vec<(std::net::IpAddr, std::net::IpAddr)>) -> bool {
        let found = self.look_up(&paths);
        self.take_hops(found)
    }

    /// How each path's outer packets would leave, read from the datapath
    /// (nothing written); `None` without probing.
    fn look_up(
        &mut self,
        paths: &[(std::net::IpAddr, std::net::IpAddr)],
    ) -> Option<Result<Hops, crate::datapath::DatapathError>> {
        self.prober.is_some().then(|| off_workers(self.datapath.blocks(), || self.datapath.hops(paths)))
    }

    /// Keeps what [`Agent::look_up`] found; true when the hops changed.
    fn take_hops(&mut self, found: Option<Result<Hops, crate::datapath::DatapathError>>) -> bool {
        let Some(found) = found else { return false };
        match found {
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
            self.failover(Event::Hops(self.hops.clone()));
        }
    }
}

/// The instant of Unix ms `at`, as this process's clock runs (`now_ms`: now).
fn at_instant(at: Option<u64>, now_ms: u64) -> Option<Instant> {
    at.map(|at| Instant::now() + std::time::Duration::from_millis(at.saturating_sub(now_ms)))
}

/// When the machine asked to be woken, if it did.
fn wake(actions: &[Action]) -> Option<Instant> {
    actions.iter().find_map(|a| if let Action::WakeAt(at) = a { Some(*at) } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{Health, Key};
    use crate::state::StateDir;
    use session::End;
    use std::time::Duration;

    fn update(lan: &str) -> pb::ConfigUpdate {
        let tunnel = |name: &str, listen_port| pb::WireguardInterface {
            name: name.into(),
            listen_port,
            addresses: vec!["100.64.0.10/32".into()],
            faces: pb::PeerRole::AccessPoint as i32,
        };
        let config = pb::SiteConfig {
            site: "kita-hall".into(),
            segments: vec![pb::SegmentConfig {
                segment: "lgwan".into(),
                domain: Some(pb::RoutingDomain { vrf: "mv-lgwan".into(), table: 1000 }),
                tunnels: vec![tunnel("me-lgwan", 51820), tunnel("mw-lgwan", 51821)],
                attachment: Some(pb::Attachment { interface: lan.into(), prefixes: vec!["10.0.1.0/24".into()] }),
                ..Default::default()
            }],
            ..Default::default()
        };
        pb::ConfigUpdate { revision: 7, digest: format!("d-{lan}"), config: Some(config) }
    }

    /// Two access points, one route group on the first: what an agent
    /// that starts while its controller cannot be reached works from.
    fn two_access_points() -> pb::ConfigUpdate {
        let ap = |name: &str, interface: &str, address: &str| pb::Peer {
            name: name.into(),
            role: pb::PeerRole::AccessPoint as i32,
            public_key: format!("{name}-key"),
            allowed_prefixes: vec![format!("{address}/32")],
            interface: interface.into(),
            ..Default::default()
        };
        let mut update = update("eth3");
        let segment = &mut update.config.as_mut().expect("config").segments[0];
        segment.peers = vec![ap("ap-east", "me-lgwan", "100.64.0.1"), ap("ap-west", "mw-lgwan", "100.64.0.2")];
        segment.route_groups = vec![pb::RouteGroup {
            name: "lgwan".into(),
            prefixes: vec!["10.0.0.0/16".into()],
            candidates: vec!["ap-east".into(), "ap-west".into()],
        }];
        update
    }

    /// An agent whose controller accepts its connection and never answers
    /// (a controller partitioned half-way, a stalled one) keeps failing
    /// over while it waits for the stream to open: its home access point
    /// goes quiet 300 ms into the wait, and by the time the opening gives
    /// up (the silence, 2 s here) the route group is on the other one.
    /// (The failover used to wait for the opening: a restored access point
    /// moved its groups 5 s late.) The probes' health is set by hand: the
    /// tunnels here are not real interfaces.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_failover_goes_on_while_a_silent_controller_holds_the_stream_open() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let address = format!("http://{}", listener.local_addr().expect("address"));
        // Accepts and holds every connection, says nothing.
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let dir = tempfile::tempdir().expect("tmp");
        let mut settings = Settings::new("kita-hall", vec![address.clone()], StateDir::new(dir.path()));
        settings.insecure = true;
        settings.probe = true;
        settings.silence = Duration::from_secs(2);
        let mut agent = Agent::new(settings, Box::new(crate::datapath::fake::Fake::new())).expect("agent");
        agent.apply(two_access_points());
        assert!(agent.errors.is_empty(), "{:?}", agent.errors);
        let prober = agent.prober.as_ref().expect("probing");
        let (health, changed) = (prober.health.clone(), prober.changed.clone());
        let group = ("lgwan".to_string(), "lgwan".to_string());
        let set = move |peer: &str, up: bool| {
            let now = Instant::now();
            let h = Health {
                up,
                since: Some(if up { now - Duration::from_secs(60) } else { now }),
                last_reply: Some(if up { now } else { now - Duration::from_millis(151) }),
                interval: Duration::from_millis(50),
                ..Default::default()
            };
            health.lock().expect("health").insert(Key::tunnel("lgwan", peer), h);
            changed.notify_one();
        };
        set("ap-east", true);
        set("ap-west", true);
        agent.probed();
        assert_eq!(agent.machine.active().groups.get(&group).map(String::as_str), Some("ap-east"));

        let quiet = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            set("ap-east", false);
        });
        let began = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(20), agent.session(&address)).await;
        let waited = began.elapsed();
        quiet.await.expect("the access point went quiet");
        silent.abort();
        match ended {
            Ok(Err(End::Broken(why))) => assert!(why.contains("did not open the stream"), "{why}"),
            Ok(Err(End::Refused(why))) => panic!("refused: {why}"),
            Ok(Ok(())) => panic!("a silent controller opened a stream"),
            Err(_) => panic!("the opening was not bounded by the silence"),
        }
        assert!(waited >= Duration::from_secs(2), "gave up after {waited:?}");
        assert_eq!(
            agent.machine.active().groups.get(&group).map(String::as_str),
            Some("ap-west"),
            "moved while the stream was opening"
        );
        assert!(agent.writes() > 0);
    }

    #[test]
    fn a_configuration_outside_what_the_site_trusts_touches_neither_disk_nor_datapath() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut settings = Settings::new("kita-hall", vec!["127.0.0.1:1".into()], StateDir::new(dir.path()));
        settings.trust.lan_interfaces = Some(["eth3".to_string()].into());
        let mut agent = Agent::new(settings, Box::new(crate::datapath::fake::Fake::new())).expect("agent");
        let keys = agent.apply(update("eth2"));
        assert!(keys.is_empty());
        assert_eq!(agent.writes(), 0, "nothing reached the datapath");
        assert!(agent.errors.iter().any(|e| e.contains("LAN interface `eth2` refused")), "{:?}", agent.errors);
        let written: Vec<_> = std::fs::read_dir(dir.path()).expect("state").flatten().map(|e| e.file_name()).collect();
        assert!(written.is_empty(), "nothing written to the state directory: {written:?}");
        assert!(agent.applied.is_none());

        // The LAN the site lists: applied, a key made for the segment.
        let keys = agent.apply(update("eth3"));
        assert_eq!(keys.len(), 1, "{:?}", agent.errors);
        assert!(agent.writes() > 0 && agent.errors.is_empty(), "{:?}", agent.errors);
        // A later configuration outside the limits leaves the applied one.
        agent.apply(update("mw-evil"));
        assert_eq!(agent.applied.as_ref().map(|a| a.digest.as_str()), Some("d-eth3"));
        assert!(agent.errors.iter().any(|e| e.contains("Musubi's own")), "{:?}", agent.errors);
    }
}
