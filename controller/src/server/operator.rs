//! The `Operator` gRPC service: validate, plan, apply, get, history,
//! rollback and export, over any intent store.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_server::Operator;
use tonic::{Request, Response, Status};

use crate::approvals::{self, Pending};
use crate::fanout::Fanout;
use crate::sites;
use crate::store::apply::{
    self, Accepted, ApplyError, Change, Hold, Mode, NO_KEYS, RollbackError, apply_on, rollback_held,
};
use crate::store::layout::Stored;
use crate::store::{IntentStore, StoreError};
use musubi_core::access::{self, Rights};
use musubi_core::api;
use musubi_core::compile::PublicKeys;
use musubi_core::intent::Kind;
use musubi_core::intent::export;
use musubi_core::intent::parse::{Parsed, parse_files};
use musubi_core::intent::source::ObjectRef;
use musubi_core::validate;

/// How long a merge keeps being moved onto revisions other replicas
/// committed meanwhile before its conflict is reported. A count alone was
/// not enough: 100 merges of different sites started together on two
/// replicas, the first replica's 50 commits can come between every attempt
/// of one merge on the second (16 attempts lost in a CI run). Each lost
/// attempt means another change committed, so the wait is bounded by the
/// others' work, and by this.
const REBASE_FOR: std::time::Duration = std::time::Duration::from_secs(20);
/// And at most this many times.
const REBASES: u32 = 1_000;

/// The largest intent (all documents together) the API accepts by default.
pub const DEFAULT_MAX_INTENT_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug)]
pub struct OperatorService<S> {
    store: Arc<S>,
    max_intent_bytes: usize,
    fanout: Arc<Fanout>,
    /// The intent as this replica last read or wrote it (without the agents'
    /// public keys): reading 10,000 sites back from the store for every
    /// apply would cost more than the apply.
    kept: std::sync::Mutex<Option<Arc<Stored>>>,
    /// Held by a change that writes, from its plan to its commit: this
    /// replica's writes go one at a time, so a merge planned against an
    /// older revision is moved onto the newest once, not raced again.
    writing: tokio::sync::Mutex<()>,
}

impl<S> OperatorService<S> {
    pub fn new(store: Arc<S>, max_intent_bytes: usize, fanout: Arc<Fanout>) -> Self {
        OperatorService { store, max_intent_bytes, fanout, kept: Default::default(), writing: Default::default() }
    }

    fn kept(&self) -> Option<Arc<Stored>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the state an apply wrote, unless a newer one is kept already.
    fn keep(&self, state: Arc<Stored>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.as_ref().is_none_or(|k| k.revision < state.revision) {
            let sites = state.intent.sites.len();
            if let Some(replaced) = kept.replace(state) {
                musubi_core::par::release(replaced, sites);
            }
        }
    }
}

impl<S: IntentStore> OperatorService<S> {
    /// The caller's rights under the current intent's bindings, and that
    /// intent; a caller the bindings do not name gets nothing (logged).
    async fn rights<T>(&self, request: &Request<T>, call: &str) -> Result<(Rights, Arc<Stored>), Status> {
        let current = self.current().await.map_err(store_status)?;
        let rights = access::rights(&current.intent, &actor(request));
        // A revoked operator is refused on every replica from its next call:
        // each call reads the revocation from the store.
        if let (Some(name), Some(super::Issued(issued_ms))) =
            (rights.operator.as_deref(), request.extensions().get::<super::Issued>())
            && let Some(r) = sites::operator_revocation(&*self.store, name).await.map_err(store_status)?
            && r.refuses(*issued_ms)
        {
            tracing::warn!(actor = %rights.actor, call, "refused: the operator's certificate is revoked");
            return Err(Status::unauthenticated(format!("the certificate of {} is revoked", rights.actor)));
        }
        if !rights.is_bound() {
            tracing::warn!(actor = %rights.actor, call, "refused: the operator has no role");
            return Err(Status::permission_denied(format!(
                "{} has no role in this deployment (an admin binds it with an Operator object)",
                rights.actor
            )));
        }
        Ok((rights, current))
    }

