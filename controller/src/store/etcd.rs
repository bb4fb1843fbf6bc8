//! The etcd store (etcd 3.4+). Reads pin one etcd revision so a load is a
//! consistent snapshot; a commit is one etcd transaction guarded by a compare
//! on the intent revision key.
//!
//! etcd limits a transaction to `--max-txn-ops` operations (128 by default)
//! and a request to `--max-request-bytes` (1.5 MiB). A change within them is
//! one transaction; a larger one (a first import) is written as a new
//! generation in batches and made current by one small transaction
//! ([`super::generations`]), so etcd runs with its defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::Notify;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};
use futures::StreamExt;

use super::generations::{self, ETCD_DEFAULTS, Limits, Parts};
use super::layout::{self, Stored, WriteSet};
use super::presence::{Presence, renew_every};
use super::{Event, Guard, IntentStore, Refused, StoreError, Write};
use musubi_core::audit::AuditEntry;

/// How to reach etcd. Its `Debug` leaves the password out.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    /// `host:port` or `https://host:port`, one per cluster member.
    pub endpoints: Vec<String>,
    pub user: Option<(String, String)>,
    /// CA bundle that signed the etcd servers' certificates (enables TLS).
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mutual TLS.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

impl EtcdConfig {
    /// Refuses settings that would not do what they say: a client
    /// certificate is only presented over TLS (which the CA turns on), and
    /// a password never crosses the network in plain text.
    pub fn check(&self) -> Result<(), StoreError> {
        let tls = self.ca.is_some();
        if self.client_cert.is_some() && !tls {
            return Err(StoreError::Misconfigured(
                "an etcd client certificate needs the CA of the etcd servers (--etcd-ca): without it the connection is plain text and the certificate is never shown",
            ));
        }
        if self.user.is_some() && !tls {
            return Err(StoreError::Misconfigured(
                "an etcd user and password need TLS (--etcd-ca): etcd would receive the password in plain text",
            ));
        }
        Ok(())
    }
}

/// How the clients of a store connect.
fn options(config: &EtcdConfig) -> Result<ConnectOptions, StoreError> {
    let mut options =
        ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(30));
    if let Some((user, password)) = &config.user {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(ca) = &config.ca {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let Some((cert, key)) = &config.client_cert {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

#[derive(Clone)]
pub struct Etcd {
    client: Client,
    config: EtcdConfig,
    endpoints: Vec<String>,
    /// One event appended at a time from this process: appenders that
    /// race for the head only lose to other replicas.
    appending: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// What one transaction may carry (etcd's defaults).
    limits: Limits,
    /// The presence leases, by time-to-live in seconds.
    leases: Arc<tokio::sync::Mutex<BTreeMap<i64, SharedLease>>>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

fn backend(e: impl Into<super::Cause>) -> StoreError {
    StoreError::backend("etcd", e)
}

/// An error of etcd's client as a store error: a request etcd refused as
/// malformed (InvalidArgument: a key written twice in one transaction, more
/// operations or bytes than it allows; or a message larger than its gRPC
/// server takes) is [`Refused`], which no retry can help; everything else
/// is the backend's (unreachable, no leader, too many requests, …), which a
/// retry may. etcd also answers InvalidArgument when its auth store moved
/// under a request: that one passes on a retry.
fn etcd(e: etcd_client::Error) -> StoreError {
    if let etcd_client::Error::GRpcStatus(status) = &e {
        let refused = match status.code() {
            tonic::Code::InvalidArgument => !status.message().contains("auth store is old"),
            tonic::Code::ResourceExhausted => status.message().contains("larger than max"),
            _ => false,
        };
        if refused {
            return Refused { backend: "etcd", source: e.into() }.into();
        }
    }
    backend(e)
}

fn read(path: &PathBuf) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::backend("etcd", format!("cannot read {}: {e}", path.display())))
}

impl Etcd {
    pub async fn connect(config: &EtcdConfig) -> Result<Self, StoreError> {
        config.check()?;
        let options = options(config)?;
        let client = Client::connect(&config.endpoints, Some(options)).await.map_err(etcd)?;
        Ok(Etcd {
            client,
            config: config.clone(),
            endpoints: config.endpoints.clone(),
            appending: Default::default(),
            limits: ETCD_DEFAULTS,
            leases: Default::default(),
        })
    }

    /// The same store, committing as if one transaction could carry only
    /// `limits` (tests make every change a new generation this way).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A KV client whose messages may be as large as a national intent
    /// (gRPC's default 4 MiB is not).
    fn kv(&self) -> etcd_client::KvClient {
        const LIMIT: usize = 512 * 1024 * 1024;
        self.client.kv_client().max_decoding_message_size(LIMIT).max_encoding_message_size(LIMIT)
    }

    async fn range(&self, prefix: &str, revision: i64) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut kv = self.kv();
        let resp = kv.get(prefix, Some(GetOptions::new().with_prefix().with_revision(revision))).await.map_err(etcd)?;
        resp.kvs().iter().map(|kv| Ok((kv.key_str().map_err(backend)?.to_string(), kv.value().to_vec()))).collect()
    }
}

/// How long etcd keeps its own history of the keys by default (see
/// [`Etcd::compact_history`]).
pub const HISTORY: Duration = Duration::from_secs(60);

impl Etcd {
    /// Compacts etcd's history of the keys, every quarter of `keep`, up to
    /// the revision etcd had `keep` ago. The store needs none of that
    /// history (the intent's is in its change records): only a load's reads,
    /// pinned to the revision of its first read, and watchers catching up
    /// (they relist after a compaction) use it, for seconds. Uncompacted, it
    /// grows with every write — status records of access points are
    /// megabytes, written on every acknowledgement — until etcd refuses all
    /// writes (its 2 GiB quota: `mvcc: database space exceeded` 4.5 minutes
    /// into the enrolment of 2,000 agents). Every replica compacts; a
    /// compaction another did already is refused and ignored.
    pub fn compact_history(&self, keep: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut seen: std::collections::VecDeque<(std::time::Instant, i64)> = Default::default();
            let mut ticker = tokio::time::interval((keep / 4).max(Duration::from_millis(100)));
            loop {
                ticker.tick().await;
                let now = std::time::Instant::now();
                match store.position().await {
                    Ok((_, at)) => seen.push_back((now, at)),
                    Err(e) => {
                        tracing::debug!(error = %e, "etcd's revision not read; no compaction now");
                        continue;
                    }
                }
                let mut target = None;
                while seen.front().is_some_and(|(at, _)| now.duration_since(*at) >= keep) {
                    target = seen.pop_front().map(|(_, r)| r);
                }
                store.sweep_staged().await;
                let Some(target) = target else { continue };
                match store.client.kv_client().compact(target, None).await {
                    Ok(_) => tracing::debug!(revision = target, "etcd's history compacted"),
                    Err(e) => tracing::debug!(revision = target, error = %e, "etcd's history not compacted"),
                }
            }
        })
    }
}

