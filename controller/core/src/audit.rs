//! The audit chain: every accepted change of intent appends an entry naming
//! who, when, what and the resulting revision, linked to the previous entry by
//! a SHA-256 hash so that editing, dropping or reordering any entry breaks
//! every link after it. Events beside the intent (join tokens created and
//! spent, revocations and restores, WireGuard keys registered, changes
//! proposed for approval) are entries of the same chain: they keep the
//! intent revision they happened at and count up `event` within it.
//!
//! Pure: the caller supplies the time and the actor.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::intent::{Intent, Kind};
use crate::sorted::Side;

/// Hash of "no previous entry".
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Store revision the change produced.
    pub revision: u64,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Certificate identity of whoever made the change (`local` without mTLS).
    pub actor: String,
    /// What changed, one object per clause.
    pub summary: String,
    /// `hash` of the previous entry, or [`GENESIS`].
    pub previous: String,
    /// SHA-256 of the change records of this revision as stored (every
    /// intent key before and after, hex): an edited record no longer
    /// matches. Empty in entries written before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub changes: String,
    /// 0 for a change of intent; 1, 2 … for the events after it at the
    /// same revision.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub event: u32,
    /// SHA-256 over `previous` and this entry's fields, hex.
    pub hash: String,
    /// SHA-256 of the intent this change left in the store (see
    /// [`intent_digest`]), hex; empty in events and in entries written
    /// before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub intent: String,
    /// The certificate whose key signed `hash` (SHA-256 of its DER, hex);
    /// empty in unsigned entries.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signer: String,
    /// The signature over `hash`, base64; not part of the hash.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub signature: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn digest_of(e: &AuditEntry) -> String {
    let mut h = Sha256::new();
    // Length-prefixed fields: no two different entries encode alike. The
    // change records' hash and the event number count when present (older
    // entries keep their hashes).
    let fields = [
        e.previous.as_bytes(),
        &e.revision.to_be_bytes(),
        &e.time_ms.to_be_bytes(),
        e.actor.as_bytes(),
        e.summary.as_bytes(),
    ];
    let event = e.event.to_be_bytes();
    let optional = [
        (!e.changes.is_empty()).then_some(e.changes.as_bytes()),
        (e.event != 0).then_some(&event[..]),
        (!e.intent.is_empty()).then_some(e.intent.as_bytes()),
    ];
    for field in fields.into_iter().chain(optional.into_iter().flatten()) {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field);
    }
    hex(&h.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// SHA-256 of `bytes`, hex: what an entry's `changes` holds of its records.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl AuditEntry {
    /// The entry that follows `previous` (or starts the chain).
    pub fn next(previous: Option<&AuditEntry>, revision: u64, time_ms: u64, actor: &str, summary: &str) -> AuditEntry {
        Self::with_changes(previous, revision, time_ms, actor, summary, "")
    }

    /// The entry that follows `previous`, for a revision whose change
    /// records hash to `changes` (see [`sha256_hex`]).
    pub fn with_changes(
        previous: Option<&AuditEntry>,
        revision: u64,
        time_ms: u64,
        actor: &str,
        summary: &str,
        changes: &str,
    ) -> AuditEntry {
        let mut e = AuditEntry {
            revision,
            time_ms,
            actor: actor.to_string(),
            summary: summary.to_string(),
            previous: previous.map_or(GENESIS, |p| p.hash.as_str()).to_string(),
            changes: changes.to_string(),
            event: 0,
            intent: String::new(),
            hash: String::new(),
            signer: String::new(),
            signature: String::new(),
        };
        e.hash = digest_of(&e);
        e
    }

    /// An event beside the intent (a token, a revocation, a key), after
    /// `previous`, at intent revision `revision` (which it does not change).
    pub fn event(previous: Option<&AuditEntry>, revision: u64, time_ms: u64, actor: &str, summary: &str) -> AuditEntry {
        let event = match previous {
            Some(p) if p.revision == revision => p.event.saturating_add(1),
            _ => 1,
        };
        let mut e = Self::with_changes(previous, revision, time_ms, actor, summary, "");
        e.event = event;
        e.hash = digest_of(&e);
        e
    }

    /// The same entry holding `digest`, the SHA-256 of the intent it left
    /// (its hash made again to cover it).
    pub fn leaving(mut self, digest: &str) -> AuditEntry {
        self.intent = digest.to_string();
        self.hash = digest_of(&self);
        self
    }

    /// Where it stands in the chain: its revision, then its event number.
    pub fn position(&self) -> (u64, u32) {
        (self.revision, self.event)
    }

    /// `12` for a change of intent, `12.3` for the third event after it.
    pub fn label(&self) -> String {
        if self.event == 0 { self.revision.to_string() } else { format!("{}.{}", self.revision, self.event) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("audit entry {index} (revision {revision}) does not link to the entry before it")]
    Unlinked { index: usize, revision: u64 },
    #[error("audit entry {index} (revision {revision}) was altered: its hash does not match its content")]
    Altered { index: usize, revision: u64 },
    #[error("audit entry {index} ({label}) is not after {previous}")]
    OutOfOrder { index: usize, label: String, previous: String },
    #[error("the change records of revision {revision} were altered: they no longer hash to what its entry holds")]
    ChangesAltered { revision: u64 },
    #[error("the change records of revision {revision} are missing")]
    ChangesMissing { revision: u64 },
    #[error(
        "the intent after revision {revision} is not what its entry holds: the change records up to it do not add up to its digest"
    )]
    IntentDiffers { revision: u64 },
    #[error(
        "the intent in the store is not the one the audit chain ends with (revision {revision}): it was changed outside an apply"
    )]
    StoreDiffers { revision: u64 },
    #[error(
        "the history no longer extends the head verified before (revision {revision}, {hash:.16}…): it was rewritten or cut"
    )]
    Rewritten { revision: u64, hash: String },
}

