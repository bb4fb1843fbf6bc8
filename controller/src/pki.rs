//! The controller's certificate authority: who may talk to the controller.
//!
//! `musubi-controller init` makes (or adopts) a CA in the data directory and
//! issues the controller's server certificate and an admin operator
//! certificate. The CA it makes has two levels: a root (`ca.pem`, the
//! certificate everyone trusts; its key `ca-key.pem` belongs offline) and
//! an issuing CA signed by it (`issuing.pem`, `issuing-key.pem`) that the
//! replicas sign with; every certificate they issue carries the issuing
//! CA's certificate after its own. Agents enrol with a one-time token and a certificate signing
//! request; only the request's public key is used, so an agent cannot ask
//! for a name it was not given. Identities travel as URI subject alternative
//! names: `musubi://site/<name>` and `musubi://operator/<name>`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    File {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; refusing to overwrite a CA (remove the directory to start over)")]
    Exists { path: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("the certificate signing request is unreadable or its signature is wrong: {0}")]
    Request(String),
    #[error("`{name}` cannot name an operator: {why}")]
    OperatorName { name: String, why: &'static str },
}

/// Names an operator may have. An operator's certificate and key are files
/// of the PKI directory named after it, beside the CA's and the server's:
/// a name must stay a plain file name and never be theirs.
pub fn check_operator_name(name: &str) -> Result<(), PkiError> {
    match musubi_core::access::operator_name_problem(name) {
        Some(why) => Err(PkiError::OperatorName { name: musubi_core::words::printable(name, 80).into_owned(), why }),
        None => Ok(()),
    }
}

fn cert_err(e: impl std::fmt::Display) -> PkiError {
    PkiError::Certificate(e.to_string())
}

/// Who a verified client certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Site(String),
    Operator(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Site(s) => write!(f, "site:{s}"),
            Identity::Operator(s) => write!(f, "operator:{s}"),
        }
    }
}

const SITE_URI: &str = "musubi://site/";

/// Certificates are valid from this long before they are issued, for clocks
/// that disagree a little; the issue time is `notBefore` plus this.
const CLOCK_SLACK: Duration = Duration::from_secs(60);
const OPERATOR_URI: &str = "musubi://operator/";

/// The files of a PKI directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(dir: &Path) -> Self {
        Paths { dir: dir.to_path_buf() }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    /// The issuing (intermediate) CA replicas sign with, when there is one.
    pub fn issuing(&self) -> PathBuf {
        self.dir.join("issuing.pem")
    }
    pub fn issuing_key(&self) -> PathBuf {
        self.dir.join("issuing-key.pem")
    }
    pub fn server(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server-key.pem")
    }
    pub fn operator(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    pub fn operator_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }
}

pub fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|e| PkiError::File { path: path.to_path_buf(), source: e })
}

/// Writes a file readable by its owner only (keys), or by everyone (certificates).
pub fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    let err = |e: std::io::Error| PkiError::File { path: path.to_path_buf(), source: e };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn offset(at: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(at)
}

fn leaf_params(san: SanType, common_name: &str, lifetime: Duration, server: bool) -> CertificateParams {
    let mut p = CertificateParams::default();
    let now = SystemTime::now();
    // A minute of slack for clocks that disagree a little.
    p.not_before = offset(now - CLOCK_SLACK);
    p.not_after = offset(now + lifetime);
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.subject_alt_names = vec![san];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages =
        vec![if server { ExtendedKeyUsagePurpose::ServerAuth } else { ExtendedKeyUsagePurpose::ClientAuth }];
    p.use_authority_key_identifier_extension = true;
    let serial: [u8; 16] = random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial[..]));
    p
}

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS random source does not fail on Linux once booted.
    getrandom::fill(&mut b).unwrap_or_default();
    b[0] &= 0x7f; // positive serial numbers
    b
}

/// A CA certificate and its key file, ready to sign.
fn load_issuer(cert_pem: &str, key: &Path) -> Result<Issuer<'static, KeyPair>, PkiError> {
    let key = KeyPair::from_pem(&read(key)?).map_err(cert_err)?;
    Issuer::from_ca_cert_pem(cert_pem, key).map_err(cert_err)
}

/// Creates `dir` and its parents.
fn create_dir(dir: &Path) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(|e| PkiError::File { path: dir.to_path_buf(), source: e })
}