/// Attempts per operation when a member is unreachable: the client spreads
/// requests over the members, and a dead one refuses until it is dropped.
const ATTEMPTS: u32 = 50;
const PAUSE: Duration = Duration::from_millis(100);

/// Runs a read up to [`ATTEMPTS`] times while etcd is unreachable.
async fn retrying<T, F, Fut>(mut op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e @ StoreError::Backend { .. }) if attempt < ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "etcd unreachable; retrying");
                attempt += 1;
                tokio::time::sleep(PAUSE).await;
            }
            other => return other,
        }
    }
}

impl Etcd {
    async fn load_once(&self) -> Result<Stored, StoreError> {
        // Every later read is pinned to the revision this one saw.
        let (revision, generation, at) = self.position_and_generation().await?;
        let mut pairs = vec![(layout::REVISION.to_string(), revision.to_string().into_bytes())];
        for prefix in [layout::HEAD, layout::KEYS] {
            pairs.extend(self.range(prefix, at).await?);
        }
        for prefix in [layout::INTENT, layout::ALLOC] {
            pairs.extend(self.range_generation(prefix, generation.as_deref(), at).await?);
        }
        let mut stored = layout::decode(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        stored.revision = revision;
        Ok(stored)
    }

    /// The intent revision, the generation holding the intent keys and the
    /// etcd revision both were read at, in one read.
    async fn position_and_generation(&self) -> Result<(u64, Option<String>, i64), StoreError> {
        let txn = Txn::new().and_then([TxnOp::get(layout::REVISION, None), TxnOp::get(layout::GENERATION, None)]);
        let resp = self.kv().txn(txn).await.map_err(etcd)?;
        let at = resp.header().map(|h| h.revision()).ok_or_else(|| backend("response without a header"))?;
        let (mut revision, mut generation) = (0, None);
        for r in resp.op_responses() {
            let TxnOpResponse::Get(g) = r else { continue };
            for kv in g.kvs() {
                match kv.key() {
                    k if k == layout::REVISION.as_bytes() => revision = layout::revision_value(kv.value())?,
                    k if k == layout::GENERATION.as_bytes() => {
                        let g = kv.value_str().map_err(|e| StoreError::corrupt(layout::GENERATION, e))?;
                        generation = Some(g.to_string());
                    }
                    _ => {}
                }
            }
        }
        Ok((revision, generation, at))
    }

    /// The keys under the layout's `prefix` as `generation` stores them,
    /// under the layout's names.
    async fn range_generation(
        &self,
        prefix: &str,
        generation: Option<&str>,
        at: i64,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let pairs = self.range(&generations::stored(prefix, generation), at).await?;
        Ok(pairs.into_iter().filter_map(|(k, v)| Some((generations::unstored(&k, generation)?, v))).collect())
    }

    /// Change records as stored, those in parts joined again.
    async fn join_parts(&self, pairs: Vec<(String, Vec<u8>)>) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::with_capacity(pairs.len());
        for (key, value) in pairs {
            match Parts::read(&value) {
                Some(parts) if key.starts_with(layout::CHANGES) => {
                    let found = self.range(&generations::parts_prefix(&parts.parts), 0).await?;
                    let record = generations::join(&parts, &found)
                        .ok_or_else(|| StoreError::corrupt(key.as_str(), "parts of the change record are missing"))?;
                    out.push((key, record));
                }
                _ => out.push((key, value)),
            }
        }
        Ok(out)
    }

