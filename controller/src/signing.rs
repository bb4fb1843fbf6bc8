//! Signed audit entries. A replica signs the hash of every entry it writes
//! with its server key; the certificate chain of that key is kept in the
//! store (`/musubi/v1/signers/<SHA-256 of the certificate, hex>`), so that
//! `musubi history --verify` can check each signature against the CA the
//! operator trusts, as of the entry's time. Someone who can write the store
//! but holds no replica's key can no longer append or rewrite entries that
//! verify.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use rcgen::{KeyPair, SigningKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::pki::{self, Paths, PkiError};
use crate::store::{Guard, IntentStore, StoreError};
use musubi_core::audit::{AuditEntry, sha256_hex};

/// Where signers' certificate chains are kept.
pub const SIGNERS: &str = "/musubi/v1/signers/";

/// This process's signing key and the chain that vouches for it.
#[derive(Debug)]
pub struct Signer {
    key: KeyPair,
    /// SHA-256 of the end certificate (DER), hex.
    pub fingerprint: String,
    /// The end certificate and the issuing CA's, PEM.
    pub chain_pem: String,
}

static SIGNER: OnceLock<Signer> = OnceLock::new();

impl Signer {
    /// The server certificate and key of a PKI directory.
    pub fn load(paths: &Paths) -> Result<Signer, PkiError> {
        let chain_pem = pki::read(&paths.server())?;
        let key = KeyPair::from_pem(&pki::read(&paths.server_key())?)
            .map_err(|e| PkiError::Certificate(format!("the server key: {e}")))?;
        let first = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .next()
            .ok_or_else(|| PkiError::Certificate("the server certificate file holds no certificate".into()))?
            .map_err(|e| PkiError::Certificate(format!("the server certificate: {e}")))?;
        Ok(Signer { key, fingerprint: sha256_hex(first.as_ref()), chain_pem })
    }

    fn sign(&self, entry: &mut AuditEntry) {
        match self.key.sign(entry.hash.as_bytes()) {
            Ok(signature) => {
                entry.signer = self.fingerprint.clone();
                entry.signature = base64::engine::general_purpose::STANDARD.encode(signature);
            }
            Err(e) => tracing::error!(error = %e, revision = entry.revision, "could not sign an audit entry"),
        }
    }
}

/// Why a signer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("keeping the signer's certificate in the store: {0}")]
    Store(#[from] StoreError),
}

/// Makes the server key of `paths` sign every entry this process writes,
/// its certificate chain kept in `store` where `history --verify` finds it.
/// Gives the certificate's fingerprint.
pub async fn install_from<S: IntentStore>(store: &S, paths: &Paths) -> Result<String, InstallError> {
    let signer = Signer::load(paths)?;
    let key = format!("{SIGNERS}{}", signer.fingerprint);
    store.swap(&key, Guard::Absent, Some(signer.chain_pem.clone().into_bytes())).await?;
    let fingerprint = signer.fingerprint.clone();
    install(signer);
    Ok(fingerprint)
}

/// Makes `signer` sign every entry this process writes from now on.
/// Once per process; a second call changes nothing and says so.
pub fn install(signer: Signer) -> bool {
    SIGNER.set(signer).is_ok()
}