    /// The store's current state: the kept one while the store (any
    /// replica's writes included) is still at its revision, else read
    /// afresh. Should another replica commit in between, the commit of a
    /// change planned against it loses the race and writes nothing.
    async fn current(&self) -> Result<Arc<Stored>, StoreError> {
        let revision = self.store.revision().await?;
        if let Some(kept) = self.kept()
            && kept.revision == revision
        {
            return Ok(kept);
        }
        let mut stored = self.store.load().await?;
        stored.keys = PublicKeys::new();
        let stored = Arc::new(stored);
        *self.kept.lock().unwrap_or_else(|p| p.into_inner()) = Some(stored.clone());
        Ok(stored)
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The caller's identity for the audit chain, as [`super::operator_auth`]
/// established it.
fn actor<T>(request: &Request<T>) -> String {
    request.extensions().get::<super::Actor>().map_or_else(|| "local".to_string(), |a| a.0.clone())
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        other => {
            tracing::error!(error = %other, "store failure");
            Status::unavailable(other.to_string())
        }
    }
}

/// An apply that was refused: invalid intent is an answer (diagnostics),
/// anything else a failure.
fn apply_status(e: ApplyError) -> Result<pb::ApplyResponse, Status> {
    match e {
        ApplyError::Invalid(diags) => Ok(pb::ApplyResponse {
            diagnostics: diags.iter().map(api::diagnostic_to_pb).collect(),
            ..Default::default()
        }),
        other => Err(failure(other)),
    }
}

fn failure(e: ApplyError) -> Status {
    match e {
        ApplyError::NotApprover { approver, refusals } => {
            let what: Vec<String> = refusals.iter().map(|r| r.to_string()).collect();
            tracing::warn!(actor = %approver, refused = %what.join("; "), "refused: the approver lacks the scope of the change");
            Status::permission_denied(format!(
                "{approver} may not approve this change: it changes objects outside this operator's roles:\n  {}",
                what.join("\n  ")
            ))
        }
        ApplyError::Forbidden { actor, refusals } => {
            let what: Vec<String> = refusals.iter().map(|r| r.to_string()).collect();
            tracing::warn!(actor = %actor, refused = %what.join("; "), "change refused: outside the operator's roles");
            Status::permission_denied(format!("{actor} may not make this change:\n  {}", what.join("\n  ")))
        }
        ApplyError::Store(e) => store_status(e),
        e @ ApplyError::ObjectChanged { .. } => Status::aborted(e.to_string()),
        ApplyError::Alloc(e) => Status::failed_precondition(e.to_string()),
        other @ (ApplyError::Compile(_) | ApplyError::Invalid(_)) => Status::internal(other.to_string()),
    }
}

/// The objects a request removes (`Kind/name`); only a merge removes.
fn removals(merge: bool, remove: &[String]) -> Result<Vec<ObjectRef>, Status> {
    if !merge && !remove.is_empty() {
        return Err(Status::invalid_argument(
            "removing objects by name needs a merge (--merge); without it, leave them out of the files",
        ));
    }
    remove
        .iter()
        .map(|r| {
            let (kind, name) = r.split_once('/').unwrap_or(("", r));
            Kind::parse(kind).filter(|_| !name.is_empty()).map(|k| ObjectRef::new(k, name)).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "cannot read `{r}` as an object to remove; expected Kind/name, e.g. Site/kita-hall"
                ))
            })
        })
        .collect()
}

fn mode(merge: bool, remove: &[ObjectRef]) -> Mode<'_> {
    if merge { Mode::Merge { remove } } else { Mode::Replace }
}

fn accepted(a: Accepted) -> pb::ApplyResponse {
    pb::ApplyResponse {
        diagnostics: Vec::new(),
        revision: a.revision,
        sites: api::plan_to_pb(&a.plan),
        // The sites whose configuration really changes, not the wider set
        // the intent-level analysis would recompile.
        affected_sites: a.plan.affected().into_iter().map(String::from).collect(),
        audit: a.audit.as_ref().map(api::audit_to_pb),
        summary: a.summary,
        ..Default::default()
    }
}

/// What an Apply (or an approved proposal) applies.
#[derive(Debug, Clone, Copy)]
struct Documents<'a> {
    documents: &'a [pb::Document],
    merge: bool,
    remove: &'a [String],
}

/// How a change by `who` waits for approval: a plain-text caller (the
/// controller's own loopback, which has no second operator) never does.
fn hold_for(who: &str, propose: bool) -> Hold {
    match (who, propose) {
        ("local", _) => Hold::Never,
        (_, true) => Hold::Always,
        (_, false) => Hold::IfNational,
    }
}