    /// The intent revision now, and the etcd revision it was read at.
    async fn position(&self) -> Result<(u64, i64), StoreError> {
        let rev = self.kv().get(layout::REVISION, None).await.map_err(etcd)?;
        let at = rev.header().map(|h| h.revision()).ok_or_else(|| backend("response without a header"))?;
        let revision = rev.kvs().first().map(|kv| layout::revision_value(kv.value())).transpose()?.unwrap_or(0);
        Ok((revision, at))
    }

    /// The intent revision and head record as etcd has them now.
    async fn head_raw(&self) -> Result<(u64, Option<Vec<u8>>), StoreError> {
        let (revision, at) = self.position().await?;
        let head = self
            .kv()
            .get(layout::HEAD, Some(GetOptions::new().with_revision(at)))
            .await
            .map_err(etcd)?
            .kvs()
            .first()
            .map(|kv| kv.value().to_vec());
        Ok((revision, head))
    }

    /// The guard of a commit planned at `expected`.
    fn revision_guard(expected: u64) -> Compare {
        if expected == 0 {
            Compare::create_revision(layout::REVISION, CompareOp::Equal, 0)
        } else {
            Compare::value(layout::REVISION, CompareOp::Equal, expected.to_string())
        }
    }

    /// The intent revision in a failed transaction's answer.
    fn actual_revision(resp: etcd_client::TxnResponse) -> u64 {
        resp.op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => g.kvs().first().and_then(|kv| layout::revision_value(kv.value()).ok()),
                _ => None,
            })
            .unwrap_or(0)
    }

    async fn commit_once(&self, expected: u64, writes: &WriteSet) -> Result<(), StoreError> {
        let (revision, generation, at) = self.position_and_generation().await?;
        if revision != expected {
            return Err(StoreError::Conflict { expected, actual: revision });
        }
        if !generations::fits(writes, self.limits) {
            return self.commit_generation(expected, writes, generation, at).await;
        }
        // Unchanged since the read above (a generation moves only with the
        // revision, which the guard compares).
        let key = |k: &str| generations::stored(k, generation.as_deref());
        let mut ops: Vec<TxnOp> = writes.deletes.iter().map(|k| TxnOp::delete(key(k), None)).collect();
        ops.extend(writes.puts.iter().map(|(k, v)| TxnOp::put(key(k), v.clone(), None)));
        self.guarded_commit(expected, &writes.head, Vec::new(), ops).await
    }

    /// Runs `ops` if the store is still at revision `expected` with the
    /// head record `head` and `also` holds; a conflict otherwise.
    async fn guarded_commit(
        &self,
        expected: u64,
        head: &Guard,
        also: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<(), StoreError> {
        let compares: Vec<Compare> =
            std::iter::once(Self::revision_guard(expected)).chain(compare(layout::HEAD, head)).chain(also).collect();
        let txn = Txn::new().when(compares).and_then(ops).or_else([TxnOp::get(layout::REVISION, None)]);
        let resp = self.kv().txn(txn).await.map_err(etcd)?;
        if resp.succeeded() {
            return Ok(());
        }
        Err(StoreError::Conflict { expected, actual: Self::actual_revision(resp) })
    }

    /// A change too large for one transaction: the whole state after it
    /// written as a new generation in batches, then made current (see
    /// [`generations`]).
    async fn commit_generation(
        &self,
        expected: u64,
        writes: &WriteSet,
        generation: Option<String>,
        at: i64,
    ) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        self.sweep_staged().await;
        let mut state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for prefix in [layout::INTENT, layout::ALLOC] {
            state.extend(self.range_generation(prefix, generation.as_deref(), at).await?);
        }
        let (mut last_puts, mut last_deletes) = (Vec::new(), Vec::new());
        for k in &writes.deletes {
            if generations::generational(k) {
                state.remove(k);
            } else {
                last_deletes.push(k.clone());
            }
        }
        for (k, v) in &writes.puts {
            if generations::generational(k) {
                state.insert(k.clone(), v.clone());
            } else {
                last_puts.push((k.clone(), v.clone()));
            }
        }
        let mut id = [0u8; 8];
        getrandom::fill(&mut id).map_err(|e| StoreError::backend("random source", e.to_string()))?;
        let next = format!("{:020}-{}", expected + 1, id.iter().map(|b| format!("{b:02x}")).collect::<String>());
        let staging = self.stage(&next).await?;
        let result = async {
            let mut staged: Vec<(String, Vec<u8>)> =
                state.into_iter().map(|(k, v)| (generations::stored(&k, Some(&next)), v)).collect();
            let keys = staged.len();
            // Large values beside the intent (the change record) go in parts.
            let part = self.limits.bytes / 2;
            let mut final_puts = Vec::new();
            for (k, v) in last_puts {
                if v.len() > part && k.starts_with(layout::CHANGES) {
                    let (marker, parts) = generations::split(&v, &next, part);
                    staged.extend(parts);
                    final_puts.push((k, marker));
                } else {
                    final_puts.push((k, v));
                }
            }
            let batches = generations::batches(staged, self.limits);
            let count = batches.len();
            let kv = self.kv();
            // A few batches in flight at once: each is a round trip and a
            // disk sync on every member.
            let mut pending = futures::stream::iter(batches.into_iter().map(|batch| {
                let mut kv = kv.clone();
                async move {
                    let ops: Vec<TxnOp> = batch.into_iter().map(|(k, v)| TxnOp::put(k, v, None)).collect();
                    kv.txn(Txn::new().and_then(ops)).await.map(|_| ()).map_err(etcd)
                }
            }))
            .buffer_unordered(4);
            while let Some(done) = pending.next().await {
                done?;
            }
            drop(pending);
            let mut ops: Vec<TxnOp> = last_deletes.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect();
            ops.extend(final_puts.into_iter().map(|(k, v)| TxnOp::put(k, v, None)));
            ops.push(TxnOp::put(layout::GENERATION, next.as_str(), None));
            ops.push(TxnOp::delete(staging_key(&next), None));
            let everything = Some(etcd_client::DeleteOptions::new().with_prefix());
            match &generation {
                Some(old) => ops.push(TxnOp::delete(generations::generation_prefix(old), everything.clone())),
                None => {
                    ops.push(TxnOp::delete(layout::INTENT, everything.clone()));
                    ops.push(TxnOp::delete(layout::ALLOC, everything.clone()));
                }
            }
            // Only while it is still staged: a replica that found its lease
            // gone (this writer stalled past it) may have swept it, whole or
            // in part, and it must not become current then.
            let staged = Compare::version(staging_key(&next), CompareOp::Greater, 0);
            self.guarded_commit(expected, &writes.head, vec![staged], ops).await?;
            tracing::info!(
                generation = %next,
                keys,
                batches = count,
                took_ms = started.elapsed().as_millis() as u64,
                "a change too large for one etcd transaction committed as a new generation"
            );
            Ok(())
        }
        .await;
        if result.is_err() {
            // Not current: nothing reads it. Swept now, or by any replica
            // once the lease is gone if this fails too.
            self.drop_generation(&next).await;
        }
        staging.finish().await;
        result
    }

    /// Names a generation being written under a lease kept alive until
    /// [`Staging::finish`].
    async fn stage(&self, generation: &str) -> Result<Staging, StoreError> {
        let mut client = self.client.clone();
        let lease = client.lease_grant(STAGING_TTL.as_secs() as i64, None).await.map_err(etcd)?.id();
        self.kv().put(staging_key(generation), lease.to_string(), None).await.map_err(etcd)?;
        let mut keeper_client = client.clone();
        let keeper = tokio::spawn(async move {
            if let Ok((mut keeper, mut stream)) = keeper_client.lease_keep_alive(lease).await {
                while keeper.keep_alive().await.is_ok() && matches!(stream.message().await, Ok(Some(_))) {
                    tokio::time::sleep(STAGING_TTL / 3).await;
                }
            }
        });
        Ok(Staging { client, lease, keeper })
    }

    /// Deletes a generation that is not current: its keys, its change
    /// record's parts and its staging record.
    async fn drop_generation(&self, generation: &str) {
        let everything = || Some(etcd_client::DeleteOptions::new().with_prefix());
        let ops = [
            TxnOp::delete(generations::generation_prefix(generation), everything()),
            TxnOp::delete(generations::parts_prefix(generation), everything()),
            TxnOp::delete(staging_key(generation), None),
        ];
        // Never the current one (a commit that made it current deleted its
        // staging record in the same transaction).
        let not_current = Compare::value(layout::GENERATION, CompareOp::NotEqual, generation);
        let absent = Compare::create_revision(layout::GENERATION, CompareOp::Equal, 0);
        for guard in [not_current, absent] {
            match self.kv().txn(Txn::new().when([guard]).and_then(ops.clone())).await {
                Ok(r) if r.succeeded() => {
                    tracing::info!(%generation, "a generation that never became current swept away");
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%generation, error = %e, "a staged generation not swept; the next sweep will");
                    return;
                }
            }
        }
    }

    /// Sweeps away generations whose writer died half-way (its lease is
    /// gone): every replica does, before a large commit and with each
    /// history compaction.
    pub async fn sweep_staged(&self) {
        let Ok(staged) = self.range(layout::STAGING, 0).await else { return };
        for (key, lease) in staged {
            let Some(generation) = key.strip_prefix(layout::STAGING) else { continue };
            let lease: i64 = std::str::from_utf8(&lease).ok().and_then(|l| l.parse().ok()).unwrap_or(0);
            let alive = match self.client.clone().lease_time_to_live(lease, None).await {
                Ok(r) => r.ttl() > 0,
                Err(_) => false,
            };
            if !alive {
                self.drop_generation(generation).await;
            }
        }
    }
}

