//! Tunnel health: a light UDP echo to every peer through its tunnel, as BFD
//! does — every `interval`, a peer is down after `multiplier` intervals
//! without an answer. Each tunnel interface has one socket on
//! [`PORT`], bound to the interface (so it is routed in the segment's
//! domain), that both answers the peers' probes and sends its own.
//!
//! Health feeds the agent's status (up, round-trip time, loss over the last
//! [`WINDOW`] probes); the failover that acts on it is to come.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use musubi_proto::v1::SiteConfig;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};

/// The port of the echo (BFD's single-hop port).
pub const PORT: u16 = 3784;
/// Probes the loss figure covers.
pub const WINDOW: usize = 20;

/// How long a peer that has never answered is given before it counts as down.
pub const GRACE: Duration = Duration::from_secs(5);

const REQUEST: u8 = 1;
const REPLY: u8 = 2;

/// One peer to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub segment: String,
    pub interface: String,
    pub peer: String,
    /// This router's tunnel address in the segment: the probes' source, and
    /// where the peers' probes arrive (answers must come from it: WireGuard
    /// accepts from a peer only its own addresses).
    pub local: IpAddr,
    /// The peer's tunnel address in this segment.
    pub address: IpAddr,
    pub interval: Duration,
    pub multiplier: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Since when it has been up (or down).
    pub since: Option<Instant>,
    pub rtt_us: u32,
    pub loss_permille: u32,
}

/// Health by (segment, peer).
pub type Healths = Arc<Mutex<BTreeMap<(String, String), Health>>>;

/// The peers a configuration asks to probe: every peer with a key, at its
/// tunnel address, with the timing of its first path.
pub fn targets(config: &SiteConfig) -> Vec<Target> {
    let default = config.probe.unwrap_or_default();
    let mut out = Vec::new();
    for seg in &config.segments {
        let Some(wg) = &seg.wireguard else { continue };
        let Some(local) =
            wg.addresses.iter().find_map(|a| a.split('/').next()?.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4))
        else {
            continue;
        };
        for p in seg.peers.iter().filter(|p| !p.public_key.is_empty()) {
            let address = p.allowed_prefixes.iter().find_map(|a| {
                let (ip, len) = a.split_once('/')?;
                let ip: IpAddr = ip.parse().ok()?;
                (ip.is_ipv4() && len == "32").then_some(ip)
            });
            let Some(address) = address else { continue };
            let probe = p.endpoints.first().and_then(|e| e.probe).unwrap_or(default);
            out.push(Target {
                segment: seg.segment.clone(),
                interface: wg.name.clone(),
                peer: p.name.clone(),
                local,
                address,
                interval: Duration::from_millis(u64::from(probe.interval_ms.max(10))),
                multiplier: probe.multiplier.max(1),
            });
        }
    }
    out
}

/// The probing of one agent: give it targets, read health.
#[derive(Debug)]
pub struct Prober {
    targets: watch::Sender<Vec<Target>>,
    pub health: Healths,
    /// Woken when a peer goes up or down.
    pub changed: Arc<Notify>,
}

impl Prober {
    /// Starts probing (nothing until targets are set).
    pub fn start() -> Prober {
        let (tx, rx) = watch::channel(Vec::new());
        let health: Healths = Arc::default();
        let changed = Arc::new(Notify::new());
        tokio::spawn(supervise(rx, health.clone(), changed.clone()));
        Prober { targets: tx, health, changed }
    }

    pub fn set(&self, targets: Vec<Target>) {
        self.targets.send_if_modified(|t| {
            let differs = *t != targets;
            *t = targets;
            differs
        });
    }

    pub fn get(&self, segment: &str, peer: &str) -> Option<Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).get(&(segment.to_string(), peer.to_string())).cloned()
    }
}

