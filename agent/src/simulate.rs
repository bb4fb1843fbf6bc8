//! The fleet simulator: many agents in one process, each with its own state
//! directory, its own enrolment token and mTLS identity, and an in-memory
//! datapath. For scale measurements of the controller.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use musubi_proto::v1 as pb;
use musubi_proto::v1::operator_client::OperatorClient;
use tokio::sync::mpsc;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::client::{Agent, Applied, Settings};
use crate::datapath::fake::Fake;
use crate::state::StateDir;

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("operator API: {0}")]
    Operator(String),
    #[error("{0}")]
    Agent(#[from] crate::client::AgentError),
}

/// How to reach the controller as an operator (to make tokens).
#[derive(Debug, Clone)]
pub struct Operator {
    pub controller: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn op_err(e: impl std::fmt::Display) -> SimulateError {
    SimulateError::Operator(e.to_string())
}

impl Operator {
    pub async fn connect(&self) -> Result<OperatorClient<Channel>, SimulateError> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| op_err(format!("{}: {e}", p.display())));
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?));
        let url = crate::client::url(&self.controller, false);
        let channel = Channel::from_shared(url)
            .map_err(op_err)?
            .tls_config(tls)
            .map_err(op_err)?
            .connect()
            .await
            .map_err(op_err)?;
        Ok(OperatorClient::new(channel).max_decoding_message_size(usize::MAX))
    }
}

/// A running fleet: its agents' events arrive on `events`.
#[derive(Debug)]
pub struct Fleet {
    pub events: mpsc::UnboundedReceiver<Applied>,
    pub sites: Vec<String>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The sites of the controller's intent (the first `limit`, by name).
pub async fn sites(operator: &Operator, limit: usize) -> Result<Vec<String>, SimulateError> {
    let mut client = operator.connect().await?;
    let resp = client.status(pb::StatusRequest::default()).await.map_err(|s| op_err(s.message()))?.into_inner();
    Ok(resp.sites.into_iter().map(|s| s.site).take(limit).collect())
}

/// A temporary directory for the simulated agents' state, in memory
/// (`/dev/shm`) where there is one: each apply rewrites an agent's saved
/// configuration, and creating 10,000 files at once on a disk file system
/// took a third of the simulator's time — a real site writes one.
pub fn scratch() -> std::io::Result<tempfile::TempDir> {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        tempfile::Builder::new().prefix("musubi-fleet-").tempdir_in(shm).or_else(|_| tempfile::tempdir())
    } else {
        tempfile::tempdir()
    }
}

/// Enrols and starts one agent per site (tokens made through the operator
/// API), with state under `root/<site>`, each listing the operator's
/// controller only.
pub async fn start(operator: &Operator, sites: Vec<String>, root: &Path) -> Result<Fleet, SimulateError> {
    start_with(operator, vec![operator.controller.clone()], sites, root).await
}

/// [`start`], each agent listing `controllers` (replicas of one
/// deployment) and starting at one of them at random.
pub async fn start_with(
    operator: &Operator,
    controllers: Vec<String>,
    sites: Vec<String>,
    root: &Path,
) -> Result<Fleet, SimulateError> {
    use futures::StreamExt;
    let client = operator.connect().await?;
    let (tx, events) = mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(sites.len());
    // Tokens are made a hundred sites at a time (one audit entry each
    // batch), a few batches in flight; agents start as their batch arrives.
    let batches: Vec<Vec<String>> = sites.chunks(100).map(<[String]>::to_vec).collect();
    let mut tokens = futures::stream::iter(batches)
        .map(|batch| {
            let mut client = client.clone();
            async move {
                let made = client.create_tokens(pb::CreateTokensRequest { sites: batch, ttl_seconds: 3600 }).await;
                made.map(|r| r.into_inner().tokens).map_err(|s| op_err(s.message()))
            }
        })
        .buffered(4);
    while let Some(batch) = tokens.next().await {
        for pb::SiteToken { site, token, .. } in batch? {
            let mut state = StateDir::new(&root.join(&site));
            state.sync = false;
            let mut settings = Settings::new(&site, controllers.clone(), state);
            settings.token = Some(token);
            settings.ca = Some(operator.ca.clone());
            let agent = Agent::new(settings, Box::new(Fake::new()))?.with_events(tx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) = agent.run().await {
                    tracing::error!(site, error = %e, "simulated agent stopped");
                }
            }));
        }
    }
    Ok(Fleet { events, sites, tasks })
}

impl Fleet {
    /// Waits until every site has applied a configuration whose digest
    /// `done` accepts; returns when the last one did, or `None` on timeout.
    pub async fn until(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Applied) -> bool,
    ) -> Option<(Instant, HashMap<String, Applied>)> {
        let deadline = Instant::now() + timeout;
        let mut seen: HashMap<String, Applied> = HashMap::new();
        let mut last = Instant::now();
        while seen.len() < self.sites.len() {
            let left = deadline.checked_duration_since(Instant::now())?;
            let event = tokio::time::timeout(left, self.events.recv()).await.ok()??;
            if done(&event) {
                last = event.at;
                seen.insert(event.site.clone(), event);
            }
        }
        Some((last, seen))
    }
}
