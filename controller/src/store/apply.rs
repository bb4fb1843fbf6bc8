//! Accepting a change of intent: validate, allocate, plan, audit, commit —
//! all or nothing. Invalid intent or a lost race writes nothing.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use musubi_proto::v1::SiteConfig;

use super::layout::{self, Stored};
use super::{IntentStore, StoreError};
use musubi_core::access::{self, Refusal};
use musubi_core::allocate::{AllocError, reallocate};
use musubi_core::audit::{AuditEntry, summarise};
use musubi_core::compile::{CompileError, Index, PublicKeys, incremental};
use musubi_core::diagnostic::Diagnostic;
use musubi_core::intent::parse::Parsed;
use musubi_core::intent::source::ObjectRef;
use musubi_core::intent::{Intent, Kind};
use musubi_core::plan::affected::member_change;
use musubi_core::plan::{Plan, affected_sites, diff};
use musubi_core::validate;

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
    /// The caller's roles do not cover every object the change touches.
    #[error("{actor} may not make this change: {}", refusals.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    Forbidden { actor: String, refusals: Vec<Refusal> },
    /// A merge planned at `planned` declares or removes an object that a
    /// later revision changed: applying it would undo that change unseen.
    #[error(
        "{object} changed in revision {revision}, after revision {planned} this change was planned against; plan again against the current intent"
    )]
    ObjectChanged { object: String, revision: u64, planned: u64 },
    /// The approver's roles do not cover every object the change touches.
    #[error("{approver} may not approve this change: {}", refusals.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("; "))]
    NotApprover { approver: String, refusals: Vec<Refusal> },
}

/// What an accepted change did.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The new intent revision (unchanged when the intent was already current).
    pub revision: u64,
    pub plan: Plan,
    pub affected: BTreeSet<String>,
    /// `None` when nothing was written (no change, or a dry run).
    pub audit: Option<AuditEntry>,
    /// The intent objects that change, or `no change`.
    pub summary: String,
    /// The store's state after the commit, without the agents' public keys
    /// (an apply does not read them); `None` when nothing was written.
    pub after: Option<Arc<Stored>>,
    /// Planned but held for a second operator's approval (see [`Hold`]):
    /// nothing was written.
    pub held: bool,
}

/// When a change waits for a second operator instead of being written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hold {
    /// Written now (approved already, or nobody approves: dry runs, plans).
    #[default]
    Never,
    /// Held if it touches a national object once operators are bound.
    IfNational,
    /// Held whatever it touches (an admin asked for a second pair of eyes).
    Always,
}

/// What an apply shares with a fan-out. Asked for the configurations it
/// holds (the plan's before side), and told, just before a change is
/// committed, the new configurations the plan compiled whole (see
/// [`Planned::compiled`]) with the keys it was given: a fan-out following
/// the store need not compile them again. The commit may still lose its
/// race: a receiver must check that the revision it follows has this
/// content.
pub trait BeforeCommit: Sync {
    fn compiled(
        &self,
        revision: u64,
        intent: &Intent,
        allocations: &musubi_core::allocate::Allocations,
        configs: BTreeMap<String, SiteConfig>,
    );

    /// The configurations of `sites` as compiled at `revision` with the
    /// keys this apply compiles with, if the receiver holds every one of
    /// them: a plan's before side without compiling it again.
    fn held(&self, _revision: u64, _sites: &[&str]) -> Option<BTreeMap<String, SiteConfig>> {
        None
    }
}

impl std::fmt::Debug for dyn BeforeCommit + '_ {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BeforeCommit")
    }
}

/// A plan, and how it was made.
#[derive(Debug, Default)]
pub struct Planned {
    pub plan: Plan,
    /// The sites the change may reach (see [`affected_sites`]).
    pub affected: BTreeSet<String>,
    /// The new configurations of those sites (present in the new intent),
    /// when they were compiled whole — not for a member change, which
    /// compiles only the members and slices of their access points.
    pub compiled: Option<BTreeMap<String, SiteConfig>>,
}

