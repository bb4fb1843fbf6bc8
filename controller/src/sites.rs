//! Site records beside the intent: one-time join tokens, revocations and
//! agents' last-seen status. Kept in the store so every replica sees them.
//!
//! A token is 32 random bytes shown once to the operator; the store keeps
//! only its SHA-256. Redeeming it is a compare-and-swap from "unused" to
//! "used", so two agents racing with one token cannot both win.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::store::layout::{KEY_OWNERS, REVOKED, REVOKED_OPERATORS, SEEN, TOKENS};
use crate::store::{Event, Guard, IntentStore, StoreError, Write};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub site: String,
    pub expires_ms: u64,
    pub created_by: String,
    pub created_ms: u64,
    #[serde(default)]
    pub used_ms: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("unknown join token")]
    Unknown,
    #[error("the join token was already used")]
    Used { used_ms: u64 },
    #[error("the join token expired {ago_s} s ago")]
    Expired { ago_s: u64 },
    #[error("the join token is for site `{token_site}`, not `{asked}`")]
    OtherSite { token_site: String, asked: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn hash(token: &str) -> String {
    musubi_core::audit::sha256_hex(token.as_bytes())
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode { key: key.to_string(), source })
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::corrupt(key, e))
}

/// Reads one key exactly (not the keys it is a prefix of).
pub(crate) async fn get<S: IntentStore>(store: &S, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(store.list(key).await?.into_iter().find(|(k, _)| k == key).map(|(_, v)| v))
}

/// Makes a single-use token for `site`, valid for `ttl`. Returns the token
/// (shown once, never stored) and its expiry.
/// Most sites in one batch of join tokens: one transaction within etcd's
/// default limit of 128 operations (the audit entry and its head, then a
/// record per token).
pub const TOKENS_PER_BATCH: usize = 100;

pub async fn create_token<S: IntentStore>(
    store: &S,
    site: &str,
    ttl: Duration,
    actor: &str,
    now_ms: u64,
) -> Result<(String, u64), StoreError> {
    let mut made = create_tokens(store, &[site.to_string()], ttl, actor, now_ms).await?;
    made.pop().ok_or_else(|| StoreError::backend("join tokens", "no token made"))
}

/// Join tokens for `sites` (at most [`TOKENS_PER_BATCH`]), in their order:
/// their records and one audit entry naming every site, atomically — an
/// enrolment of thousands of sites appends tens of entries to the chain,
/// not thousands, each a serialised append (and on etcd a replicated one).
pub async fn create_tokens<S: IntentStore>(
    store: &S,
    sites: &[String],
    ttl: Duration,
    actor: &str,
    now_ms: u64,
) -> Result<Vec<(String, u64)>, StoreError> {
    if sites.len() > TOKENS_PER_BATCH {
        return Err(StoreError::backend(
            "join tokens",
            format!("{} sites in one batch; at most {TOKENS_PER_BATCH}", sites.len()),
        ));
    }
    let expires_ms = now_ms + ttl.as_millis() as u64;
    let mut tokens = Vec::with_capacity(sites.len());
    let mut writes = Vec::with_capacity(sites.len());
    for site in sites {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| StoreError::backend("random source", e.to_string()))?;
        let token = format!("mst_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret));
        let key = format!("{TOKENS}{}", hash(&token));
        let record = TokenRecord {
            site: site.clone(),
            expires_ms,
            created_by: actor.to_string(),
            created_ms: now_ms,
            used_ms: None,
        };
        writes.push(Write { value: Some(encode(&key, &record)?), key, guard: Guard::Absent });
        tokens.push((token, expires_ms));
    }
    let summary = match sites {
        [site] => format!("join token created for site {site}, valid {} s", ttl.as_secs()),
        _ => format!("join tokens created for {} sites, valid {} s: {}", sites.len(), ttl.as_secs(), sites.join(", ")),
    };
    let event = Event { time_ms: now_ms, actor: actor.to_string(), summary };
    match store.record(event, writes).await? {
        Some(_) => Ok(tokens),
        None => Err(StoreError::backend("random source", "a new join token collided with a kept one")),
    }
}