/// A presence record as its holder last wrote it.
struct Owned {
    key: String,
    /// The etcd revision of the holder's last write of it.
    written: i64,
    value: Vec<u8>,
}

impl Owned {
    /// The record is still the holder's.
    fn own(&self) -> Compare {
        Compare::mod_revision(self.key.as_str(), CompareOp::Equal, self.written)
    }
}

impl Etcd {
    /// Writes the holder's value under `lease` if `guard` holds (the record
    /// is still the holder's, or absent). Says whether it wrote.
    async fn put_owned(&self, o: &mut Owned, lease: i64, guard: Compare) -> Result<bool, StoreError> {
        let put = etcd_client::PutOptions::new().with_lease(lease);
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(o.key.as_str(), o.value.clone(), Some(put))]);
        let resp = self.kv().txn(txn).await.map_err(etcd)?;
        if resp.succeeded() {
            o.written = resp.header().map_or(o.written, |h| h.revision());
        }
        Ok(resp.succeeded())
    }

    /// The lease this process holds its agents' presence records with, one
    /// per time-to-live (one per replica in practice): renewing one lease
    /// per connected agent cost etcd thousands of renewals a second at
    /// 10,000 agents. When it expires (etcd out of reach for longer than
    /// the time-to-live) a new one is granted and published.
    async fn shared_lease(&self, ttl: Duration) -> Result<SharedLease, StoreError> {
        let seconds = ttl.as_secs().max(1) as i64;
        let mut leases = self.leases.lock().await;
        if let Some(l) = leases.get(&seconds) {
            return Ok(l.clone());
        }
        // A connection of its own: renewals must not queue behind the
        // thousands of writes of agents reconnecting at once (the lease
        // expired under them).
        let mut client = Client::connect(&self.config.endpoints, Some(options(&self.config)?)).await.map_err(etcd)?;
        let id = client.lease_grant(seconds, None).await.map_err(etcd)?.id();
        let (tx, rx) = tokio::sync::watch::channel(id);
        let lease = SharedLease { seconds, id: rx, check: Arc::new(Notify::new()) };
        tokio::spawn(keep_lease(client, seconds, tx, lease.check.clone()));
        leases.insert(seconds, lease.clone());
        Ok(lease)
    }
}