impl<S: IntentStore + 'static> OperatorService<S> {
    /// `musubi site rotate-keys` (or, with `revoke`, `revoke-keys`): an
    /// operator who manages the site, a site in the intent, a reason kept
    /// printable for the audit entry.
    async fn keys_call(
        &self,
        request: Request<pb::RotateKeysRequest>,
        revoke: bool,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, if revoke { "revoke_keys" } else { "rotate_keys" }).await?;
        let req = request.into_inner();
        if !current.intent.sites.contains_key(&req.site) {
            return Err(Status::not_found(format!("site `{}` is not in the intent", req.site)));
        }
        manages(&rights, &current, &req.site, if revoke { "revoke the keys of" } else { "rotate the keys of" })?;
        let reason = musubi_core::words::printable(&req.reason, 200);
        let done = if revoke {
            crate::rotation::revoke(&*self.store, &req.site, &who, &reason, now_ms()).await
        } else {
            crate::rotation::request(&*self.store, &req.site, &who, &reason, now_ms()).await
        };
        let id = done.map_err(|e| match e {
            crate::rotation::RotationError::Store(e) => store_status(e),
            crate::rotation::RotationError::Raced(_) => Status::aborted(e.to_string()),
            other => Status::failed_precondition(other.to_string()),
        })?;
        if revoke {
            tracing::warn!(site = %req.site, actor = %who, id, "WireGuard keys revoked");
        } else {
            tracing::info!(site = %req.site, actor = %who, id, "key rotation asked for");
        }
        Ok(Response::new(pb::RotateKeysResponse { id }))
    }

    async fn aid_call(
        &self,
        request: Request<pb::AidRequest>,
        open: bool,
    ) -> Result<Response<pb::AidResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, if open { "activate_aid" } else { "deactivate_aid" }).await?;
        let req = request.into_inner();
        let Some((segment, aid)) = current.intent.aid(&req.name) else {
            return Err(Status::not_found(format!("no segment declares an aid named `{}`", req.name)));
        };
        // Each network speaks for itself once roles are declared: the aided
        // segment's tenant through an operator of that tenant (an admin only
        // for a national segment), the aiding access points through those
        // who manage them (admins: access points are national).
        let roles = !current.intent.operators.is_empty() && who != "local";
        let national = current.intent.tenants.get(&segment.tenant).is_none_or(|t| t.national);
        let sides = crate::aid::Sides {
            segment: !roles || if national { rights.admin } else { rights.write.contains(&segment.tenant) },
            aiding: !roles || aid.access_points.iter().all(|ap| rights.may_manage_site(&current.intent, ap)),
        };
        if !sides.segment && !sides.aiding {
            tracing::warn!(actor = %who, aid = %req.name, "refused: neither network of the aid is the operator's");
            return Err(Status::permission_denied(format!(
                "{who} may not {} aid `{}`: it speaks for neither segment `{}`'s network nor the aiding access points'",
                if open { "activate" } else { "deactivate" },
                req.name,
                segment.name
            )));
        }
        let reason = musubi_core::words::printable(&req.reason, 200);
        let as_status = |e: crate::aid::AidError| match e {
            crate::aid::AidError::Store(e) => store_status(e),
            crate::aid::AidError::Raced(_) => Status::aborted(e.to_string()),
            crate::aid::AidError::Unknown(_) => Status::not_found(e.to_string()),
            other => Status::failed_precondition(other.to_string()),
        };
        let store = &*self.store;
        if !open {
            crate::aid::deactivate(store, &current.intent, &req.name, &who, &reason, now_ms())
                .await
                .map_err(as_status)?;
            tracing::warn!(aid = %req.name, actor = %who, "mutual aid deactivated");
            return Ok(Response::new(pb::AidResponse::default()));
        }
        let duration = (req.duration_s > 0).then(|| std::time::Duration::from_secs(req.duration_s));
        let done = crate::aid::activate(store, &current.intent, &req.name, &who, sides, &reason, duration, now_ms())
            .await
            .map_err(as_status)?;
        Ok(Response::new(match done {
            crate::aid::Activated::Open(until) => {
                tracing::warn!(aid = %req.name, actor = %who, until, "mutual aid activated");
                pb::AidResponse { until_unix_ms: until, waiting_for: String::new() }
            }
            crate::aid::Activated::Waiting(other) => {
                tracing::info!(aid = %req.name, actor = %who, waiting_for = other, "mutual aid activation asked for");
                pb::AidResponse { until_unix_ms: 0, waiting_for: other.to_string() }
            }
        }))
    }

    /// Applies `how` for `who` against `current` at `expected`, held as
    /// `hold` says (a held change becomes a proposal), approved by
    /// `approver` (see [`Change::approver`]).
    #[allow(clippy::too_many_arguments)]
    async fn apply_documents(
        &self,
        who: &str,
        current: Arc<Stored>,
        how: Documents<'_>,
        expected: u64,
        dry_run: bool,
        hold: Hold,
        approver: Option<&str>,
    ) -> Result<pb::ApplyResponse, Status> {
        let started = std::time::Instant::now();
        let parsed = self.parse(how.documents)?;
        let remove = removals(how.merge, how.remove)?;
        // Compiled with the fan-out's keys, the new configurations are the
        // ones the fan-out needs for this revision: handed over, not compiled twice.
        let _writing = if dry_run { None } else { Some(self.writing.lock().await) };
        // Whatever committed while this change waited for its turn.
        let mut current = if dry_run { current } else { self.current().await.map_err(store_status)? };
        // Only a merge that writes, by its own operator (an approval applies
        // what was proposed at its revision), is moved onto a newer one.
        let may_rebase = how.merge && !dry_run && approver.is_none();
        let mut rebased = None;
        let mut attempts = 0;
        let result = loop {
            // A merge planned against an older revision is applied to the
            // current intent when none of its objects changed since (as
            // Kubernetes' resourceVersion per object): operators of
            // different sites do not refuse each other's changes.
            let mut at = expected;
            if may_rebase && expected < current.revision {
                let objects = parsed.sources.declared().chain(remove.iter());
                if let Some((object, revision)) =
                    apply::changed_since(&*self.store, expected, objects).await.map_err(store_status)?
                {
                    let e = ApplyError::ObjectChanged { object: object.to_string(), revision, planned: expected };
                    crate::metrics::get().applied("conflict", started.elapsed());
                    return apply_status(e);
                }
                at = current.revision;
                rebased = Some(format!("planned at revision {expected}"));
            }
            let keys = self.fanout.public_keys();
            let priming = self.fanout.priming(&keys);
            let change = Change {
                actor: who,
                now_ms: now_ms(),
                dry_run,
                note: rebased.as_deref(),
                keys: &keys.keys,
                before_commit: Some(&priming),
                hold,
                approver,
            };
            let result = apply_on(&*self.store, &current, &parsed, mode(how.merge, &remove), Some(at), change).await;
            // Another replica committed in between: the merge is checked
            // and moved onto its revision in turn.
            if may_rebase
                && attempts < REBASES
                && started.elapsed() < REBASE_FOR
                && matches!(result, Err(ApplyError::Store(StoreError::Conflict { .. })))
            {
                attempts += 1;
                current = self.current().await.map_err(store_status)?;
                continue;
            }
            break result;
        };
        let outcome = match &result {
            Ok(a) if a.audit.is_some() => "applied",
            Ok(a) if a.held => "proposed",
            Ok(_) if dry_run => "dry_run",
            Ok(_) => "unchanged",
            Err(ApplyError::Invalid(_)) => "invalid",
            Err(ApplyError::Store(StoreError::Conflict { .. })) => "conflict",
            Err(ApplyError::Forbidden { .. } | ApplyError::NotApprover { .. }) => "forbidden",
            Err(_) => "failed",
        };
        crate::metrics::get().applied(outcome, started.elapsed());
        let a = match result {
            Ok(a) => a,
            Err(e) => return apply_status(e),
        };
        if let Some(after) = &a.after {
            self.keep(after.clone());
            self.retire_removed(&current, after, who).await?;
        }
        // The intent this change replaced is freed off the answer's path.
        let sites = current.intent.sites.len();
        musubi_core::par::release(current, sites);
        if let Some(audit) = &a.audit {
            let took_ms = started.elapsed().as_millis() as u64;
            tracing::info!(revision = a.revision, actor = %who, summary = %audit.summary, took_ms, "intent applied");
        }
        if !a.held {
            return Ok(accepted(a));
        }
        let pending = Pending {
            documents: how.documents.iter().map(|d| (d.name.clone(), d.text.clone())).collect(),
            merge: how.merge,
            remove: how.remove.to_vec(),
            ..self.proposal(who, &a)?
        };
        self.propose(pending, a).await
    }

    /// Every site `before` had and `after` has not: its certificates are
    /// refused from now on, should the name come back.
    async fn retire_removed(&self, before: &Stored, after: &Stored, who: &str) -> Result<(), Status> {
        let now = now_ms();
        // Side by side, not 10,000 look-ups per apply.
        for site in musubi_core::sorted::removed(&before.intent.sites, &after.intent.sites) {
            sites::retire(&*self.store, site, who, now).await.map_err(store_status)?;
            tracing::info!(site = %site, "site removed from the intent: its certificates are refused from now on");
        }
        Ok(())
    }

    /// A proposal of `who` for the held change `a`, without its content.
    fn proposal(&self, who: &str, a: &Accepted) -> Result<Pending, Status> {
        let now = now_ms();
        Ok(Pending {
            id: approvals::new_id().map_err(store_status)?,
            proposer: who.to_string(),
            created_ms: now,
            expires_ms: now + approvals::DEFAULT_TTL_MS,
            revision: a.revision,
            summary: a.summary.clone(),
            documents: Vec::new(),
            merge: false,
            remove: Vec::new(),
            rollback_to: None,
        })
    }

    /// Keeps `pending` and answers with its plan and its id.
    async fn propose(&self, pending: Pending, a: Accepted) -> Result<pb::ApplyResponse, Status> {
        approvals::propose(&*self.store, &pending).await.map_err(store_status)?;
        tracing::info!(
            id = %pending.id, proposer = %pending.proposer, revision = pending.revision, summary = %pending.summary,
            "change proposed: it waits for a second operator's approval"
        );
        let mut response = accepted(a);
        response.pending_id = pending.id;
        response.pending_expires_unix_ms = pending.expires_ms;
        Ok(response)
    }
}

