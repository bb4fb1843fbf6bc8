//! Generations: how the etcd store commits a change larger than one etcd
//! transaction may be, with etcd's default limits (`--max-txn-ops 128`,
//! `--max-request-bytes` 1.5 MiB).
//!
//! A change that fits is one transaction, as always. A larger one (a first
//! import, a change of thousands of sites) writes the whole intent and its
//! allocations after the change under a new generation prefix,
//! `/musubi/v1/g/<generation>/`, in batches that each fit; nothing reads
//! that prefix until one small transaction, guarded by the intent revision
//! and the audit head like every commit, points
//! [`GENERATION`](super::layout::GENERATION) at it, writes the revision,
//! head and audit entry, and deletes the previous generation (one range
//! delete). A change record too large for one request is stored in parts
//! beside the generation and the record itself names them ([`Parts`]):
//! read back, the bytes are the same, so the audit chain's digest of them
//! holds. A generation being written is named under
//! [`STAGING`](super::layout::STAGING) with the lease of its writer: if the
//! writer dies half-way, its lease expires and any replica sweeps the
//! generation away.
//!
//! This module is the pure part: which keys move with generations, where
//! they are stored, how writes are cut into batches.

use serde::{Deserialize, Serialize};

use super::layout::{ALLOC, CHANGE_PARTS, GENERATIONS, INTENT, PREFIX, WriteSet};

/// What one etcd transaction may carry here: etcd's defaults (128
/// operations, 1.5 MiB per request) with room for the guards and framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub ops: usize,
    pub bytes: usize,
}

pub const ETCD_DEFAULTS: Limits = Limits { ops: 100, bytes: 1024 * 1024 };

/// Whether `key` lives in a generation (intent objects and allocations).
pub fn generational(key: &str) -> bool {
    key.starts_with(INTENT) || key.starts_with(ALLOC)
}

/// Where `key` is stored while `generation` is current (`None`: no staged
/// commit yet, every key where the layout names it).
pub fn stored(key: &str, generation: Option<&str>) -> String {
    match (generation, key.strip_prefix(PREFIX)) {
        (Some(g), Some(rest)) if generational(key) => format!("{GENERATIONS}{g}/{rest}"),
        _ => key.to_string(),
    }
}

/// The layout's key for a key stored in `generation`.
pub fn unstored(key: &str, generation: Option<&str>) -> Option<String> {
    match generation {
        None => Some(key.to_string()),
        Some(g) => {
            key.strip_prefix(GENERATIONS)?.strip_prefix(g)?.strip_prefix('/').map(|rest| format!("{PREFIX}{rest}"))
        }
    }
}

/// The prefix under which a generation's keys are stored.
pub fn generation_prefix(generation: &str) -> String {
    format!("{GENERATIONS}{generation}/")
}

/// The prefix of a generation's change-record parts.
pub fn parts_prefix(generation: &str) -> String {
    format!("{CHANGE_PARTS}{generation}/")
}

/// Whether `writes` fits in one transaction.
pub fn fits(writes: &WriteSet, limits: Limits) -> bool {
    let ops = writes.puts.len() + writes.deletes.len();
    let bytes: usize = writes.puts.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
        + writes.deletes.iter().map(String::len).sum::<usize>();
    ops <= limits.ops && bytes <= limits.bytes
}

/// Puts cut into batches that each fit in one transaction, in order. A
/// single pair larger than the limit goes alone (etcd then refuses it,
/// saying why).
pub fn batches(pairs: Vec<(String, Vec<u8>)>, limits: Limits) -> Vec<Vec<(String, Vec<u8>)>> {
    let mut out: Vec<Vec<(String, Vec<u8>)>> = Vec::new();
    let mut bytes = 0;
    for (k, v) in pairs {
        let size = k.len() + v.len();
        match out.last_mut() {
            Some(last) if last.len() < limits.ops && bytes + size <= limits.bytes => {
                bytes += size;
                last.push((k, v));
            }
            _ => {
                bytes = size;
                out.push(vec![(k, v)]);
            }
        }
    }
    out
}

/// A change record stored in parts: the record's key holds this, the
/// parts hold its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    pub parts: String,
    pub count: usize,
}