/// Checks a whole chain, oldest first; names the first broken link.
pub fn verify(chain: &[AuditEntry]) -> Result<(), ChainError> {
    let mut prev: Option<&AuditEntry> = None;
    for (index, e) in chain.iter().enumerate() {
        let expected_prev = prev.map_or(GENESIS, |p| p.hash.as_str());
        if e.previous != expected_prev {
            return Err(ChainError::Unlinked { index, revision: e.revision });
        }
        if let Some(p) = prev
            && e.position() <= p.position()
        {
            return Err(ChainError::OutOfOrder { index, label: e.label(), previous: p.label() });
        }
        if digest_of(e) != e.hash {
            return Err(ChainError::Altered { index, revision: e.revision });
        }
        prev = Some(e);
    }
    Ok(())
}

/// Checks every entry's change records, as stored (`records`: revision →
/// the bytes of its change records): an entry that hashes its records must
/// find them, unaltered.
pub fn verify_changes(chain: &[AuditEntry], records: &BTreeMap<u64, Vec<u8>>) -> Result<(), ChainError> {
    for e in chain.iter().filter(|e| !e.changes.is_empty() && e.event == 0) {
        match records.get(&e.revision) {
            None => return Err(ChainError::ChangesMissing { revision: e.revision }),
            Some(bytes) if sha256_hex(bytes) != e.changes => {
                return Err(ChainError::ChangesAltered { revision: e.revision });
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Where the intent's keys start in the store: what [`intent_digest`]
/// covers of the change records.
pub const INTENT_KEYS: &str = "/musubi/v1/intent/";

/// SHA-256 of an intent as stored: over every intent key in key order, the
/// key and the SHA-256 of its stored value (JSON), each length-prefixed.
/// `pairs` must come in key order.
pub fn intent_digest<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> String {
    intent_digest_of_hashes(pairs.into_iter().map(|(k, v)| (k, value_hash(v))))
}

/// The SHA-256 of one stored value, as [`intent_digest`] takes it.
pub fn value_hash(value: &[u8]) -> [u8; 32] {
    Sha256::digest(value).into()
}

/// [`intent_digest`] from each key and the [`value_hash`] of its value
/// (kept by a caller that hashes only what changed), in key order.
pub fn intent_digest_of_hashes<'a>(pairs: impl IntoIterator<Item = (&'a str, [u8; 32])>) -> String {
    let mut digest = IntentDigest::default();
    for (key, value) in pairs {
        digest.push(&[key], &value);
    }
    digest.finish()
}

/// [`intent_digest_of_hashes`] fed one key at a time, each key given in
/// parts (a prefix and a name: no key string is built).
#[derive(Default, Clone)]
pub struct IntentDigest(Sha256);

impl std::fmt::Debug for IntentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntentDigest")
    }
}

