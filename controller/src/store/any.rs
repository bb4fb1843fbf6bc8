//! The store a controller was started with, chosen at run time from
//! `--store file:///dir` or `--store etcd://host:port,host:port`.

use std::path::PathBuf;

use super::embedded::Embedded;
use super::etcd::{Etcd, EtcdConfig};
use super::layout::{KeyChange, Stored, WriteSet};
use super::{Event, Guard, IntentStore, StoreError, Write};
use musubi_core::audit::AuditEntry;

#[derive(Debug, Clone)]
pub enum AnyStore {
    Embedded(Embedded),
    Etcd(Etcd),
}

/// Where the intent lives, parsed from a `--store` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    File(PathBuf),
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("file://") {
            if path.is_empty() {
                return Err("file:// needs a directory, e.g. file:///var/lib/musubi".into());
            }
            Ok(StoreUrl::File(PathBuf::from(path)))
        } else if let Some(hosts) = s.strip_prefix("etcd://") {
            let endpoints: Vec<String> = hosts.split(',').filter(|h| !h.is_empty()).map(String::from).collect();
            if endpoints.is_empty() {
                return Err("etcd:// needs at least one host:port".into());
            }
            Ok(StoreUrl::Etcd(endpoints))
        } else {
            Err(format!("unknown store `{s}`; expected file:///DIR or etcd://HOST:PORT[,HOST:PORT…]"))
        }
    }
}

impl AnyStore {
    pub async fn open(url: &StoreUrl, etcd: EtcdConfig) -> Result<AnyStore, StoreError> {
        match url {
            StoreUrl::File(dir) => Ok(AnyStore::Embedded(Embedded::open(dir)?)),
            StoreUrl::Etcd(endpoints) => {
                Ok(AnyStore::Etcd(Etcd::connect(&EtcdConfig { endpoints: endpoints.clone(), ..etcd }).await?))
            }
        }
    }
}

impl IntentStore for AnyStore {
    async fn load(&self) -> Result<Stored, StoreError> {
        timed("load", async {
            match self {
                AnyStore::Embedded(s) => s.load().await,
                AnyStore::Etcd(s) => s.load().await,
            }
        })
        .await
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        timed("revision", async {
            match self {
                AnyStore::Embedded(s) => s.revision().await,
                AnyStore::Etcd(s) => s.revision().await,
            }
        })
        .await
    }

    async fn commit(&self, expected: u64, writes: WriteSet) -> Result<(), StoreError> {
        timed("commit", async {
            match self {
                AnyStore::Embedded(s) => s.commit(expected, writes).await,
                AnyStore::Etcd(s) => s.commit(expected, writes).await,
            }
        })
        .await
    }

    async fn history(&self) -> Result<Vec<AuditEntry>, StoreError> {
        timed("history", async {
            match self {
                AnyStore::Embedded(s) => s.history().await,
                AnyStore::Etcd(s) => s.history().await,
            }
        })
        .await
    }

    async fn put_public_keys(&self, site: &str, keys: &[(String, String)]) -> Result<(), StoreError> {
        timed("put_public_keys", async {
            match self {
                AnyStore::Embedded(s) => s.put_public_keys(site, keys).await,
                AnyStore::Etcd(s) => s.put_public_keys(site, keys).await,
            }
        })
        .await
    }

    async fn announce(&self, site: &str, ttl: std::time::Duration) -> Result<super::presence::Presence, StoreError> {
        timed("announce", async {
            match self {
                AnyStore::Embedded(s) => s.announce(site, ttl).await,
                AnyStore::Etcd(s) => s.announce(site, ttl).await,
            }
        })
        .await
    }

    async fn present(&self) -> Result<std::collections::BTreeMap<String, Vec<u8>>, StoreError> {
        timed("present", async {
            match self {
                AnyStore::Embedded(s) => s.present().await,
                AnyStore::Etcd(s) => s.present().await,
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        timed("list", async {
            match self {
                AnyStore::Embedded(s) => s.list(prefix).await,
                AnyStore::Etcd(s) => s.list(prefix).await,
            }
        })
        .await
    }

    async fn head(&self) -> Result<(u64, Option<AuditEntry>), StoreError> {
        match self {
            AnyStore::Embedded(s) => s.head().await,
            AnyStore::Etcd(s) => s.head().await,
        }
    }

    async fn record(&self, event: Event, writes: Vec<Write>) -> Result<Option<AuditEntry>, StoreError> {
        timed("record", async {
            match self {
                AnyStore::Embedded(s) => s.record(event, writes).await,
                AnyStore::Etcd(s) => s.record(event, writes).await,
            }
        })
        .await
    }

    async fn swap(&self, key: &str, expected: Guard, value: Option<Vec<u8>>) -> Result<bool, StoreError> {
        timed("swap", async {
            match self {
                AnyStore::Embedded(s) => s.swap(key, expected, value).await,
                AnyStore::Etcd(s) => s.swap(key, expected, value).await,
            }
        })
        .await
    }

    async fn subscribe_sites(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        timed("subscribe_sites", async {
            match self {
                AnyStore::Embedded(s) => s.subscribe_sites().await,
                AnyStore::Etcd(s) => s.subscribe_sites().await,
            }
        })
        .await
    }

    async fn subscribe(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        timed("subscribe", async {
            match self {
                AnyStore::Embedded(s) => s.subscribe().await,
                AnyStore::Etcd(s) => s.subscribe().await,
            }
        })
        .await
    }

    async fn changes_since(&self, after: u64) -> Result<Vec<(u64, Vec<KeyChange>)>, StoreError> {
        timed("changes_since", async {
            match self {
                AnyStore::Embedded(s) => s.changes_since(after).await,
                AnyStore::Etcd(s) => s.changes_since(after).await,
            }
        })
        .await
    }
}

/// Runs a store operation, timing it into the controller's metrics.
async fn timed<T>(operation: &'static str, f: impl std::future::Future<Output = T>) -> T {
    let started = std::time::Instant::now();
    let out = f.await;
    crate::metrics::get().store(operation, started.elapsed());
    out
}