/// Spends `token` for `site`. A token presented for the wrong site is not
/// spent (it stays usable by its own site).
pub async fn redeem<S: IntentStore>(store: &S, token: &str, site: &str, now_ms: u64) -> Result<(), TokenError> {
    let spent = check(store, token, site, now_ms).await?;
    let event = Event { time_ms: now_ms, actor: format!("site:{site}"), summary: spent.summary() };
    match store.record(event, vec![spent.write]).await? {
        Some(_) => Ok(()),
        None => Err(TokenError::Used { used_ms: now_ms }),
    }
}

/// A token found good for its site, and the write that spends it.
struct Spent {
    site: String,
    created_by: String,
    write: Write,
}

impl Spent {
    fn summary(&self) -> String {
        format!("join token of site {} spent: certificate issued (token created by {})", self.site, self.created_by)
    }
}

/// Checks `token` for `site` at `now_ms`: the write that spends it, or why not.
async fn check<S: IntentStore>(store: &S, token: &str, site: &str, now_ms: u64) -> Result<Spent, TokenError> {
    let key = format!("{TOKENS}{}", hash(token));
    let current = get(store, &key).await?.ok_or(TokenError::Unknown)?;
    let mut record: TokenRecord = decode(&key, &current)?;
    if let Some(used_ms) = record.used_ms {
        return Err(TokenError::Used { used_ms });
    }
    if record.site != site {
        return Err(TokenError::OtherSite { token_site: record.site, asked: site.to_string() });
    }
    if now_ms >= record.expires_ms {
        return Err(TokenError::Expired { ago_s: (now_ms - record.expires_ms) / 1000 });
    }
    record.used_ms = Some(now_ms);
    let write = Write { value: Some(encode(&key, &record)?), key, guard: Guard::Holds(current) };
    Ok(Spent { site: site.to_string(), created_by: record.created_by, write })
}

/// One redemption waiting for its batch.
struct Pending {
    token: String,
    site: String,
    now_ms: u64,
    done: tokio::sync::oneshot::Sender<Result<(), TokenError>>,
}

/// Spends join tokens in batches: the redemptions that arrive while one
/// batch is being recorded are checked one by one and recorded together —
/// their writes (each guarded by the record it read) and one audit entry
/// naming every site, atomically. An enrolment of thousands of agents
/// appends tens of entries, not thousands (each a serialised append, on
/// etcd a replicated one: 2,000 agents on three replicas took 90 s to
/// enrol, mostly waiting for their turn). Should a guard fail (a token
/// spent meanwhile, on another replica), each of the batch is tried on
/// its own, so that only that one is refused.
pub struct Redeemer<S> {
    batches: Batches<S, Pending>,
}

impl<S> std::fmt::Debug for Redeemer<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redeemer").finish_non_exhaustive()
    }
}

impl<S: IntentStore + 'static> Redeemer<S> {
    pub fn new(store: Arc<S>) -> Redeemer<S> {
        Redeemer { batches: Batches::new(store, |store, batch| Box::pin(async move { spend(&*store, batch).await })) }
    }

    /// Spends `token` for `site`, in the next batch.
    pub async fn redeem(&self, token: &str, site: &str, now_ms: u64) -> Result<(), TokenError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let pending = Pending { token: token.to_string(), site: site.to_string(), now_ms, done };
        if !self.batches.push(pending) {
            return Err(StoreError::backend("join tokens", "the redemption queue stopped").into());
        }
        answer.await.unwrap_or_else(|_| Err(StoreError::backend("join tokens", "a redemption was dropped").into()))
    }
}

