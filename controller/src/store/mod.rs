//! The intent store: where intent, allocations and the audit chain live.
//!
//! One seam, two backends that pass the same conformance suite:
//! [`embedded`] (redb, one crash-safe file; the zero-setup default) and
//! [`etcd`] (production and HA). Both keep the [`layout`] of one key per
//! object and commit a change atomically only if the store is still at the
//! revision the change was planned against.
//!
//! The store is I/O; everything it is given was computed by the pure core.

pub mod any;
pub mod apply;
pub mod embedded;
pub mod etcd;
pub mod generations;
pub mod layout;
pub mod presence;
pub mod watch;

use layout::{Stored, WriteSet};
use musubi_core::audit::AuditEntry;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the intent changed since revision {expected} (it is now at revision {actual}); plan again against the current intent"
    )]
    Conflict { expected: u64, actual: u64 },
    #[error("cannot encode {key}: {source}")]
    Encode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the stored value at {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: Cause,
    },
    #[error("{path} is in use by another controller")]
    Locked { path: String },
    /// A store configuration that would send secrets in plain text or
    /// silently drop what was asked for.
    #[error("refusing the etcd settings: {0}")]
    Misconfigured(&'static str),
    /// The backend failed or could not be reached: etcd's client error,
    /// redb's, or the file or random source the store needed. Messages
    /// carry the cause, which is also kept as the source.
    #[error("{backend}: {source}")]
    Backend {
        backend: &'static str,
        #[source]
        source: Cause,
    },
    #[error(transparent)]
    Refused(#[from] Refused),
}

/// The backend refused a request as malformed (etcd: a key written twice
/// in one transaction, more operations than it allows): sending it again
/// cannot help.
#[derive(Debug, thiserror::Error)]
#[error("{backend} refused the request: {source}")]
pub struct Refused {
    pub backend: &'static str,
    #[source]
    pub source: Cause,
}

/// The cause of a [`StoreError`], kept whole.
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

impl StoreError {
    pub fn backend(backend: &'static str, source: impl Into<Cause>) -> Self {
        StoreError::Backend { backend, source: source.into() }
    }

    pub fn corrupt(key: impl Into<String>, source: impl Into<Cause>) -> Self {
        StoreError::Corrupt { key: key.into(), source: source.into() }
    }
}

/// The condition of [`IntentStore::swap`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Guard {
    #[default]
    Any,
    Absent,
    Holds(Vec<u8>),
}

/// An event beside the intent, for the audit chain: who, when, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub time_ms: u64,
    pub actor: String,
    pub summary: String,
}

/// One key set (or, with `None`, deleted) if its guard holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub guard: Guard,
    pub value: Option<Vec<u8>>,
}

/// A backend of the intent store. Its futures are `Send` so that a server
/// can serve many clients from one store on a multi-threaded runtime.
pub trait IntentStore: Send + Sync {
    /// The whole current state, read at one consistent point.
    fn load(&self) -> impl Future<Output = Result<Stored, StoreError>> + Send;

    /// The intent revision now: one small read, to tell whether a state
    /// read earlier is still current.
    fn revision(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Writes every put and delete atomically, if and only if the store is
    /// still at revision `expected`; otherwise writes nothing and reports a
    /// conflict.
    fn commit(&self, expected: u64, writes: WriteSet) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The audit chain, oldest first.
    fn history(&self) -> impl Future<Output = Result<Vec<AuditEntry>, StoreError>> + Send;

    /// Records the WireGuard public keys an agent reported, (segment, key)
    /// pairs, in one write. Not part of the intent: no revision, no audit entry.
    fn put_public_keys(
        &self,
        site: &str,
        keys: &[(String, String)],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Holds a presence record for `site` that expires `ttl` after its
    /// holder stops renewing it.
    fn announce(
        &self,
        site: &str,
        ttl: std::time::Duration,
    ) -> impl Future<Output = Result<presence::Presence, StoreError>> + Send;

    /// Sites whose presence record is live, with the value last set on it.
    fn present(&self) -> impl Future<Output = Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError>> + Send;

    /// Every key under `prefix` (site records outside the intent: join
    /// tokens, revocations, last-seen times), from one consistent read.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<(String, Vec<u8>)>, StoreError>> + Send;

    /// Sets `key` to `value` (`None` deletes it) if and only if `expected`
    /// holds now. Says whether it wrote.
    fn swap(
        &self,
        key: &str,
        expected: Guard,
        value: Option<Vec<u8>>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// The intent revision and the head of the audit chain, as stored now.
    fn head(&self) -> impl Future<Output = Result<(u64, Option<AuditEntry>), StoreError>> + Send;

    /// Writes `writes` if every one's guard holds and appends `event` to the
    /// audit chain after the current head, atomically: all or nothing.
    /// `Ok(None)` when a guard did not hold (nothing was written).
    fn record(
        &self,
        event: Event,
        writes: Vec<Write>,
    ) -> impl Future<Output = Result<Option<AuditEntry>, StoreError>> + Send;

    /// A counter that moves whenever an agent's public key or a revocation
    /// changes, from this controller or any other.
    fn subscribe_sites(&self) -> impl Future<Output = Result<tokio::sync::watch::Receiver<u64>, StoreError>> + Send;

    /// The newest intent revision, updated as commits land, from this
    /// controller or (on a shared store) any other.
    fn subscribe(&self) -> impl Future<Output = Result<tokio::sync::watch::Receiver<u64>, StoreError>> + Send;

    /// Change records of every revision after `after`, oldest first.
    fn changes_since(
        &self,
        after: u64,
    ) -> impl Future<Output = Result<Vec<(u64, Vec<layout::KeyChange>)>, StoreError>> + Send;
}
