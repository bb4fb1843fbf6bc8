//! The dashboard over TLS: the controller's own server certificate, and
//! only clients holding an operator certificate of its CA — the operators'
//! identities, as on the operator API. (Sites' certificates are refused.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::pki::{self, Identity, Paths};

/// Why TLS for the dashboard could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} for the dashboard's TLS")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the dashboard's TLS settings")]
    Rustls(#[from] rustls::Error),
    #[error("the dashboard's client-certificate check")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// TLS with the controller's certificate, requiring a client certificate
/// signed by the CA.
pub fn config(paths: &Paths) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let pem = |what| move |source| TlsError::Pem { what, source };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(paths.server())
        .map_err(pem("the server certificate"))?
        .collect::<Result<_, _>>()
        .map_err(pem("the server certificate"))?;
    let key = PrivateKeyDer::from_pem_file(paths.server_key()).map_err(pem("the server key"))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(paths.ca()).map_err(pem("the CA"))? {
        roots.add(ca.map_err(pem("the CA"))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the operator of this name may see the dashboard.
pub type Allowed = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// Accepts TLS connections whose client holds an operator certificate of
/// an operator `allowed` lets in.
pub struct Listener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
    pub allowed: Allowed,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener").field("tcp", &self.tcp).finish_non_exhaustive()
    }
}

impl axum::serve::Listener for Listener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "the dashboard could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Bounded: a client that never completes its handshake holds the
            // next ones back for at most this long.
            let tls = match tokio::time::timeout(Duration::from_secs(5), self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%addr, error = %e, "dashboard: TLS handshake refused");
                    continue;
                }
                Err(_) => {
                    tracing::info!(%addr, "dashboard: TLS handshake not completed within 5 s");
                    continue;
                }
            };
            let who = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| pki::peer(c.as_ref()));
            match who.map(|p| p.identity) {
                Some(Identity::Operator(name)) if (self.allowed)(&name) => {
                    tracing::debug!(%addr, operator = %name, "dashboard: operator connected");
                    return (tls, addr);
                }
                Some(Identity::Operator(name)) => tracing::warn!(
                    %addr, operator = %name,
                    "dashboard: refused an operator without the admin or auditor role (it shows every site)"
                ),
                _ => tracing::warn!(%addr, "dashboard: refused a client without an operator certificate"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
