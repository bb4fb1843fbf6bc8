//! The embedded store: one redb file in the data directory. redb commits
//! are crash-safe (copy-on-write with checksummed commits) and serialised
//! (one writer at a time), and redb locks the file so that a second
//! controller cannot open the same directory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::layout::{self, Stored, WriteSet};
use super::presence::{Presence, renew_every};
use super::{Event, Guard, IntentStore, StoreError, Write};
use musubi_core::audit::AuditEntry;

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("musubi");

/// redb's page cache.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// The file inside the data directory.
pub const FILE: &str = "musubi.redb";

/// A presence record: when it expires, its value, and which holder owns it
/// (a newer holder of the same site takes the record over).
type Record = (Instant, Vec<u8>, u64);

static HOLDERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct Embedded {
    db: Arc<Database>,
    path: PathBuf,
    /// The newest committed revision, for watchers (one process owns the file).
    latest: Arc<tokio::sync::watch::Sender<u64>>,
    /// Presence expiries: only this process can see the file, so presence
    /// lives in memory.
    presence: Arc<Mutex<HashMap<String, Record>>>,
    /// Moves on every public key or revocation written (see [`IntentStore::subscribe_sites`]).
    sites: Arc<tokio::sync::watch::Sender<u64>>,
}

fn backend(e: impl Into<super::Cause>) -> StoreError {
    StoreError::backend("embedded store", e)
}

impl Embedded {
    /// Opens (or creates) the store in `dir`; refuses a directory another
    /// process has open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(backend)?;
        let path = dir.join(FILE);
        // redb caches pages in memory (1 GiB by default); the controller
        // keeps what it serves compiled anyway, so a small cache will do.
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked { path: path.display().to_string() },
            other => backend(other),
        })?;
        let tx = db.begin_write().map_err(backend)?;
        tx.open_table(KV).map_err(backend)?;
        tx.commit().map_err(backend)?;
        let store = Embedded {
            db: Arc::new(db),
            path,
            latest: Arc::new(tokio::sync::watch::Sender::new(0)),
            presence: Arc::new(Mutex::new(HashMap::new())),
            sites: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let revision = store.revision_blocking()?;
        store.latest.send_replace(revision);
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key under the prefixes, from one read transaction.
    fn pairs(&self, prefixes: &[&str]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let ranges: Vec<(&str, &str)> = prefixes.iter().map(|p| (*p, *p)).collect();
        self.scan(&ranges)
    }

    /// For each `(from, prefix)`: the keys under `prefix` from `from` on, in
    /// key order, all from one read transaction.
    fn scan(&self, ranges: &[(&str, &str)]) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let table = tx.open_table(KV).map_err(backend)?;
        let mut out = Vec::new();
        for (from, prefix) in ranges {
            for item in table.range(*from..).map_err(backend)? {
                let (k, v) = item.map_err(backend)?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_string(), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    fn revision_blocking(&self) -> Result<u64, StoreError> {
        let pairs = self.pairs(&[layout::REVISION])?;
        Ok(layout::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?.revision)
    }

    fn commit_blocking(&self, expected: u64, writes: WriteSet) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            let mut table = tx.open_table(KV).map_err(backend)?;
            let current = match table.get(layout::REVISION).map_err(backend)? {
                Some(v) => layout::revision_value(v.value())?,
                None => 0,
            };
            let head = table.get(layout::HEAD).map_err(backend)?.map(|v| v.value().to_vec());
            if current != expected || !holds(&writes.head, head.as_ref()) {
                // Dropping the transaction without commit writes nothing.
                return Err(StoreError::Conflict { expected, actual: current });
            }
            for key in &writes.deletes {
                table.remove(key.as_str()).map_err(backend)?;
            }
            for (key, value) in &writes.puts {
                table.insert(key.as_str(), value.as_slice()).map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)?;
        self.latest.send_replace(expected + 1);
        Ok(())
    }
}

fn holds(guard: &Guard, current: Option<&Vec<u8>>) -> bool {
    match guard {
        Guard::Any => true,
        Guard::Absent => current.is_none(),
        Guard::Holds(v) => current == Some(v),
    }
}

/// Sets `key` to `value` (`None` removes it) in `table` if `guard` holds;
/// says whether it wrote.
fn write_guarded(
    table: &mut redb::Table<'_, &str, &[u8]>,
    key: &str,
    guard: &Guard,
    value: Option<&[u8]>,
) -> Result<bool, StoreError> {
    let current = table.get(key).map_err(backend)?.map(|v| v.value().to_vec());
    if !holds(guard, current.as_ref()) {
        return Ok(false);
    }
    match value {
        Some(v) => table.insert(key, v).map(|_| ()).map_err(backend)?,
        None => table.remove(key).map(|_| ()).map_err(backend)?,
    }
    Ok(true)
}

/// Whether writing `key` moves [`IntentStore::subscribe_sites`]: a public
/// key or a revocation.
fn moves_sites(key: &str) -> bool {
    key.starts_with(layout::KEYS) || key.starts_with(layout::REVOKED)
}

impl Embedded {
    fn record_blocking(&self, event: Event, writes: Vec<Write>) -> Result<Option<AuditEntry>, StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        let entry = {
            let mut table = tx.open_table(KV).map_err(backend)?;
            for w in &writes {
                // A guard that fails drops the transaction: nothing written.
                if !write_guarded(&mut table, &w.key, &w.guard, w.value.as_deref())? {
                    return Ok(None);
                }
            }
            let revision = match table.get(layout::REVISION).map_err(backend)? {
                Some(v) => layout::revision_value(v.value())?,
                None => 0,
            };
            let head = table.get(layout::HEAD).map_err(backend)?.map(|v| layout::parse_head(v.value())).transpose()?;
            let mut entry = AuditEntry::event(head.as_ref(), revision, event.time_ms, &event.actor, &event.summary);
            crate::signing::sign(&mut entry);
            let bytes = layout::head_bytes(&entry)?;
            table.insert(layout::entry_key(&entry).as_str(), bytes.as_slice()).map_err(backend)?;
            table.insert(layout::HEAD, bytes.as_slice()).map_err(backend)?;
            entry
        };
        tx.commit().map_err(backend)?;
        Ok(Some(entry))
    }
}

