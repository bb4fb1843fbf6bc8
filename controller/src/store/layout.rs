//! The key layout of the intent store, shared by every backend. One key per
//! object, so watches and transactions are fine-grained:
//!
//! | key | value (JSON) |
//! | --- | --- |
//! | `/musubi/v1/revision` | the intent revision, decimal; every commit compares it |
//! | `/musubi/v1/head` | the newest [`AuditEntry`] (its hash starts the next link) |
//! | `/musubi/v1/intent/settings` | [`Settings`] |
//! | `/musubi/v1/intent/{tenant,segment,site,policy,operator}/<name>` | the object (an operator: its roles and tenants) |
//! | `/musubi/v1/alloc/segment/<name>`, `/musubi/v1/alloc/site/<name>` | its allocation |
//! | `/musubi/v1/audit/<revision, 20 digits>` | the [`AuditEntry`] of that revision |
//! | `/musubi/v1/audit/<revision, 20 digits>.<event, 10 digits>` | an event's [`AuditEntry`] (token, revocation, key, proposal) after that revision |
//! | `/musubi/v1/keys/<site>/<segment>` | the agent's WireGuard public key for that segment (base64) |
//! | `/musubi/v1/presence/<site>` | the agent's [`SiteStatus`](musubi_proto::v1::SiteStatus) (JSON); lives while the agent is connected (lease or expiry) |
//! | `/musubi/v1/seen/<site>` | the agent's last status, kept after it disconnects |
//! | `/musubi/v1/tokens/<SHA-256 of the token, hex>` | a join token's [`site`, expiry, use] record; the token itself is never stored |
//! | `/musubi/v1/revoked/<site>` | a revocation: certificates issued before it are refused |
//! | `/musubi/v1/revoked-operators/<name>` | an operator's revocation, read on every operator call |
//! | `/musubi/v1/signers/<SHA-256 of a certificate, hex>` | the certificate chain (PEM) of a key that signs audit entries (a replica's server key) |
//! | `/musubi/v1/pending/<id>` | a change proposed for approval |
//! | `/musubi/v1/key-owners/<SHA-256 of a public key, hex>` | `site/segment`: the one interface a WireGuard public key may belong to |
//! | `/musubi/v1/changes/<revision, 20 digits>` | [`KeyChange`] records: each intent key that revision changed, before and after (watches replay them forwards, rollbacks backwards); on etcd, a record too large for one request names its parts instead |
//! | `/musubi/v1/generation` | etcd: the generation that holds the intent and allocation keys, once a change too large for one etcd transaction was committed ([`super::generations`]) |
//! | `/musubi/v1/g/<generation>/intent/…`, `/musubi/v1/g/<generation>/alloc/…` | etcd: the intent and allocation keys of that generation |
//! | `/musubi/v1/staging/<generation>` | etcd: a generation being written, with its writer's lease (swept when the lease is gone) |
//! | `/musubi/v1/change-parts/<generation>/<part, 8 digits>` | etcd: the bytes of a large change record, in order |
//!
//! The intent revision is Musubi's own counter (1, 2, 3 …), kept in the head
//! entry: every accepted change adds one, whatever else the backend stores.
//! [`write_set`] turns two states into the puts and deletes between them
//! (pure), and [`decode`] turns the keys back into a [`Stored`] state.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;
use musubi_core::allocate::Allocations;
use musubi_core::audit::AuditEntry;
use musubi_core::intent::source::ObjectRef;
use musubi_core::intent::{Intent, Kind};
use musubi_core::sorted::{Side, merge};