impl<S> OperatorService<S> {
    /// Parses the documents, refusing an oversized intent before reading it.
    fn parse(&self, docs: &[pb::Document]) -> Result<Parsed, Status> {
        let size: usize = docs.iter().map(|d| d.text.len() + d.name.len()).sum();
        if size > self.max_intent_bytes {
            return Err(Status::invalid_argument(format!(
                "the intent is {:.1} MiB; this controller accepts at most {:.1} MiB (--max-intent-mib)",
                size as f64 / 1048576.0,
                self.max_intent_bytes as f64 / 1048576.0
            )));
        }
        Ok(parse_files(api::source_files(docs)))
    }
}

#[tonic::async_trait]
impl<S: IntentStore + 'static> Operator for OperatorService<S> {
    async fn validate(&self, request: Request<pb::ValidateRequest>) -> Result<Response<pb::ValidateResponse>, Status> {
        self.rights(&request, "validate").await?;
        let parsed = self.parse(&request.get_ref().documents)?;
        let diagnostics = validate::check(&parsed).iter().map(api::diagnostic_to_pb).collect();
        Ok(Response::new(pb::ValidateResponse { diagnostics }))
    }

    async fn plan(&self, request: Request<pb::PlanRequest>) -> Result<Response<pb::PlanResponse>, Status> {
        let who = actor(&request);
        self.rights(&request, "plan").await?;
        let req = request.into_inner();
        let parsed = self.parse(&req.documents)?;
        let remove = removals(req.merge, &req.remove)?;
        let current = self.current().await.map_err(store_status)?;
        let change = Change {
            actor: &who,
            now_ms: 0,
            dry_run: true,
            note: None,
            keys: &NO_KEYS,
            before_commit: None,
            hold: Hold::Never,
            approver: None,
        };
        match apply_on(&*self.store, &current, &parsed, mode(req.merge, &remove), None, change).await {
            Ok(a) => Ok(Response::new(pb::PlanResponse {
                revision: a.revision,
                diagnostics: Vec::new(),
                sites: api::plan_to_pb(&a.plan),
                summary: a.summary,
            })),
            Err(ApplyError::Invalid(diags)) => Ok(Response::new(pb::PlanResponse {
                revision: current.revision,
                diagnostics: diags.iter().map(api::diagnostic_to_pb).collect(),
                ..Default::default()
            })),
            Err(e) => Err(failure(e)),
        }
    }

    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = actor(&request);
        let (_, current) = self.rights(&request, "apply").await?;
        let req = request.into_inner();
        let how = Documents { documents: &req.documents, merge: req.merge, remove: &req.remove };
        let hold = hold_for(&who, req.propose);
        let response = self.apply_documents(&who, current, how, req.expected_revision, req.dry_run, hold, None).await?;
        Ok(Response::new(response))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let (rights, current) = self.rights(&request, "get").await?;
        let req = request.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(Kind::parse(&req.kind).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown kind `{}`; expected one of Tenant, Segment, Site, Policy, Settings, Operator",
                    req.kind
                ))
            })?)
        };
        // What the caller may not read is as absent as what is not there.
        let (yaml, count) = export::select(&current.intent, |k, name| {
            kind.is_none_or(|want| want == k)
                && (req.name.is_empty() || req.name == name)
                && rights.may_read(&current.intent, k, name)
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        if count == 0 && !req.name.is_empty() {
            return Err(Status::not_found(format!("no {} named `{}`", kind.map_or("object", |k| k.word()), req.name)));
        }
        Ok(Response::new(pb::GetResponse { revision: current.revision, yaml, count: count as u32 }))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let (rights, _) = self.rights(&request, "history").await?;
        everything(&rights, "the history")?;
        let entries = self.store.history().await.map_err(store_status)?;
        // What `--verify` checks the entries against: every revision's
        // change records, the digest of the intent keys as stored, the
        // signers' certificate chains.
        let (changes, intent_digest, signers) = if request.get_ref().with_changes {
            let list = async |prefix: &'static str| self.store.list(prefix).await.map_err(store_status);
            let changes = list(crate::store::layout::CHANGES)
                .await?
                .into_iter()
                .filter_map(|(key, records)| {
                    let revision = key.strip_prefix(crate::store::layout::CHANGES)?.parse().ok()?;
                    Some(pb::RevisionChanges { revision, records })
                })
                .collect();
            let intent = list(crate::store::layout::INTENT).await?;
            let digest = musubi_core::audit::intent_digest(intent.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
            let signers = list(crate::signing::SIGNERS)
                .await?
                .into_iter()
                .filter_map(|(key, pem)| {
                    let fingerprint = key.strip_prefix(crate::signing::SIGNERS)?.to_string();
                    Some((fingerprint, String::from_utf8(pem).ok()?))
                })
                .collect();
            (changes, digest, signers)
        } else {
            Default::default()
        };
        Ok(Response::new(pb::HistoryResponse {
            entries: entries.iter().map(api::audit_to_pb).collect(),
            changes,
            signers,
            intent_digest,
        }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = actor(&request);
        let (_, current) = self.rights(&request, "rollback").await?;
        let req = request.into_inner();
        let expected = (!req.dry_run).then_some(req.expected_revision);
        let hold = hold_for(&who, req.propose);
        match rollback_held(&*self.store, req.to_revision, expected, &who, now_ms(), req.dry_run, hold, None).await {
            Ok(a) if a.held => {
                let pending = Pending { rollback_to: Some(req.to_revision), ..self.proposal(&who, &a)? };
                Ok(Response::new(self.propose(pending, a).await?))
            }
            Ok(a) => {
                if let Some(after) = &a.after {
                    self.keep(after.clone());
                    self.retire_removed(&current, after, &who).await?;
                    tracing::info!(revision = a.revision, actor = %who, to = req.to_revision, "intent rolled back");
                }
                Ok(Response::new(accepted(a)))
            }
            Err(RollbackError::NoSuchRevision { target, current }) => {
                Err(Status::invalid_argument(RollbackError::NoSuchRevision { target, current }.to_string()))
            }
            Err(RollbackError::Apply(e)) => Ok(Response::new(apply_status(e)?)),
        }
    }

    async fn list_pending(
        &self,
        request: Request<pb::ListPendingRequest>,
    ) -> Result<Response<pb::ListPendingResponse>, Status> {
        let (rights, _) = self.rights(&request, "list_pending").await?;
        let all = approvals::list(&*self.store, now_ms()).await.map_err(store_status)?;
        // Admins and auditors see every proposal; others their own.
        let changes = all
            .into_iter()
            .filter(|p| rights.reads_everything() || p.proposer == rights.actor)
            .map(|p| pb::PendingChange {
                id: p.id,
                proposer: p.proposer,
                created_unix_ms: p.created_ms,
                expires_unix_ms: p.expires_ms,
                revision: p.revision,
                summary: p.summary,
            })
            .collect();
        Ok(Response::new(pb::ListPendingResponse { changes }))
    }

    async fn approve(&self, request: Request<pb::ApproveRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, "approve").await?;
        let req = request.into_inner();
        let now = now_ms();
        let id = musubi_core::words::quoted(&req.id).into_owned();
        let pending = approvals::get(&*self.store, &req.id)
            .await
            .map_err(store_status)?
            .filter(|p| p.expires_ms > now)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no pending change `{id}`: approved, expired or never proposed (musubi pending lists them)"
                ))
            })?;
        if pending.proposer == who {
            tracing::warn!(actor = %who, id = %pending.id, "refused: an operator approving its own proposal");
            return Err(Status::permission_denied(format!(
                "{who} proposed change {id}: another operator approves it (the two-person rule)"
            )));
        }
        if current.revision != pending.revision {
            return Err(Status::aborted(format!(
                "the intent moved from revision {} to {} since change {id} was proposed: its plan no longer holds; \
                 propose it again",
                pending.revision, current.revision
            )));
        }
        // The approver needs the scope of every object the change touches:
        // judged where every change is (the apply), a rollback by admins only.
        if pending.rollback_to.is_some() && !rights.admin {
            tracing::warn!(actor = %who, id = %pending.id, "refused: the approver lacks the scope of the change");
            return Err(Status::permission_denied(format!(
                "{who} may not approve change {id}: it changes objects outside this operator's roles"
            )));
        }
        let documents: Vec<pb::Document> = pending
            .documents
            .iter()
            .map(|(name, text)| pb::Document { name: name.clone(), text: text.clone() })
            .collect();
        let response = match pending.rollback_to {
            Some(to) => {
                let expected = (!req.dry_run).then_some(pending.revision);
                match rollback_held(
                    &*self.store,
                    to,
                    expected,
                    &pending.proposer,
                    now,
                    req.dry_run,
                    Hold::Never,
                    Some(&who),
                )
                .await
                {
                    Ok(a) => {
                        if let Some(after) = &a.after {
                            self.keep(after.clone());
                            self.retire_removed(&current, after, &who).await?;
                        }
                        accepted(a)
                    }
                    Err(RollbackError::NoSuchRevision { target, current }) => {
                        return Err(Status::invalid_argument(
                            RollbackError::NoSuchRevision { target, current }.to_string(),
                        ));
                    }
                    Err(RollbackError::Apply(e)) => apply_status(e)?,
                }
            }
            None => {
                let how = Documents { documents: &documents, merge: pending.merge, remove: &pending.remove };
                let proposer = pending.proposer.clone();
                self.apply_documents(&proposer, current, how, pending.revision, req.dry_run, Hold::Never, Some(&who))
                    .await?
            }
        };
        if !req.dry_run && response.audit.is_some() {
            approvals::remove(&*self.store, &pending.id).await.map_err(store_status)?;
            tracing::info!(id = %pending.id, proposer = %pending.proposer, approver = %who, revision = response.revision,
                "pending change approved and applied");
        }
        Ok(Response::new(response))
    }

    async fn export(&self, request: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        let (rights, current) = self.rights(&request, "export").await?;
        everything(&rights, "an export of the whole intent")?;
        let yaml = export::to_yaml(&current.intent).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ExportResponse { revision: current.revision, yaml }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, "create_token").await?;
        let req = request.into_inner();
        let ttl = token_request(&rights, &current, std::slice::from_ref(&req.site), req.ttl_seconds)?;
        let (token, expires) =
            sites::create_token(&*self.store, &req.site, ttl, &who, now_ms()).await.map_err(store_status)?;
        tracing::info!(site = %req.site, actor = %who, ttl_s = req.ttl_seconds, "join token created");
        Ok(Response::new(pb::CreateTokenResponse { token, expires_unix_ms: expires }))
    }

    async fn create_tokens(
        &self,
        request: Request<pb::CreateTokensRequest>,
    ) -> Result<Response<pb::CreateTokensResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, "create_token").await?;
        let req = request.into_inner();
        if req.sites.is_empty() || req.sites.len() > sites::TOKENS_PER_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} sites: a batch of join tokens is for 1 to {} sites",
                req.sites.len(),
                sites::TOKENS_PER_BATCH
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        if let Some(twice) = req.sites.iter().find(|site| !seen.insert(site.as_str())) {
            return Err(Status::invalid_argument(format!("site `{twice}` is named twice in the batch")));
        }
        let ttl = token_request(&rights, &current, &req.sites, req.ttl_seconds)?;
        let made = sites::create_tokens(&*self.store, &req.sites, ttl, &who, now_ms()).await.map_err(store_status)?;
        tracing::info!(sites = req.sites.len(), actor = %who, ttl_s = req.ttl_seconds, "join tokens created");
        let tokens = req
            .sites
            .into_iter()
            .zip(made)
            .map(|(site, (token, expires_unix_ms))| pb::SiteToken { site, token, expires_unix_ms })
            .collect();
        Ok(Response::new(pb::CreateTokensResponse { tokens }))
    }

    async fn revoke_site(
        &self,
        request: Request<pb::RevokeSiteRequest>,
    ) -> Result<Response<pb::RevokeSiteResponse>, Status> {
        let who = actor(&request);
        let (rights, current) = self.rights(&request, "revoke_site").await?;
        let req = request.into_inner();
        manages(&rights, &current, &req.site, if req.restore { "restore" } else { "revoke" })?;
        let at = sites::revoke(&*self.store, &req.site, &who, now_ms(), req.restore).await.map_err(store_status)?;
        if req.restore {
            tracing::warn!(site = %req.site, actor = %who, "site revocation lifted");
        } else {
            tracing::warn!(site = %req.site, actor = %who, "site revoked");
        }
        Ok(Response::new(pb::RevokeSiteResponse { at_unix_ms: at }))
    }

    async fn revoke_operator(
        &self,
        request: Request<pb::RevokeOperatorRequest>,
    ) -> Result<Response<pb::RevokeSiteResponse>, Status> {
        let (rights, _) = self.rights(&request, "revoke_operator").await?;
        let req = request.into_inner();
        if !rights.admin {
            tracing::warn!(actor = %rights.actor, operator = %req.name, "refused: revoking an operator needs admin");
            return Err(Status::permission_denied(format!(
                "{} may not revoke operators: it needs admin",
                rights.actor
            )));
        }
        if let Some(why) = access::operator_name_problem(&req.name) {
            return Err(Status::invalid_argument(format!("`{}`: {why}", musubi_core::words::quoted(&req.name))));
        }
        if !req.restore && rights.operator.as_deref() == Some(req.name.as_str()) {
            return Err(Status::invalid_argument("an operator cannot revoke its own certificate"));
        }
        let at = sites::revoke_operator(&*self.store, &req.name, &rights.actor, now_ms(), req.restore)
            .await
            .map_err(store_status)?;
        if req.restore {
            tracing::warn!(operator = %req.name, actor = %rights.actor, "operator revocation lifted");
        } else {
            tracing::warn!(operator = %req.name, actor = %rights.actor, "operator revoked");
        }
        Ok(Response::new(pb::RevokeSiteResponse { at_unix_ms: at }))
    }

    async fn rotate_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        self.keys_call(request, false).await
    }

    async fn revoke_keys(
        &self,
        request: Request<pb::RotateKeysRequest>,
    ) -> Result<Response<pb::RotateKeysResponse>, Status> {
        self.keys_call(request, true).await
    }

    async fn activate_aid(&self, request: Request<pb::AidRequest>) -> Result<Response<pb::AidResponse>, Status> {
        self.aid_call(request, true).await
    }

    async fn deactivate_aid(&self, request: Request<pb::AidRequest>) -> Result<Response<pb::AidResponse>, Status> {
        self.aid_call(request, false).await
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let (rights, current) = self.rights(&request, "status").await?;
        let req = request.into_inner();
        let only = (!req.site.is_empty()).then_some(req.site.as_str());
        let readable = |site: &str| rights.may_read(&current.intent, Kind::Site, site);
        if let Some(site) = only
            && (!self.fanout.sites().iter().any(|s| s == site) || !readable(site))
        {
            return Err(Status::not_found(format!("site `{site}` is not in the intent")));
        }
        let mut rows = site_states(&*self.store, &self.fanout, only).await.map_err(store_status)?;
        rows.retain(|r| readable(&r.site));
        let activations = crate::aid::activations(&*self.store).await.map_err(store_status)?;
        let aids = aid_states(&current.intent, &activations, &rows)
            .into_iter()
            .filter(|a| rights.may_read(&current.intent, Kind::Segment, &a.segment))
            .collect();
        Ok(Response::new(pb::StatusResponse { sites: rows, aids }))
    }
}

