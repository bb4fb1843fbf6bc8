//! One Sync stream with one controller: the Hello, then configurations in
//! and status out, upkeep, failback checks and the certificate's renewal,
//! until the stream breaks or the controller refuses the agent.

use std::time::Duration;

use musubi_proto::v1 as pb;
use musubi_proto::v1::agent_client::AgentClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Agent;
use super::enrol::channel;
use super::settings::url;

/// Sets a gauge to 1 while it lives.
struct Connected(prometheus_client::metrics::gauge::Gauge);

impl Connected {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.set(1);
        Connected(gauge.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.set(0);
    }
}

/// Why a session ended.
pub(super) enum End {
    /// The controller refused us (revoked, removed, wrong identity): wait long.
    Refused(String),
    /// The stream broke or could not be opened: try the next controller.
    Broken(String),
}

impl Agent {
    pub(super) async fn session(&mut self, address: &str) -> Result<(), End> {
        let broken = |e: &dyn std::fmt::Display| End::Broken(e.to_string());
        let tls = self.tls().map_err(|e| broken(&e))?;
        let target = url(address, self.settings.insecure);
        let channel = self.failing_over(channel(&target, tls)).await.map_err(|e| broken(&e))?;
        let mut client = AgentClient::new(channel).max_decoding_message_size(usize::MAX);
        let (tx, rx) = mpsc::channel(8);
        tx.send(self.hello().map_err(|e| broken(&e))?).await.map_err(|e| broken(&e))?;
        let silence = self.settings.silence;
        let opened = self.failing_over(tokio::time::timeout(silence, client.sync(ReceiverStream::new(rx)))).await;
        let mut inbound = match opened {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(s)) => return Err(ended(s)),
            Err(_) => return Err(End::Broken(format!("the controller did not open the stream within {silence:?}"))),
        };
        tracing::info!(site = %self.settings.site, controller = %address, "stream open");
        let _connected = Connected::new(&self.metrics.connected);
        // Report where we stand (the controller may not send anything).
        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
        let renewal = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(renewal);
        let changed = self.prober.as_ref().map(|p| p.changed.clone());
        let mut upkeep = tokio::time::interval(self.settings.upkeep.unwrap_or(Duration::from_secs(3600)));
        upkeep.reset();
        loop {
            tokio::select! {
                _ = upkeep.tick(), if self.settings.upkeep.is_some() => {
                    self.refresh_hops();
                    // With probing, also to refresh round-trip times and loss.
                    if self.upkeep() || self.prober.is_some() {
                        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                    }
                }
                _ = health_changed(&changed) => {
                    self.probed();
                    tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                }
                // The health as it is now: answers that flip nothing raise no event.
                _ = woken(self.wake_at) => {
                    if self.probed() {
                        tx.send(self.status(Vec::new())).await.map_err(|e| broken(&e))?;
                    }
                }
                // A key rotation's switch, at its instant; this site's new
                // keys reported (they confirm its switch).
                _ = woken(self.switch_at) => {
                    let keys = self.switch_due();
                    tx.send(self.status(keys)).await.map_err(|e| broken(&e))?;
                }
                message = tokio::time::timeout(self.settings.silence, inbound.message()) => {
                    let message = message.map_err(|_| End::Broken("the controller went silent".into()))?;
                    match message {
                        Ok(Some(pb::ControllerMessage { body: Some(pb::controller_message::Body::Config(update)) })) => {
                            self.configs_received += 1;
                            self.metrics.configurations.inc();
                            let keys = self.apply(update);
                            tx.send(self.status(keys)).await.map_err(|e| broken(&e))?;
                        }
                        Ok(Some(_)) => {} // keepalive, or a message this version does not know
                        Ok(None) => return Err(End::Broken("the controller closed the stream".into())),
                        Err(s) => return Err(ended(s)),
                    }
                }
                _ = &mut renewal => {
                    if let Err(e) = self.renew_if_due(&mut client).await {
                        tracing::warn!(site = %self.settings.site, error = %e, "certificate renewal failed; will retry");
                    }
                    renewal.as_mut().reset(tokio::time::Instant::now() + self.until_renewal());
                }
            }
        }
    }
}

impl Agent {
    /// Awaits `step` — opening a stream: up to a connect timeout, or as
    /// long as a controller that accepts and never answers keeps it; the
    /// wait between attempts without a controller (the supervisor) — while
    /// the failover goes on, the probes' events and the machine's wake-ups
    /// handled as they come. (An access point restarted while its
    /// controller was unreachable judged every peer within 100 ms of
    /// restoring its configuration but moved nothing until its connection
    /// attempt gave up 5 s later; its sites came back to it after their
    /// 3 s hold-down, and a loaded drill lost a flow for 1.8 s.)
    pub(super) async fn failing_over<T>(&mut self, step: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(step);
        let changed = self.prober.as_ref().map(|p| p.changed.clone());
        loop {
            tokio::select! {
                out = &mut step => return out,
                _ = health_changed(&changed) => {
                    self.probed();
                }
                _ = woken(self.wake_at) => {
                    self.probed();
                }
                // Without a controller too: the peers switch at the instant
                // (the new keys are reported by the next Hello).
                _ = woken(self.switch_at) => {
                    self.switch_due();
                }
            }
        }
    }
}

/// When the failover machine asked to be woken (never, if it did not).
async fn woken(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// A peer went up or down (never, without probing).
async fn health_changed(changed: &Option<std::sync::Arc<tokio::sync::Notify>>) {
    match changed {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}

pub(super) fn ended(s: tonic::Status) -> End {
    match s.code() {
        tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated
        | tonic::Code::NotFound
        | tonic::Code::AlreadyExists => End::Refused(s.message().to_string()),
        _ => End::Broken(format!("{:?}: {}", s.code(), s.message())),
    }
}