pub const PREFIX: &str = "/musubi/v1/";
pub const REVISION: &str = "/musubi/v1/revision";
pub const HEAD: &str = "/musubi/v1/head";
pub const SETTINGS: &str = "/musubi/v1/intent/settings";
pub const TENANT: &str = "/musubi/v1/intent/tenant/";
pub const SEGMENT: &str = "/musubi/v1/intent/segment/";
pub const SITE: &str = "/musubi/v1/intent/site/";
pub const POLICY: &str = "/musubi/v1/intent/policy/";
pub const OPERATOR: &str = "/musubi/v1/intent/operator/";
pub const ALLOC_SEGMENT: &str = "/musubi/v1/alloc/segment/";
pub const ALLOC_SITE: &str = "/musubi/v1/alloc/site/";
pub const AUDIT: &str = "/musubi/v1/audit/";
pub const CHANGES: &str = "/musubi/v1/changes/";
pub const GENERATION: &str = "/musubi/v1/generation";
pub const GENERATIONS: &str = "/musubi/v1/g/";
pub const STAGING: &str = "/musubi/v1/staging/";
pub const CHANGE_PARTS: &str = "/musubi/v1/change-parts/";
pub const INTENT: &str = musubi_core::audit::INTENT_KEYS;
pub const KEYS: &str = "/musubi/v1/keys/";
pub const PRESENCE: &str = "/musubi/v1/presence/";
pub const SEEN: &str = "/musubi/v1/seen/";
pub const TOKENS: &str = "/musubi/v1/tokens/";
pub const REVOKED: &str = "/musubi/v1/revoked/";
pub const REVOKED_OPERATORS: &str = "/musubi/v1/revoked-operators/";
pub const KEY_OWNERS: &str = "/musubi/v1/key-owners/";

pub fn public_key_key(site: &str, segment: &str) -> String {
    format!("{KEYS}{site}/{segment}")
}
pub const ALLOC: &str = "/musubi/v1/alloc/";

pub fn audit_key(revision: u64) -> String {
    format!("{AUDIT}{revision:020}")
}

/// Where `entry` is kept: a change of intent under its revision, an event
/// just after it (the keys sort as the chain runs).
pub fn entry_key(entry: &AuditEntry) -> String {
    match entry.event {
        0 => audit_key(entry.revision),
        n => format!("{AUDIT}{:020}.{n:010}", entry.revision),
    }
}

/// An audit entry as the head record (and its own record) holds it.
pub fn head_bytes(entry: &AuditEntry) -> Result<Vec<u8>, StoreError> {
    json(HEAD, entry)
}

/// The head record read back.
pub fn parse_head(value: &[u8]) -> Result<AuditEntry, StoreError> {
    parse(HEAD, value)
}

/// The head record as stored: what a write that links to `head` compares.
pub fn head_guard(head: Option<&AuditEntry>) -> Result<super::Guard, StoreError> {
    Ok(match head {
        None => super::Guard::Absent,
        Some(h) => super::Guard::Holds(json(HEAD, h)?),
    })
}

/// The key an intent object is stored at.
pub fn object_key(object: &ObjectRef) -> String {
    let prefix = match object.kind {
        Kind::Settings => return SETTINGS.to_string(),
        Kind::Tenant => TENANT,
        Kind::Segment => SEGMENT,
        Kind::Site => SITE,
        Kind::Policy => POLICY,
        Kind::Operator => OPERATOR,
    };
    format!("{prefix}{}", object.name)
}

pub fn changes_key(revision: u64) -> String {
    format!("{CHANGES}{revision:020}")
}

/// One intent key changed by a revision: its JSON before and after (`None`
/// where it did not exist).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyChange {
    pub key: String,
    pub previous: Option<String>,
    pub current: Option<String>,
}

/// Everything the store holds about the intent at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// 0 before the first change.
    pub revision: u64,
    pub head: Option<AuditEntry>,
    pub intent: Intent,
    pub allocations: Allocations,
    /// Agents' public keys, site → segment → key.
    pub keys: musubi_core::compile::PublicKeys,
}

/// Puts and deletes that take the store from one state to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
    /// What the head record must still be: the new entry links to it, and
    /// an event appended since (which does not move the revision) would
    /// otherwise be cut out of the chain.
    pub head: super::Guard,
}

fn json_text<T: Serialize>(key: &str, value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|source| StoreError::Encode { key: key.to_string(), source })
}

fn json<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    json_text(key, value).map(String::into_bytes)
}