/// Refuses (and logs) a caller who may not read `what`: everything.
fn everything(rights: &Rights, what: &str) -> Result<(), Status> {
    if rights.reads_everything() {
        return Ok(());
    }
    tracing::warn!(actor = %rights.actor, what, "refused: needs the admin or auditor role");
    Err(Status::permission_denied(format!("{} may not read {what}: it needs the admin or auditor role", rights.actor)))
}

/// Refuses (and logs) a caller who may not `verb` `site`'s agent.
/// What a request for join tokens must hold, whether for one site or many:
/// every site in the intent as read for this call (not the fan-out's, which
/// follows a commit a moment after it returns: a token asked for right
/// after an import found no such site), each one the operator manages, and
/// a life between 1 s and 7 days. Gives that life.
fn token_request(
    rights: &Rights,
    current: &Stored,
    sites: &[String],
    ttl_seconds: u64,
) -> Result<std::time::Duration, Status> {
    for site in sites {
        if !current.intent.sites.contains_key(site) {
            return Err(Status::not_found(format!("site `{site}` is not in the intent")));
        }
        manages(rights, current, site, "create a join token for")?;
    }
    if ttl_seconds == 0 || ttl_seconds > 7 * 86_400 {
        return Err(Status::invalid_argument("a token lives between 1 s and 7 days (--ttl)"));
    }
    Ok(std::time::Duration::from_secs(ttl_seconds))
}