/// What a batch of `T` is handed to, with the store.
type Handler<S, T> = fn(Arc<S>, Vec<T>) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Items handled in batches by a task started with the first one (group
/// commit): the task takes what the queue holds, up to a batch's most
/// ([`TOKENS_PER_BATCH`] items unless [`Batches::weighed`]), waiting only
/// for the first; the next batch is what arrived while one was handled.
struct Batches<S, T> {
    store: Arc<S>,
    handle: Handler<S, T>,
    queue: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<T>>,
    /// An item's share of a batch, and a batch's most (an item heavier
    /// than that is a batch of its own).
    weight: fn(&T) -> usize,
    max: usize,
}

impl<S: Send + Sync + 'static, T: Send + 'static> Batches<S, T> {
    fn new(store: Arc<S>, handle: Handler<S, T>) -> Batches<S, T> {
        Batches { store, handle, queue: std::sync::OnceLock::new(), weight: |_| 1, max: TOKENS_PER_BATCH }
    }

    /// Batches of at most `max` by `weight` instead of [`TOKENS_PER_BATCH`] items.
    fn weighed(self, weight: fn(&T) -> usize, max: usize) -> Batches<S, T> {
        Batches { weight, max, ..self }
    }

    /// Queues `item`; false if the task is gone.
    fn push(&self, item: T) -> bool {
        let queue = self.queue.get_or_init(|| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<T>();
            let (store, handle, weight, max) = (self.store.clone(), self.handle, self.weight, self.max);
            tokio::spawn(async move {
                // The item that did not fit the last batch begins the next.
                let mut held = None;
                loop {
                    let first = match held.take() {
                        Some(item) => item,
                        None => match rx.recv().await {
                            Some(item) => item,
                            None => return,
                        },
                    };
                    let mut total = weight(&first);
                    let mut batch = vec![first];
                    while total < max {
                        let Ok(item) = rx.try_recv() else { break };
                        let w = weight(&item);
                        if total + w > max {
                            held = Some(item);
                            break;
                        }
                        total += w;
                        batch.push(item);
                    }
                    handle(store.clone(), batch).await;
                }
            });
            tx
        });
        queue.send(item).is_ok()
    }
}

async fn spend<S: IntentStore>(store: &S, batch: Vec<Pending>) {
    let checks = futures::future::join_all(batch.iter().map(|p| check(store, &p.token, &p.site, p.now_ms))).await;
    let mut good: Vec<(Pending, Spent)> = Vec::new();
    for (p, checked) in batch.into_iter().zip(checks) {
        match checked {
            // The same token twice in one batch: the first spends it.
            Ok(spent) if good.iter().any(|(_, s)| s.write.key == spent.write.key) => {
                let _ = p.done.send(Err(TokenError::Used { used_ms: p.now_ms }));
            }
            Ok(spent) => good.push((p, spent)),
            Err(e) => {
                let _ = p.done.send(Err(e));
            }
        }
    }
    let Some(now_ms) = good.iter().map(|(p, _)| p.now_ms).max() else { return };
    let (actor, summary) = match &good[..] {
        [(_, spent)] => (format!("site:{}", spent.site), spent.summary()),
        _ => {
            let sites: Vec<String> =
                good.iter().map(|(_, s)| format!("{} (token created by {})", s.site, s.created_by)).collect();
            let summary =
                format!("join tokens of {} sites spent: certificates issued: {}", good.len(), sites.join(", "));
            ("controller:enrolment".to_string(), summary)
        }
    };
    let event = Event { time_ms: now_ms, actor, summary };
    let writes: Vec<Write> = good.iter().map(|(_, s)| s.write.clone()).collect();
    match store.record(event, writes).await {
        Ok(Some(_)) => {
            for (p, _) in good {
                let _ = p.done.send(Ok(()));
            }
        }
        // A guard failed: someone spent one of them meanwhile. Each on its own.
        Ok(None) if good.len() > 1 => {
            for (p, _) in good {
                let result = redeem(store, &p.token, &p.site, p.now_ms).await;
                let _ = p.done.send(result);
            }
        }
        Ok(None) => {
            for (p, _) in good {
                let _ = p.done.send(Err(TokenError::Used { used_ms: p.now_ms }));
            }
        }
        Err(e) => {
            let message = e.to_string();
            for (p, _) in good {
                let _ = p.done.send(Err(StoreError::backend("join tokens", message.clone()).into()));
            }
        }
    }
}

