//! WireGuard devices through `wireguard-control`: the kernel module where
//! there is one, otherwise `wireguard-go`, which the agent starts for the
//! interfaces it owns.
//!
//! `wireguard-go` runs as a daemon of its own, not as a child that dies with
//! the agent: a restarted (or crashed) agent finds its tunnels still
//! forwarding and adopts them through their UAPI sockets. Deleting the
//! interface stops it. Its UAPI sockets live in `/var/run/wireguard/`, which
//! every network namespace shares: two routers on one host need a mount
//! namespace each (the lab runner gives every node one).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::datapath::{DatapathError, PeerSpec};

fn err(what: &str, e: std::io::Error) -> DatapathError {
    DatapathError::io(what, e)
}

fn invalid(what: &str, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Invalid(format!("{what}: {e}"))
}

fn iface(name: &str) -> Result<InterfaceName, DatapathError> {
    name.parse().map_err(|e| invalid(&format!("interface name `{name}`"), e))
}

fn key(base64: &str) -> Result<Key, DatapathError> {
    Key::from_base64(base64).map_err(|_| DatapathError::Invalid(format!("`{base64}` is not a WireGuard key")))
}

/// What a device holds, as the datapath compares it.
#[derive(Debug, Clone)]
pub struct State {
    pub listen_port: u32,
    pub public_key: String,
    pub peers: BTreeMap<String, PeerSpec>,
}

/// Reads a device; `None` when it does not answer (no such device, or its
/// userspace process is gone).
pub fn read(name: &str, backend: Backend) -> Option<State> {
    let device = Device::get(&iface(name).ok()?, backend).ok()?;
    // The kernel dumps a peer with many allowed IPs in several parts, the
    // peer repeated in each: the parts are one peer (keyed by its public key,
    // the last part alone would lose the others' allowed IPs).
    let mut peers: BTreeMap<String, PeerSpec> = BTreeMap::new();
    for p in &device.peers {
        let spec = peers.entry(p.config.public_key.to_base64()).or_insert_with(|| PeerSpec {
            // The kernel knows peers by key only; names take no part in comparisons.
            name: String::new(),
            endpoint: String::new(),
            allowed_ips: Default::default(),
            roams: false,
        });
        if let Some(e) = p.config.endpoint {
            spec.endpoint = e.to_string();
        }
        spec.allowed_ips.extend(p.config.allowed_ips.iter().map(|a| format!("{}/{}", a.address, a.cidr)));
    }
    Some(State {
        listen_port: u32::from(device.listen_port.unwrap_or(0)),
        public_key: device.public_key.map(|k| k.to_base64()).unwrap_or_default(),
        peers,
    })
}

/// Starts `wireguard-go` for `name` and waits until its interface and UAPI
/// socket exist (the program returns once its daemon is up).
pub fn start_userspace(program: &Path, name: &str, log: &Path) -> Result<(), DatapathError> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| err(&format!("opening {}", log.display()), e))?;
    let out2 = out.try_clone().map_err(|e| err("log file", e))?;
    let status = Command::new(program)
        .arg(name)
        .env_remove("WG_PROCESS_FOREGROUND")
        // `MUSUBI_WIREGUARD_LOG=verbose` logs every handshake (debugging).
        .env("LOG_LEVEL", std::env::var("MUSUBI_WIREGUARD_LOG").unwrap_or_else(|_| "error".into()))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(out2)
        .status()
        .map_err(|e| err(&format!("starting {}", program.display()), e))?;
    if !status.success() {
        return Err(DatapathError::Program(format!(
            "{} {name} failed ({status}); see {}",
            program.display(),
            log.display()
        )));
    }
    // The socket appears with the interface; allow a moment on a busy host.
    let socket = Path::new("/var/run/wireguard").join(format!("{name}.sock"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        if Instant::now() > deadline {
            return Err(DatapathError::missing(format!(
                "{} (wireguard-go's UAPI socket, after 5 s)",
                socket.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Sets the private key and the listen port.
pub fn configure(name: &str, backend: Backend, private: [u8; 32], listen_port: u32) -> Result<(), DatapathError> {
    let port = u16::try_from(listen_port).map_err(|e| invalid("listen port", e))?;
    DeviceUpdate::new()
        .set_private_key(Key(private))
        .set_listen_port(port)
        .apply(&iface(name)?, backend)
        .map_err(|e| err(&format!("configuring {name}"), e))
}

/// Sets a new private key on an existing interface, leaving its port and
/// peers (a key rotation's switch; WireGuard starts new sessions with it).
pub fn set_private_key(name: &str, backend: Backend, private: [u8; 32]) -> Result<(), DatapathError> {
    DeviceUpdate::new()
        .set_private_key(Key(private))
        .apply(&iface(name)?, backend)
        .map_err(|e| err(&format!("setting the key of {name}"), e))
}

/// Allowed IPs of one peer per netlink message with kernel WireGuard. A
/// generic-netlink request is at most 8 KiB here, and one allowed IP takes
/// about 28 bytes; an access point's interconnect peer carries thousands.
const ALLOWED_IPS_PER_MESSAGE: usize = 200;

/// Adds or replaces peers (endpoint and the whole allowed-IPs list of each)
/// in one update. With kernel WireGuard a peer with many allowed IPs is
/// written as `wg` does it: the first part replaces the list, the next parts
/// of the same peer add to it (the update may span several messages).
pub fn set_peers(name: &str, backend: Backend, peers: &[(&str, &PeerSpec)]) -> Result<(), DatapathError> {
    let per_part = match backend {
        Backend::Kernel => ALLOWED_IPS_PER_MESSAGE,
        _ => usize::MAX,
    };
    let mut builders = Vec::with_capacity(peers.len());
    for (public_key, peer) in peers {
        let key = key(public_key)?;
        let mut builder = PeerConfigBuilder::new(&key).replace_allowed_ips();
        if !peer.endpoint.is_empty() {
            let endpoint: SocketAddr = peer
                .endpoint
                .parse()
                .map_err(|e| invalid(&format!("endpoint `{}` of {}", peer.endpoint, peer.name), e))?;
            builder = builder.set_endpoint(endpoint);
        }
        for (i, prefix) in peer.allowed_ips.iter().enumerate() {
            if i > 0 && i % per_part == 0 {
                builders.push(std::mem::replace(&mut builder, PeerConfigBuilder::new(&key)));
            }
            let (ip, len) = super::netlink::split(prefix)?;
            builder = builder.add_allowed_ip(ip, len);
        }
        builders.push(builder);
    }
    DeviceUpdate::new()
        .add_peers(&builders)
        .apply(&iface(name)?, backend)
        .map_err(|e| err(&format!("setting peers on {name}"), e))
}

pub fn remove_peer(name: &str, backend: Backend, public_key: &str) -> Result<(), DatapathError> {
    DeviceUpdate::new()
        .remove_peer_by_key(&key(public_key)?)
        .apply(&iface(name)?, backend)
        .map_err(|e| err(&format!("removing a peer from {name}"), e))
}