fn manages(rights: &Rights, current: &Stored, site: &str, verb: &str) -> Result<(), Status> {
    if rights.may_manage_site(&current.intent, site) {
        return Ok(());
    }
    let scope = access::site_scope(&current.intent, site);
    tracing::warn!(actor = %rights.actor, site, verb, "refused: the site is outside the operator's tenants");
    Err(Status::permission_denied(format!(
        "{} may not {verb} site `{site}`: it is {scope}, outside this operator's roles",
        rights.actor
    )))
}

/// Every aid of the intent: its operators' activation, and which of
/// `rows` (connected sites) report using it.
pub fn aid_states(
    intent: &musubi_core::intent::Intent,
    activations: &std::collections::BTreeMap<String, musubi_core::aid::Activation>,
    rows: &[pb::SiteState],
) -> Vec<pb::AidState> {
    let mut out = Vec::new();
    for seg in intent.segments.values() {
        for aid in &seg.aid {
            let activation = activations.get(aid.name.as_str());
            out.push(pb::AidState {
                name: aid.name.clone(),
                segment: seg.name.clone(),
                access_points: aid.access_points.clone(),
                activation: musubi_core::intent::YamlName::yaml(aid.activation).to_string(),
                active_until_unix_ms: activation.map_or(0, |a| a.until_unix_ms),
                reason: activation.map(|a| a.reason.clone()).unwrap_or_default(),
                in_use_at: rows
                    .iter()
                    .filter(|r| r.connected)
                    .filter(|r| {
                        r.reported
                            .as_ref()
                            .and_then(|s| s.status.as_ref())
                            .is_some_and(|s| s.aids_in_use.contains(&aid.name))
                    })
                    .map(|r| r.site.clone())
                    .collect(),
            });
        }
    }
    out
}

