//! Presence: a record that says "this agent is connected" and disappears by
//! itself when its holder stops renewing it (a lease on etcd, an expiry on
//! the embedded store), so every controller replica sees who is there.

use std::time::Duration;

use tokio::task::JoinHandle;

/// A held presence record, renewed in the background. Dropping it withdraws
/// the record at once; [`Presence::forget`] stops renewing and lets it expire,
/// as a crashed holder would.
pub struct Presence {
    renew: JoinHandle<()>,
    withdraw: Option<Box<dyn FnOnce() + Send + Sync>>,
    /// What [`Presence::forget`] does beside ending the renewal (a shared
    /// lease is renewed for every record: the record must leave it).
    forget: Option<Box<dyn FnOnce() + Send + Sync>>,
    set: Setter,
}

/// Replaces the value of a presence record.
pub(crate) type Setter =
    Box<dyn Fn(Vec<u8>) -> std::pin::Pin<Box<dyn Future<Output = Result<(), super::StoreError>> + Send>> + Send + Sync>;

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

impl Presence {
    pub(crate) fn new(renew: JoinHandle<()>, withdraw: impl FnOnce() + Send + Sync + 'static, set: Setter) -> Self {
        Presence { renew, withdraw: Some(Box::new(withdraw)), forget: None, set }
    }

    pub(crate) fn on_forget(mut self, forget: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.forget = Some(Box::new(forget));
        self
    }

    /// Replaces the value every replica reads from this record.
    pub async fn set(&self, value: Vec<u8>) -> Result<(), super::StoreError> {
        (self.set)(value).await
    }

    /// Stops renewing without withdrawing: the record expires after its TTL.
    pub fn forget(mut self) {
        self.withdraw = None;
        if let Some(forget) = self.forget.take() {
            forget();
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        self.renew.abort();
        if let Some(withdraw) = self.withdraw.take() {
            withdraw();
        }
    }
}

/// How often a record with time-to-live `ttl` is renewed.
pub(crate) fn renew_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}
