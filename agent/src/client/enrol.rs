//! Enrolment with a one-time join token, and the site certificate's
//! renewal. The private key of the site certificate is made here and never
//! leaves the state directory.

use std::path::PathBuf;
use std::time::Duration;

use musubi_proto::v1 as pb;
use musubi_proto::v1::agent_client::AgentClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::Agent;
use super::settings::{AgentError, Settings, now_ms, url};
use crate::state::{StateDir, write_file};

/// How much earlier than its issue a certificate's validity starts (the
/// controller allows for clocks that disagree a little).
const CLOCK_SLACK_MS: u64 = 60_000;

/// Validity of a PEM certificate: (not before, not after), Unix ms.
pub(super) fn validity(pem: &str) -> Result<(u64, u64), AgentError> {
    let bad = |e: &dyn std::fmt::Display| AgentError::Certificate(e.to_string());
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(&e))?;
    let cert = parsed.parse_x509().map_err(|e| bad(&e))?;
    let v = cert.validity();
    Ok(((v.not_before.timestamp().max(0) as u64) * 1000, (v.not_after.timestamp().max(0) as u64) * 1000))
}

pub(super) fn csr(site: &str) -> Result<(String, String), AgentError> {
    let bad = AgentError::Key;
    let key = rcgen::KeyPair::generate().map_err(bad)?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, site);
    let request = params.serialize_request(&key).map_err(bad)?.pem().map_err(bad)?;
    Ok((request, key.serialize_pem()))
}

pub(super) fn save_certificate(
    state: &StateDir,
    response: &pb::EnrollResponse,
    key_pem: &str,
) -> Result<(), AgentError> {
    write_file(&state.cert_key(), key_pem.as_bytes(), true)?;
    write_file(&state.cert(), response.certificate_pem.as_bytes(), false)?;
    write_file(&state.ca(), response.ca_pem.as_bytes(), false)?;
    Ok(())
}

pub(super) async fn channel(url: &str, tls: Option<ClientTlsConfig>) -> Result<Channel, String> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .map_err(|e| format!("`{url}` is not a controller address: {e}"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    endpoint
        .connect()
        .await
        .map_err(|e| format!("{e}: {}", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()))
}

/// Enrols with a join token if the state directory has no certificate.
pub async fn enrol(settings: &Settings) -> Result<(), AgentError> {
    if settings.insecure || settings.state.enrolled() {
        return Ok(());
    }
    let token = settings.token.clone().ok_or(AgentError::NoToken)?;
    let ca = settings.ca.as_ref().ok_or(AgentError::NoToken)?;
    let ca_pem = std::fs::read(ca).map_err(|source| AgentError::File { path: ca.clone(), source })?;
    let (request, key_pem) = csr(&settings.site)?;
    let mut last = String::from("no controller address");
    // From a replica chosen at random, then the others in turn: a fleet
    // enrolling at once spreads its certificates over the replicas (in
    // list order the first signed all 2,000 of a bench's).
    let start = {
        use rand::Rng;
        rand::rng().random_range(0..settings.controllers.len().max(1))
    };
    let order = settings.controllers.iter().cycle().skip(start).take(settings.controllers.len());
    for address in order {
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem));
        let channel = match channel(&url(address, false), Some(tls)).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{address}: {e}");
                continue;
            }
        };
        let req = pb::EnrollRequest { site: settings.site.clone(), token: token.clone(), csr_pem: request.clone() };
        match AgentClient::new(channel).enroll(req).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                save_certificate(&settings.state, &resp, &key_pem)?;
                tracing::info!(site = %settings.site, controller = %address, "enrolled");
                return Ok(());
            }
            Err(s) if s.code() == tonic::Code::Unavailable => last = format!("{address}: {}", s.message()),
            Err(s) => return Err(AgentError::Refused(Box::new(s))),
        }
    }
    Err(AgentError::Unreachable(last))
}

impl Agent {
    pub(super) fn tls(&self) -> Result<Option<ClientTlsConfig>, AgentError> {
        if self.settings.insecure {
            return Ok(None);
        }
        let read = |p: PathBuf| std::fs::read(&p).map_err(|source| AgentError::File { path: p.clone(), source });
        let s = &self.settings.state;
        Ok(Some(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(s.ca())?))
                .identity(Identity::from_pem(read(s.cert())?, read(s.cert_key())?)),
        ))
    }

    /// How long until the renewal is due: at most a minute (the wall clock
    /// may jump), a second while the due time is not known yet or a
    /// renewal failed.
    pub(super) fn until_renewal(&self) -> Duration {
        let (soon, late) = (Duration::from_secs(1), Duration::from_secs(60));
        match self.renew_at {
            _ if self.settings.insecure => late,
            Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).clamp(soon, late),
            None => soon,
        }
    }

    /// Renews the site certificate once two thirds of its lifetime are gone.
    pub(super) async fn renew_if_due(&mut self, client: &mut AgentClient<Channel>) -> Result<(), AgentError> {
        if self.settings.insecure {
            return Ok(());
        }
        let renew_at = match self.renew_at {
            Some(at) => at,
            None => {
                let path = self.settings.state.cert();
                let pem = std::fs::read_to_string(&path).map_err(|source| AgentError::File { path, source })?;
                let (from, until) = validity(&pem)?;
                // Certificates start a minute early for clock skew; count from issue.
                let issued = (from + CLOCK_SLACK_MS).min(until);
                *self.renew_at.insert(issued + (until - issued) * 2 / 3)
            }
        };
        if now_ms() < renew_at {
            return Ok(());
        }
        let (request, key_pem) = csr(&self.settings.site)?;
        let resp = client
            .renew(pb::RenewRequest { csr_pem: request })
            .await
            .map_err(|s| AgentError::Refused(Box::new(s)))?
            .into_inner();
        save_certificate(&self.settings.state, &resp, &key_pem)?;
        self.renew_at = None;
        tracing::info!(site = %self.settings.site, not_after_ms = resp.not_after_unix_ms, "site certificate renewed");
        Ok(())
    }
}