/// Every site's state (or only `only`'s): connected to a replica, what it
/// reported last (live, or when it was last seen), what it should have.
pub async fn site_states<S: IntentStore>(
    store: &S,
    fanout: &Fanout,
    only: Option<&str>,
) -> Result<Vec<pb::SiteState>, StoreError> {
    let present = store.present().await?;
    let seen = sites::seen(store).await?;
    let names = match only {
        Some(site) => vec![site.to_string()],
        None => fanout.sites(),
    };
    Ok(names
        .into_iter()
        .map(|site| {
            let desired = fanout.desired(&site);
            let live = present.get(&site);
            let mut reported = live.or_else(|| seen.get(&site)).and_then(|v| sites::decode_status(v));
            // A live record is renewed while the agent's stream lives: the
            // agent is seen now, not when its status was last written
            // (once per configuration: "18m ago" for a healthy agent).
            if let Some(r) = reported.as_mut().filter(|_| live.is_some()) {
                r.last_seen_unix_ms = now_ms();
            }
            let (keys_since_unix_ms, key_rotation) = crate::rotation::key_state(&fanout.keys(&site));
            pb::SiteState {
                keys_since_unix_ms,
                key_rotation,
                connected: live.is_some(),
                revoked: fanout.revocation(&site).is_some_and(|r| r.active),
                desired_revision: desired.as_ref().map_or(0, |d| d.revision),
                desired_digest: desired.map(|d| d.digest.clone()).unwrap_or_default(),
                reported,
                site,
            }
        })
        .collect())
}