/// The plan from `old` to `new`, compiling only the sites the change
/// reaches; the before side of a change compiled whole is taken from
/// `held` when it has it.
pub fn plan_between(
    old: &Stored,
    new: &Intent,
    alloc: &musubi_core::allocate::Allocations,
    keys: &PublicKeys,
    held: Option<&dyn BeforeCommit>,
) -> Result<Planned, CompileError> {
    let affected = affected_sites(&old.intent, new);
    let before = Index::new(&old.intent, &old.allocations, keys);
    let after = Index::new(new, alloc, keys);
    if let Some(members) = member_change(&old.intent, new) {
        // Access points only as slices holding the changed members' entries:
        // compiling two of 2,000 peers each, twice, would cost 100–250 ms.
        let members: Vec<&str> = members.iter().map(|m| m.as_str()).collect();
        let aps = incremental::access_points_of(&after, &old.intent, new, &members);
        let mut a = BTreeMap::new();
        let mut b = BTreeMap::new();
        for (side, index, intent) in [(&mut a, &before, &old.intent), (&mut b, &after, new)] {
            for m in members.iter().filter(|m| intent.sites.contains_key(**m)) {
                side.insert(m.to_string(), index.site(m)?);
            }
            for ap in &aps {
                side.insert(ap.to_string(), incremental::slice(index, &intent.sites[*ap], &members)?);
            }
        }
        return Ok(Planned { plan: diff(&a, &b), affected, compiled: None });
    }
    let was: Vec<&str> = affected.iter().map(String::as_str).filter(|s| old.intent.sites.contains_key(*s)).collect();
    let is: Vec<&str> = affected.iter().map(String::as_str).filter(|s| new.sites.contains_key(*s)).collect();
    let a: BTreeMap<_, _> = match held.and_then(|h| h.held(old.revision, &was)) {
        Some(a) => a,
        None => before.sites(&was)?.into_iter().collect(),
    };
    let b: BTreeMap<_, _> = after.sites(&is)?.into_iter().collect();
    let plan = diff(&a, &b);
    let before = a.len();
    musubi_core::par::free(a, before);
    Ok(Planned { plan, affected, compiled: Some(b) })
}

/// How an apply's documents relate to the intent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode<'a> {
    /// The documents are the whole new intent: objects they leave out go.
    #[default]
    Replace,
    /// The documents add or replace only the objects they declare, these
    /// objects are removed, and every other object stays as it is.
    Merge { remove: &'a [ObjectRef] },
}