/// A presence lease shared by a replica's records.
#[derive(Clone)]
struct SharedLease {
    seconds: i64,
    /// The lease now (a new one when it expired).
    id: tokio::sync::watch::Receiver<i64>,
    /// Asks the renewal to check the lease at once.
    check: Arc<Notify>,
}

/// Renews the lease `tx` holds; grants and publishes a new one when it has
/// expired.
async fn keep_lease(mut client: Client, seconds: i64, tx: tokio::sync::watch::Sender<i64>, check: Arc<Notify>) {
    // Renewed every second (one lease per replica: a renewal a second is
    // nothing), each call given a third of the time-to-live.
    let ttl = Duration::from_secs(seconds as u64);
    let every = renew_every(ttl).min(Duration::from_secs(1));
    let bound = renew_every(ttl);
    // Every call is bounded: a keep-alive stream that stops answering
    // (a busy member, a busy host) must not hold the renewal up until the
    // lease has expired unnoticed — at 10,000 agents that cut a replica
    // off from every new agent.
    let bounded = async |f: std::pin::Pin<Box<dyn Future<Output = Option<i64>> + Send + '_>>| {
        tokio::time::timeout(bound, f).await.ok().flatten()
    };
    loop {
        let id = *tx.borrow();
        if let Ok(Ok((mut keeper, mut stream))) = tokio::time::timeout(bound, client.lease_keep_alive(id)).await {
            loop {
                let answered = bounded(Box::pin(async {
                    keeper.keep_alive().await.ok()?;
                    Some(stream.message().await.ok()??.ttl())
                }))
                .await;
                match answered {
                    Some(ttl) if ttl > 0 => {}
                    _ => break,
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = check.notified() => {}
                }
            }
        }
        // The stream ended, stalled or said the lease is gone: is it?
        let remaining = match tokio::time::timeout(bound, client.lease_time_to_live(id, None)).await {
            Ok(Ok(r)) => Some(r.ttl()),
            Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => Some(-1),
            _ => None, // etcd out of reach: ask again
        };
        if remaining.is_some_and(|ttl| ttl <= 0) {
            match client.lease_grant(seconds, None).await {
                Ok(granted) => {
                    tracing::warn!(
                        old = id,
                        new = granted.id(),
                        "the presence lease expired; records move to a new one"
                    );
                    if tx.send(granted.id()).is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "no new presence lease yet"),
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// How long a staged generation outlives its writer.
const STAGING_TTL: Duration = Duration::from_secs(10);

fn staging_key(generation: &str) -> String {
    format!("{}{generation}", layout::STAGING)
}

/// A generation being written: its lease, kept alive.
struct Staging {
    client: Client,
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

impl Staging {
    async fn finish(mut self) {
        self.keeper.abort();
        let _ = self.client.lease_revoke(self.lease).await;
    }
}

/// Sets `key` to `value`, or deletes it with `None`.
fn write_op(key: &str, value: Option<Vec<u8>>) -> TxnOp {
    match value {
        Some(v) => TxnOp::put(key, v, None),
        None => TxnOp::delete(key, None),
    }
}

/// The etcd comparison a guard on `key` makes (none for [`Guard::Any`]).
fn compare(key: &str, guard: &Guard) -> Option<Compare> {
    match guard {
        Guard::Any => None,
        Guard::Absent => Some(Compare::create_revision(key, CompareOp::Equal, 0)),
        Guard::Holds(v) => Some(Compare::value(key, CompareOp::Equal, v.clone())),
    }
}

impl Etcd {
    /// One attempt at appending `event` after the head read just before:
    /// `Ok(Err(()))` when the head moved meanwhile (try again).
    async fn record_once(&self, event: &Event, writes: &[Write]) -> Result<Result<Option<AuditEntry>, ()>, StoreError> {
        let (revision, raw) = self.head_raw().await?;
        let head = raw.as_deref().map(layout::parse_head).transpose()?;
        let mut entry = AuditEntry::event(head.as_ref(), revision, event.time_ms, &event.actor, &event.summary);
        crate::signing::sign(&mut entry);
        let bytes = layout::head_bytes(&entry)?;
        let head_guard = raw.clone().map_or(Guard::Absent, Guard::Holds);
        let mut compares: Vec<Compare> = compare(layout::HEAD, &head_guard).into_iter().collect();
        let mut ops = vec![
            TxnOp::put(layout::entry_key(&entry), bytes.clone(), None),
            TxnOp::put(layout::HEAD, bytes.clone(), None),
        ];
        for w in writes {
            compares.extend(compare(&w.key, &w.guard));
            ops.push(write_op(&w.key, w.value.clone()));
        }
        let txn = Txn::new().when(compares).and_then(ops).or_else([TxnOp::get(layout::HEAD, None)]);
        let resp = match self.kv().txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                // Refused as malformed: it did not commit, and would not.
                let e = match etcd(e) {
                    refused @ StoreError::Refused(_) => return Err(refused),
                    other => other,
                };
                // The answer may be lost while the transaction committed:
                // our entry at the head means it did.
                tokio::time::sleep(PAUSE).await;
                return match self.head_raw().await {
                    Ok((_, Some(now))) if now == bytes => Ok(Ok(Some(entry))),
                    Ok(_) => Ok(Err(())),
                    Err(_) => Err(e),
                };
            }
        };
        if resp.succeeded() {
            return Ok(Ok(Some(entry)));
        }
        let now = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(|kv| kv.value().to_vec())),
            _ => None,
        });
        // The head held: the write's own guard failed.
        Ok(if now == Some(raw) { Ok(None) } else { Err(()) })
    }
}

