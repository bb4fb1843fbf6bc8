//! The `Operator` gRPC service: validate, plan, apply, get, history,
//! rollback and export, over any intent store.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_server::Operator;
use tonic::{Request, Response, Status};

use crate::fanout::Fanout;
use crate::sites;
use crate::store::apply::{Accepted, ApplyError, Change, Mode, NO_KEYS, RollbackError, apply_on, rollback};
use crate::store::layout::Stored;
use crate::store::{IntentStore, StoreError};
use musubi_core::api;
use musubi_core::compile::PublicKeys;
use musubi_core::intent::Kind;
use musubi_core::intent::export;
use musubi_core::intent::parse::{Parsed, parse_files};
use musubi_core::intent::source::ObjectRef;
use musubi_core::validate;

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
}

impl<S> OperatorService<S> {
    pub fn new(store: Arc<S>, max_intent_bytes: usize, fanout: Arc<Fanout>) -> Self {
        OperatorService { store, max_intent_bytes, fanout, kept: Default::default() }
    }

    fn kept(&self) -> Option<Arc<Stored>> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Keeps the state an apply wrote, unless a newer one is kept already.
    fn keep(&self, state: Arc<Stored>) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.as_ref().is_none_or(|k| k.revision < state.revision) {
            *kept = Some(state);
        }
    }
}

impl<S: IntentStore> OperatorService<S> {
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
        ApplyError::Store(e) => store_status(e),
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
        let parsed = self.parse(&request.get_ref().documents)?;
        let diagnostics = validate::check(&parsed).iter().map(api::diagnostic_to_pb).collect();
        Ok(Response::new(pb::ValidateResponse { diagnostics }))
    }

    async fn plan(&self, request: Request<pb::PlanRequest>) -> Result<Response<pb::PlanResponse>, Status> {
        let req = request.into_inner();
        let parsed = self.parse(&req.documents)?;
        let remove = removals(req.merge, &req.remove)?;
        let current = self.current().await.map_err(store_status)?;
        let change = Change { actor: "", now_ms: 0, dry_run: true, note: None, keys: &NO_KEYS, before_commit: None };
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
        let started = std::time::Instant::now();
        let who = actor(&request);
        let req = request.into_inner();
        let parsed = self.parse(&req.documents)?;
        let remove = removals(req.merge, &req.remove)?;
        let current = self.current().await.map_err(store_status)?;
        // Compiled with the fan-out's keys, the new configurations are the
        // ones the fan-out needs for this revision: handed over, not compiled twice.
        let keys = self.fanout.public_keys();
        let priming = self.fanout.priming(&keys);
        let change = Change {
            actor: &who,
            now_ms: now_ms(),
            dry_run: req.dry_run,
            note: None,
            keys: &keys.keys,
            before_commit: Some(&priming),
        };
        let result =
            apply_on(&*self.store, &current, &parsed, mode(req.merge, &remove), Some(req.expected_revision), change)
                .await;
        let outcome = match &result {
            Ok(a) if a.audit.is_some() => "applied",
            Ok(_) if req.dry_run => "dry_run",
            Ok(_) => "unchanged",
            Err(ApplyError::Invalid(_)) => "invalid",
            Err(ApplyError::Store(StoreError::Conflict { .. })) => "conflict",
            Err(_) => "failed",
        };
        crate::metrics::get().applied(outcome, started.elapsed());
        let response = match result {
            Ok(a) => {
                if let Some(after) = &a.after {
                    self.keep(after.clone());
                }
                if let Some(audit) = &a.audit {
                    let took_ms = started.elapsed().as_millis() as u64;
                    tracing::info!(revision = a.revision, actor = %who, summary = %audit.summary, took_ms, "intent applied");
                }
                accepted(a)
            }
            Err(e) => apply_status(e)?,
        };
        Ok(Response::new(response))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let req = request.into_inner();
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(Kind::parse(&req.kind).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "unknown kind `{}`; expected one of Tenant, Segment, Site, Policy, Settings",
                    req.kind
                ))
            })?)
        };
        let current = self.current().await.map_err(store_status)?;
        let (yaml, count) = export::select(&current.intent, |k, name| {
            kind.is_none_or(|want| want == k) && (req.name.is_empty() || req.name == name)
        })
        .map_err(|e| Status::internal(e.to_string()))?;
        if count == 0 && !req.name.is_empty() {
            return Err(Status::not_found(format!("no {} named `{}`", kind.map_or("object", |k| k.word()), req.name)));
        }
        Ok(Response::new(pb::GetResponse { revision: current.revision, yaml, count: count as u32 }))
    }

    async fn history(&self, _request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let entries = self.store.history().await.map_err(store_status)?;
        Ok(Response::new(pb::HistoryResponse { entries: entries.iter().map(api::audit_to_pb).collect() }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let expected = (!req.dry_run).then_some(req.expected_revision);
        match rollback(&*self.store, req.to_revision, expected, &who, now_ms(), req.dry_run).await {
            Ok(a) => {
                if a.audit.is_some() {
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

    async fn export(&self, _request: Request<pb::ExportRequest>) -> Result<Response<pb::ExportResponse>, Status> {
        let current = self.current().await.map_err(store_status)?;
        let yaml = export::to_yaml(&current.intent).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ExportResponse { revision: current.revision, yaml }))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        if self.fanout.subscribe(&req.site).is_none() {
            return Err(Status::not_found(format!("site `{}` is not in the intent", req.site)));
        }
        if req.ttl_seconds == 0 || req.ttl_seconds > 7 * 86_400 {
            return Err(Status::invalid_argument("a token lives between 1 s and 7 days (--ttl)"));
        }
        let ttl = std::time::Duration::from_secs(req.ttl_seconds);
        let (token, expires) =
            sites::create_token(&*self.store, &req.site, ttl, &who, now_ms()).await.map_err(store_status)?;
        tracing::info!(site = %req.site, actor = %who, ttl_s = req.ttl_seconds, "join token created");
        Ok(Response::new(pb::CreateTokenResponse { token, expires_unix_ms: expires }))
    }

    async fn revoke_site(
        &self,
        request: Request<pb::RevokeSiteRequest>,
    ) -> Result<Response<pb::RevokeSiteResponse>, Status> {
        let who = actor(&request);
        let req = request.into_inner();
        let at = sites::revoke(&*self.store, &req.site, now_ms(), req.restore).await.map_err(store_status)?;
        if req.restore {
            tracing::warn!(site = %req.site, actor = %who, "site revocation lifted");
        } else {
            tracing::warn!(site = %req.site, actor = %who, "site revoked");
        }
        Ok(Response::new(pb::RevokeSiteResponse { at_unix_ms: at }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let req = request.into_inner();
        let only = (!req.site.is_empty()).then_some(req.site.as_str());
        if let Some(site) = only
            && !self.fanout.sites().iter().any(|s| s == site)
        {
            return Err(Status::not_found(format!("site `{site}` is not in the intent")));
        }
        let rows = site_states(&*self.store, &self.fanout, only).await.map_err(store_status)?;
        Ok(Response::new(pb::StatusResponse { sites: rows }))
    }
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
            let reported = live.or_else(|| seen.get(&site)).and_then(|v| serde_json::from_slice(v).ok());
            pb::SiteState {
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