/// A revocation of a site: while `active`, the site may not enrol; and
/// every certificate issued before `at_ms` is refused for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub at_ms: u64,
    pub active: bool,
}

pub async fn revoke<S: IntentStore>(
    store: &S,
    site: &str,
    actor: &str,
    now_ms: u64,
    restore: bool,
) -> Result<u64, StoreError> {
    revoke_key(store, &format!("{REVOKED}{site}"), &format!("site {site}"), actor, now_ms, restore).await
}

/// Whose a WireGuard public key is, as [`claim_key`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Claimed now, for this site and segment.
    New,
    /// Theirs already.
    Theirs,
    /// Another interface's (`site/segment`).
    Other(String),
}

/// The claim of WireGuard public key `key` for `site`'s key entry `entry`
/// (a next key's claim is its segment's): written only where no one holds
/// the key.
fn claim(site: &str, entry: &str, key: &str) -> Write {
    let segment = entry.strip_prefix(musubi_core::rotation::NEXT).unwrap_or(entry);
    Write { key: owner_index(key), guard: Guard::Absent, value: Some(format!("{site}/{segment}").into_bytes()) }
}

/// Claims WireGuard public key `key` for `site`'s key entry `entry`.
pub async fn claim_key<S: IntentStore>(store: &S, key: &str, site: &str, entry: &str) -> Result<Claim, StoreError> {
    let Write { key: index, guard, value: owner } = claim(site, entry, key);
    if store.swap(&index, guard, owner.clone()).await? {
        return Ok(Claim::New);
    }
    let held = get(store, &index).await?;
    let text = |v: Option<Vec<u8>>| v.map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
    Ok(if held == owner { Claim::Theirs } else { Claim::Other(text(held)) })
}

/// "WireGuard keys registered for site S: segment sha256:…, …".
fn keys_summary(site: &str, keys: &[(String, String)]) -> String {
    format!("WireGuard keys registered for site {site}: {}", key_list(keys))
}

/// The store key that says which interface a public key belongs to.
pub fn owner_index(key: &str) -> String {
    format!("{KEY_OWNERS}{}", hash(key))
}

/// "segment sha256:…, …": keys named in audit entries by a short hash.
pub(crate) fn key_list(keys: &[(String, String)]) -> String {
    let list: Vec<String> =
        keys.iter().map(|(segment, key)| format!("{segment} sha256:{}", &hash(key)[..16])).collect();
    list.join(", ")
}

/// One site's keys, waiting for their batch.
struct Registration {
    site: String,
    /// New keys, `(entry, key)`: claimed and audited.
    claims: Vec<(String, String)>,
    /// The site's key entries to record once the claims hold (the claimed
    /// keys among them).
    puts: Vec<(String, String)>,
    now_ms: u64,
    done: tokio::sync::oneshot::Sender<Result<bool, String>>,
}

impl Registration {
    /// Its claims (each only where no one holds the key) and its puts.
    fn writes(&self) -> Vec<Write> {
        let claims = self.claims.iter().map(|(entry, key)| claim(&self.site, entry, key));
        let puts = self.puts.iter().map(|(entry, key)| Write {
            key: crate::store::layout::public_key_key(&self.site, entry),
            guard: Guard::Any,
            value: Some(key.clone().into_bytes()),
        });
        claims.chain(puts).collect()
    }

    fn weight(&self) -> usize {
        self.claims.len() + self.puts.len()
    }
}

