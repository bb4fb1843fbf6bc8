//! Accepting a change of intent: validate, allocate, plan, audit, commit —
//! all or nothing. Invalid intent or a lost race writes nothing.

use std::collections::BTreeSet;

use super::layout::{self, Stored};
use super::{IntentStore, StoreError};
use crate::allocate::{AllocError, reallocate};
use crate::audit::{AuditEntry, summarise};
use crate::compile::{CompileError, Index, PublicKeys};
use crate::diagnostic::Diagnostic;
use crate::intent::Intent;
use crate::intent::parse::Parsed;
use crate::plan::{Plan, affected_sites, diff};
use crate::validate;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the intent is invalid ({} errors)", .0.len())]
    Invalid(Vec<Diagnostic>),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What an accepted change did.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The new intent revision (unchanged when the intent was already current).
    pub revision: u64,
    pub plan: Plan,
    pub affected: BTreeSet<String>,
    /// `None` when nothing changed and nothing was written.
    pub audit: Option<AuditEntry>,
}

/// The plan from `old` to `new`, compiling only the sites the change reaches.
pub fn plan_between(
    old: &Stored,
    new: &Intent,
    alloc: &crate::allocate::Allocations,
    keys: &PublicKeys,
) -> Result<(Plan, BTreeSet<String>), CompileError> {
    let affected = affected_sites(&old.intent, new);
    let before = Index::new(&old.intent, &old.allocations, keys);
    let after = Index::new(new, alloc, keys);
    let mut a = std::collections::BTreeMap::new();
    let mut b = std::collections::BTreeMap::new();
    for site in &affected {
        if old.intent.sites.contains_key(site) {
            a.insert(site.clone(), before.site(site)?);
        }
        if new.sites.contains_key(site) {
            b.insert(site.clone(), after.site(site)?);
        }
    }
    Ok((diff(&a, &b), affected))
}

/// Applies `parsed` as the whole new intent if the store is still at
/// `expected`. With `dry_run`, plans without writing.
pub async fn apply<S: IntentStore>(
    store: &S,
    parsed: &Parsed,
    expected: u64,
    actor: &str,
    now_ms: u64,
    dry_run: bool,
) -> Result<Accepted, ApplyError> {
    let diags = validate::check(parsed);
    if !diags.is_empty() {
        return Err(ApplyError::Invalid(diags));
    }
    let current = store.load().await?;
    if current.revision != expected {
        return Err(StoreError::Conflict { expected, actual: current.revision }.into());
    }
    let new = &parsed.intent;
    let mut alloc = current.allocations.clone();
    reallocate(new, &mut alloc)?;
    let (plan, affected) = plan_between(&current, new, &alloc, &PublicKeys::new())?;
    let summary = summarise(&current.intent, new);
    if dry_run || (summary == "no change" && alloc == current.allocations) {
        return Ok(Accepted { revision: current.revision, plan, affected, audit: None });
    }
    let audit = AuditEntry::next(current.head.as_ref(), expected + 1, now_ms, actor, &summary);
    let writes = layout::write_set(&current, new, &alloc, &audit)?;
    store.commit(expected, writes).await?;
    Ok(Accepted { revision: audit.revision, plan, affected, audit: Some(audit) })
}