/// Writes for one map; with `log`, also a [`KeyChange`] for each written key.
fn diff_map<T: Serialize + PartialEq>(
    out: &mut WriteSet,
    log: Option<&mut Vec<KeyChange>>,
    prefix: &str,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> Result<(), StoreError> {
    write_sides(out, log, prefix, merge(old, new))
}

/// [`diff_map`] for maps of shared objects: an intent's (see
/// [`musubi_core::sorted::differing`]).
fn diff_shared<T: Serialize + Eq>(
    out: &mut WriteSet,
    log: Option<&mut Vec<KeyChange>>,
    prefix: &str,
    old: &BTreeMap<String, Arc<T>>,
    new: &BTreeMap<String, Arc<T>>,
) -> Result<(), StoreError> {
    write_sides(out, log, prefix, musubi_core::sorted::differing(old, new))
}

fn write_sides<'a, T: Serialize + PartialEq + 'a>(
    out: &mut WriteSet,
    mut log: Option<&mut Vec<KeyChange>>,
    prefix: &str,
    sides: impl IntoIterator<Item = Side<'a, T, T>>,
) -> Result<(), StoreError> {
    for side in sides {
        let (name, before, after) = match side {
            Side::Left(name, a) => (name, Some(a), None),
            Side::Right(name, b) => (name, None, Some(b)),
            Side::Both(name, a, b) if a != b => (name, Some(a), Some(b)),
            Side::Both(..) => continue,
        };
        let key = format!("{prefix}{name}");
        if let Some(log) = log.as_deref_mut() {
            let text = |v: &T| json_text(&key, v);
            log.push(KeyChange {
                key: key.clone(),
                previous: before.map(text).transpose()?,
                current: after.map(text).transpose()?,
            });
        }
        match after {
            Some(v) => out.puts.push((key.clone(), json(&key, v)?)),
            None => out.deletes.push(key),
        }
    }
    Ok(())
}

/// The writes that turn `old` into (`intent`, `allocations`) at `revision`,
/// plus the new head and its audit record: `entry` makes it from the SHA-256
/// of the revision's change records (as written) and the digest of the
/// intent they leave ([`intent_digest`]), so the chain covers both, linked
/// to `head` (the head record the commit will require).
pub fn write_set(
    old: &Stored,
    head: Option<&AuditEntry>,
    intent: &Intent,
    allocations: &Allocations,
    revision: u64,
    entry: impl FnOnce(&str, &str) -> AuditEntry,
) -> Result<(WriteSet, AuditEntry), StoreError> {
    let mut w = WriteSet::default();
    let mut log = Vec::new();
    if old.revision == 0 || old.intent.settings != intent.settings {
        let previous = (old.revision != 0).then(|| json_text(SETTINGS, &old.intent.settings)).transpose()?;
        let current = Some(json_text(SETTINGS, &intent.settings)?);
        log.push(KeyChange { key: SETTINGS.to_string(), previous, current });
        w.puts.push((SETTINGS.to_string(), json(SETTINGS, &intent.settings)?));
    }
    diff_shared(&mut w, Some(&mut log), TENANT, &old.intent.tenants, &intent.tenants)?;
    diff_shared(&mut w, Some(&mut log), SEGMENT, &old.intent.segments, &intent.segments)?;
    diff_shared(&mut w, Some(&mut log), SITE, &old.intent.sites, &intent.sites)?;
    diff_shared(&mut w, Some(&mut log), POLICY, &old.intent.policies, &intent.policies)?;
    diff_shared(&mut w, Some(&mut log), OPERATOR, &old.intent.operators, &intent.operators)?;
    // Allocations are logged too, so that a watcher can follow the whole
    // compiled state from change records alone (rollback ignores them).
    // A change that allocated nothing shares the previous maps.
    if !Arc::ptr_eq(&old.allocations.segments, &allocations.segments) {
        diff_map(&mut w, Some(&mut log), ALLOC_SEGMENT, &old.allocations.segments, &allocations.segments)?;
    }
    if !Arc::ptr_eq(&old.allocations.sites, &allocations.sites) {
        diff_map(&mut w, Some(&mut log), ALLOC_SITE, &old.allocations.sites, &allocations.sites)?;
    }
    let changes_key = changes_key(revision);
    let records = json(&changes_key, &log)?;
    let audit = entry(&musubi_core::audit::sha256_hex(&records), &intent_digest(intent)?);
    w.puts.push((changes_key, records));
    w.head = head_guard(head)?;
    let audit_json = json(HEAD, &audit)?;
    w.puts.push((entry_key(&audit), audit_json.clone()));
    w.puts.push((HEAD.to_string(), audit_json));
    w.puts.push((REVISION.to_string(), audit.revision.to_string().into_bytes()));
    Ok((w, audit))
}

/// The digest of `intent` as the store holds it (every intent key and its
/// JSON, in key order; see [`musubi_core::audit::intent_digest`]).
pub fn intent_digest(intent: &Intent) -> Result<String, StoreError> {
    // Objects are shared (`Arc`) from one revision to the next: each one's
    // hash is kept with the object itself, and only objects not seen
    // before are serialised again (a one-site change hashes one site, not
    // ten thousand). The cache holds the objects it hashed, so an address
    // is never reused while its hash is kept; it keeps only the newest
    // intent's objects, by kind and name, updated in place (no key is
    // formatted and no map rebuilt for the objects that did not change).
    type Kept = BTreeMap<String, (Arc<dyn std::any::Any + Send + Sync>, [u8; 32])>;
    static CACHE: std::sync::Mutex<[Kept; 5]> = std::sync::Mutex::new([const { BTreeMap::new() }; 5]);
    fn each<T: Serialize + Send + Sync + 'static>(
        digest: &mut musubi_core::audit::IntentDigest,
        kept: &mut Kept,
        prefix: &str,
        map: &BTreeMap<String, Arc<T>>,
    ) -> Result<(), StoreError> {
        let hash_of = |name: &str, value: &Arc<T>| {
            json_text(&format!("{prefix}{name}"), value).map(|j| musubi_core::audit::value_hash(j.as_bytes()))
        };
        // Both in name order: walked side by side, not searched per name.
        let mut known = kept.iter_mut().peekable();
        let mut stale = false;
        let mut fresh = Vec::new();
        for (name, value) in map {
            while known.next_if(|(k, _)| k.as_str() < name.as_str()).is_some() {
                stale = true;
            }
            let hash = match known.next_if(|(k, _)| *k == name) {
                Some((_, (same, hash)))
                    if std::ptr::eq(Arc::as_ptr(same) as *const (), Arc::as_ptr(value) as *const ()) =>
                {
                    *hash
                }
                Some((_, entry)) => {
                    *entry = (value.clone(), hash_of(name, value)?);
                    entry.1
                }
                None => {
                    let hash = hash_of(name, value)?;
                    fresh.push((name.clone(), (value.clone() as Arc<dyn std::any::Any + Send + Sync>, hash)));
                    hash
                }
            };
            digest.push(&[prefix, name], &hash);
        }
        stale |= known.next().is_some();
        kept.extend(fresh);
        // Names no longer in `map` leave.
        if stale {
            kept.retain(|name, _| map.contains_key(name));
        }
        Ok(())
    }
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let result = (|| {
        let [operators, policies, segments, sites, tenants] = &mut *cache;
        let mut digest = musubi_core::audit::IntentDigest::default();
        // Key order: operator/ < policy/ < segment/ < settings < site/ < tenant/.
        each(&mut digest, operators, OPERATOR, &intent.operators)?;
        each(&mut digest, policies, POLICY, &intent.policies)?;
        each(&mut digest, segments, SEGMENT, &intent.segments)?;
        let settings = musubi_core::audit::value_hash(json_text(SETTINGS, &intent.settings)?.as_bytes());
        digest.push(&[SETTINGS], &settings);
        each(&mut digest, sites, SITE, &intent.sites)?;
        each(&mut digest, tenants, TENANT, &intent.tenants)?;
        Ok(digest.finish())
    })();
    if result.is_err() {
        // Half updated: start afresh next time.
        *cache = Default::default();
    }
    result
}