/// Registers agents' new WireGuard keys in batches (group commit): the
/// registrations that arrive while one batch is recorded become one
/// transaction — every key claimed for its interface, every site's key
/// entries put, and one audit entry naming every site and key. While
/// 10,000 agents enrol that is about 3,400 transactions instead of six per
/// agent (a claim per key, then the keys), each an fsync on the embedded
/// store and a replicated write on etcd. A key someone already
/// holds fails its batch's guard: then each of the batch is tried alone,
/// and only the one whose key is held is turned back (nothing of it
/// written), to its claims one by one ([`claim_key`]).
pub struct Registrar<S> {
    batches: Batches<S, Registration>,
}

impl<S> std::fmt::Debug for Registrar<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registrar").finish_non_exhaustive()
    }
}

/// Most writes in one batch of key registrations: with the audit entry and
/// its head, within etcd's default limit of 128 operations per transaction.
pub const REGISTRATION_WRITES: usize = 120;

impl<S: IntentStore + 'static> Registrar<S> {
    pub fn new(store: Arc<S>) -> Registrar<S> {
        let batches = Batches::new(store, |store, batch| Box::pin(async move { register_batch(&*store, batch).await }))
            .weighed(Registration::weight, REGISTRATION_WRITES);
        Registrar { batches }
    }

    /// Claims `claims` (`(entry, key)`, none empty) for `site` and puts its
    /// key entries `puts`, atomically with an audit entry, in the next
    /// batch. `Ok(false)`: a key of `claims` is held already (by the site
    /// itself or another one) and nothing of the site's was written.
    pub async fn register(
        &self,
        site: &str,
        claims: Vec<(String, String)>,
        puts: Vec<(String, String)>,
        now_ms: u64,
    ) -> Result<bool, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let registration = Registration { site: site.to_string(), claims, puts, now_ms, done };
        if !self.batches.push(registration) {
            return Err(StoreError::backend("public keys", "the key registrations' queue stopped"));
        }
        match answer.await {
            Ok(Ok(registered)) => Ok(registered),
            Ok(Err(message)) => Err(StoreError::backend("public keys", message)),
            Err(_) => Err(StoreError::backend("public keys", "a key registration was dropped")),
        }
    }
}

/// The audit entry of a batch's new keys.
fn keys_event(batch: &[Registration]) -> Option<Event> {
    let now_ms = batch.iter().map(|r| r.now_ms).max()?;
    Some(match batch {
        [one] => site_keys_event(&one.site, &one.claims, now_ms),
        _ => {
            let sites: Vec<String> = batch.iter().map(|r| format!("{}: {}", r.site, key_list(&r.claims))).collect();
            let summary = format!("WireGuard keys registered for {} sites: {}", batch.len(), sites.join("; "));
            Event { time_ms: now_ms, actor: "controller:enrolment".to_string(), summary }
        }
    })
}

/// Records `batch` in one transaction: whether every guard held.
async fn record_registrations<S: IntentStore>(store: &S, batch: &[Registration]) -> Result<bool, String> {
    let Some(event) = keys_event(batch) else { return Ok(true) };
    let writes: Vec<Write> = batch.iter().flat_map(Registration::writes).collect();
    store.record(event, writes).await.map(|entry| entry.is_some()).map_err(|e| e.to_string())
}

async fn register_batch<S: IntentStore>(store: &S, batch: Vec<Registration>) {
    // A key claimed twice in one batch (two sites, or one site for two
    // interfaces) is claimed one by one instead: one transaction may not
    // write a key twice (etcd refuses it).
    let mut claimed = std::collections::HashSet::new();
    let (batch, twice): (Vec<Registration>, Vec<Registration>) =
        batch.into_iter().partition(|r| r.claims.iter().all(|(_, key)| claimed.insert(key.clone())));
    for r in twice {
        let _ = r.done.send(Ok(false));
    }
    let result = record_registrations(store, &batch).await;
    match result {
        // A key of the batch is held already: each on its own.
        Ok(false) if batch.len() > 1 => {
            for r in batch {
                let alone = record_registrations(store, std::slice::from_ref(&r)).await;
                let _ = r.done.send(alone);
            }
        }
        result => {
            for r in batch {
                let _ = r.done.send(result.clone());
            }
        }
    }
}