/// `current` with the objects `parsed` declares added or replaced and the
/// `remove`d ones gone; a removal of something not there, or of something
/// the documents declare, is a problem. An object declared exactly as it is
/// keeps its place (and its sharing with `current`).
pub fn merged(current: &Intent, parsed: &Parsed, remove: &[ObjectRef]) -> Result<Intent, Vec<Diagnostic>> {
    fn put<T: PartialEq>(map: &mut BTreeMap<String, Arc<T>>, from: &BTreeMap<String, Arc<T>>, name: &str) {
        if let Some(new) = from.get(name)
            && map.get(name) != Some(new)
        {
            map.insert(name.to_string(), new.clone());
        }
    }
    let mut out = current.clone();
    let from = &parsed.intent;
    for obj in parsed.sources.declared() {
        match obj.kind {
            Kind::Settings => out.settings = from.settings.clone(),
            Kind::Tenant => put(&mut out.tenants, &from.tenants, &obj.name),
            Kind::Segment => put(&mut out.segments, &from.segments, &obj.name),
            Kind::Site => put(&mut out.sites, &from.sites, &obj.name),
            Kind::Policy => put(&mut out.policies, &from.policies, &obj.name),
            Kind::Operator => put(&mut out.operators, &from.operators, &obj.name),
        }
    }
    let mut problems = Vec::new();
    for obj in remove {
        let gone = match obj.kind {
            Kind::Settings => false,
            Kind::Tenant => out.tenants.remove(&obj.name).is_some(),
            Kind::Segment => out.segments.remove(&obj.name).is_some(),
            Kind::Site => out.sites.remove(&obj.name).is_some(),
            Kind::Policy => out.policies.remove(&obj.name).is_some(),
            Kind::Operator => out.operators.remove(&obj.name).is_some(),
        };
        let word = obj.kind.word();
        let problem = if obj.kind == Kind::Settings {
            Some((
                "the settings cannot be removed".to_string(),
                "a Tenant, Segment, Site, Policy or Operator to remove".to_string(),
            ))
        } else if parsed.sources.object(obj).is_some() {
            Some(("declared and removed in one apply".to_string(), format!("either a {word} document or its removal")))
        } else if !gone {
            Some((format!("no such {word} in the intent"), format!("the name of a {word} to remove")))
        } else {
            None
        };
        if let Some((message, expected)) = problem {
            problems.push(Diagnostic {
                object: Some(obj.clone()),
                field: None,
                message,
                expected: Some(expected),
                loc: parsed.sources.object(obj),
                related: Vec::new(),
            });
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

/// The intent `parsed` proposes against `current`, if it is valid: every
/// problem of the documents and of the intent they make, or the intent.
pub fn proposed<'a>(current: &Intent, parsed: &'a Parsed, mode: Mode<'_>) -> Result<Cow<'a, Intent>, ApplyError> {
    let new = match mode {
        Mode::Replace => Cow::Borrowed(&parsed.intent),
        Mode::Merge { remove } => Cow::Owned(merged(current, parsed, remove).map_err(ApplyError::Invalid)?),
    };
    // The current intent was valid when it was accepted: a change of a few
    // member sites is checked without revisiting the others.
    let diags = validate::check_change(parsed, current, &new);
    if !diags.is_empty() {
        return Err(ApplyError::Invalid(diags));
    }
    Ok(new)
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
    let current = store.load().await?;
    let change = Change {
        actor,
        now_ms,
        dry_run,
        note: None,
        keys: &NO_KEYS,
        before_commit: None,
        hold: Hold::Never,
        approver: None,
    };
    apply_on(store, &current, parsed, Mode::Replace, Some(expected), change).await
}

/// Applies `parsed` in `mode` against `current`, the state the caller holds
/// for the store's (a state that is not current any more loses the race at
/// commit: nothing is written). Without `expected`, plans and never writes.
pub async fn apply_on<S: IntentStore>(
    store: &S,
    current: &Stored,
    parsed: &Parsed,
    mode: Mode<'_>,
    expected: Option<u64>,
    change: Change<'_>,
) -> Result<Accepted, ApplyError> {
    let new = proposed(&current.intent, parsed, mode)?;
    apply_intent(store, current, new, expected, change).await
}

/// The first of `objects` that a revision after `planned` changed, with
/// that revision (the latest one that did): a merge planned at `planned`
/// that declares or removes none of them can be applied to the current
/// intent instead, as if it had been planned against it.
pub async fn changed_since<'a, S: IntentStore>(
    store: &S,
    planned: u64,
    objects: impl IntoIterator<Item = &'a ObjectRef>,
) -> Result<Option<(&'a ObjectRef, u64)>, StoreError> {
    let changes = store.changes_since(planned).await?;
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    for (revision, keys) in &changes {
        for k in keys {
            last.insert(k.key.as_str(), *revision);
        }
    }
    Ok(objects.into_iter().find_map(|o| last.get(layout::object_key(o).as_str()).map(|r| (o, *r))))
}

/// How often a commit links its entry again after events appended
/// meanwhile, before it reports a conflict.
const RELINKS: u32 = 20;

/// Who makes a change, when, and how.
#[derive(Debug, Clone, Copy)]
pub struct Change<'a> {
    pub actor: &'a str,
    pub now_ms: u64,
    pub dry_run: bool,
    /// Prefixed to the audit summary (e.g. `rollback to 3`).
    pub note: Option<&'a str>,
    /// The agents' public keys to compile with (the plan does not depend
    /// on them; the configurations it compiles do).
    pub keys: &'a PublicKeys,
    /// Given the compiled configurations before the commit.
    pub before_commit: Option<&'a dyn BeforeCommit>,
    pub hold: Hold,
    /// The second operator approving the change: judged like the actor,
    /// and named after the note in the audit summary.
    pub approver: Option<&'a str>,
}

/// No public keys: plans alone.
pub static NO_KEYS: std::sync::LazyLock<PublicKeys> = std::sync::LazyLock::new(PublicKeys::new);

/// Applies an already validated intent if the store is at `expected`;
/// without an expected revision it plans against the current one and never
/// writes (a write must name the revision it was planned against).
async fn apply_intent<S: IntentStore>(
    store: &S,
    current: &Stored,
    proposed: Cow<'_, Intent>,
    expected: Option<u64>,
    change: Change<'_>,
) -> Result<Accepted, ApplyError> {
    // Owned (a merge, a rollback): kept as the state after the commit
    // without copying 10,000 sites' map once more.
    let new: &Intent = &proposed;
    // Judged by the bindings in force before the change, plans included.
    let refusals = access::check_change(&access::rights(&current.intent, change.actor), &current.intent, new);
    if !refusals.is_empty() {
        return Err(ApplyError::Forbidden { actor: change.actor.to_string(), refusals });
    }
    if let Some(approver) = change.approver {
        let refusals = access::check_change(&access::rights(&current.intent, approver), &current.intent, new);
        if !refusals.is_empty() {
            return Err(ApplyError::NotApprover { approver: approver.to_string(), refusals });
        }
    }
    let held = match change.hold {
        Hold::Never => false,
        Hold::IfNational => access::needs_approval(&current.intent, new),
        Hold::Always => true,
    };
    let (expected, dry_run) = match expected {
        Some(e) if e != current.revision => {
            return Err(StoreError::Conflict { expected: e, actual: current.revision }.into());
        }
        Some(e) => (e, change.dry_run || held),
        None => (current.revision, true),
    };
    let mut alloc = current.allocations.clone();
    reallocate(new, &mut alloc)?;
    let Planned { plan, affected, compiled } = plan_between(current, new, &alloc, change.keys, change.before_commit)?;
    let mut summary = summarise(&current.intent, new);
    if dry_run || (summary == "no change" && alloc == current.allocations) {
        if let Some(compiled) = compiled {
            let n = compiled.len();
            musubi_core::par::free(compiled, n);
        }
        let held = held && summary != "no change";
        return Ok(Accepted { revision: current.revision, plan, affected, audit: None, summary, after: None, held });
    }
    let approved = change.approver.map(|by| format!("approved by {by}"));
    let prefix: Vec<&str> = change.note.into_iter().chain(approved.as_deref()).collect();
    if !prefix.is_empty() {
        summary = format!("{}: {summary}", prefix.join(", "));
    }
    let mut head = current.head.clone();
    let mut compiled = compiled;
    let mut relinked = 0;
    let audit = loop {
        let (writes, audit) =
            layout::write_set(current, head.as_ref(), new, &alloc, expected + 1, |changes, intent| {
                let mut e = AuditEntry::with_changes(
                    head.as_ref(),
                    expected + 1,
                    change.now_ms,
                    change.actor,
                    &summary,
                    changes,
                )
                .leaving(intent);
                crate::signing::sign(&mut e);
                e
            })?;
        match (change.before_commit, compiled.take()) {
            (Some(hook), Some(configs)) => hook.compiled(audit.revision, new, &alloc, configs),
            (None, Some(configs)) => {
                let n = configs.len();
                musubi_core::par::free(configs, n);
            }
            (_, None) => {}
        }
        match store.commit(expected, writes).await {
            Ok(()) => break audit,
            // Still at `expected`, but an event (a token, a key, a
            // revocation) was appended to the chain since the plan: link
            // to it instead, the plan itself is unchanged.
            Err(StoreError::Conflict { actual, .. }) if actual == expected && relinked < RELINKS => {
                relinked += 1;
                let (now, newest) = store.head().await?;
                if now != expected {
                    return Err(StoreError::Conflict { expected, actual: now }.into());
                }
                tracing::debug!(revision = expected + 1, relinked, "an audit event came first; linking after it");
                head = newest;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let after = Stored {
        revision: audit.revision,
        head: Some(audit.clone()),
        intent: proposed.into_owned(),
        allocations: alloc,
        keys: PublicKeys::new(),
    };
    let after = Some(Arc::new(after));
    Ok(Accepted { revision: audit.revision, plan, affected, audit: Some(audit), summary, after, held: false })
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("revision {target} is not an earlier revision (the intent is at revision {current})")]
    NoSuchRevision { target: u64, current: u64 },
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// A new forward change whose content is the intent of an earlier revision.
/// Allocations stay sticky: objects that come back get their old numbers if
/// still free, never someone else's.
///
/// Without `expected`, plans against the current revision and writes nothing.
pub async fn rollback<S: IntentStore>(
    store: &S,
    target: u64,
    expected: Option<u64>,
    actor: &str,
    now_ms: u64,
    dry_run: bool,
) -> Result<Accepted, RollbackError> {
    rollback_held(store, target, expected, actor, now_ms, dry_run, Hold::Never, None).await
}

/// [`rollback`], held as `hold` says, approved by `approver` (see
/// [`Change::approver`]).
#[allow(clippy::too_many_arguments)]
pub async fn rollback_held<S: IntentStore>(
    store: &S,
    target: u64,
    expected: Option<u64>,
    actor: &str,
    now_ms: u64,
    dry_run: bool,
    hold: Hold,
    approver: Option<&str>,
) -> Result<Accepted, RollbackError> {
    let current = store.load().await.map_err(ApplyError::from)?;
    if target == 0 || target >= current.revision {
        return Err(RollbackError::NoSuchRevision { target, current: current.revision });
    }
    let undo = store.changes_since(target).await.map_err(ApplyError::from)?;
    let old = layout::intent_at(&current.intent, current.revision, target, &undo).map_err(ApplyError::from)?;
    // It was valid when it was applied; check again rather than assume.
    let diags = validate::validate(&old, &musubi_core::intent::source::SourceMap::default());
    if !diags.is_empty() {
        return Err(ApplyError::Invalid(diags).into());
    }
    let note = format!("rollback to {target}");
    Ok(apply_intent(
        store,
        &current,
        Cow::Owned(old),
        expected,
        Change { actor, now_ms, dry_run, note: Some(&note), keys: &NO_KEYS, before_commit: None, hold, approver },
    )
    .await?)
}
