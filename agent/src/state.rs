//! The agent's state directory: WireGuard private keys (one per segment,
//! 0600, generated here and never sent anywhere), the site certificate and
//! its key, and the last configuration applied — so that an agent that
//! restarts while the controller is away keeps (and can re-apply) it.
//!
//! ```text
//! <state>/keys/<segment>.key      WireGuard private key, base64 (0600)
//! <state>/tls/ca.pem              the controller's CA
//! <state>/tls/site.pem            this site's certificate
//! <state>/tls/site-key.pem        its private key (0600)
//! <state>/applied.pb              the last applied ConfigUpdate
//! ```

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use musubi_proto::v1 as pb;
use prost::Message;

use crate::reconcile::{LocalKey, LocalKeys};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is unreadable: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("no random source: {0}")]
    Random(#[source] getrandom::Error),
    #[error(
        "refusing segment name `{0}`: a segment's key is a file named after it (lowercase letters, digits and dashes, at most 63)"
    )]
    SegmentName(String),
}

/// A name as an error message may show it: 64 characters, controls as `?`.
pub fn shown(name: &str) -> String {
    name.chars().take(64).map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// Whether `segment` may name a file of the state directory: what the
/// intent's validation allows a segment to be called, so `../`, `/` and
/// hidden names can never reach the disk whatever a controller sends.
pub fn plain_segment(segment: &str) -> bool {
    segment.len() <= 63
        && segment.starts_with(|c: char| c.is_ascii_lowercase())
        && segment.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// [`plain_segment`] as a result: the refusal names the segment as shown.
pub fn check_segment(segment: &str) -> Result<(), StateError> {
    if plain_segment(segment) { Ok(()) } else { Err(StateError::SegmentName(shown(segment))) }
}

fn file_err(path: &Path, source: std::io::Error) -> StateError {
    StateError::File { path: path.to_path_buf(), source }
}

fn unreadable(path: &Path, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StateError {
    StateError::Unreadable { path: path.to_path_buf(), source: source.into() }
}

/// Writes a file atomically (temp file + rename), owner-only when `private`.
pub fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), StateError> {
    write_file_with(path, contents, private, true)
}

/// [`write_file`], with the flush to disk optional (the fleet simulator's
/// thousands of agents share one disk; a real agent always syncs).
pub fn write_file_with(path: &Path, contents: &[u8], private: bool, sync: bool) -> Result<(), StateError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(|e| file_err(&tmp, e))?;
    f.write_all(contents).and_then(|()| if sync { f.sync_all() } else { Ok(()) }).map_err(|e| file_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_err(path, e))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, StateError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

/// A WireGuard key pair; the private half stays in the state directory.
fn parse_key(path: &Path, text: &[u8]) -> Result<[u8; 32], StateError> {
    let bytes = STANDARD.decode(String::from_utf8_lossy(text).trim()).map_err(|e| unreadable(path, e))?;
    bytes.try_into().map_err(|_| unreadable(path, "not a 32-byte key"))
}

/// A new private key as a key file holds it: base64, clamped as `wg
/// genkey` writes it.
fn new_private_key() -> Result<String, StateError> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(StateError::Random)?;
    key[0] &= 248;
    key[31] = (key[31] & 127) | 64;
    Ok(format!("{}\n", STANDARD.encode(key)))
}

/// The private key in a key file (base64, as `wg genkey` writes it).
pub fn private_key(path: &Path) -> Result<[u8; 32], StateError> {
    let text = std::fs::read(path).map_err(|e| file_err(path, e))?;
    parse_key(path, &text)
}

pub fn public_of(private: &[u8; 32]) -> String {
    let secret = x25519_dalek::StaticSecret::from(*private);
    STANDARD.encode(x25519_dalek::PublicKey::from(&secret).as_bytes())
}

/// A key file's text and the public key derived from it.
type Derived = (Vec<u8>, String);

#[derive(Debug, Clone)]
pub struct StateDir {
    pub root: PathBuf,
    /// Flush the applied configuration to disk (on, except in the simulator).
    pub sync: bool,
    /// Public keys already derived, by segment, with the key file's text
    /// they came from: every apply asks for them, and deriving one is a
    /// scalar multiplication.
    derived: Arc<Mutex<HashMap<String, Derived>>>,
}

impl StateDir {
    pub fn new(root: &Path) -> Self {
        StateDir { root: root.to_path_buf(), sync: true, derived: Arc::default() }
    }

    /// The public key of a private key file's text (as read from `path`).
    fn public_of_text(&self, segment: &str, path: &Path, text: &[u8]) -> Result<String, StateError> {
        let mut derived = self.derived.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((seen, public)) = derived.get(segment)
            && seen == text
        {
            return Ok(public.clone());
        }
        let public = public_of(&parse_key(path, text)?);
        derived.insert(segment.to_string(), (text.to_vec(), public.clone()));
        Ok(public)
    }

    pub fn key_file(&self, segment: &str) -> PathBuf {
        self.root.join("keys").join(format!("{segment}.key"))
    }
    pub fn ca(&self) -> PathBuf {
        self.root.join("tls/ca.pem")
    }
    pub fn cert(&self) -> PathBuf {
        self.root.join("tls/site.pem")
    }
    pub fn cert_key(&self) -> PathBuf {
        self.root.join("tls/site-key.pem")
    }
    fn applied(&self) -> PathBuf {
        self.root.join("applied.pb")
    }

    /// The public key of `segment`'s interface, making the key pair first if
    /// there is none.
    /// The key of each of `segments`, made where missing: what the desired
    /// state is built from, and the segments whose key was new (their public
    /// halves go to the controller).
    pub fn local_keys<'a>(
        &self,
        segments: impl IntoIterator<Item = &'a str>,
    ) -> Result<(LocalKeys, Vec<String>), StateError> {
        let (mut keys, mut new) = (LocalKeys::new(), Vec::new());
        for segment in segments {
            let (public_key, made) = self.ensure_key(segment)?;
            if made {
                new.push(segment.to_string());
            }
            keys.insert(segment.to_string(), LocalKey { public_key, file: self.key_file(segment) });
        }
        Ok((keys, new))
    }

    pub fn ensure_key(&self, segment: &str) -> Result<(String, bool), StateError> {
        check_segment(segment)?;
        let path = self.key_file(segment);
        if let Some(text) = read_optional(&path)? {
            return Ok((self.public_of_text(segment, &path, &text)?, false));
        }
        let text = new_private_key()?;
        write_file(&path, text.as_bytes(), true)?;
        Ok((public_of(&parse_key(&path, text.as_bytes())?), true))
    }

    /// Where a key rotation's next key of `segment` waits until the switch.
    pub fn next_key_file(&self, segment: &str) -> PathBuf {
        self.root.join("keys").join(format!("{segment}.next"))
    }

    /// Where the id of the last key rotation acted on is kept.
    fn rotation_file(&self) -> PathBuf {
        self.root.join("keys").join("rotation")
    }

    /// Acts on key rotation `id` in `phase` for `segments` (see
    /// [`pb::KeyRotation`]), once per id and phase: *prepare* makes a next
    /// key per segment beside the current one (kept until the switch);
    /// *switch* makes each next key the segment's key; *fresh* (after a
    /// revocation) replaces every key with a new one. Gives the segments
    /// whose key changed (their public halves go to the controller).
    pub fn rotate(&self, id: u64, phase: pb::KeyPhase, segments: &[&str]) -> Result<Vec<String>, StateError> {
        let done = format!("{id} {}", phase.as_str_name());
        if read_optional(&self.rotation_file())?.is_some_and(|t| String::from_utf8_lossy(&t).trim() == done) {
            return Ok(Vec::new());
        }
        let mut changed = Vec::new();
        for segment in segments {
            check_segment(segment)?;
            let (key, next) = (self.key_file(segment), self.next_key_file(segment));
            match phase {
                pb::KeyPhase::Prepare => {
                    if read_optional(&next)?.is_none() {
                        write_file(&next, new_private_key()?.as_bytes(), true)?;
                    }
                }
                pb::KeyPhase::Switch => {
                    // Without a next key (the state directory was replaced
                    // since the prepare), the current one stays: the agent
                    // reports it when it next connects, and its peers take
                    // it back.
                    if read_optional(&next)?.is_some() {
                        std::fs::rename(&next, &key).map_err(|e| file_err(&next, e))?;
                        changed.push(segment.to_string());
                    }
                }
                pb::KeyPhase::Fresh => {
                    write_file(&key, new_private_key()?.as_bytes(), true)?;
                    let _ = std::fs::remove_file(&next);
                    changed.push(segment.to_string());
                }
                pb::KeyPhase::Unspecified => return Ok(Vec::new()),
            }
        }
        if phase != pb::KeyPhase::Prepare {
            write_file(&self.rotation_file(), done.as_bytes(), false)?;
        }
        Ok(changed)
    }

    /// The public halves of the next keys made for `segments`.
    pub fn next_public_keys(&self, segments: &[&str]) -> Result<BTreeMap<String, String>, StateError> {
        let mut out = BTreeMap::new();
        for segment in segments {
            check_segment(segment)?;
            let path = self.next_key_file(segment);
            if let Some(text) = read_optional(&path)? {
                out.insert(segment.to_string(), public_of(&parse_key(&path, &text)?));
            }
        }
        Ok(out)
    }

    /// Public keys of every segment that has a key, by segment.
    pub fn public_keys(&self) -> Result<BTreeMap<String, String>, StateError> {
        let dir = self.root.join("keys");
        let mut out = BTreeMap::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(file_err(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| file_err(&dir, e))?;
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(segment) = name.strip_suffix(".key") {
                out.insert(segment.to_string(), self.ensure_key(segment)?.0);
            }
        }
        Ok(out)
    }

    pub fn load_applied(&self) -> Result<Option<pb::ConfigUpdate>, StateError> {
        let path = self.applied();
        read_optional(&path)?
            .map(|b| pb::ConfigUpdate::decode(b.as_slice()).map_err(|e| unreadable(&path, e)))
            .transpose()
    }

    pub fn save_applied(&self, update: &pb::ConfigUpdate) -> Result<(), StateError> {
        write_file_with(&self.applied(), &update.encode_to_vec(), false, self.sync)
    }

    pub fn enrolled(&self) -> bool {
        self.cert().exists() && self.cert_key().exists() && self.ca().exists()
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::StateDir;
    use musubi_proto::v1::KeyPhase;

    /// Prepare makes a next key beside each current one (once, however
    /// often the configuration comes); switch makes it the key; each phase
    /// of a rotation acts once; fresh replaces every key. Private keys stay
    /// 0600 files.
    #[test]
    fn a_rotation_prepares_switches_once_and_fresh_keys_replace_revoked_ones() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(dir.path());
        let segments = ["office", "guest"];
        let (keys, _) = state.local_keys(segments).expect("keys");
        let first = |s: &str| keys[s].public_key.clone();
        assert!(state.rotate(7, KeyPhase::Prepare, &segments).expect("prepare").is_empty(), "nothing switched yet");
        let next = state.next_public_keys(&segments).expect("next");
        assert_eq!(next.len(), 2);
        assert!(segments.iter().all(|s| next[*s] != first(s)), "new keys");
        state.rotate(7, KeyPhase::Prepare, &segments).expect("again");
        assert_eq!(state.next_public_keys(&segments).expect("next"), next, "the next keys are made once");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(state.next_key_file("office")).expect("next key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        // The public keys reported in a Hello are still the current ones.
        assert_eq!(state.public_keys().expect("public")["office"], first("office"));

        let switched = state.rotate(7, KeyPhase::Switch, &segments).expect("switch");
        assert_eq!(switched, vec!["office".to_string(), "guest".to_string()]);
        let (now, made) = state.local_keys(segments).expect("keys");
        assert!(made.is_empty());
        assert!(segments.iter().all(|s| now[*s].public_key == next[*s]), "the next keys are the keys");
        assert!(state.next_public_keys(&segments).expect("next").is_empty());
        assert!(state.rotate(7, KeyPhase::Switch, &segments).expect("once").is_empty(), "a switch acts once");

        let fresh = state.rotate(9, KeyPhase::Fresh, &segments).expect("fresh");
        assert_eq!(fresh.len(), 2);
        let (after, _) = state.local_keys(segments).expect("keys");
        assert!(segments.iter().all(|s| after[*s].public_key != now[*s].public_key), "fresh keys");
        assert!(state.rotate(9, KeyPhase::Fresh, &segments).expect("once").is_empty(), "fresh acts once");
        assert!(state.rotate(9, KeyPhase::Prepare, &["../x"]).is_err(), "segment names are checked");
    }
}

#[cfg(test)]
mod segment_name_tests {
    use super::{StateDir, StateError, plain_segment};

    #[test]
    fn a_segment_name_never_leaves_the_keys_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let state = StateDir::new(&dir.path().join("state"));
        for bad in ["../escaped", "a/b", "", ".hidden", "Office", "x\u{1b}[2J", &"a".repeat(64)] {
            assert!(!plain_segment(bad), "{bad:?}");
            assert!(matches!(state.ensure_key(bad), Err(StateError::SegmentName(_))), "{bad:?}");
        }
        assert!(!dir.path().join("state/escaped.key").exists() && !dir.path().join("escaped.key").exists());
        let (_, made) = state.ensure_key("office").expect("a plain name");
        assert!(made && dir.path().join("state/keys/office.key").exists());
    }
}
