//! WireGuard key rotation, make before break, driven by the controller (the
//! phases are [`musubi_core::rotation`]'s): asked for by an operator
//! ([`request`]) or by the schedule, a rotation moves from prepare to
//! switch once every connected peer of the site holds the site's next keys
//! (acknowledged: its agent applied the configuration that carries them);
//! the switch names its instant, a little ahead, when the site and its
//! peers all take the next keys; the rotation ends once that instant passed
//! and the site's agent applied the switch: the next keys are recorded as
//! the site's keys. A revocation
//! ([`revoke`]) drops the keys at once. Every step is one guarded write
//! with its audit entry: replicas may all drive, one of them wins each step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use musubi_core::rotation::{self, Phase, Rotation, Schedule};
use musubi_proto::v1::SiteConfig;

use crate::fanout::Fanout;
use crate::store::layout::{KEYS, public_key_key};
use crate::store::{Event, Guard, IntentStore, StoreError, Write};

/// How long a rotation may prepare (every connected peer to hold the next
/// keys) before it is given up.
pub const PREPARE_LIMIT: Duration = Duration::from_secs(600);

/// How often, at most, the schedule looks for keys due for a rotation.
pub const SCHEDULE_EVERY: Duration = Duration::from_secs(60);

/// Why a rotation cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("site `{0}` has no WireGuard keys registered yet: nothing to rotate")]
    NoKeys(String),
    #[error("a key rotation of site `{site}` is under way already ({phase})")]
    UnderWay { site: String, phase: &'static str },
    #[error("the key rotation of site `{0}` changed under this request; ask again")]
    Raced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The site's entries under the keys prefix as the store holds them now.
async fn entries<S: IntentStore>(store: &S, site: &str) -> Result<BTreeMap<String, String>, StoreError> {
    let prefix = format!("{KEYS}{site}/");
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .map(|(k, v)| (k[prefix.len()..].to_string(), String::from_utf8_lossy(&v).into_owned()))
        .collect())
}

fn put(site: &str, entry: &str, guard: Guard, value: Option<String>) -> Write {
    Write { key: public_key_key(site, entry), guard, value: value.map(String::into_bytes) }
}

/// Asks for a rotation of `site`'s keys (its id: `now_ms`).
pub async fn request<S: IntentStore>(
    store: &S,
    site: &str,
    actor: &str,
    reason: &str,
    now_ms: u64,
) -> Result<u64, RotationError> {
    let held = entries(store, site).await?;
    if let Some(r) = rotation::site_rotation(&held) {
        return Err(RotationError::UnderWay { site: site.to_string(), phase: r.phase.as_str() });
    }
    if !held.keys().any(|k| rotation::is_segment_key(k)) {
        return Err(RotationError::NoKeys(site.to_string()));
    }
    let r = Rotation { id: now_ms, phase: Phase::Prepare, switch_at: None };
    let summary = format!("key rotation of site {site} asked for (rotation {}){}", r.id, because(reason));
    let writes = vec![put(site, rotation::ROTATION, Guard::Absent, Some(r.text()))];
    asked(store, site, actor, now_ms, summary, writes).await?;
    Ok(r.id)
}

/// ": reason", or nothing.
fn because(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(": {reason}") }
}

/// Writes what an operator (or the schedule) asked for with its audit
/// entry; a guard that failed means another request came first.
async fn asked<S: IntentStore>(
    store: &S,
    site: &str,
    actor: &str,
    now_ms: u64,
    summary: String,
    writes: Vec<Write>,
) -> Result<(), RotationError> {
    let event = Event { time_ms: now_ms, actor: actor.to_string(), summary };
    match store.record(event, writes).await? {
        Some(_) => Ok(()),
        None => Err(RotationError::Raced(site.to_string())),
    }
}