impl IntentDigest {
    /// The next key (the concatenation of `key`), in key order, and the
    /// [`value_hash`] of its value.
    pub fn push(&mut self, key: &[&str], value_hash: &[u8; 32]) {
        let len: usize = key.iter().map(|part| part.len()).sum();
        self.0.update((len as u64).to_be_bytes());
        for part in key {
            self.0.update(part.as_bytes());
        }
        self.0.update(value_hash);
    }

    pub fn finish(self) -> String {
        hex(&self.0.finalize())
    }
}

/// One change record as [`verify_intent`] reads it.
#[derive(Deserialize)]
struct Record {
    key: String,
    current: Option<String>,
}

/// Replays the change records of every revision, oldest first, and checks
/// the intent digest of every entry that holds one against the intent the
/// records add up to; then that `stored` (the digest of the intent in the
/// store now, if known) is the one the chain ends with. Says whether the
/// replay could run (records of every change of intent are needed).
pub fn verify_intent(
    chain: &[AuditEntry],
    records: &BTreeMap<u64, Vec<u8>>,
    stored: Option<&str>,
) -> Result<bool, ChainError> {
    let changes: Vec<&AuditEntry> = chain.iter().filter(|e| e.event == 0).collect();
    if changes.iter().any(|e| !records.contains_key(&e.revision)) {
        return Ok(false);
    }
    let mut intent: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<(u64, String)> = None;
    for e in changes {
        let list: Vec<Record> = serde_json::from_slice(&records[&e.revision])
            .map_err(|_| ChainError::ChangesAltered { revision: e.revision })?;
        for r in list.into_iter().filter(|r| r.key.starts_with(INTENT_KEYS)) {
            match r.current {
                Some(v) => intent.insert(r.key, v),
                None => intent.remove(&r.key),
            };
        }
        let now = intent_digest(intent.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
        if !e.intent.is_empty() && e.intent != now {
            return Err(ChainError::IntentDiffers { revision: e.revision });
        }
        last = Some((e.revision, now));
    }
    if let (Some(stored), Some((revision, replayed))) = (stored, last)
        && stored != replayed
    {
        return Err(ChainError::StoreDiffers { revision });
    }
    Ok(true)
}

/// Does `chain` still hold the head verified earlier (`revision`, `hash`)?
/// A history that was rewritten, or cut before it, does not.
pub fn extends(chain: &[AuditEntry], revision: u64, hash: &str) -> Result<(), ChainError> {
    if chain.iter().any(|e| e.hash == hash) {
        Ok(())
    } else {
        Err(ChainError::Rewritten { revision, hash: hash.to_string() })
    }
}

fn clauses<T: Eq>(out: &mut Vec<String>, kind: Kind, old: &BTreeMap<String, Arc<T>>, new: &BTreeMap<String, Arc<T>>) {
    for side in crate::sorted::differing(old, new) {
        let (sign, name) = match side {
            Side::Left(name, _) => ('-', name),
            Side::Right(name, _) => ('+', name),
            Side::Both(name, _, _) => ('~', name),
        };
        out.push(format!("{sign}{} {name}", kind.word()));
    }
}

/// One clause per added, removed or changed object: `+site kita-hall`,
/// `~segment lgwan`, `-policy files`; `no change` when nothing differs.
pub fn summarise(old: &Intent, new: &Intent) -> String {
    let mut out = Vec::new();
    if old.settings != new.settings {
        out.push("~settings".to_string());
    }
    clauses(&mut out, Kind::Tenant, &old.tenants, &new.tenants);
    clauses(&mut out, Kind::Segment, &old.segments, &new.segments);
    clauses(&mut out, Kind::Site, &old.sites, &new.sites);
    clauses(&mut out, Kind::Policy, &old.policies, &new.policies);
    clauses(&mut out, Kind::Operator, &old.operators, &new.operators);
    if out.is_empty() { "no change".into() } else { out.join(", ") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_records_are_part_of_the_chain() {
        let records: BTreeMap<u64, Vec<u8>> =
            (1..=3).map(|r| (r, format!("[{{\"key\":\"k{r}\"}}]").into_bytes())).collect();
        let mut chain: Vec<AuditEntry> = Vec::new();
        for (r, bytes) in &records {
            let e = AuditEntry::with_changes(
                chain.last(),
                *r,
                1_700_000_000_000,
                "operator:a",
                "~site s",
                &sha256_hex(bytes),
            );
            chain.push(e);
        }
        assert_eq!(verify(&chain), Ok(()));
        assert_eq!(verify_changes(&chain, &records), Ok(()));
        let mut edited = records.clone();
        edited.insert(2, b"[{\"key\":\"k2\",\"current\":\"evil\"}]".to_vec());
        assert_eq!(verify_changes(&chain, &edited), Err(ChainError::ChangesAltered { revision: 2 }));
        let mut removed = records.clone();
        removed.remove(&3);
        assert_eq!(verify_changes(&chain, &removed), Err(ChainError::ChangesMissing { revision: 3 }));
        // The records' hash is in the entry's own: replacing it breaks the entry.
        let mut forged = chain.clone();
        forged[1].changes = sha256_hex(&edited[&2]);
        assert_eq!(verify(&forged), Err(ChainError::Altered { index: 1, revision: 2 }));
        // A head seen before must still be there.
        assert_eq!(extends(&chain, 2, &chain[1].hash), Ok(()));
        let rewritten: Vec<AuditEntry> = chain[..1].to_vec();
        assert!(matches!(extends(&rewritten, 2, &chain[1].hash), Err(ChainError::Rewritten { revision: 2, .. })));
    }

    fn chain(n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for i in 1..=n {
            let e = AuditEntry::next(out.last(), i * 10, 1_700_000_000_000 + i, "local", &format!("~site s{i}"));
            out.push(e);
        }
        out
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(()));
        assert_eq!(verify(&[]), Ok(()));
    }

    #[test]
    fn tampering_names_the_first_broken_link() {
        let mut c = chain(5);
        c[2].actor = "mallory".into();
        assert_eq!(verify(&c), Err(ChainError::Altered { index: 2, revision: 30 }));

        let mut c = chain(5);
        c.remove(1);
        assert_eq!(verify(&c), Err(ChainError::Unlinked { index: 1, revision: 30 }));

        // Rewriting an entry and its own hash still breaks the next link.
        let mut c = chain(5);
        c[3] = AuditEntry::next(Some(&c[2]), 40, 1, "local", "-site everything");
        assert_eq!(verify(&c), Err(ChainError::Unlinked { index: 4, revision: 50 }));
    }

    #[test]
    fn events_count_up_within_a_revision_and_are_links_of_the_chain() {
        let mut c = chain(2);
        let t = AuditEntry::event(c.last(), 20, 5, "operator:a", "token created for site s");
        assert_eq!((t.revision, t.event, t.label()), (20, 1, "20.1".to_string()));
        c.push(t);
        let k = AuditEntry::event(c.last(), 20, 6, "site:s", "keys registered");
        assert_eq!(k.label(), "20.2");
        c.push(k);
        c.push(AuditEntry::next(c.last(), 30, 7, "operator:a", "~site s"));
        c.push(AuditEntry::event(c.last(), 30, 8, "operator:a", "site s revoked"));
        assert_eq!(c[5].label(), "30.1");
        assert_eq!(verify(&c), Ok(()));
        // An event's number is part of its hash.
        let mut renumbered = c.clone();
        renumbered[3].event = 7;
        assert_eq!(verify(&renumbered), Err(ChainError::Altered { index: 3, revision: 20 }));
        // Dropping an event breaks the next link, as dropping a change does.
        let mut dropped = c.clone();
        dropped.remove(2);
        assert_eq!(verify(&dropped), Err(ChainError::Unlinked { index: 2, revision: 20 }));
        // The first event before any change of intent is at revision 0.
        assert_eq!(AuditEntry::event(None, 0, 1, "operator:a", "x").label(), "0.1");
        // Entries without an event number keep the hash they had.
        let json = serde_json::to_string(&c[0]).unwrap_or_default();
        assert!(!json.contains("event"), "{json}");
    }

    #[test]
    fn the_intent_digest_follows_the_change_records() {
        let record = |key: &str, v: Option<&str>| serde_json::json!({"key": key, "previous": null, "current": v});
        let site = "/musubi/v1/intent/site/a";
        let alloc = "/musubi/v1/alloc/site/a";
        let r1 = serde_json::to_vec(&[record(site, Some("{\"n\":1}")), record(alloc, Some("{}"))]).unwrap_or_default();
        let r2 = serde_json::to_vec(&[record(site, None)]).unwrap_or_default();
        let d1 = intent_digest([(site, &b"{\"n\":1}"[..])]);
        let d2 = intent_digest([]);
        let mut chain = vec![AuditEntry::with_changes(None, 1, 1, "a", "+site a", &sha256_hex(&r1)).leaving(&d1)];
        chain.push(AuditEntry::event(chain.last(), 1, 2, "a", "site a revoked"));
        chain.push(AuditEntry::with_changes(chain.last(), 2, 3, "a", "-site a", &sha256_hex(&r2)).leaving(&d2));
        assert_eq!(verify(&chain), Ok(()));
        let records: BTreeMap<u64, Vec<u8>> = [(1, r1.clone()), (2, r2)].into();
        assert_eq!(verify_intent(&chain, &records, Some(&d2)), Ok(true));
        // The store holds another intent than the chain ends with.
        assert_eq!(verify_intent(&chain, &records, Some(&d1)), Err(ChainError::StoreDiffers { revision: 2 }));
        // Records that no longer add up to an entry's digest.
        let other = serde_json::to_vec(&[record(site, Some("{\"n\":2}"))]).unwrap_or_default();
        let edited: BTreeMap<u64, Vec<u8>> = [(1, other), (2, records[&2].clone())].into();
        assert_eq!(verify_intent(&chain, &edited, None), Err(ChainError::IntentDiffers { revision: 1 }));
        // Without every revision's records, no replay.
        assert_eq!(verify_intent(&chain, &[(2, records[&2].clone())].into(), None), Ok(false));
        // The digest is inside the hash.
        let mut forged = chain.clone();
        forged[0].intent = d2.clone();
        assert_eq!(verify(&forged), Err(ChainError::Altered { index: 0, revision: 1 }));
    }

    #[test]
    fn summaries_name_each_object() {
        let a = crate::intent::parse::parse_str("a", "kind: Tenant\nname: t\n---\nkind: Tenant\nname: u\n").intent;
        let b =
            crate::intent::parse::parse_str("b", "kind: Tenant\nname: t\ndescription: x\n---\nkind: Tenant\nname: v\n")
                .intent;
        assert_eq!(summarise(&a, &b), "~tenant t, -tenant u, +tenant v");
        assert_eq!(summarise(&a, &a), "no change");
    }
}