/// The audit entry of `site`'s new keys claimed one by one (a batch's
/// guard failed, see [`Registrar`]).
pub async fn keys_claimed<S: IntentStore>(
    store: &S,
    site: &str,
    keys: &[(String, String)],
    now_ms: u64,
) -> Result<(), StoreError> {
    store.record(site_keys_event(site, keys, now_ms), Vec::new()).await.map(|_| ())
}

/// The audit event of one site's new keys, the site its actor.
fn site_keys_event(site: &str, keys: &[(String, String)], now_ms: u64) -> Event {
    Event { time_ms: now_ms, actor: format!("site:{site}"), summary: keys_summary(site, keys) }
}

/// A site removed from the intent: the certificates issued to it until now
/// are refused from now on, should a site of that name come back (it enrols
/// again with a new token). An active revocation stays active.
pub async fn retire<S: IntentStore>(store: &S, site: &str, actor: &str, now_ms: u64) -> Result<(), StoreError> {
    let key = format!("{REVOKED}{site}");
    let active = match get(store, &key).await? {
        Some(v) => decode::<Revocation>(&key, &v)?.active,
        None => false,
    };
    let event = Event {
        time_ms: now_ms,
        actor: actor.to_string(),
        summary: format!("site {site} removed from the intent: the certificates issued to it are refused"),
    };
    let value = Some(encode(&key, &Revocation { at_ms: now_ms, active })?);
    store.record(event, vec![Write { key, guard: Guard::Any, value }]).await.map(|_| ())
}

/// Refuses operator `name`'s certificates issued before `now_ms` (every
/// replica reads it on every call), or lifts that with `restore`.
pub async fn revoke_operator<S: IntentStore>(
    store: &S,
    name: &str,
    actor: &str,
    now_ms: u64,
    restore: bool,
) -> Result<u64, StoreError> {
    revoke_key(store, &format!("{REVOKED_OPERATORS}{name}"), &format!("operator {name}"), actor, now_ms, restore).await
}

/// Operator `name`'s revocation, if it was ever revoked.
pub async fn operator_revocation<S: IntentStore>(store: &S, name: &str) -> Result<Option<Revocation>, StoreError> {
    let key = format!("{REVOKED_OPERATORS}{name}");
    get(store, &key).await?.map(|v| decode(&key, &v)).transpose()
}

impl Revocation {
    /// Does it refuse a certificate issued at `issued_ms`? While active,
    /// every one; once lifted, those issued before it.
    pub fn refuses(&self, issued_ms: u64) -> bool {
        self.active || issued_ms < self.at_ms
    }
}

/// Revokes (or restores) `what` at `key`, with its audit entry.
async fn revoke_key<S: IntentStore>(
    store: &S,
    key: &str,
    what: &str,
    actor: &str,
    now_ms: u64,
    restore: bool,
) -> Result<u64, StoreError> {
    let key = key.to_string();
    let (record, summary) = if restore {
        let Some(current) = get(store, &key).await? else { return Ok(0) };
        let record = Revocation { active: false, ..decode(&key, &current)? };
        (record, format!("{what} restored: certificates issued before its revocation stay refused"))
    } else {
        (Revocation { at_ms: now_ms, active: true }, format!("{what} revoked"))
    };
    let event = Event { time_ms: now_ms, actor: actor.to_string(), summary };
    let value = Some(encode(&key, &record)?);
    store.record(event, vec![Write { key, guard: Guard::Any, value }]).await?;
    Ok(record.at_ms)
}

pub async fn revocations<S: IntentStore>(store: &S) -> Result<BTreeMap<String, Revocation>, StoreError> {
    store.list(REVOKED).await?.into_iter().map(|(k, v)| Ok((k[REVOKED.len()..].to_string(), decode(&k, &v)?))).collect()
}

