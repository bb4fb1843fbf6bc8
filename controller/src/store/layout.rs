//! The key layout of the intent store, shared by every backend. One key per
//! object, so watches and transactions are fine-grained:
//!
//! | key | value (JSON) |
//! | --- | --- |
//! | `/musubi/v1/revision` | the intent revision, decimal; every commit compares it |
//! | `/musubi/v1/head` | the newest [`AuditEntry`] (its hash starts the next link) |
//! | `/musubi/v1/intent/settings` | [`Settings`] |
//! | `/musubi/v1/intent/{tenant,segment,site,policy}/<name>` | the object |
//! | `/musubi/v1/alloc/segment/<name>`, `/musubi/v1/alloc/site/<name>` | its allocation |
//! | `/musubi/v1/audit/<revision, 20 digits>` | the [`AuditEntry`] of that revision |
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
use crate::allocate::Allocations;
use crate::audit::AuditEntry;
use crate::intent::{Intent, Settings};
use crate::sorted::{Side, merge};

pub const PREFIX: &str = "/musubi/v1/";
pub const REVISION: &str = "/musubi/v1/revision";
pub const HEAD: &str = "/musubi/v1/head";
pub const SETTINGS: &str = "/musubi/v1/intent/settings";
pub const TENANT: &str = "/musubi/v1/intent/tenant/";
pub const SEGMENT: &str = "/musubi/v1/intent/segment/";
pub const SITE: &str = "/musubi/v1/intent/site/";
pub const POLICY: &str = "/musubi/v1/intent/policy/";
pub const ALLOC_SEGMENT: &str = "/musubi/v1/alloc/segment/";
pub const ALLOC_SITE: &str = "/musubi/v1/alloc/site/";
pub const AUDIT: &str = "/musubi/v1/audit/";

pub fn audit_key(revision: u64) -> String {
    format!("{AUDIT}{revision:020}")
}

/// Everything the store holds about the intent at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// 0 before the first change.
    pub revision: u64,
    pub head: Option<AuditEntry>,
    pub intent: Intent,
    pub allocations: Allocations,
}

/// Puts and deletes that take the store from one state to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteSet {
    pub puts: Vec<(String, Vec<u8>)>,
    pub deletes: Vec<String>,
}

fn json<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode { key: key.to_string(), reason: e.to_string() })
}

fn diff_map<T: Serialize + PartialEq>(
    out: &mut WriteSet,
    prefix: &str,
    old: &BTreeMap<String, T>,
    new: &BTreeMap<String, T>,
) -> Result<(), StoreError> {
    for side in merge(old, new) {
        match side {
            Side::Left(name, _) => out.deletes.push(format!("{prefix}{name}")),
            Side::Right(name, v) => {
                let key = format!("{prefix}{name}");
                out.puts.push((key.clone(), json(&key, v)?));
            }
            Side::Both(name, a, b) if a != b => {
                let key = format!("{prefix}{name}");
                out.puts.push((key.clone(), json(&key, b)?));
            }
            Side::Both(..) => {}
        }
    }
    Ok(())
}

/// The writes that turn `old` into (`intent`, `allocations`), plus the new
/// head and its audit record.
pub fn write_set(
    old: &Stored,
    intent: &Intent,
    allocations: &Allocations,
    audit: &AuditEntry,
) -> Result<WriteSet, StoreError> {
    let mut w = WriteSet::default();
    if old.revision == 0 || old.intent.settings != intent.settings {
        w.puts.push((SETTINGS.to_string(), json(SETTINGS, &intent.settings)?));
    }
    diff_map(&mut w, TENANT, &old.intent.tenants, &intent.tenants)?;
    diff_map(&mut w, SEGMENT, &old.intent.segments, &intent.segments)?;
    diff_map(&mut w, SITE, &old.intent.sites, &intent.sites)?;
    diff_map(&mut w, POLICY, &old.intent.policies, &intent.policies)?;
    diff_map(&mut w, ALLOC_SEGMENT, &old.allocations.segments, &allocations.segments)?;
    diff_map(&mut w, ALLOC_SITE, &old.allocations.sites, &allocations.sites)?;
    let audit_json = json(HEAD, audit)?;
    w.puts.push((audit_key(audit.revision), audit_json.clone()));
    w.puts.push((HEAD.to_string(), audit_json));
    w.puts.push((REVISION.to_string(), audit.revision.to_string().into_bytes()));
    Ok(w)
}

fn parse<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt { key: key.to_string(), reason: e.to_string() })
}

/// Rebuilds the state from every key under [`PREFIX`] (audit records are
/// skipped; read them with [`decode_history`]).
pub fn decode<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Stored, StoreError> {
    let mut s = Stored::default();
    for (key, value) in pairs {
        if key == REVISION {
            s.revision = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| StoreError::Corrupt { key: key.to_string(), reason: "not a revision number".into() })?;
        } else if key == HEAD {
            s.head = Some(parse(key, value)?);
        } else if key == SETTINGS {
            s.intent.settings = parse::<Settings>(key, value)?;
        } else if let Some(name) = key.strip_prefix(TENANT) {
            s.intent.tenants.insert(name.to_string(), Arc::new(parse(key, value)?));
        } else if let Some(name) = key.strip_prefix(SEGMENT) {
            s.intent.segments.insert(name.to_string(), Arc::new(parse(key, value)?));
        } else if let Some(name) = key.strip_prefix(SITE) {
            s.intent.sites.insert(name.to_string(), Arc::new(parse(key, value)?));
        } else if let Some(name) = key.strip_prefix(POLICY) {
            s.intent.policies.insert(name.to_string(), Arc::new(parse(key, value)?));
        } else if let Some(name) = key.strip_prefix(ALLOC_SEGMENT) {
            s.allocations.segments.insert(name.to_string(), parse(key, value)?);
        } else if let Some(name) = key.strip_prefix(ALLOC_SITE) {
            s.allocations.sites.insert(name.to_string(), parse(key, value)?);
        }
    }
    Ok(s)
}

/// Audit records, oldest first.
pub fn decode_history<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<Vec<AuditEntry>, StoreError> {
    let mut out: Vec<AuditEntry> =
        pairs.into_iter().filter(|(k, _)| k.starts_with(AUDIT)).map(|(k, v)| parse(k, v)).collect::<Result<_, _>>()?;
    out.sort_by_key(|e| e.revision);
    Ok(out)
}
