//! How an agent runs, what it reports to the simulator and tests, and its errors.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::state::{StateDir, StateError};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("not enrolled: give a join token (--token) and the controller's CA (--ca)")]
    NoToken,
    /// The controller answered no (a used or expired token, a revoked site).
    #[error("refused by the controller: {}", .0.message())]
    Refused(#[source] Box<tonic::Status>),
    #[error("cannot reach any controller for enrolment: {0}")]
    Unreachable(String),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("making the site's key or certificate request: {0}")]
    Key(#[source] rcgen::Error),
    #[error("certificate: {0}")]
    Certificate(String),
    #[error(
        "refusing plain text to {0}: use https:// (the default) with the controller's CA, or --insecure for a controller started with --insecure"
    )]
    PlainText(String),
}

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub site: String,
    /// `host:port` or `https://host:port` (`http://` only with `insecure`).
    pub controllers: Vec<String>,
    pub state: StateDir,
    /// One-time join token, used when the state directory holds no certificate.
    pub token: Option<String>,
    /// The controller's CA, for enrolment.
    pub ca: Option<PathBuf>,
    /// Plain text, no certificates (a controller started with `--insecure`).
    pub insecure: bool,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A stream with no message for this long is given up (three keepalives).
    pub silence: Duration,
    /// How often the last applied configuration is reconciled again, with or
    /// without a controller, so what drifted (a `wireguard-go` that died, a
    /// route deleted by hand) is put back. `None`: only when a configuration
    /// arrives.
    pub upkeep: Option<Duration>,
    /// Probe every peer through its tunnel and report its health (the
    /// Linux datapath); without it every configured peer counts as up.
    pub probe: bool,
    /// How long a better candidate must have been up before route groups
    /// move back to it (no flapping).
    pub hold_down: Duration,
    /// What configurations from the controller may ask for (see [`crate::trust`]).
    pub trust: crate::trust::Limits,
}

impl Settings {
    pub fn new(site: &str, controllers: Vec<String>, state: StateDir) -> Self {
        Settings {
            site: site.to_string(),
            controllers,
            state,
            token: None,
            ca: None,
            insecure: false,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            silence: Duration::from_secs(45),
            upkeep: None,
            probe: false,
            hold_down: Duration::from_secs(3),
            trust: crate::trust::Limits::default(),
        }
    }
}

/// Something an agent did, for the fleet simulator and tests.
#[derive(Debug, Clone)]
pub struct Applied {
    pub site: String,
    pub revision: u64,
    pub digest: String,
    pub writes: u64,
    pub at: Instant,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A controller's URL: as given if it has a scheme, else `https://` (`http://`
/// for a plain-text controller).
pub(crate) fn url(address: &str, insecure: bool) -> String {
    if address.contains("://") {
        address.to_string()
    } else if insecure {
        format!("http://{address}")
    } else {
        format!("https://{address}")
    }
}