impl Parts {
    /// The key of part `n`.
    pub fn key(&self, n: usize) -> String {
        format!("{}{n:08}", parts_prefix(&self.parts))
    }

    /// Reads a record's value: `Some` when it names parts (a record itself
    /// is a JSON array, never an object).
    pub fn read(value: &[u8]) -> Option<Parts> {
        if value.first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(value).ok()
    }
}

/// Cuts `value` into parts of at most `size` bytes, stored in `generation`:
/// what the record's key holds, and the parts' keys and bytes.
pub fn split(value: &[u8], generation: &str, size: usize) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let chunks: Vec<&[u8]> = value.chunks(size.max(1)).collect();
    let parts = Parts { parts: generation.to_string(), count: chunks.len() };
    let pairs = chunks.iter().enumerate().map(|(n, c)| (parts.key(n), c.to_vec())).collect();
    (serde_json::to_vec(&parts).unwrap_or_default(), pairs)
}

/// Joins parts read back (in key order) into the record's bytes, if every
/// part is there.
pub fn join(parts: &Parts, found: &[(String, Vec<u8>)]) -> Option<Vec<u8>> {
    if found.len() != parts.count || found.iter().enumerate().any(|(n, (k, _))| *k != parts.key(n)) {
        return None;
    }
    Some(found.iter().flat_map(|(_, v)| v.iter().copied()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::layout::{AUDIT, HEAD, SITE};

    #[test]
    fn only_intent_and_allocations_move_with_a_generation() {
        let site = format!("{SITE}kita-hall");
        assert_eq!(stored(&site, None), site, "before any staged commit, keys are where the layout says");
        let moved = stored(&site, Some("g1"));
        assert_eq!(moved, "/musubi/v1/g/g1/intent/site/kita-hall");
        assert_eq!(unstored(&moved, Some("g1")), Some(site.clone()));
        assert_eq!(unstored(&moved, Some("g"),), None, "another generation's key is not this one's");
        assert_eq!(stored("/musubi/v1/alloc/site/x", Some("g1")), "/musubi/v1/g/g1/alloc/site/x");
        for key in [HEAD, AUDIT, "/musubi/v1/keys/a/b"] {
            assert_eq!(stored(key, Some("g1")), key, "{key} stays put");
        }
    }

    #[test]
    fn batches_respect_both_limits_and_keep_order() {
        let limits = Limits { ops: 3, bytes: 100 };
        let pairs: Vec<(String, Vec<u8>)> = (0..10).map(|i| (format!("k{i}"), vec![b'x'; 30])).collect();
        let out = batches(pairs.clone(), limits);
        assert!(out.iter().all(|b| b.len() <= 3 && b.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>() <= 100));
        assert_eq!(out.concat(), pairs, "every pair once, in order");
        assert_eq!(out.len(), 4, "3 + 3 + 3 + 1 (32 bytes each: three fit in 100)");
        let big = vec![("big".to_string(), vec![0; 500])];
        assert_eq!(batches(big.clone(), limits), vec![big], "an oversized pair goes alone");
    }

    #[test]
    fn a_record_split_in_parts_reads_back_byte_for_byte() {
        let record = serde_json::to_vec(&vec!["a"; 1000]).expect("json");
        let (marker, parts) = split(&record, "g7", 64);
        let named = Parts::read(&marker).expect("a marker");
        assert_eq!(named.count, parts.len());
        assert_eq!(join(&named, &parts), Some(record.clone()));
        assert_eq!(join(&named, &parts[1..]), None, "a missing part is not a record");
        assert_eq!(Parts::read(&record), None, "a record itself is an array");
    }

    #[test]
    fn fits_counts_operations_and_bytes() {
        let limits = Limits { ops: 2, bytes: 10 };
        let mut w = WriteSet::default();
        w.puts.push(("a".into(), vec![0; 4]));
        assert!(fits(&w, limits));
        w.deletes.push("bbbbbb".into());
        assert!(!fits(&w, limits), "11 bytes");
        w.deletes[0] = "b".into();
        assert!(fits(&w, limits));
        w.deletes.push("c".into());
        assert!(!fits(&w, limits), "3 operations");
    }
}