/// The CA, loaded for signing.
#[derive(Debug)]
pub struct Authority {
    /// The root everyone trusts (`ca.pem`).
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    /// The issuing CA's certificate, sent after every certificate it
    /// signs; empty when the root signs itself (a single-level CA).
    chain: String,
}

impl Authority {
    /// The issuing CA of the directory if it has one, else its root.
    pub fn load(paths: &Paths) -> Result<Self, PkiError> {
        let ca_pem = read(&paths.ca())?;
        let (issuer, chain) = if paths.issuing().exists() {
            let cert = read(&paths.issuing())?;
            (load_issuer(&cert, &paths.issuing_key())?, cert)
        } else {
            (load_issuer(&ca_pem, &paths.ca_key())?, String::new())
        };
        Ok(Authority { ca_pem, issuer, chain })
    }

    /// A certificate as it is handed out: itself, then the issuing CA's.
    fn with_chain(&self, pem: String) -> String {
        if self.chain.is_empty() { pem } else { pem + &self.chain }
    }

    /// A site certificate for the public key of `csr_pem`, valid for `lifetime`.
    pub fn issue_site(&self, csr_pem: &str, site: &str, lifetime: Duration) -> Result<(String, u64), PkiError> {
        let request =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::Request(e.to_string()))?;
        let params = leaf_params(SanType::URI(uri(SITE_URI, site)?), site, lifetime, false);
        let not_after = (params.not_after.unix_timestamp() as u64) * 1000;
        let signed = CertificateSigningRequestParams { params, public_key: request.public_key };
        let cert = signed.signed_by(&self.issuer).map_err(cert_err)?;
        Ok((self.with_chain(cert.pem()), not_after))
    }

    /// A new key and certificate for an operator (or the controller itself).
    fn issue_with_key(&self, params: CertificateParams) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate().map_err(cert_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_err)?;
        Ok((self.with_chain(cert.pem()), key.serialize_pem()))
    }

    pub fn issue_operator(&self, name: &str, lifetime: Duration) -> Result<(String, String), PkiError> {
        check_operator_name(name)?;
        self.issue_with_key(leaf_params(SanType::URI(uri(OPERATOR_URI, name)?), name, lifetime, false))
    }

    pub fn issue_server(&self, names: &[String], lifetime: Duration) -> Result<(String, String), PkiError> {
        let mut params = leaf_params(
            SanType::DnsName("localhost".try_into().map_err(cert_err)?),
            "musubi-controller",
            lifetime,
            true,
        );
        params.subject_alt_names.clear();
        for n in names {
            params.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into().map_err(cert_err)?),
            });
        }
        self.issue_with_key(params)
    }
}

fn uri(prefix: &str, name: &str) -> Result<rcgen::string::Ia5String, PkiError> {
    format!("{prefix}{name}").try_into().map_err(cert_err)
}

/// What `init` made.
#[derive(Debug)]
pub struct Initialised {
    pub paths: Paths,
    pub admin: String,
    pub external_ca: bool,
    /// The CA was there already, prepared by `ca issuing`.
    pub prepared: bool,
}

fn ca_params(common_name: &str, path_length: u8, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, common_name);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_length));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = SystemTime::now();
    p.not_before = offset(now - CLOCK_SLACK);
    p.not_after = offset(now + lifetime);
    let serial: [u8; 16] = random();
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial[..]));
    p
}

