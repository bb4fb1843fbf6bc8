//! Mutual aid's operations: an operator opens a declared aid for a while
//! ([`activate`]) or closes it ([`deactivate`]); [`drive`] closes the
//! expired ones. The activation is stored beside the WireGuard keys
//! (`musubi_core::aid`), so one reload of the fan-out puts it in the
//! configurations of the aided segment's sites; every step is one write with
//! its audit entry. Automatic activations happen on the sites themselves
//! (the controller may be cut off too) and are audited when their agents
//! report them ([`reported`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use musubi_core::aid::{ACTIVATIONS, Activation};
use musubi_core::intent::Intent;

use crate::store::layout::{KEYS, public_key_key};
use crate::store::{Event, Guard, IntentStore, StoreError, Write};

/// Why an aid cannot be activated or deactivated.
#[derive(Debug, thiserror::Error)]
pub enum AidError {
    #[error("no segment declares an aid named `{0}`")]
    Unknown(String),
    #[error("aid `{0}` is not active")]
    NotActive(String),
    #[error("aid `{name}` lasts at most {max}; asked for {asked}")]
    TooLong { name: String, max: String, asked: String },
    #[error("aid `{0}` changed under this request; ask again")]
    Raced(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The activation of `name` as the store holds it now.
async fn held<S: IntentStore>(store: &S, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let key = public_key_key(ACTIVATIONS, name);
    Ok(store.list(&key).await?.into_iter().find(|(k, _)| *k == key).map(|(_, v)| v))
}

fn describe(intent: &Intent, name: &str) -> Result<String, AidError> {
    let (segment, aid) = intent.aid(name).ok_or_else(|| AidError::Unknown(name.to_string()))?;
    Ok(format!("mutual aid {name} (segment {} through {})", segment.name, aid.access_points.join(" and ")))
}

fn because(reason: &str) -> String {
    if reason.is_empty() { String::new() } else { format!(": {reason}") }
}

/// How long the first network's request for an activation waits for the
/// other network's.
pub const ASK_LIMIT: Duration = Duration::from_secs(15 * 60);

/// The entry beside an activation that holds a request waiting for the
/// other network's operator.
const ASKED: &str = "+asked";

/// The two networks an aid joins, for whom an operator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sides {
    /// The aided segment's network (its tenant).
    pub segment: bool,
    /// The aiding access points' network.
    pub aiding: bool,
}

impl Sides {
    fn word(self) -> &'static str {
        if self.segment { "the aided segment's network" } else { "the aiding access points' network" }
    }
}

/// What an activation request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activated {
    /// Open until then (Unix ms).
    Open(u64),
    /// Recorded; waits for an operator of this network.
    Waiting(&'static str),
}

/// Opens `name` for `duration` (its declared maximum when `None`, never
/// longer). An operator who speaks for one of the two networks only
/// (`sides`) records a request that the other network's operator completes
/// within [`ASK_LIMIT`].
#[allow(clippy::too_many_arguments)]
pub async fn activate<S: IntentStore>(
    store: &S,
    intent: &Intent,
    name: &str,
    actor: &str,
    sides: Sides,
    reason: &str,
    duration: Option<Duration>,
    now_ms: u64,
) -> Result<Activated, AidError> {
    let what = describe(intent, name)?;
    let (_, aid) = intent.aid(name).ok_or_else(|| AidError::Unknown(name.to_string()))?;
    let max = Duration::from_secs(aid.max_duration_s);
    let duration = duration.unwrap_or(max);
    if duration > max {
        return Err(AidError::TooLong {
            name: name.to_string(),
            max: musubi_core::words::duration_text(max.as_secs()),
            asked: musubi_core::words::duration_text(duration.as_secs()),
        });
    }
    let ask_key = public_key_key(ACTIVATIONS, &format!("{name}{ASKED}"));
    let mut writes = Vec::new();
    let mut by = String::new();
    // The other network's request, if one waits: this one completes it.
    let waiting = held(store, &format!("{name}{ASKED}")).await?;
    let other = waiting.as_ref().and_then(|v| Ask::parse(&String::from_utf8_lossy(v))).filter(|ask| {
        let speaks = if ask.segment { sides.aiding } else { sides.segment };
        speaks && now_ms < ask.at_ms.saturating_add(ASK_LIMIT.as_millis() as u64)
    });
    if let Some(ask) = &other {
        let side = Sides { segment: ask.segment, aiding: !ask.segment };
        by = format!(" (asked by {} for {})", ask.actor, side.word());
        writes.push(Write { key: ask_key.clone(), guard: Guard::Holds(waiting.unwrap_or_default()), value: None });
    } else if !(sides.segment && sides.aiding) {
        let ask = Ask { segment: sides.segment, at_ms: now_ms, actor: actor.to_string() };
        let other = Sides { segment: !sides.segment, aiding: sides.segment };
        let summary = format!(
            "activation of {what} asked for {}{}; waits for an operator of {}",
            sides.word(),
            because(reason),
            other.word()
        );
        let write = Write { key: ask_key, guard: Guard::Any, value: Some(ask.text().into_bytes()) };
        let event = Event { time_ms: now_ms, actor: actor.to_string(), summary };
        return match store.record(event, vec![write]).await? {
            Some(_) => Ok(Activated::Waiting(other.word())),
            None => Err(AidError::Raced(name.to_string())),
        };
    }
    let until = now_ms.saturating_add(duration.as_millis() as u64);
    let activation = Activation { until_unix_ms: until, reason: reason.to_string() };
    let summary = format!(
        "{what} activated{by} for {}{}",
        musubi_core::words::duration_text(duration.as_secs()),
        because(reason)
    );
    writes.push(Write {
        key: public_key_key(ACTIVATIONS, name),
        guard: Guard::Any,
        value: Some(activation.text().into_bytes()),
    });
    let event = Event { time_ms: now_ms, actor: actor.to_string(), summary };
    match store.record(event, writes).await? {
        Some(_) => Ok(Activated::Open(until)),
        None => Err(AidError::Raced(name.to_string())),
    }
}

