//! The datapath's errors. A caller can tell an object that is already there
//! from one that is missing or busy, and every error keeps its cause: the
//! netlink error with its errno, nft's own message, the UAPI's I/O error.

use std::io;

/// Linux errno values the reconciler tells apart (the same on every
/// architecture Musubi runs on).
const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EBUSY: i32 = 16;
const EEXIST: i32 = 17;
const ENODEV: i32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// An operation the datapath's rules forbid (the fake refuses them).
    #[error("illegal operation {op}: {reason}")]
    Illegal { op: String, reason: String },
    /// The object is already there (EEXIST).
    #[error("{what}: already exists")]
    Exists {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The object, or one it needs, is not there (ENODEV, ENOENT, ESRCH, or
    /// not found when looked up).
    #[error("{what}: not there")]
    Missing {
        what: String,
        #[source]
        source: Option<io::Error>,
    },
    /// The kernel refused because the object is in use (EBUSY).
    #[error("{what}: busy")]
    Busy {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Any other netlink failure.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    /// nft refused a ruleset or could not be run; its own message is shown.
    #[error("{what}: {}", nft_message(.source))]
    Nft {
        what: String,
        #[source]
        source: nftables::helper::NftablesError,
    },
    /// A file, a process or a WireGuard UAPI socket. (The message is cut
    /// short: wireguard-control puts a whole peer in some of its errors.)
    #[error("{what}: {}", short(.source))]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// A step of an apply failed; the step is named, the cause kept.
    #[error("{op}: {source}")]
    During {
        op: String,
        #[source]
        source: Box<DatapathError>,
    },
    /// The interface's private key could not be read from the state directory.
    #[error("reading the interface's private key: {0}")]
    Key(#[source] Box<crate::state::StateError>),
    /// A helper program failed (wireguard-go); the message says where its log is.
    #[error("{0}")]
    Program(String),
    /// A value from the configuration the kernel cannot take (a prefix
    /// without a length, a key that is not base64).
    #[error("{0}")]
    Invalid(String),
    /// The datapath's own machinery failed (its netlink runtime is gone, a
    /// worker panicked).
    #[error("{0}")]
    Internal(String),
}

/// An error's message, at most 300 characters.
fn short(e: &io::Error) -> String {
    let text = e.to_string();
    match text.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn nft_message(e: &nftables::helper::NftablesError) -> String {
    match e {
        nftables::helper::NftablesError::NftFailed { stderr, hint, .. } if !stderr.trim().is_empty() => {
            format!("{} (while {hint})", stderr.trim())
        }
        other => other.to_string(),
    }
}

impl DatapathError {
    /// A netlink failure, told apart by its errno.
    pub fn netlink(what: impl Into<String>, source: rtnetlink::Error) -> Self {
        let what = what.into();
        let errno = match &source {
            rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
            _ => None,
        };
        match errno {
            Some(EEXIST) => DatapathError::Exists { what, source: io::Error::from_raw_os_error(EEXIST) },
            Some(n @ (ENODEV | ENOENT | ESRCH)) => {
                DatapathError::Missing { what, source: Some(io::Error::from_raw_os_error(n)) }
            }
            Some(EBUSY) => DatapathError::Busy { what, source: io::Error::from_raw_os_error(EBUSY) },
            _ => DatapathError::Netlink { what, source },
        }
    }

    /// A file, process or UAPI failure; an I/O error that carries one of the
    /// errnos above is classified the same way.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        let what = what.into();
        match source.raw_os_error() {
            Some(EEXIST) => DatapathError::Exists { what, source },
            Some(ENODEV | ENOENT | ESRCH) => DatapathError::Missing { what, source: Some(source) },
            Some(EBUSY) => DatapathError::Busy { what, source },
            _ => DatapathError::Io { what, source },
        }
    }

    /// Something looked up and not found.
    pub fn missing(what: impl Into<String>) -> Self {
        DatapathError::Missing { what: what.into(), source: None }
    }

    /// The error under any [`DatapathError::During`] wrappers.
    pub fn root(&self) -> &DatapathError {
        match self {
            DatapathError::During { source, .. } => source.root(),
            other => other,
        }
    }

    pub fn is_exists(&self) -> bool {
        matches!(self.root(), DatapathError::Exists { .. })
    }

    pub fn is_missing(&self) -> bool {
        matches!(self.root(), DatapathError::Missing { .. })
    }

    pub fn is_busy(&self) -> bool {
        matches!(self.root(), DatapathError::Busy { .. })
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use rtnetlink::packet_core::ErrorMessage;

    use super::*;

    fn netlink_errno(errno: i32) -> rtnetlink::Error {
        let mut m = ErrorMessage::default();
        m.code = std::num::NonZeroI32::new(-errno);
        rtnetlink::Error::NetlinkError(m)
    }

    #[test]
    fn netlink_errors_are_told_apart_and_keep_their_cause() {
        let e = DatapathError::netlink("creating VRF mv-a", netlink_errno(EEXIST));
        assert!(e.is_exists(), "{e:?}");
        assert!(e.to_string().contains("creating VRF mv-a"), "{e}");
        assert_eq!(e.source().and_then(|s| s.downcast_ref::<io::Error>()).and_then(io::Error::raw_os_error), Some(17));
        assert!(DatapathError::netlink("deleting mw-a", netlink_errno(ENODEV)).is_missing());
        assert!(DatapathError::netlink("deleting mv-a", netlink_errno(EBUSY)).is_busy());
        let during = DatapathError::During { op: "create mv-a".into(), source: Box::new(e) };
        assert!(during.is_exists(), "the kind is seen through the step that failed");
        assert!(during.to_string().contains("create mv-a"), "{during}");
        let other = DatapathError::netlink("adding a route", netlink_errno(22));
        assert!(matches!(other, DatapathError::Netlink { .. }), "EINVAL stays a netlink error: {other:?}");
        assert!(other.source().is_some(), "the netlink error is kept");
    }

    #[test]
    fn io_errors_are_classified_by_errno() {
        assert!(DatapathError::io("uapi", io::Error::from_raw_os_error(ENOENT)).is_missing());
        assert!(DatapathError::io("uapi", io::Error::from_raw_os_error(EEXIST)).is_exists());
        assert!(matches!(DatapathError::io("uapi", io::Error::other("x")), DatapathError::Io { .. }));
    }

    #[test]
    fn nft_refusals_show_nfts_own_message() {
        let e = DatapathError::Nft {
            what: "writing the policy".into(),
            source: nftables::helper::NftablesError::NftFailed {
                program: "nft".into(),
                hint: "applying ruleset".into(),
                stdout: String::new(),
                stderr: "Error: Could not process rule: No such file or directory\n".into(),
            },
        };
        let text = e.to_string();
        assert!(text.contains("Could not process rule: No such file or directory"), "{text}");
        assert!(text.starts_with("writing the policy"), "{text}");
    }
}