/// A new root CA in `dir` (`ca.pem`, `ca-key.pem`), valid for `lifetime`;
/// it may sign one level of CAs below it. Refuses to overwrite a CA.
pub fn make_root(dir: &Path, lifetime: Duration) -> Result<Paths, PkiError> {
    let paths = Paths::new(dir);
    create_dir(dir)?;
    if paths.ca().exists() {
        return Err(PkiError::Exists { path: paths.ca().display().to_string() });
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let cert = ca_params("Musubi root CA", 1, lifetime).self_signed(&key).map_err(cert_err)?;
    write(&paths.ca_key(), &key.serialize_pem(), true)?;
    write(&paths.ca(), &cert.pem(), false)?;
    Ok(paths)
}

/// Signs a new issuing CA with the root in `root` and writes it into `dir`
/// (`issuing.pem`, `issuing-key.pem`) with the root's certificate, never its
/// key. Replaces an earlier issuing CA of the same root (renewal); refuses a
/// directory that trusts another root.
pub fn make_issuing(root: &Paths, dir: &Path, lifetime: Duration) -> Result<Paths, PkiError> {
    let root_pem = read(&root.ca())?;
    let issuer = load_issuer(&root_pem, &root.ca_key())?;
    let paths = Paths::new(dir);
    create_dir(dir)?;
    if paths.ca().exists() && read(&paths.ca())? != root_pem {
        return Err(PkiError::Certificate(format!(
            "{} trusts another root CA; an issuing CA goes beside the root that signed it",
            paths.ca().display()
        )));
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = ca_params("Musubi issuing CA", 0, lifetime);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    write(&paths.issuing_key(), &key.serialize_pem(), true)?;
    write(&paths.issuing(), &cert.pem(), false)?;
    if !paths.ca().exists() {
        write(&paths.ca(), &root_pem, false)?;
    }
    Ok(paths)
}

/// How long the issuing CA `init` makes is valid.
const ISSUING_LIFETIME: Duration = Duration::from_secs(2 * 365 * 86_400);

/// Creates the PKI directory: a new root and issuing CA (or the given
/// external CA), the server certificate for `server_names` and an operator
/// certificate for `admin`. A directory that `ca issuing` prepared (the
/// root's certificate and an issuing CA, no server certificate yet) gets
/// its server and admin certificates from that issuing CA. Refuses to
/// overwrite an existing CA.
pub fn init(
    dir: &Path,
    server_names: &[String],
    admin: &str,
    external: Option<(&Path, &Path)>,
) -> Result<Initialised, PkiError> {
    check_operator_name(admin)?;
    let paths = Paths::new(dir);
    create_dir(dir)?;
    let prepared = paths.ca().exists() && paths.issuing().exists() && !paths.server().exists();
    if paths.ca().exists() && !(prepared && external.is_none()) {
        return Err(PkiError::Exists { path: paths.ca().display().to_string() });
    }
    match external {
        _ if prepared => {}
        Some((cert, key)) => {
            let (cert, key) = (read(cert)?, read(key)?);
            // Check that they belong together before adopting them.
            let pair = KeyPair::from_pem(&key).map_err(cert_err)?;
            let (_, parsed) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).map_err(cert_err)?;
            let parsed = parsed.parse_x509().map_err(cert_err)?;
            if parsed.tbs_certificate.subject_pki.subject_public_key.data.as_ref() != pair.public_key_raw() {
                return Err(PkiError::Certificate("the CA key does not belong to the CA certificate".into()));
            }
            Issuer::from_ca_cert_pem(&cert, pair).map_err(cert_err)?;
            write(&paths.ca_key(), &key, true)?;
            write(&paths.ca(), &cert, false)?;
        }
        None => {
            make_root(dir, Duration::from_secs(20 * 365 * 86_400))?;
            make_issuing(&paths, dir, ISSUING_LIFETIME)?;
        }
    }
    let authority = Authority::load(&paths)?;
    let year = Duration::from_secs(365 * 86_400);
    let (cert, key) = authority.issue_server(server_names, year)?;
    write(&paths.server_key(), &key, true)?;
    write(&paths.server(), &cert, false)?;
    let (cert, key) = authority.issue_operator(admin, year)?;
    write(&paths.operator_key(admin), &key, true)?;
    write(&paths.operator(admin), &cert, false)?;
    Ok(Initialised { paths, admin: admin.to_string(), external_ca: external.is_some(), prepared })
}

/// A verified client certificate (DER), as the TLS layer hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: Identity,
    /// When the certificate was issued (`notBefore` + the clock slack), Unix milliseconds.
    pub issued_ms: u64,
}

/// Reads the identity out of a certificate the TLS layer has verified.
pub fn peer(der: &[u8]) -> Option<Peer> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let issued_ms = (cert.validity().not_before.timestamp().max(0) as u64) * 1000 + CLOCK_SLACK.as_millis() as u64;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => {
            let identity = if let Some(s) = u.strip_prefix(SITE_URI) {
                Identity::Site(s.to_string())
            } else {
                Identity::Operator(u.strip_prefix(OPERATOR_URI)?.to_string())
            };
            Some(Peer { identity, issued_ms })
        }
        _ => None,
    })
}

/// Tonic's TLS settings for a controller: its certificate, and client
/// certificates verified against the CA when presented (an enrolling agent
/// has none yet; every other call checks for one).
pub fn server_tls(paths: &Paths) -> Result<tonic::transport::ServerTlsConfig, PkiError> {
    let identity = tonic::transport::Identity::from_pem(read(&paths.server())?, read(&paths.server_key())?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(read(&paths.ca())?))
        .client_auth_optional(true))
}