/// The intent revision stored at [`REVISION`] (a decimal number).
pub fn revision_value(value: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| StoreError::corrupt(REVISION, "not a revision number"))
}

fn parse<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::corrupt(key, e))
}

/// Sets (or, with `None`, removes) the object an intent key names.
pub fn set_intent_key(intent: &mut Intent, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
    fn put<T: DeserializeOwned>(
        map: &mut BTreeMap<String, Arc<T>>,
        name: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        match value {
            Some(v) => {
                map.insert(name.to_string(), Arc::new(parse(key, v)?));
            }
            None => {
                map.remove(name);
            }
        }
        Ok(())
    }
    if key == SETTINGS {
        intent.settings = value.map(|v| parse(key, v)).transpose()?.unwrap_or_default();
    } else if let Some(name) = key.strip_prefix(TENANT) {
        put(&mut intent.tenants, name, key, value)?;
    } else if let Some(name) = key.strip_prefix(SEGMENT) {
        put(&mut intent.segments, name, key, value)?;
    } else if let Some(name) = key.strip_prefix(SITE) {
        put(&mut intent.sites, name, key, value)?;
    } else if let Some(name) = key.strip_prefix(POLICY) {
        put(&mut intent.policies, name, key, value)?;
    } else if let Some(name) = key.strip_prefix(OPERATOR) {
        put(&mut intent.operators, name, key, value)?;
    }
    Ok(())
}

