//! Changes waiting for a second operator. Once operators are bound, a change
//! that touches a national object (or one its proposer marks so) is planned
//! and kept here instead of being written; another operator with the scope
//! approves it, and it is applied then if the intent is still at the
//! revision it was planned against. Kept in the store, so any replica
//! approves what any replica proposed; each expires.

use serde::{Deserialize, Serialize};

use crate::store::{Event, Guard, IntentStore, StoreError, Write};

pub const PENDING: &str = "/musubi/v1/pending/";

/// How long a proposal waits for its approval by default.
pub const DEFAULT_TTL_MS: u64 = 24 * 3600 * 1000;

/// A proposed change: what to apply, who proposed it, against which revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub id: String,
    pub proposer: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The revision its plan was made against; approved only at it.
    pub revision: u64,
    /// The intent objects it changes (`~settings, +site x`).
    pub summary: String,
    /// The operator's documents (name, text), as Apply received them.
    #[serde(default)]
    pub documents: Vec<(String, String)>,
    #[serde(default)]
    pub merge: bool,
    #[serde(default)]
    pub remove: Vec<String>,
    /// A rollback to this revision instead of documents.
    #[serde(default)]
    pub rollback_to: Option<u64>,
}

fn key(id: &str) -> String {
    format!("{PENDING}{id}")
}

/// A new identifier: 8 random bytes, hex.
pub fn new_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| StoreError::backend("random source", e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Keeps `pending` (a new id: never overwrites another proposal).
pub async fn propose<S: IntentStore>(store: &S, pending: &Pending) -> Result<(), StoreError> {
    let k = key(&pending.id);
    let value = serde_json::to_vec(pending).map_err(|source| StoreError::Encode { key: k.clone(), source })?;
    let what = match pending.rollback_to {
        Some(to) => format!("rollback to {to}: {}", pending.summary),
        None => pending.summary.clone(),
    };
    let event = Event {
        time_ms: pending.created_ms,
        actor: pending.proposer.clone(),
        summary: format!(
            "change {} proposed at revision {}, waiting for approval: {what}",
            pending.id, pending.revision
        ),
    };
    if store.record(event, vec![Write { key: k.clone(), guard: Guard::Absent, value: Some(value) }]).await?.is_some() {
        Ok(())
    } else {
        Err(StoreError::corrupt(&k, "a proposal with this id exists already"))
    }
}

/// The proposal `id`, if it is still kept (expired ones included).
pub async fn get<S: IntentStore>(store: &S, id: &str) -> Result<Option<Pending>, StoreError> {
    let k = key(id);
    let found = crate::sites::get(store, &k).await?;
    found.map(|v| serde_json::from_slice(&v).map_err(|e| StoreError::corrupt(&k, e))).transpose()
}

/// Every proposal not expired at `now_ms`, oldest first; expired ones are
/// dropped from the store on the way.
pub async fn list<S: IntentStore>(store: &S, now_ms: u64) -> Result<Vec<Pending>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in store.list(PENDING).await? {
        let p: Pending = serde_json::from_slice(&v).map_err(|e| StoreError::corrupt(&k, e))?;
        if p.expires_ms <= now_ms {
            store.swap(&k, Guard::Any, None).await?;
        } else {
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.created_ms);
    Ok(out)
}

/// Drops proposal `id` (approved, withdrawn or expired).
pub async fn remove<S: IntentStore>(store: &S, id: &str) -> Result<(), StoreError> {
    store.swap(&key(id), Guard::Any, None).await.map(|_| ())
}