/// Revokes `site`'s keys at once: its current and next keys are dropped
/// (every peer removes them from its tunnels with the next configuration),
/// their claims become the revocation's (no site may register them again),
/// and the agent is asked for fresh keys. A site that must stay out is
/// revoked as well (`musubi site revoke`).
pub async fn revoke<S: IntentStore>(
    store: &S,
    site: &str,
    actor: &str,
    reason: &str,
    now_ms: u64,
) -> Result<u64, RotationError> {
    let held = entries(store, site).await?;
    let keys: Vec<(&String, &String)> =
        held.iter().filter(|(k, _)| rotation::is_segment_key(k) || k.starts_with(rotation::NEXT)).collect();
    // Without keys (revoked before, the site kept out, then let back in)
    // it only asks the agent for fresh ones.
    let r = Rotation { id: now_ms, phase: Phase::Fresh, switch_at: None };
    let mut writes = vec![put(site, rotation::ROTATION, Guard::Any, Some(r.text()))];
    writes.push(put(site, rotation::SINCE, Guard::Any, None));
    writes.push(put(site, rotation::SWITCHED, Guard::Any, None));
    let mut listed = Vec::new();
    for (entry, key) in &keys {
        writes.push(put(site, entry, Guard::Any, None));
        writes.push(Write {
            key: crate::sites::owner_index(key),
            guard: Guard::Any,
            value: Some(format!("revoked:{site}/{entry}").into_bytes()),
        });
        listed.push(((*entry).clone(), (*key).clone()));
    }
    let summary = if listed.is_empty() {
        format!("fresh WireGuard keys asked of site {site} (none registered){}", because(reason))
    } else {
        format!("WireGuard keys of site {site} revoked ({}){}", crate::sites::key_list(&listed), because(reason))
    };
    asked(store, site, actor, now_ms, summary, writes).await?;
    Ok(r.id)
}

/// Whether `config` holds `key` for peer `site` in `segment`, as its current
/// or its next key.
fn holds(config: &SiteConfig, site: &str, segment: &str, key: &str) -> bool {
    let Some(seg) = config.segments.iter().find(|s| s.segment == segment) else { return false };
    let Ok(i) = seg.peers.binary_search_by(|p| p.name.as_str().cmp(site)) else { return false };
    let p = &seg.peers[i];
    p.public_key == key || p.next_public_key == key
}

/// `f` of the configuration the fan-out holds for `site` (decoded if kept
/// encoded), if it holds one.
fn with_config<T>(fanout: &Fanout, site: &str, f: impl FnOnce(&SiteConfig) -> T) -> Option<(String, T)> {
    let d = fanout.desired(site)?;
    let out = f(&d.decoded().ok()?);
    Some((d.digest.clone(), out))
}

/// The digest each present agent has applied, from its presence record.
async fn applied<S: IntentStore>(store: &S) -> Result<BTreeMap<String, String>, StoreError> {
    Ok(store
        .present()
        .await?
        .into_iter()
        .filter_map(|(site, v)| {
            let status = crate::sites::decode_status(&v)?.status?;
            Some((site, status.applied_digest))
        })
        .collect())
}

/// How a rotation stands, for one step of the driver.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Wait(String),
    Switch { peers: usize },
}

/// The prepare phase: every segment's next key is registered, and every
/// peer whose agent is connected applied a configuration holding it.
fn prepared(fanout: &Fanout, site: &str, keys: &BTreeMap<String, String>, applied: &BTreeMap<String, String>) -> Next {
    let segments = fanout.segments(site);
    let mut next = BTreeMap::new();
    for seg in &segments {
        match keys.get(&rotation::next_entry(seg)) {
            Some(k) => next.insert(seg.clone(), k.clone()),
            None => return Next::Wait(format!("the next key of {seg}")),
        };
    }
    let Some((_, peers)) = with_config(fanout, site, |c| {
        c.segments
            .iter()
            .flat_map(|s| s.peers.iter().map(move |p| (s.segment.clone(), p.name.clone())))
            .collect::<BTreeSet<(String, String)>>()
    }) else {
        return Next::Wait("the site's configuration".into());
    };
    let names: BTreeSet<&String> = peers.iter().map(|(_, p)| p).collect();
    let mut held_by = 0;
    for peer in names {
        let Some(applied) = applied.get(peer) else { continue };
        let holds_all = with_config(fanout, peer, |c| {
            peers
                .iter()
                .filter(|(_, p)| p == peer)
                .all(|(seg, _)| next.get(seg).is_some_and(|k| holds(c, site, seg, k)))
        });
        match holds_all {
            Some((digest, true)) if digest == *applied => held_by += 1,
            _ => return Next::Wait(format!("peer {peer}")),
        }
    }
    Next::Switch { peers: held_by }
}