/// Sets (or removes) the intent object or allocation a key names.
pub fn set_state_key(state: &mut Stored, key: &str, value: Option<&[u8]>) -> Result<(), StoreError> {
    fn put<T: DeserializeOwned>(
        map: &mut BTreeMap<String, T>,
        name: &str,
        key: &str,
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        match value {
            Some(v) => map.insert(name.to_string(), parse(key, v)?),
            None => map.remove(name),
        };
        Ok(())
    }
    if let Some(name) = key.strip_prefix(ALLOC_SEGMENT) {
        put(Arc::make_mut(&mut state.allocations.segments), name, key, value)
    } else if let Some(name) = key.strip_prefix(ALLOC_SITE) {
        put(Arc::make_mut(&mut state.allocations.sites), name, key, value)
    } else {
        set_intent_key(&mut state.intent, key, value)
    }
}

/// Rebuilds the state from the keys of one consistent read (audit and undo
/// records are skipped; read them with [`decode_history`] and [`decode_changes`]).
pub fn decode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Stored, StoreError> {
    let mut s = Stored::default();
    for (key, value) in pairs {
        if key == REVISION {
            s.revision = revision_value(value)?;
        } else if key == HEAD {
            s.head = Some(parse(key, value)?);
        } else if key.starts_with(INTENT) {
            set_intent_key(&mut s.intent, key, Some(value))?;
        } else if let Some((site, segment)) = key.strip_prefix(KEYS).and_then(|k| k.split_once('/')) {
            let public = std::str::from_utf8(value).map_err(|e| StoreError::corrupt(key, e))?;
            s.keys.entry(site.to_string()).or_default().insert(segment.to_string(), public.to_string());
        } else if let Some(name) = key.strip_prefix(ALLOC_SEGMENT) {
            Arc::make_mut(&mut s.allocations.segments).insert(name.to_string(), parse(key, value)?);
        } else if let Some(name) = key.strip_prefix(ALLOC_SITE) {
            Arc::make_mut(&mut s.allocations.sites).insert(name.to_string(), parse(key, value)?);
        }
    }
    Ok(s)
}

/// KeyChange records by revision.
pub fn decode_changes<'a>(
    pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Vec<(u64, Vec<KeyChange>)>, StoreError> {
    let mut out = Vec::new();
    for (key, value) in pairs {
        let Some(rev) = key.strip_prefix(CHANGES).and_then(|r| r.parse::<u64>().ok()) else { continue };
        out.push((rev, parse(key, value)?));
    }
    out.sort_by_key(|(r, _)| *r);
    Ok(out)
}

/// The intent as it was at revision `target`: `current` (at revision
/// `current_revision`) with the undo records of every later revision applied,
/// newest first.
pub fn intent_at(
    current: &Intent,
    current_revision: u64,
    target: u64,
    undo: &[(u64, Vec<KeyChange>)],
) -> Result<Intent, StoreError> {
    let mut intent = current.clone();
    for (rev, records) in undo.iter().rev() {
        if *rev <= target || *rev > current_revision {
            continue;
        }
        for u in records {
            set_intent_key(&mut intent, &u.key, u.previous.as_deref().map(str::as_bytes))?;
        }
    }
    Ok(intent)
}

