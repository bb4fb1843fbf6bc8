//! Watching the intent: every revision after a given one, in order, with
//! the keys it changed, on either backend and across controller replicas.
//!
//! A watcher is woken by the store's revision notifications and reads the
//! change records the commits wrote, so it never misses or reorders a
//! revision even when notifications coalesce; [`apply_changes`] replays
//! them onto a local copy of the intent.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::layout::{KeyChange, set_intent_key};
use super::{IntentStore, StoreError};
use musubi_core::intent::Intent;

/// What one revision changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision {
    pub revision: u64,
    pub changes: Vec<KeyChange>,
}

/// Every revision after `from`, oldest first, until the receiver is dropped.
/// A store error ends the stream after being sent.
pub async fn watch<S: IntentStore + 'static>(
    store: Arc<S>,
    from: u64,
) -> Result<mpsc::Receiver<Result<Revision, StoreError>>, StoreError> {
    let mut latest = store.subscribe().await?;
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut seen = from;
        loop {
            let newest = *latest.borrow_and_update();
            if newest > seen {
                match store.changes_since(seen).await {
                    Ok(records) => {
                        for (revision, changes) in records {
                            if revision <= seen {
                                continue;
                            }
                            if tx.send(Ok(Revision { revision, changes })).await.is_err() {
                                return;
                            }
                            seen = revision;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                changed = latest.changed() => if changed.is_err() { return },
            }
        }
    });
    Ok(rx)
}

/// Replays one revision's changes onto an intent.
pub fn apply_changes(intent: &mut Intent, revision: &Revision) -> Result<(), StoreError> {
    for c in &revision.changes {
        set_intent_key(intent, &c.key, c.current.as_deref().map(str::as_bytes))?;
    }
    Ok(())
}