/// Above this many peers and route groups, a status is stored condensed.
const CONDENSE_ABOVE: usize = 64;

/// Leaves out of a large status (an access point's: every member's tunnel
/// in every segment, every member's route group) what is as it should be —
/// peers up, judged, without loss, whose line never moved; route groups on
/// their own site, never moved — and peers not judged yet (members still
/// enrolling), counting them instead (`peers_up_omitted`,
/// `active_omitted`, `peers_unjudged_omitted`). What an operator looks for
/// stays: every peer judged down, lossy or moved, every group elsewhere.
pub fn condense(status: &mut musubi_proto::v1::Status) {
    if status.peers.len() + status.active.len() <= CONDENSE_ABOVE {
        return;
    }
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    let before = status.peers.len();
    status.peers.retain(|p| !(p.up && p.judged && p.loss_permille == 0 && p.line_moves == 0 && p.path.is_empty()));
    status.peers_up_omitted = status.peers_up_omitted.saturating_add(count(before - status.peers.len()));
    let before = status.peers.len();
    status.peers.retain(|p| p.judged || p.line_moves > 0 || !p.path.is_empty());
    status.peers_unjudged_omitted = status.peers_unjudged_omitted.saturating_add(count(before - status.peers.len()));
    let before = status.active.len();
    status.active.retain(|a| !(a.peer == a.route_group && a.moves == 0));
    status.active_omitted = status.active_omitted.saturating_add(count(before - status.active.len()));
}

/// An agent's status as the store keeps it (its presence record while it
/// is connected, its last-seen record after): protobuf, about a quarter of
/// its JSON — an access point reports every member's tunnels, and its
/// record is rewritten at every acknowledgement.
pub fn encode_status(status: &musubi_proto::v1::SiteStatus) -> Vec<u8> {
    prost::Message::encode_to_vec(status)
}

/// A stored status: protobuf, or the JSON that earlier versions wrote
/// (it begins with `{`, which no protobuf encoding of it does: field 15
/// as a group). `None` for neither.
pub fn decode_status(value: &[u8]) -> Option<musubi_proto::v1::SiteStatus> {
    if value.first() == Some(&b'{') {
        return serde_json::from_slice(value).ok();
    }
    prost::Message::decode(value).ok()
}

/// Keeps an agent's last status after it disconnects.
pub async fn record_seen<S: IntentStore>(store: &S, site: &str, status: &[u8]) -> Result<(), StoreError> {
    store.swap(&format!("{SEEN}{site}"), Guard::Any, Some(status.to_vec())).await.map(|_| ())
}

pub async fn seen<S: IntentStore>(store: &S) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
    Ok(store.list(SEEN).await?.into_iter().map(|(k, v)| (k[SEEN.len()..].to_string(), v)).collect())
}

#[cfg(test)]
mod tests {
    use musubi_proto::v1 as pb;

    use super::*;

    /// Batches by weight: what the queue holds is taken in order until the
    /// next item would pass the most; that item begins the next batch, and
    /// an item heavier than the most is a batch of its own.
    #[tokio::test(flavor = "current_thread")]
    async fn batches_are_cut_by_weight() {
        type Seen = std::sync::Mutex<Vec<Vec<usize>>>;
        type Item = (usize, tokio::sync::oneshot::Sender<()>);
        let seen: Arc<Seen> = Arc::default();
        let batches: Batches<Seen, Item> = Batches::new(seen.clone(), |seen, batch: Vec<Item>| {
            Box::pin(async move {
                seen.lock().expect("lock").push(batch.iter().map(|(w, _)| *w).collect());
                for (_, done) in batch {
                    let _ = done.send(());
                }
            })
        })
        .weighed(|(w, _)| *w, 120);
        // Queued before the batching task first runs (one thread): it finds them all.
        let mut answers = Vec::new();
        for w in [50, 50, 30, 130, 10, 60, 50] {
            let (done, answer) = tokio::sync::oneshot::channel();
            assert!(batches.push((w, done)));
            answers.push(answer);
        }
        for answer in answers {
            answer.await.expect("handled");
        }
        assert_eq!(*seen.lock().expect("lock"), vec![vec![50, 50], vec![30], vec![130], vec![10, 60, 50]]);
    }