/// Audit records, oldest first.
pub fn decode_history<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Vec<AuditEntry>, StoreError> {
    let mut out: Vec<AuditEntry> =
        pairs.into_iter().filter(|(k, _)| k.starts_with(AUDIT)).map(|(k, v)| parse(k, v)).collect::<Result<_, _>>()?;
    out.sort_by_key(AuditEntry::position);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The digest with every object serialised afresh, in sorted key order.
    fn plain(intent: &Intent) -> String {
        let mut pairs: Vec<(String, String)> =
            vec![(SETTINGS.to_string(), json_text(SETTINGS, &intent.settings).unwrap_or_default())];
        let mut add = |prefix: &str, items: Vec<(&String, String)>| {
            pairs.extend(items.into_iter().map(|(n, v)| (format!("{prefix}{n}"), v)));
        };
        let text = |v: &dyn erased::Json| v.text();
        add(TENANT, intent.tenants.iter().map(|(n, v)| (n, text(&**v))).collect());
        add(SEGMENT, intent.segments.iter().map(|(n, v)| (n, text(&**v))).collect());
        add(SITE, intent.sites.iter().map(|(n, v)| (n, text(&**v))).collect());
        add(POLICY, intent.policies.iter().map(|(n, v)| (n, text(&**v))).collect());
        add(OPERATOR, intent.operators.iter().map(|(n, v)| (n, text(&**v))).collect());
        pairs.sort();
        musubi_core::audit::intent_digest(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
    }

    mod erased {
        pub trait Json {
            fn text(&self) -> String;
        }
        impl<T: serde::Serialize> Json for T {
            fn text(&self) -> String {
                serde_json::to_string(self).unwrap_or_default()
            }
        }
    }

    #[test]
    fn the_kept_hashes_give_the_digest_of_the_whole_intent() {
        let text = "kind: Tenant\nname: t\n---\nkind: Tenant\nname: u\n";
        let first = musubi_core::intent::parse::parse_str("a", text).intent;
        assert_eq!(intent_digest(&first).ok(), Some(plain(&first)));
        // One object changed, the others shared: hashed from the cache, same as afresh.
        let mut second = first.clone();
        Arc::make_mut(second.tenants.get_mut("u").expect("u")).description = "changed".into();
        let digest = intent_digest(&second).ok();
        assert_eq!(digest, Some(plain(&second)));
        assert_ne!(digest, intent_digest(&first).ok());
        // Removed and added objects count too.
        let mut third = second.clone();
        third.tenants.remove("t");
        assert_eq!(intent_digest(&third).ok(), Some(plain(&third)));
        // A rename: as many objects as before, one of them new.
        let mut fourth = third.clone();
        let mut v = (*fourth.tenants["u"]).clone();
        v.name = "v".into();
        fourth.tenants.remove("u");
        fourth.tenants.insert("v".into(), Arc::new(v));
        assert_eq!(intent_digest(&fourth).ok(), Some(plain(&fourth)));
        // And back to an intent whose objects are no longer kept.
        assert_eq!(intent_digest(&first).ok(), Some(plain(&first)));
        assert_eq!(intent_digest(&fourth).ok(), Some(plain(&fourth)));
        // Names walked side by side with the kept ones: added before, between
        // and after them, one removed from the middle, in one change.
        let many = "kind: Tenant\nname: b\n---\nkind: Tenant\nname: d\n---\nkind: Tenant\nname: f\n";
        let fifth = musubi_core::intent::parse::parse_str("b", many).intent;
        assert_eq!(intent_digest(&fifth).ok(), Some(plain(&fifth)));
        let mut sixth = fifth.clone();
        sixth.tenants.remove("d");
        for name in ["a", "c", "e", "g"] {
            let mut t = (*fifth.tenants["b"]).clone();
            t.name = name.into();
            sixth.tenants.insert(name.into(), Arc::new(t));
        }
        assert_eq!(intent_digest(&sixth).ok(), Some(plain(&sixth)));
        assert_eq!(intent_digest(&fifth).ok(), Some(plain(&fifth)));
    }
}