/// `hh:mm:ss.mmm UTC` of a Unix ms instant, for the audit entry.
fn utc(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:02}:{:02}:{:02}.{:03} UTC", t.hour(), t.minute(), t.second(), t.millisecond())
}

/// The next keys a site's entries hold, by segment.
fn next_keys(keys: &BTreeMap<String, String>) -> Vec<(String, String)> {
    keys.iter()
        .filter_map(|(entry, key)| Some((entry.strip_prefix(rotation::NEXT)?.to_string(), key.clone())))
        .collect()
}

/// One step of every rotation under way, then the schedule's new ones.
/// Returns how many writes it made.
pub async fn step<S: IntentStore>(
    store: &S,
    fanout: &Fanout,
    now_ms: u64,
    schedule: Schedule,
) -> Result<usize, StoreError> {
    let all = fanout.public_keys().keys;
    let under_way: Vec<(&String, Rotation)> =
        all.keys().filter_map(|site| Some((site, rotation::rotation(&all, site)?))).collect();
    let mut writes = 0;
    let applied =
        if under_way.iter().any(|(_, r)| r.phase != Phase::Fresh) { applied(store).await? } else { BTreeMap::new() };
    for (site, r) in &under_way {
        let keys = &all[*site];
        let guard = Guard::Holds(r.text().into_bytes());
        // A rotation that cannot end is given up, so that it does not hold
        // a place of the schedule's for ever: the site is no longer served
        // (removed from the intent, or revoked), or its peers never all
        // held the next keys (a peer that cannot apply its configuration).
        // The site keeps its current keys; the next ones are dropped.
        let gone = fanout.desired(site).is_none();
        if gone || (r.phase == Phase::Prepare && now_ms.saturating_sub(r.id) > PREPARE_LIMIT.as_millis() as u64) {
            let why = if gone {
                "the site is not served (removed from the intent, or revoked)".to_string()
            } else {
                let waiting = match prepared(fanout, site, keys, &applied) {
                    Next::Wait(what) => what,
                    Next::Switch { .. } => "the switch".to_string(),
                };
                format!(
                    "not every peer held the next keys within {} s (waiting for {waiting})",
                    PREPARE_LIMIT.as_secs()
                )
            };
            let mut w =
                vec![put(site, rotation::ROTATION, guard, None), put(site, rotation::SWITCHED, Guard::Any, None)];
            w.extend(keys.keys().filter(|e| e.starts_with(rotation::NEXT)).map(|e| put(site, e, Guard::Any, None)));
            let summary = format!("key rotation of site {site} given up (rotation {}): {why}; its keys stay", r.id);
            let event = Event { time_ms: now_ms, actor: "controller:keys".to_string(), summary };
            if store.record(event, w).await?.is_some() {
                tracing::warn!(site = %site, id = r.id, reason = %why, "key rotation given up");
                writes += 1;
            }
            continue;
        }
        let (summary, w) = match r.phase {
            // The switch's instant is set ahead: the keys stay as they are
            // until the rotation is done, the peers and the site acting on
            // the instant each configuration carries.
            Phase::Prepare => match prepared(fanout, site, keys, &applied) {
                Next::Switch { peers } => {
                    let at = now_ms + rotation::switch_lead_ms(peers);
                    let switch = Rotation { phase: Phase::Switch, switch_at: Some(at), ..*r };
                    let w = vec![put(site, rotation::ROTATION, guard, Some(switch.text()))];
                    let summary = format!(
                        "WireGuard keys of site {site} switch to the next ones ({}) at {}; {peers} connected peers held them first",
                        crate::sites::key_list(&next_keys(keys)),
                        utc(at)
                    );
                    (summary, w)
                }
                Next::Wait(_) => continue,
            },
            // Done once the agent confirmed the switch (it reported its
            // next keys as its keys): removing the rotation from its
            // configuration before then would leave it on its old keys
            // while its peers hold only the new ones. A switch without an
            // instant (an earlier version's) is done once applied.
            Phase::Switch => {
                let done = match r.switch_at {
                    Some(at) => now_ms >= at && keys.get(rotation::SWITCHED) == Some(&r.id.to_string()),
                    None => with_config(fanout, site, |_| ())
                        .is_some_and(|(digest, ())| applied.get(*site) == Some(&digest)),
                };
                if !done {
                    continue;
                }
                let mut w = vec![
                    put(site, rotation::ROTATION, guard, None),
                    put(site, rotation::SWITCHED, Guard::Any, None),
                    put(site, rotation::SINCE, Guard::Any, Some(r.switch_at.unwrap_or(now_ms).to_string())),
                ];
                let listed = next_keys(keys);
                for (seg, key) in &listed {
                    w.push(put(site, seg, Guard::Any, Some(key.clone())));
                    w.push(put(site, &rotation::next_entry(seg), Guard::Any, None));
                }
                let summary = format!(
                    "key rotation of site {site} done (rotation {}): its keys are the next ones ({})",
                    r.id,
                    crate::sites::key_list(&listed)
                );
                (summary, w)
            }
            Phase::Fresh => {
                let segments = fanout.segments(site);
                if segments.is_empty() || !segments.iter().all(|s| keys.contains_key(s)) {
                    continue;
                }
                let summary = format!("site {site} registered fresh WireGuard keys after their revocation");
                (summary, vec![put(site, rotation::ROTATION, guard, None)])
            }
        };
        let event = Event { time_ms: now_ms, actor: "controller:keys".to_string(), summary };
        if store.record(event, w).await?.is_some() {
            tracing::info!(site = %site, id = r.id, phase = r.phase.as_str(), "key rotation moved on");
            writes += 1;
        }
    }
    if schedule.period_ms > 0 {
        let rotating: BTreeSet<String> = under_way.iter().map(|(s, _)| (*s).clone()).collect();
        let since: BTreeMap<String, u64> =
            all.keys().filter_map(|s| Some((s.clone(), rotation::since(&all, s)?))).collect();
        for site in rotation::due(now_ms, &since, &rotating, schedule) {
            match request(store, &site, "controller:schedule", "scheduled: keys older than the period", now_ms).await {
                Ok(_) => writes += 1,
                Err(RotationError::Store(e)) => return Err(e),
                Err(e) => tracing::debug!(site, error = %e, "scheduled rotation not started"),
            }
        }
    }
    Ok(writes)
}