    /// An access point's status: every member's tunnel in every segment,
    /// and a route group per member and segment.
    fn access_point(members: usize, segments: usize) -> pb::SiteStatus {
        let mut status = pb::Status {
            applied_revision: 41,
            applied_digest: "9f2c".repeat(16),
            at_unix_ms: 1_796_000_000_000,
            ..Default::default()
        };
        for s in 0..segments {
            for m in 0..members {
                let (segment, peer) = (format!("segment-{s}"), format!("school-{m:05}"));
                status.peers.push(pb::PeerHealth {
                    segment: segment.clone(),
                    peer: peer.clone(),
                    up: m % 97 != 0 && m < 1_900,
                    rtt_us: 800 + (m as u32 * 7) % 3000,
                    loss_permille: u32::from(m % 50 == 0),
                    // The last hundred members are still enrolling.
                    judged: m < 1_900,
                    ..Default::default()
                });
                status.active.push(pb::ActivePath {
                    segment,
                    route_group: peer.clone(),
                    peer,
                    local_line: "fiber".into(),
                    moves: u64::from(m % 100 == 0),
                });
            }
        }
        pb::SiteStatus {
            site: "ap-east".into(),
            agent_version: "0.1.0".into(),
            controller: "controller-1".into(),
            connected_unix_ms: 1_796_000_000_000,
            last_seen_unix_ms: 1_796_000_100_000,
            status: Some(status),
            desired_revision: 41,
            desired_digest: "9f2c".repeat(16),
        }
    }

    /// The stored status of an access point with 2,000 members in 5
    /// segments: protobuf, and condensed to what is not as it should be —
    /// a small fraction of the JSON earlier versions wrote (which still
    /// reads); the totals an operator sees are the same.
    #[test]
    fn a_stored_status_is_condensed_protobuf_and_old_json_still_reads() {
        let full = access_point(2_000, 5);
        let json = serde_json::to_vec(&full).expect("json");
        let protobuf = encode_status(&full);
        let mut condensed = full.clone();
        condense(condensed.status.as_mut().expect("status"));
        let stored = encode_status(&condensed);
        eprintln!(
            "access point, 2,000 members x 5 segments: JSON {} bytes, protobuf {} bytes, stored (condensed) {} bytes",
            json.len(),
            protobuf.len(),
            stored.len()
        );
        assert!(stored.len() * 20 < json.len(), "stored {} bytes, JSON {}", stored.len(), json.len());
        let (f, c) = (full.status.as_ref().expect("full"), condensed.status.as_ref().expect("condensed"));
        assert_eq!((c.peers_up(), c.peers_total()), (f.peers_up(), f.peers.len()), "peers up / total");
        assert_eq!(c.peers_unjudged_omitted, 500, "the members still enrolling are counted");
        assert_eq!(c.active.len() + c.active_omitted as usize, f.active.len(), "route groups");
        assert!(
            c.peers.iter().all(|p| p.judged && (!p.up || p.loss_permille > 0)),
            "every peer kept is judged down or lossy"
        );
        assert!(c.active.iter().all(|a| a.moves > 0), "every route group kept has moved");
        assert!(c.peers.iter().any(|p| !p.up), "the peers down are kept");
        assert_eq!(decode_status(&stored).as_ref(), Some(&condensed), "protobuf reads back");
        assert_eq!(decode_status(&json).as_ref(), Some(&full), "JSON of earlier versions reads");
        assert_eq!(decode_status(b"\xff\xff not a status"), None, "neither: nothing");
        // A small site's status is kept whole.
        let mut site = access_point(3, 2);
        let whole = site.clone();
        condense(site.status.as_mut().expect("status"));
        assert_eq!(site, whole);
    }
}