impl IntentStore for Embedded {
    async fn head(&self) -> Result<(u64, Option<AuditEntry>), StoreError> {
        let this = self.clone();
        let pairs = tokio::task::spawn_blocking(move || this.pairs(&[layout::REVISION, layout::HEAD]))
            .await
            .map_err(backend)??;
        let s = layout::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        Ok((s.revision, s.head))
    }

    async fn record(&self, event: Event, writes: Vec<Write>) -> Result<Option<AuditEntry>, StoreError> {
        let notify = writes.iter().any(|w| moves_sites(&w.key));
        let this = self.clone();
        let entry =
            tokio::task::spawn_blocking(move || this.record_blocking(event, writes)).await.map_err(backend)??;
        if entry.is_some() && notify {
            self.sites.send_modify(|n| *n += 1);
        }
        Ok(entry)
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        // Only this process writes the file, and every commit moves it.
        Ok(*self.latest.borrow())
    }

    async fn load(&self) -> Result<Stored, StoreError> {
        let this = self.clone();
        let pairs = tokio::task::spawn_blocking(move || {
            this.pairs(&[layout::REVISION, layout::HEAD, layout::INTENT, layout::ALLOC, layout::KEYS])
        })
        .await
        .map_err(backend)??;
        layout::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    async fn commit(&self, expected: u64, writes: WriteSet) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.commit_blocking(expected, writes)).await.map_err(backend)?
    }

    async fn history(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let this = self.clone();
        let pairs = tokio::task::spawn_blocking(move || this.pairs(&[layout::AUDIT])).await.map_err(backend)??;
        layout::decode_history(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    async fn put_public_keys(&self, site: &str, keys: &[(String, String)]) -> Result<(), StoreError> {
        let this = self.clone();
        let pairs: Vec<(String, String)> =
            keys.iter().map(|(segment, key)| (layout::public_key_key(site, segment), key.clone())).collect();
        tokio::task::spawn_blocking(move || {
            let tx = this.db.begin_write().map_err(backend)?;
            {
                let mut table = tx.open_table(KV).map_err(backend)?;
                for (k, v) in &pairs {
                    table.insert(k.as_str(), v.as_bytes()).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)
        })
        .await
        .map_err(backend)??;
        self.sites.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn announce(&self, site: &str, ttl: Duration) -> Result<Presence, StoreError> {
        let map = self.presence.clone();
        let name = site.to_string();
        let holder = HOLDERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Runs `f` on the record if this holder still owns it.
        let with_own = {
            let (map, name) = (map.clone(), name.clone());
            move |f: &mut dyn FnMut(&mut Record)| {
                if let Ok(mut m) = map.lock()
                    && let Some(r) = m.get_mut(&name).filter(|r| r.2 == holder)
                {
                    f(r);
                }
            }
        };
        let renew = {
            let with_own = with_own.clone();
            tokio::spawn(async move {
                loop {
                    with_own(&mut |r| r.0 = Instant::now() + ttl);
                    tokio::time::sleep(renew_every(ttl)).await;
                }
            })
        };
        if let Ok(mut m) = map.lock() {
            m.insert(name.clone(), (Instant::now() + ttl, Vec::new(), holder));
        }
        let set = {
            let with_own = with_own.clone();
            Box::new(move |value: Vec<u8>| {
                let mut value = Some(value);
                with_own(&mut |r| r.1 = value.take().unwrap_or_default());
                Box::pin(std::future::ready(Ok(()))) as std::pin::Pin<Box<dyn Future<Output = _> + Send>>
            })
        };
        Ok(Presence::new(
            renew,
            move || {
                if let Ok(mut m) = map.lock()
                    && m.get(&name).is_some_and(|r| r.2 == holder)
                {
                    m.remove(&name);
                }
            },
            set,
        ))
    }

    async fn present(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let now = Instant::now();
        let m = self.presence.lock().map_err(|_| backend("presence table poisoned"))?;
        Ok(m.iter().filter(|(_, r)| r.0 > now).map(|(site, r)| (site.clone(), r.1.clone())).collect())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || this.pairs(&[prefix.as_str()])).await.map_err(backend)?
    }

    async fn swap(&self, key: &str, expected: Guard, value: Option<Vec<u8>>) -> Result<bool, StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        let notify = moves_sites(&key);
        let wrote = tokio::task::spawn_blocking(move || {
            let tx = this.db.begin_write().map_err(backend)?;
            {
                let mut table = tx.open_table(KV).map_err(backend)?;
                if !write_guarded(&mut table, &key, &expected, value.as_deref())? {
                    return Ok(false);
                }
            }
            tx.commit().map_err(backend)?;
            Ok::<bool, StoreError>(true)
        })
        .await
        .map_err(backend)??;
        if wrote && notify {
            self.sites.send_modify(|n| *n += 1);
        }
        Ok(wrote)
    }

    async fn subscribe_sites(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        Ok(self.sites.subscribe())
    }

    async fn subscribe(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        Ok(self.latest.subscribe())
    }

    async fn changes_since(&self, after: u64) -> Result<Vec<(u64, Vec<layout::KeyChange>)>, StoreError> {
        let this = self.clone();
        // Keys sort by zero-padded revision: read only the records after `after`
        // (the first import's record is the size of the whole intent).
        let pairs = tokio::task::spawn_blocking(move || {
            this.scan(&[(layout::changes_key(after + 1).as_str(), layout::CHANGES)])
        })
        .await
        .map_err(backend)??;
        layout::decode_changes(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }
}