impl IntentStore for Etcd {
    async fn head(&self) -> Result<(u64, Option<AuditEntry>), StoreError> {
        let (revision, raw) = retrying(|| self.head_raw()).await?;
        Ok((revision, raw.as_deref().map(layout::parse_head).transpose()?))
    }

    async fn record(&self, event: Event, writes: Vec<Write>) -> Result<Option<AuditEntry>, StoreError> {
        let _one = self.appending.lock().await;
        for attempt in 1..=ATTEMPTS {
            match retrying(|| self.record_once(&event, &writes)).await? {
                Ok(done) => return Ok(done),
                Err(()) => tracing::debug!(attempt, "the audit head moved while an event was appended; again"),
            }
        }
        Err(backend("the audit head kept moving: another replica appends without pause"))
    }

    async fn load(&self) -> Result<Stored, StoreError> {
        retrying(|| self.load_once()).await
    }

    async fn revision(&self) -> Result<u64, StoreError> {
        retrying(|| self.position()).await.map(|(revision, _)| revision)
    }

    /// A transaction whose answer was lost may still have committed: before
    /// retrying, look at the head. Our own head record there means success.
    async fn commit(&self, expected: u64, writes: WriteSet) -> Result<(), StoreError> {
        let ours = writes.puts.iter().find(|(k, _)| k == layout::HEAD).map(|(_, v)| v.clone());
        let mut attempt = 1;
        loop {
            match self.commit_once(expected, &writes).await {
                Err(e @ StoreError::Backend { .. }) if attempt < ATTEMPTS => {
                    tracing::debug!(attempt, error = %e, "etcd unreachable during a commit; checking the head");
                    attempt += 1;
                    tokio::time::sleep(PAUSE).await;
                    match self.head_raw().await {
                        Ok((rev, head)) if rev == expected + 1 && head.is_some() && head == ours => return Ok(()),
                        Ok((rev, _)) if rev != expected => {
                            return Err(StoreError::Conflict { expected, actual: rev });
                        }
                        _ => {} // still at `expected`, or unreachable: try again
                    }
                }
                other => return other,
            }
        }
    }