/// Drives rotations every `every` until the fan-out is dropped.
pub async fn drive<S: IntentStore + 'static>(
    store: Arc<S>,
    fanout: std::sync::Weak<Fanout>,
    every: Duration,
    schedule: Schedule,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scheduled_at: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        let Some(f) = fanout.upgrade() else { return };
        // The schedule counts in days: it reads every site's key age once
        // a minute (an eighth of a shorter period), not at every step
        // (10,000 sites, five times a second).
        let now = tokio::time::Instant::now();
        let every = SCHEDULE_EVERY.min(Duration::from_millis(schedule.period_ms / 8));
        let due = scheduled_at.is_none_or(|at| now.duration_since(at) >= every);
        if due {
            scheduled_at = Some(now);
        }
        let this_step = if due { schedule } else { Schedule { period_ms: 0, ..schedule } };
        if let Err(e) = step(&*store, &f, crate::pki::now_ms(), this_step).await {
            tracing::warn!(error = %e, "key rotations: cannot move on; trying again");
        }
    }
}

/// A site's key state for `musubi status`: when its keys were registered,
/// and the phase of a rotation under way.
pub fn key_state(keys: &BTreeMap<String, String>) -> (u64, String) {
    let phase = rotation::site_rotation(keys).map(|r| r.phase.as_str());
    (rotation::site_since(keys).unwrap_or(0), phase.unwrap_or_default().to_string())
}