async fn supervise(mut rx: watch::Receiver<Vec<Target>>, health: Healths, changed: Arc<Notify>) {
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        let targets = rx.borrow_and_update().clone();
        for t in tasks.drain(..) {
            t.abort();
        }
        {
            let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
            h.retain(|(seg, peer), _| targets.iter().any(|t| &t.segment == seg && &t.peer == peer));
        }
        let mut by_interface: BTreeMap<String, Vec<Target>> = BTreeMap::new();
        for t in targets {
            by_interface.entry(t.interface.clone()).or_default().push(t);
        }
        for (interface, targets) in by_interface {
            tasks.push(tokio::spawn(interface_loop(interface, targets, health.clone(), changed.clone())));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn socket(interface: &str, local: IpAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.bind_device(Some(interface.as_bytes()))?;
    s.bind(&SocketAddr::new(local, PORT).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Per target: when it last answered, and the last probes (sent at, answered).
struct State {
    /// When probing began: a peer is not judged before one detection time.
    started: Instant,
    last_reply: Option<Instant>,
    sent: VecDeque<(u64, Instant, bool)>,
    next: Instant,
}

async fn interface_loop(interface: String, targets: Vec<Target>, health: Healths, changed: Arc<Notify>) {
    // The interface may appear a moment after the configuration.
    let Some(local) = targets.first().map(|t| t.local) else { return };
    let sock = loop {
        match socket(&interface, local) {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(interface, error = %e, "probe socket not ready");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let epoch = Instant::now();
    let tick =
        targets.iter().map(|t| t.interval).min().unwrap_or(Duration::from_millis(100)).min(Duration::from_millis(50));
    let mut ticker = tokio::time::interval(tick);
    let mut states: Vec<State> = targets
        .iter()
        .map(|_| State { started: Instant::now(), last_reply: None, sent: VecDeque::new(), next: Instant::now() })
        .collect();
    let mut seq: u64 = 0;
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let now = Instant::now();
                for (t, st) in targets.iter().zip(states.iter_mut()) {
                    if now >= st.next {
                        seq += 1;
                        let mut msg = [0u8; 17];
                        msg[0] = REQUEST;
                        msg[1..9].copy_from_slice(&seq.to_be_bytes());
                        msg[9..17].copy_from_slice(&(now - epoch).as_nanos().min(u128::from(u64::MAX)).to_be_bytes()[8..]);
                        let _ = sock.send_to(&msg, SocketAddr::new(t.address, PORT)).await;
                        st.sent.push_back((seq, now, false));
                        while st.sent.len() > WINDOW + 8 {
                            st.sent.pop_front();
                        }
                        st.next = now + t.interval;
                    }
                }
                evaluate(&targets, &states, &health, &changed, None);
            }
            received = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                if n < 17 {
                    continue;
                }
                match buf[0] {
                    REQUEST => {
                        buf[0] = REPLY;
                        let _ = sock.send_to(&buf[..17], from).await;
                    }
                    REPLY => {
                        let Some(i) = targets.iter().position(|t| t.address == from.ip()) else { continue };
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&buf[1..9]);
                        let got = u64::from_be_bytes(s);
                        let now = Instant::now();
                        let st = &mut states[i];
                        let mut rtt = None;
                        for entry in st.sent.iter_mut().filter(|e| e.0 == got) {
                            entry.2 = true;
                            rtt = Some(now - entry.1);
                        }
                        st.last_reply = Some(now);
                        evaluate(&targets, &states, &health, &changed, rtt.map(|r| (i, r)));
                    }
                    _ => {}
                }
            }
        }
    }
}

fn evaluate(targets: &[Target], states: &[State], health: &Healths, changed: &Notify, rtt: Option<(usize, Duration)>) {
    let now = Instant::now();
    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
    let mut flipped = false;
    for (i, (t, st)) in targets.iter().zip(states).enumerate() {
        let detect = t.interval * t.multiplier;
        // A peer that has never answered is not judged before the grace
        // (keys and the first handshake take a moment): neither up nor down.
        if st.last_reply.is_none() && now - st.started <= detect.max(GRACE) {
            continue;
        }
        let up = st.last_reply.is_some_and(|at| now - at <= detect);
        // Probes old enough to have been answered.
        let settled: Vec<bool> =
            st.sent.iter().filter(|e| e.2 || now - e.1 > detect).map(|e| e.2).rev().take(WINDOW).collect();
        let lost = settled.iter().filter(|a| !**a).count();
        let loss_permille = if settled.is_empty() { 0 } else { (lost * 1000 / settled.len()) as u32 };
        let entry = h.entry((t.segment.clone(), t.peer.clone())).or_default();
        if entry.up != up || entry.since.is_none() {
            entry.since = Some(now);
        }
        if entry.up != up {
            flipped = true;
            tracing::info!(segment = %t.segment, peer = %t.peer, up, "peer {}", if up { "up" } else { "down" });
        }
        entry.up = up;
        entry.loss_permille = loss_permille;
        if let Some((j, r)) = rtt
            && j == i
        {
            entry.rtt_us = u32::try_from(r.as_micros()).unwrap_or(u32::MAX);
        }
    }
    drop(h);
    if flipped {
        changed.notify_one();
    }
}