    async fn history(&self) -> Result<Vec<AuditEntry>, StoreError> {
        let pairs = retrying(|| self.range(layout::AUDIT, 0)).await?;
        layout::decode_history(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }

    async fn put_public_keys(&self, site: &str, keys: &[(String, String)]) -> Result<(), StoreError> {
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|(segment, key)| TxnOp::put(layout::public_key_key(site, segment), key.as_str(), None))
            .collect();
        // Puts are idempotent: retrying after a lost answer is safe.
        retrying(|| async { self.kv().txn(Txn::new().and_then(ops.clone())).await.map(|_| ()).map_err(etcd) }).await
    }

    async fn announce(&self, site: &str, ttl: Duration) -> Result<Presence, StoreError> {
        let key = format!("{}{site}", layout::PRESENCE);
        let lease = self.shared_lease(ttl).await?;
        let put = etcd_client::PutOptions::new().with_lease(*lease.id.borrow());
        let resp = match self.kv().put(key.as_str(), "", Some(put)).await {
            Ok(r) => r,
            Err(e) => {
                // The lease may be gone: the keeper checks it now.
                lease.check.notify_one();
                return Err(etcd(e));
            }
        };
        let at = resp.header().map(|h| h.revision()).ok_or_else(|| backend("response without a header"))?;
        // The record is this holder's while its modification is the
        // holder's own last write: a session that another one of the same
        // site replaced (the agent moved to another replica) must not take
        // it back with a late write, nor delete the live one on its way out.
        let owned = Arc::new(tokio::sync::Mutex::new(Owned { key, written: at, value: Vec::new() }));
        // When the replica's lease changes (the old one expired: etcd was
        // out of reach for longer than the time-to-live), the record moves
        // to the new one, or is written again if it expired with the old.
        let follow = {
            let (store, owned, mut changes) = (self.clone(), owned.clone(), lease.id.clone());
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let id = *changes.borrow_and_update();
                    let mut o = owned.lock().await;
                    let own = o.own();
                    if !matches!(store.put_owned(&mut o, id, own).await, Ok(true)) {
                        let absent = Compare::create_revision(o.key.as_str(), CompareOp::Equal, 0);
                        let _ = store.put_owned(&mut o, id, absent).await;
                    }
                }
            })
        };
        let setter = (self.clone(), owned.clone(), lease.id.clone());
        let set: super::presence::Setter = Box::new(move |value: Vec<u8>| {
            let (store, owned, id) = setter.clone();
            Box::pin(async move {
                let id = *id.borrow();
                let mut o = owned.lock().await;
                o.value = value;
                let own = o.own();
                store.put_owned(&mut o, id, own).await.map(|_| ())
            })
        });
        let withdraw = {
            let (store, owned) = (self.clone(), owned.clone());
            move || {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let o = owned.lock().await;
                        let txn = Txn::new().when([o.own()]).and_then([TxnOp::delete(o.key.as_str(), None)]);
                        let _ = store.kv().txn(txn).await;
                    });
                }
            }
        };
        // A crashed holder's record expires: moved to a lease of its own
        // that nobody renews.
        let forget = {
            let (store, owned, seconds) = (self.clone(), owned, lease.seconds);
            move || {
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let Ok(alone) = store.client.clone().lease_grant(seconds, None).await else { return };
                        let mut o = owned.lock().await;
                        let own = o.own();
                        let _ = store.put_owned(&mut o, alone.id(), own).await;
                    });
                }
            }
        };
        Ok(Presence::new(follow, withdraw, set).on_forget(forget))
    }

    async fn present(&self) -> Result<BTreeMap<String, Vec<u8>>, StoreError> {
        let pairs = retrying(|| self.range(layout::PRESENCE, 0)).await?;
        Ok(pairs.into_iter().filter_map(|(k, v)| Some((k.strip_prefix(layout::PRESENCE)?.to_string(), v))).collect())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        if generations::generational(prefix) {
            return retrying(|| async {
                let (_, generation, at) = self.position_and_generation().await?;
                self.range_generation(prefix, generation.as_deref(), at).await
            })
            .await;
        }
        let pairs = retrying(|| self.range(prefix, 0)).await?;
        if layout::CHANGES.starts_with(prefix) || prefix.starts_with(layout::CHANGES) {
            return retrying(|| self.join_parts(pairs.clone())).await;
        }
        Ok(pairs)
    }

    async fn swap(&self, key: &str, expected: Guard, value: Option<Vec<u8>>) -> Result<bool, StoreError> {
        let guard: Vec<Compare> = compare(key, &expected).into_iter().collect();
        // A lost answer is not retried: the caller reads again and decides.
        let resp = self.kv().txn(Txn::new().when(guard).and_then([write_op(key, value)])).await.map_err(etcd)?;
        Ok(resp.succeeded())
    }

    async fn subscribe_sites(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        let (_, at) = retrying(|| self.position()).await?;
        let (tx, rx) = tokio::sync::watch::channel(0);
        tokio::spawn(follow_sites(self.clone(), tx, at + 1));
        Ok(rx)
    }

    async fn subscribe(&self) -> Result<tokio::sync::watch::Receiver<u64>, StoreError> {
        let (revision, at) = retrying(|| self.position()).await?;
        let (tx, rx) = tokio::sync::watch::channel(revision);
        tokio::spawn(follow(self.clone(), tx, at + 1));
        Ok(rx)
    }

    async fn changes_since(&self, after: u64) -> Result<Vec<(u64, Vec<layout::KeyChange>)>, StoreError> {
        // Keys sort by zero-padded revision: start the range just after `after`.
        let pairs = retrying(|| async {
            let options = GetOptions::new().with_range(layout::CHANGES.to_string() + "~");
            let resp = self.kv().get(layout::changes_key(after + 1), Some(options)).await.map_err(etcd)?;
            resp.kvs()
                .iter()
                .map(|kv| Ok((kv.key_str().map_err(backend)?.to_string(), kv.value().to_vec())))
                .collect::<Result<Vec<(String, Vec<u8>)>, StoreError>>()
        })
        .await?;
        let pairs = retrying(|| self.join_parts(pairs.clone())).await?;
        layout::decode_changes(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
    }
}