/// Signs `entry` if this process has a signer (a controller serving over
/// TLS does; tools and tests without a server key write unsigned entries).
pub fn sign(entry: &mut AuditEntry) {
    if let Some(s) = SIGNER.get() {
        s.sign(entry);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the CA certificate is unreadable: {0}")]
    Anchor(String),
    #[error("audit entry {label} is not signed, though the chain is signed from entry {first} on")]
    Unsigned { label: String, first: String },
    #[error("audit entry {label} names a signer whose certificate the store does not hold")]
    UnknownSigner { label: String },
    #[error("audit entry {label} was signed by a certificate the CA does not vouch for as a controller's: {why}")]
    Untrusted { label: String, why: String },
    #[error("audit entry {label}: its signature does not match its hash")]
    Forged { label: String },
}

/// Checks the signature of every signed entry against `signers`
/// (fingerprint → certificate chain, PEM) and the trusted CA `ca_pem`: the
/// signer's certificate must be a controller's (server authentication)
/// issued under the CA and valid at the entry's time, and the signature must
/// be over the entry's hash. Once an entry is signed, every later one must
/// be. Returns how many entries are signed.
pub fn verify(chain: &[AuditEntry], signers: &BTreeMap<String, String>, ca_pem: &str) -> Result<usize, SignatureError> {
    let anchor_der = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .ok_or_else(|| SignatureError::Anchor("no certificate".into()))?
        .map_err(|e| SignatureError::Anchor(e.to_string()))?;
    let anchor = webpki::anchor_from_trusted_cert(&anchor_der).map_err(|e| SignatureError::Anchor(e.to_string()))?;
    let anchors = [anchor];
    let mut first: Option<String> = None;
    let mut signed = 0;
    for e in chain {
        let label = e.label();
        if e.signature.is_empty() {
            if let Some(first) = &first {
                return Err(SignatureError::Unsigned { label, first: first.clone() });
            }
            continue;
        }
        first.get_or_insert_with(|| label.clone());
        let pem = signers.get(&e.signer).ok_or_else(|| SignatureError::UnknownSigner { label: label.clone() })?;
        let untrusted = |why: String| SignatureError::Untrusted { label: label.clone(), why };
        let certs: Vec<CertificateDer<'_>> = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|err| untrusted(err.to_string()))?;
        let (end, intermediates) = certs.split_first().ok_or_else(|| untrusted("an empty chain".into()))?;
        if sha256_hex(end.as_ref()) != e.signer {
            return Err(untrusted("the stored certificate is not the one the entry names".into()));
        }
        let cert = webpki::EndEntityCert::try_from(end).map_err(|err| untrusted(err.to_string()))?;
        let at = UnixTime::since_unix_epoch(Duration::from_millis(e.time_ms));
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            at,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|err| untrusted(format!("{err:?}")))?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(&e.signature)
            .map_err(|_| SignatureError::Forged { label: label.clone() })?;
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, e.hash.as_bytes(), &signature)
            .map_err(|_| SignatureError::Forged { label: label.clone() })?;
        signed += 1;
    }
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_of(signer: &Signer, n: u64) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = Vec::new();
        for i in 1..=n {
            let mut e = AuditEntry::next(out.last(), i, crate::pki::now_ms(), "operator:a", &format!("~site s{i}"));
            signer.sign(&mut e);
            out.push(e);
        }
        out
    }

    #[test]
    fn signatures_verify_against_the_ca_and_catch_forgeries() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let made = pki::init(dir.path(), &["localhost".into()], "admin", None)?;
        let signer = Signer::load(&made.paths)?;
        let ca = pki::read(&made.paths.ca())?;
        let signers: BTreeMap<String, String> = [(signer.fingerprint.clone(), signer.chain_pem.clone())].into();
        let chain = chain_of(&signer, 3);
        assert_eq!(verify(&chain, &signers, &ca), Ok(3));

        // An entry rewritten with its hash recomputed: the signature no longer fits.
        let mut forged = chain.clone();
        let (sig, signer_fp) = (forged[1].signature.clone(), forged[1].signer.clone());
        forged[1] = AuditEntry::next(Some(&forged[0]), 2, forged[1].time_ms, "operator:a", "-site everything");
        forged[1].signature = sig;
        forged[1].signer = signer_fp;
        assert!(matches!(verify(&forged, &signers, &ca), Err(SignatureError::Forged { label }) if label == "2"));

        // Appended without a signature after signed entries.
        let mut appended = chain.clone();
        appended.push(AuditEntry::event(appended.last(), 3, 1, "local", "operator x restored"));
        assert!(matches!(
            verify(&appended, &signers, &ca),
            Err(SignatureError::Unsigned { label, first }) if label == "3.1" && first == "1"
        ));

        // Signed with a key of another CA, or with a site's key: refused.
        let other_dir = tempfile::tempdir()?;
        let other = pki::init(other_dir.path(), &["localhost".into()], "admin", None)?;
        let stranger = Signer::load(&other.paths)?;
        let strange = chain_of(&stranger, 1);
        let mut with_stranger = signers.clone();
        with_stranger.insert(stranger.fingerprint.clone(), stranger.chain_pem.clone());
        assert!(matches!(verify(&strange, &with_stranger, &ca), Err(SignatureError::Untrusted { .. })));
        assert!(matches!(verify(&strange, &signers, &ca), Err(SignatureError::UnknownSigner { .. })));
        let operator = Signer {
            key: KeyPair::from_pem(&pki::read(&made.paths.operator_key("admin"))?)?,
            fingerprint: {
                let pem = pki::read(&made.paths.operator("admin"))?;
                let der = CertificateDer::pem_slice_iter(pem.as_bytes()).next().ok_or("no cert")??;
                sha256_hex(der.as_ref())
            },
            chain_pem: pki::read(&made.paths.operator("admin"))?,
        };
        let by_operator = chain_of(&operator, 1);
        let with_operator: BTreeMap<String, String> =
            [(operator.fingerprint.clone(), operator.chain_pem.clone())].into();
        assert!(
            matches!(verify(&by_operator, &with_operator, &ca), Err(SignatureError::Untrusted { .. })),
            "an operator's key does not sign audit entries"
        );
        // Unsigned chains (older ones) pass, with nothing signed.
        let plain: Vec<AuditEntry> =
            chain.iter().map(|e| AuditEntry { signature: String::new(), ..e.clone() }).collect();
        assert_eq!(verify(&plain, &signers, &ca), Ok(0));
        Ok(())
    }
}