/// A request for an activation from one network, waiting for the other's.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ask {
    /// Asked for the aided segment's network (else the aiding one's).
    segment: bool,
    at_ms: u64,
    actor: String,
}

impl Ask {
    fn text(&self) -> String {
        format!("{} {} {}", if self.segment { "segment" } else { "aiding" }, self.at_ms, self.actor)
    }

    fn parse(text: &str) -> Option<Ask> {
        let mut words = text.splitn(3, ' ');
        let segment = match words.next()? {
            "segment" => true,
            "aiding" => false,
            _ => return None,
        };
        Some(Ask { segment, at_ms: words.next()?.parse().ok()?, actor: words.next().unwrap_or_default().to_string() })
    }
}

/// Closes `name` before its time.
pub async fn deactivate<S: IntentStore>(
    store: &S,
    intent: &Intent,
    name: &str,
    actor: &str,
    reason: &str,
    now_ms: u64,
) -> Result<(), AidError> {
    let what = describe(intent, name)?;
    let Some(value) = held(store, name).await? else { return Err(AidError::NotActive(name.to_string())) };
    let write = Write { key: public_key_key(ACTIVATIONS, name), guard: Guard::Holds(value), value: None };
    let event =
        Event { time_ms: now_ms, actor: actor.to_string(), summary: format!("{what} deactivated{}", because(reason)) };
    match store.record(event, vec![write]).await? {
        Some(_) => Ok(()),
        None => Err(AidError::Raced(name.to_string())),
    }
}

/// Every operator's activation as the store holds it now, by aid name.
pub async fn activations<S: IntentStore>(store: &S) -> Result<BTreeMap<String, Activation>, StoreError> {
    let prefix = format!("{KEYS}{ACTIVATIONS}/");
    Ok(store
        .list(&prefix)
        .await?
        .into_iter()
        .filter_map(|(k, v)| Some((k[prefix.len()..].to_string(), Activation::parse(&String::from_utf8_lossy(&v))?)))
        .collect())
}

/// Closes every activation that expired at `now_ms` (and any whose aid is no
/// longer declared); returns how many.
pub async fn expire<S: IntentStore>(store: &S, intent: &Intent, now_ms: u64) -> Result<usize, StoreError> {
    let prefix = format!("{KEYS}{ACTIVATIONS}/");
    let mut closed = 0;
    for (key, value) in store.list(&prefix).await? {
        let name = key[prefix.len()..].to_string();
        let text = String::from_utf8_lossy(&value);
        let summary = if let Some(aid) = name.strip_suffix(ASKED) {
            let Some(ask) = Ask::parse(&text) else { continue };
            if now_ms < ask.at_ms.saturating_add(ASK_LIMIT.as_millis() as u64) {
                continue;
            }
            format!(
                "request by {} to activate mutual aid {aid} lapsed: the other network did not ask within 15 min",
                ask.actor
            )
        } else {
            let expired = Activation::parse(&text).is_none_or(|a| a.expired(now_ms));
            let declared = intent.aid(&name).is_some();
            if !expired && declared {
                continue;
            }
            match describe(intent, &name) {
                Ok(what) => format!("{what} expired: isolation restored"),
                Err(_) => format!("activation of mutual aid {name} dropped: no segment declares it any more"),
            }
        };
        let event = Event { time_ms: now_ms, actor: "controller:aid".to_string(), summary };
        let write = Write { key, guard: Guard::Holds(value), value: None };
        // A guard that failed: another replica closed it, or an operator
        // extended it; either way it is not this step's.
        if store.record(event, vec![write]).await?.is_some() {
            tracing::info!(aid = %name, "mutual aid activation expired");
            closed += 1;
        }
    }
    Ok(closed)
}

/// Closes expired activations every `every`, on every replica (guarded
/// writes: one wins).
pub async fn drive<S: IntentStore + 'static>(
    store: Arc<S>,
    fanout: std::sync::Weak<crate::fanout::Fanout>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(f) = fanout.upgrade() else { return };
        let intent = f.aid_intent();
        drop(f);
        if let Err(e) = expire(&*store, &intent, crate::pki::now_ms()).await {
            tracing::warn!(error = %e, "mutual aid: cannot close expired activations; trying again");
        }
    }
}

/// The audit entries for a site whose agent reports a different set of
/// aids in use than before (`before`: `None` when it just connected).
pub fn reported(intent: &Intent, site: &str, before: Option<&[String]>, now: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let was = before.unwrap_or(&[]);
    for name in now.iter().filter(|n| !was.contains(n)) {
        let what = describe(intent, name).unwrap_or_else(|_| format!("mutual aid {name}"));
        let how = match intent.aid(name).map(|(_, a)| a.activation) {
            Some(musubi_core::intent::Activation::Automatic) => {
                "automatically: neither of the segment's access points answered"
            }
            _ => "as activated",
        };
        let when = if before.is_none() { " (reported as it connected)" } else { "" };
        out.push(format!("{what} in use at site {site}, {how}{when}"));
    }
    for name in was.iter().filter(|n| !now.contains(n)) {
        let what = describe(intent, name).unwrap_or_else(|_| format!("mutual aid {name}"));
        out.push(format!("{what} no longer in use at site {site}"));
    }
    out
}