/// Tonic's TLS settings for a client holding `cert`/`key`, trusting `ca`.
pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<tonic::transport::ClientTlsConfig, PkiError> {
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_certificate_carries_only_the_granted_name() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let made = init(dir.path(), &["localhost".into(), "127.0.0.1".into()], "admin", None)?;
        let mode = std::fs::metadata(made.paths.ca_key())?.permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let ca = Authority::load(&made.paths)?;
        // The agent asks for another site's name; the certificate names the token's site.
        let key = KeyPair::generate()?;
        let csr = CertificateParams::new(vec!["other-site".to_string()])?.serialize_request(&key)?.pem()?;
        let (pem, not_after) = ca.issue_site(&csr, "kita-hall", Duration::from_secs(3600))?;
        let der = rustls_pemfile_der(&pem);
        let p = peer(&der).ok_or("no identity")?;
        assert_eq!(p.identity, Identity::Site("kita-hall".into()));
        // The issue time (what revocations compare with) is now, to the second.
        assert!(p.issued_ms <= now_ms() && p.issued_ms + 2000 > now_ms(), "issued {} now {}", p.issued_ms, now_ms());
        assert!(not_after > now_ms() + 3_500_000 && not_after <= now_ms() + 3_600_000);
        assert!(matches!(init(dir.path(), &[], "admin", None), Err(PkiError::Exists { .. })));
        assert!(ca.issue_site("garbage", "x", Duration::from_secs(1)).is_err());
        Ok(())
    }

    #[test]
    fn an_external_ca_is_adopted_and_checked() -> Result<(), Box<dyn std::error::Error>> {
        let first = tempfile::tempdir()?;
        let made = init(first.path(), &["localhost".into()], "admin", None)?;
        let second = tempfile::tempdir()?;
        let (ca, key) = (made.paths.ca(), made.paths.ca_key());
        let adopted = init(second.path(), &["localhost".into()], "ops", Some((&ca, &key)))?;
        assert!(adopted.external_ca);
        assert_eq!(read(&adopted.paths.ca())?, read(&ca)?);
        // The operator certificate it issued is signed by the external CA.
        let pem = read(&adopted.paths.operator("ops"))?;
        let p = peer(&rustls_pemfile_der(&pem)).ok_or("no identity")?;
        assert_eq!(p.identity, Identity::Operator("ops".into()));
        // A key that does not belong to the certificate is refused.
        let third = tempfile::tempdir()?;
        let other = tempfile::tempdir()?;
        let other = init(other.path(), &[], "x", None)?;
        let mismatch = init(third.path(), &[], "ops", Some((&ca, &other.paths.ca_key())));
        assert!(matches!(mismatch, Err(PkiError::Certificate(m)) if m.contains("does not belong")));
        Ok(())
    }

    #[test]
    fn an_operator_name_cannot_be_a_pki_file_or_a_path() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let made = init(dir.path(), &["localhost".into()], "admin", None)?;
        let ca = Authority::load(&made.paths)?;
        let before = std::fs::read_dir(dir.path())?.count();
        for bad in ["ca", "server", "ca-key", "admin-key", "../etc/x", "a/b", "", "Admin", "-x", ".hidden", "x y"] {
            let refused = ca.issue_operator(bad, Duration::from_secs(60));
            assert!(matches!(refused, Err(PkiError::OperatorName { .. })), "`{bad}` was accepted");
        }
        let e = ca.issue_operator("ca", Duration::from_secs(60)).err().ok_or("accepted")?;
        assert_eq!(
            e.to_string(),
            "`ca` cannot name an operator: the PKI directory's own files (the CA, the server, keys) use that name"
        );
        assert!(matches!(init(tempfile::tempdir()?.path(), &[], "server", None), Err(PkiError::OperatorName { .. })));
        for good in ["noc-east", "city-kita.admin", "ops_2"] {
            ca.issue_operator(good, Duration::from_secs(60))?;
        }
        assert_eq!(std::fs::read_dir(dir.path())?.count(), before, "issuing writes nothing by itself");
        Ok(())
    }

    /// The first certificate of a PEM chain, DER.
    fn rustls_pemfile_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        base64::engine::general_purpose::STANDARD.decode(body).unwrap_or_default()
    }
}
