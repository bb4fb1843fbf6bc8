//! The `/metrics` endpoint both daemons serve (Prometheus' text format):
//! off unless an address is configured, and an address that is not a
//! loopback one only when asked for.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;

/// Why the metrics endpoint could not be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error(
        "metrics on {0}: not a loopback address (metrics name every peer and line: pass --metrics-public to serve them beyond this host)"
    )]
    NotLoopback(SocketAddr),
    #[error("metrics on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The registry's metrics, encoded as the text exposition format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; a collector that fails leaves
    // what it wrote before.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics");
    }
    out
}

/// Binds `addr` (a loopback address unless `public`) and serves
/// `GET /metrics` from `registry` until the process ends; the address bound
/// (port 0 picks one).
pub async fn serve(addr: SocketAddr, public: bool, registry: Arc<Registry>) -> Result<SocketAddr, MetricsError> {
    if !public && !addr.ip().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    encode(&registry),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%bound, "serving metrics");
    Ok(bound)
}