/// Follows the intent revision key with an etcd watch and publishes each new
/// value. When the watch breaks (a lost member, or a start revision etcd has
/// compacted away), it relists — reads the revision again — and watches on
/// from there, so no commit goes unnoticed. Ends when nobody listens.
async fn follow(store: Etcd, tx: tokio::sync::watch::Sender<u64>, mut start: i64) {
    let publish = |rev: u64| {
        tx.send_if_modified(|v| {
            let newer = rev > *v;
            if newer {
                *v = rev;
            }
            newer
        });
    };
    while !tx.is_closed() {
        let options = etcd_client::WatchOptions::new().with_start_revision(start);
        let mut client = store.client.clone();
        if let Ok(mut stream) = client.watch(layout::REVISION, Some(options)).await {
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                let Ok(Some(resp)) = message else { break };
                if resp.canceled() || resp.compact_revision() > 0 {
                    tracing::debug!(compacted = resp.compact_revision(), "etcd watch cancelled; relisting");
                    break;
                }
                for event in resp.events() {
                    if let Some(kv) = event.kv() {
                        if let Ok(rev) = layout::revision_value(kv.value()) {
                            publish(rev);
                        }
                        start = kv.mod_revision() + 1;
                    }
                }
            }
        }
        tokio::time::sleep(PAUSE).await;
        if let Ok((rev, at)) = store.position().await {
            publish(rev);
            start = at + 1;
        }
    }
}

/// Bumps `tx` on every change under the public-key and revocation prefixes,
/// from etcd revision `start` on; after a broken watch it bumps once (the
/// reader reloads everything anyway) and watches on from the present.
async fn follow_sites(store: Etcd, tx: tokio::sync::watch::Sender<u64>, mut start: i64) {
    while !tx.is_closed() {
        let mut client = store.client.clone();
        // One watch over the key range that holds both prefixes' keys:
        // `/musubi/v1/keys/` … `/musubi/v1/revoked/` sort apart, so two watches.
        let mut streams = Vec::new();
        for prefix in [layout::KEYS, layout::REVOKED] {
            let options = etcd_client::WatchOptions::new().with_prefix().with_start_revision(start);
            if let Ok(stream) = client.watch(prefix, Some(options)).await {
                streams.push(stream);
            }
        }
        if streams.len() == 2 {
            let (mut a, mut b) = (streams.remove(0), streams.remove(0));
            loop {
                let message = tokio::select! {
                    _ = tx.closed() => return,
                    m = a.message() => m,
                    m = b.message() => m,
                };
                let Ok(Some(resp)) = message else { break };
                if resp.canceled() || resp.compact_revision() > 0 {
                    break;
                }
                if let Some(last) = resp.events().iter().filter_map(|e| e.kv()).map(|kv| kv.mod_revision()).max() {
                    start = start.max(last + 1);
                    tx.send_modify(|n| *n += 1);
                }
            }
        }
        tokio::time::sleep(PAUSE).await;
        if let Ok((_, at)) = store.position().await {
            tx.send_modify(|n| *n += 1);
            start = at + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_go_in_plain_text_and_a_certificate_is_never_dropped() {
        let plain = EtcdConfig { endpoints: vec!["127.0.0.1:2379".into()], ..Default::default() };
        assert!(plain.check().is_ok(), "no secret, plain text: allowed (a local etcd)");
        let with_cert = EtcdConfig { client_cert: Some(("c.pem".into(), "k.pem".into())), ..plain.clone() };
        let e = with_cert.check().expect_err("a client certificate without a CA");
        assert!(e.to_string().contains("needs the CA"), "{e}");
        let with_password = EtcdConfig { user: Some(("musubi".into(), "secret".into())), ..plain.clone() };
        let e = with_password.check().expect_err("a password without TLS");
        assert!(e.to_string().contains("plain text") && !e.to_string().contains("secret"), "{e}");
        assert!(!format!("{with_password:?}").contains("secret"));
        let tls = EtcdConfig { ca: Some("ca.pem".into()), ..with_password };
        assert!(EtcdConfig { client_cert: with_cert.client_cert, ..tls }.check().is_ok());
    }
}
