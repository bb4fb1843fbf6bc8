//! Health: a light UDP echo, as BFD does — every `interval`, a target is
//! down after `multiplier` intervals without an answer. Two kinds of
//! targets ([`Key`]):
//!
//! - every peer **through its tunnel**, from this router's tunnel address
//!   (an access point's member sites are also alive whenever their own
//!   probes arrive, and are probed [`MEMBER_SLOWDOWN`] times more slowly);
//! - every **underlay path** to a peer whose line this router picks (its
//!   access points, the interconnect): from a local line's address to the
//!   peer's line address, outside the tunnels, so a line that is not in use
//!   is known to be healthy before traffic moves to it.
//!
//! Each (interface, local address) has one socket on [`PORT`], bound to the
//! interface (so it is routed in the segment's domain, or out of the line),
//! that both answers probes and sends its own; a socket on the wildcard
//! address answers the underlay probes of the peers' known line addresses
//! (and nobody else's).
//!
//! Health feeds the agent's status (up, round-trip time, loss over the last
//! [`WINDOW`] probes) and its failover.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use musubi_proto::v1::{self as pb, SiteConfig};

use crate::datapath::Hops;
use crate::reconcile::{path, probes_lines};
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};

/// The port of the echo (BFD's single-hop port).
pub const PORT: u16 = 3784;
/// Probes the loss figure covers.
pub const WINDOW: usize = 20;

/// How long a peer that has never answered is given before it counts as down.
pub const GRACE: Duration = Duration::from_secs(5);

/// Messages read at most before a tick's judgment (an access point's
/// members answer in thousands; the rest wait for the next tick's read).
const DRAIN_LIMIT: usize = 4096;

const REQUEST: u8 = 1;
const REPLY: u8 = 2;

/// What a target's health is about.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// A peer, through the segment's tunnel.
    Tunnel { segment: String, peer: String },
    /// An underlay path: from a local line's address to a peer's line address.
    Path { local: IpAddr, remote: IpAddr },
    /// A peer's line address whose own underlay probes arrive here (not a
    /// target: [`Prober::snapshot`] gives when it was last heard, as
    /// `last_reply`). An access point tells by it a member whose tunnel
    /// alone went quiet from one switching lines.
    Heard { remote: IpAddr },
}

impl Key {
    pub fn tunnel(segment: &str, peer: &str) -> Key {
        Key::Tunnel { segment: segment.to_string(), peer: peer.to_string() }
    }
}

/// One thing to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: Key,
    /// The interface the probes leave by: the tunnel, or the local line's.
    pub interface: String,
    /// The probes' source and where the peer's probes arrive: this router's
    /// tunnel address in the segment (answers must come from it: WireGuard
    /// accepts from a peer only its own addresses), or the line's address.
    pub local: IpAddr,
    /// The peer's tunnel address in this segment, or its line's address.
    pub address: IpAddr,
    pub interval: Duration,
    pub multiplier: u32,
    /// An access point's member site: alive whenever its own probes arrive
    /// (it probes its access points every interval anyway), and probed
    /// only every [`MEMBER_SLOWDOWN`] intervals — enough to start a
    /// handshake after a restart and to measure its round trip — so an
    /// access point's probing grows slowly with its members.
    pub member: bool,
}

/// How much more slowly an access point probes its member sites than its
/// other peers (see [`Target::member`]).
pub const MEMBER_SLOWDOWN: u32 = 4;

/// A probe setting's interval and multiplier as probing uses them (at
/// least 10 ms, at least once).
pub fn timing(probe: pb::ProbeSettings) -> (Duration, u32) {
    (Duration::from_millis(u64::from(probe.interval_ms.max(10))), probe.multiplier.max(1))
}

impl Target {
    fn new(key: Key, interface: &str, local: IpAddr, address: IpAddr, probe: pb::ProbeSettings) -> Target {
        let (interval, multiplier) = timing(probe);
        Target { key, interface: interface.to_string(), local, address, interval, multiplier, member: false }
    }

    /// How often this target is probed.
    pub fn every(&self) -> Duration {
        if self.member { self.interval * MEMBER_SLOWDOWN } else { self.interval }
    }
}

/// Probes sent per second for `targets`.
pub fn probes_per_second(targets: &[Target]) -> f64 {
    targets.iter().map(|t| 1.0 / t.every().as_secs_f64()).sum()
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Since when it has been up (or down).
    pub since: Option<Instant>,
    pub rtt_us: u32,
    pub loss_permille: u32,
    /// When it last answered.
    pub last_reply: Option<Instant>,
    /// How often it is probed.
    pub interval: Duration,
    /// While it is judged down: since when it had been up before (given
    /// back as `since` if the judgment proves wrong — see [`Answer::late`]).
    pub up_before: Option<Instant>,
}

/// One line per target, for a debug log: up or down, for how long, and how
/// long ago it last answered (milliseconds before `now`).
pub fn describe(health: &BTreeMap<Key, Health>, now: Instant) -> String {
    let ago = |t: Option<Instant>| {
        t.map_or_else(|| "never".to_string(), |t| now.saturating_duration_since(t).as_millis().to_string())
    };
    health
        .iter()
        .map(|(k, h)| {
            let name = match k {
                Key::Tunnel { segment, peer } => format!("{segment}/{peer}"),
                Key::Path { local, remote } => format!("{local}->{remote}"),
                Key::Heard { remote } => format!("heard {remote}"),
            };
            format!("{name} {} since {} last {}", if h.up { "up" } else { "down" }, ago(h.since), ago(h.last_reply))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Health by target.
pub type Healths = Arc<Mutex<BTreeMap<Key, Health>>>;

/// When each peer line address's underlay probes last arrived.
pub type Heard = Arc<Mutex<HashMap<IpAddr, Instant>>>;

fn note_heard(heard: &Heard, from: IpAddr) {
    heard.lock().unwrap_or_else(|p| p.into_inner()).insert(from, Instant::now());
}

/// The peers a configuration asks to probe: every peer with a key, at its
/// tunnel address, with the timing of its first path.
pub fn targets(config: &SiteConfig) -> Vec<Target> {
    let default = config.probe.unwrap_or_default();
    let mut out = Vec::new();
    for seg in &config.segments {
        for p in seg.peers.iter().filter(|p| !p.public_key.is_empty()) {
            // The peer's own tunnel, from this router's tunnel address on it.
            let Some(wg) = seg.tunnels.iter().find(|t| t.name == p.interface) else { continue };
            let Some(local) =
                wg.addresses.iter().find_map(|a| a.split('/').next()?.parse::<IpAddr>().ok().filter(IpAddr::is_ipv4))
            else {
                continue;
            };
            let address = p.allowed_prefixes.iter().find_map(|a| {
                let (ip, len) = a.split_once('/')?;
                let ip: IpAddr = ip.parse().ok()?;
                (ip.is_ipv4() && len == "32").then_some(ip)
            });
            let Some(address) = address else { continue };
            let probe = p.endpoints.first().and_then(|e| e.probe).unwrap_or(default);
            let mut t = Target::new(Key::tunnel(&seg.segment, &p.name), &wg.name, local, address, probe);
            t.member = p.role() == pb::PeerRole::Site;
            out.push(t);
        }
    }
    out
}

/// The underlay paths a configuration asks to probe: every endpoint of an
/// access point (seen from a site, or from the other access point), once per (local line address, peer
/// line address), where `hops` knows how the outer packets would leave.
pub fn path_targets(config: &SiteConfig, hops: &Hops) -> Vec<Target> {
    let default = config.probe.unwrap_or_default();
    let mut out: Vec<Target> = Vec::new();
    for (e, (local, remote)) in underlay(config) {
        let key = Key::Path { local, remote };
        let Some(hop) = hops.get(&(local, remote)) else { continue };
        if !out.iter().any(|t| t.key == key) {
            out.push(Target::new(key, &hop.interface, local, remote, e.probe.unwrap_or(default)));
        }
    }
    out
}

/// Every target a configuration asks to probe, by key.
pub fn keys(config: &SiteConfig, hops: &Hops) -> BTreeSet<Key> {
    targets(config).into_iter().chain(path_targets(config, hops)).map(|t| t.key).collect()
}

/// The (local line address, peer line address) pairs of [`path_targets`]
/// and of the peers this router follows, for resolving their hops.
pub fn paths(config: &SiteConfig) -> Vec<(IpAddr, IpAddr)> {
    let pairs: BTreeSet<(IpAddr, IpAddr)> =
        underlay(config).map(|(_, pair)| pair).chain(crate::reconcile::followed_paths(config)).collect();
    pairs.into_iter().collect()
}

/// Every endpoint of an access point in `config`, with its underlay path.
fn underlay(config: &SiteConfig) -> impl Iterator<Item = (&pb::Endpoint, (IpAddr, IpAddr))> {
    config
        .segments
        .iter()
        .flat_map(|s| s.peers.iter().filter(|p| probes_lines(p)))
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| Some((e, path(config, e)?)))
}

/// The line addresses of every peer: whose underlay probes this router answers.
pub fn known_lines(config: &SiteConfig) -> BTreeSet<IpAddr> {
    config
        .segments
        .iter()
        .flat_map(|s| &s.peers)
        .flat_map(|p| &p.endpoints)
        .filter_map(|e| e.address.parse().ok())
        .collect()
}

/// What the prober is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Work {
    targets: Vec<Target>,
    answer: Arc<BTreeSet<IpAddr>>,
}

/// The probing of one agent: give it targets, read health.
#[derive(Debug)]
pub struct Prober {
    work: watch::Sender<Work>,
    pub health: Healths,
    /// When the peers' line addresses were last heard.
    heard: Heard,
    /// Woken when a peer goes up or down.
    pub changed: Arc<Notify>,
    /// Bumped to have every socket probe its targets at once: (every
    /// kick, the kicks that include member sites).
    kick: watch::Sender<(u64, u64)>,
}

impl Prober {
    /// Starts probing (nothing until targets are set).
    pub fn start() -> Prober {
        let (tx, rx) = watch::channel(Work::default());
        let health: Healths = Arc::default();
        let heard: Heard = Arc::default();
        let changed = Arc::new(Notify::new());
        let (kick, kicked) = watch::channel((0, 0));
        tokio::spawn(supervise(rx, health.clone(), heard.clone(), changed.clone(), kicked));
        Prober { work: tx, health, heard, changed, kick }
    }

    /// Probes every target (but member sites) at once, off schedule: after a
    /// line switch, so that the peers the site sends nothing else to (the
    /// other region's access point, which reaches the site directly) hear
    /// from its new line now, and roam to it, rather than at their next
    /// probe (up to an interval later: 26–34 ms of every line cut, towards
    /// the site).
    pub fn probe_now(&self) {
        self.kick.send_modify(|n| n.0 = n.0.wrapping_add(1));
    }

    /// Probes every target at once, member sites too: after a key switch,
    /// so that every peer's new session starts now. WireGuard starts a
    /// handshake for the first packet to a peer without a session; a peer
    /// that took the new key before this router switched had its own
    /// attempt refused and tries again only after 5 s, and an access point
    /// probes its members only every few intervals.
    pub fn probe_all_now(&self) {
        self.kick.send_modify(|n| {
            n.0 = n.0.wrapping_add(1);
            n.1 = n.1.wrapping_add(1);
        });
    }

    /// Probes `targets` and answers the underlay probes of `answer`'s addresses.
    pub fn set(&self, targets: Vec<Target>, answer: BTreeSet<IpAddr>) {
        let work = Work { targets, answer: Arc::new(answer) };
        self.work.send_if_modified(|w| {
            let differs = *w != work;
            *w = work;
            differs
        });
    }

    /// Probes what `config` asks for (its tunnels' peers and, where `hops`
    /// knows the way, the underlay paths to access points).
    pub fn set_for(&self, config: &SiteConfig, hops: &Hops) {
        let mut all = targets(config);
        all.extend(path_targets(config, hops));
        self.set(all, known_lines(config));
    }

    pub fn get(&self, key: &Key) -> Option<Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    /// Every target's health, and when each peer line address was last
    /// heard ([`Key::Heard`], always up: it never flips).
    pub fn snapshot(&self) -> BTreeMap<Key, Health> {
        let mut out = self.health.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(heard.iter().map(|(remote, at)| {
            (Key::Heard { remote: *remote }, Health { up: true, last_reply: Some(*at), ..Health::default() })
        }));
        out
    }
}

async fn supervise(
    mut rx: watch::Receiver<Work>,
    health: Healths,
    heard: Heard,
    changed: Arc<Notify>,
    kicked: watch::Receiver<(u64, u64)>,
) {
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        let Work { targets, answer } = rx.borrow_and_update().clone();
        for t in tasks.drain(..) {
            t.abort();
        }
        {
            let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
            h.retain(|key, _| targets.iter().any(|t| &t.key == key));
            heard.lock().unwrap_or_else(|p| p.into_inner()).retain(|a, _| answer.contains(a));
        }
        let mut by_socket: BTreeMap<(String, IpAddr), Vec<Target>> = BTreeMap::new();
        for t in targets {
            by_socket.entry((t.interface.clone(), t.local)).or_default().push(t);
        }
        for ((interface, local), targets) in by_socket {
            // Underlay sockets answer only the peers' line addresses.
            let only = matches!(targets[0].key, Key::Path { .. }).then(|| answer.clone());
            let shared = Shared { health: health.clone(), heard: heard.clone(), changed: changed.clone() };
            let task = socket_loop(interface, local, targets, only, shared, kicked.clone());
            tasks.push(tokio::spawn(task));
        }
        if !answer.is_empty() {
            tasks.push(tokio::spawn(answer_loop(answer, heard.clone())));
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn socket(interface: Option<&str>, local: IpAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(SocketAddr::new(local, PORT)), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    if local.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if let Some(interface) = interface {
        s.bind_device(Some(interface.as_bytes()))?;
    }
    s.bind(&SocketAddr::new(local, PORT).into())?;
    s.set_nonblocking(true)?;
    UdpSocket::from_std(s.into())
}

/// Answers underlay probes arriving at any address, from `answer`'s only,
/// noting when each was heard.
async fn answer_loop(answer: Arc<BTreeSet<IpAddr>>, heard: Heard) {
    let wildcard = [IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])];
    let mut socks = Vec::new();
    for local in wildcard {
        match socket(None, local) {
            Ok(s) => socks.push(s),
            Err(e) => tracing::warn!(%local, error = %e, "cannot answer underlay probes"),
        }
    }
    let serve = |sock: UdpSocket| {
        let (answer, heard) = (answer.clone(), heard.clone());
        async move {
            let mut buf = [0u8; 64];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else { continue };
                let ip = from.ip().to_canonical();
                if n >= 17 && buf[0] == REQUEST && answer.contains(&ip) {
                    note_heard(&heard, ip);
                    buf[0] = REPLY;
                    let _ = sock.send_to(&buf[..17], from).await;
                }
            }
        }
    };
    futures::future::join_all(socks.into_iter().map(serve)).await;
}

/// Per target: when it last answered, and the last probes (sent at, answered).
struct State {
    /// When probing began: a peer is not judged before one detection time.
    started: Instant,
    last_reply: Option<Instant>,
    sent: VecDeque<(u64, Instant, bool)>,
    next: Instant,
}

impl State {
    /// Notes probe `seq` sent at `now`, keeping the last few for the loss window.
    fn sent_at(&mut self, seq: u64, now: Instant) {
        self.sent.push_back((seq, now, false));
        while self.sent.len() > WINDOW + 8 {
            self.sent.pop_front();
        }
    }
}

/// What every socket's loop writes to.
struct Shared {
    health: Healths,
    heard: Heard,
    changed: Arc<Notify>,
}

async fn socket_loop(
    interface: String,
    local: IpAddr,
    targets: Vec<Target>,
    only: Option<Arc<BTreeSet<IpAddr>>>,
    shared: Shared,
    mut kicked: watch::Receiver<(u64, u64)>,
) {
    // The interface may appear a moment after the configuration.
    let sock = loop {
        match socket(Some(&interface), local) {
            Ok(s) => break s,
            Err(e) => {
                tracing::debug!(interface, error = %e, "probe socket not ready");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let epoch = Instant::now();
    let tick = tick(&targets);
    let mut ticker = tokio::time::interval(tick);
    let mut states = first_states(&targets, Instant::now());
    let by_address: std::collections::HashMap<IpAddr, usize> =
        targets.iter().enumerate().map(|(i, t)| (t.address, i)).collect();
    let mut seq: u64 = 0;
    let mut buf = [0u8; 64];
    let mut ctx = Context {
        targets: &targets,
        states: &mut states,
        by_address: &by_address,
        only: only.as_deref(),
        health: &shared.health,
        heard: &shared.heard,
        changed: &shared.changed,
    };
    let mut members_kicked = kicked.borrow_and_update().1;
    let mut kick_open = true;
    loop {
        let deadline = next_deadline(ctx.targets, ctx.states, Instant::now());
        tokio::select! {
            // Off schedule, every target at once (see `Prober::probe_now`);
            // the schedule stands.
            kick = kicked.changed(), if kick_open => {
                if kick.is_err() {
                    kick_open = false;
                    continue;
                }
                let now = Instant::now();
                let all = kicked.borrow_and_update().1;
                let members = std::mem::replace(&mut members_kicked, all) != all;
                for (t, st) in ctx.targets.iter().zip(ctx.states.iter_mut()).filter(|(t, _)| members || !t.member) {
                    seq += 1;
                    let _ = sock.try_send_to(&request(seq, now - epoch), SocketAddr::new(t.address, PORT));
                    st.sent_at(seq, now);
                }
            }
            // A target that stops answering is judged at its detection time,
            // not at the tick after it (which came up to a tick late, and a
            // whole tick late every time: the tick that sends the last probe
            // before the detection time falls short of it by the reply's
            // round trip).
            _ = until(deadline) => {
                drain(&sock, &mut buf, &mut ctx);
                evaluate(ctx.targets, ctx.states, ctx.health, ctx.changed, None);
            }
            _ = ticker.tick() => {
                drain(&sock, &mut buf, &mut ctx);
                let now = Instant::now();
                for (t, st) in ctx.targets.iter().zip(ctx.states.iter_mut()) {
                    if now + tick / 2 >= st.next {
                        seq += 1;
                        let _ = sock.send_to(&request(seq, now - epoch), SocketAddr::new(t.address, PORT)).await;
                        st.sent_at(seq, now);
                        // On a fixed schedule: `now + every` would slip
                        // behind a tick that comes a little early and skip
                        // it, probing every other tick.
                        st.next += t.every();
                        if st.next <= now {
                            st.next = now + t.every();
                        }
                    }
                }
                evaluate(ctx.targets, ctx.states, ctx.health, ctx.changed, None);
            }
            received = sock.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                if let Some(to) = take(&mut buf[..n], from, &mut ctx) {
                    let _ = sock.send_to(&buf[..17], to).await;
                }
            }
        }
    }
}

/// The targets' states before their first probe, which goes out spread
/// over an interval: target `i` of `n` at `i / n` of it. Probes sent
/// together go quiet together: the paths over one line to two access
/// points, sent in the same tick, were judged down within a millisecond of
/// each other, 100–150 ms after a cut, whereas half an interval apart one
/// of them is judged a quarter of an interval sooner on average (and an
/// access point's thousands of members are not probed in one burst).
fn first_states(targets: &[Target], now: Instant) -> Vec<State> {
    let n = u32::try_from(targets.len()).unwrap_or(u32::MAX).max(1);
    targets
        .iter()
        .enumerate()
        .map(|(i, t)| State {
            started: now,
            last_reply: None,
            sent: VecDeque::new(),
            next: now + t.every() * u32::try_from(i).unwrap_or(u32::MAX) / n,
        })
        .collect()
}

/// A probe: its sequence number and when it was sent.
fn request(seq: u64, since_epoch: Duration) -> [u8; 17] {
    let mut msg = [0u8; 17];
    msg[0] = REQUEST;
    msg[1..9].copy_from_slice(&seq.to_be_bytes());
    msg[9..17].copy_from_slice(&since_epoch.as_nanos().min(u128::from(u64::MAX)).to_be_bytes()[8..]);
    msg
}

/// Takes what has arrived on `sock`, before anything is judged: after the
/// agent was held up (a busy machine), a tick (or a detection time) and the
/// replies are ready together, and judging first declared every target
/// down, then up again a moment later — and a route group moved on the way
/// (flapping-line, 3.1 s).
fn drain(sock: &UdpSocket, buf: &mut [u8; 64], ctx: &mut Context<'_>) {
    for _ in 0..DRAIN_LIMIT {
        let Ok((n, from)) = sock.try_recv_from(buf) else { break };
        if let Some(to) = take(&mut buf[..n], from, ctx) {
            let _ = sock.try_send_to(&buf[..17], to);
        }
    }
}

/// The next detection time of `targets` still up at `now` — each one's last
/// answer plus interval × multiplier, and a millisecond — for a socket of
/// few targets (the many of an access point are judged at its ticks).
fn next_deadline(targets: &[Target], states: &[State], now: Instant) -> Option<Instant> {
    if targets.len() > FINE_TARGETS {
        return None;
    }
    targets
        .iter()
        .zip(states)
        .filter(|(t, _)| !t.member)
        .filter_map(|(t, st)| Some(st.last_reply? + t.interval * t.multiplier + Duration::from_millis(1)))
        .filter(|at| *at > now)
        .min()
}

/// Sleeps until `at`; forever without one.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Targets at most that a socket judges at a fifth of their interval.
const FINE_TARGETS: usize = 64;

/// How often a socket's loop sends what is due and judges its targets: a
/// fifth of the shortest interval (at least 10 ms), so a target is judged
/// down within a fifth of an interval of its detection time, as BFD's
/// timer would; a socket of many targets (an access point's members) at
/// the shortest interval, at most 50 ms, as judging thousands of targets
/// costs.
fn tick(targets: &[Target]) -> Duration {
    let shortest = targets.iter().map(|t| t.interval).min().unwrap_or(Duration::from_millis(100));
    if targets.len() <= FINE_TARGETS {
        (shortest / 5).max(Duration::from_millis(10)).min(shortest)
    } else {
        shortest.min(Duration::from_millis(50))
    }
}

/// What a socket's loop reads and judges with.
struct Context<'a> {
    targets: &'a [Target],
    states: &'a mut [State],
    by_address: &'a std::collections::HashMap<IpAddr, usize>,
    only: Option<&'a BTreeSet<IpAddr>>,
    health: &'a Healths,
    heard: &'a Heard,
    changed: &'a Notify,
}

/// Takes one message: a reply (its target answered) or a request from a
/// peer (a member's probe is its sign of life). Returns where to send the
/// request back as a reply (`msg[..17]`, turned into one), if it is one.
fn take(msg: &mut [u8], from: SocketAddr, ctx: &mut Context<'_>) -> Option<SocketAddr> {
    if msg.len() < 17 {
        return None;
    }
    match msg[0] {
        REQUEST if ctx.only.is_none_or(|o| o.contains(&from.ip())) => {
            msg[0] = REPLY;
            // An underlay socket's request: a peer's line is heard.
            if ctx.only.is_some() {
                note_heard(ctx.heard, from.ip());
            }
            if let Some(&i) = ctx.by_address.get(&from.ip())
                && ctx.targets[i].member
            {
                ctx.states[i].last_reply = Some(Instant::now());
                evaluate(&ctx.targets[i..=i], &ctx.states[i..=i], ctx.health, ctx.changed, None);
            }
            Some(from)
        }
        REPLY => {
            let &i = ctx.by_address.get(&from.ip())?;
            let mut s = [0u8; 8];
            s.copy_from_slice(&msg[1..9]);
            let got = u64::from_be_bytes(s);
            let now = Instant::now();
            let st = &mut ctx.states[i];
            // The first probe sent after the last answer: if this answers
            // it, no probe was lost — only answered late.
            let first_since_last = st.sent.iter().find(|e| st.last_reply.is_some_and(|l| e.1 > l)).map(|e| e.0);
            let late = first_since_last == Some(got);
            let mut rtt = None;
            for entry in st.sent.iter_mut().filter(|e| e.0 == got) {
                entry.2 = true;
                rtt = Some(now - entry.1);
            }
            st.last_reply = Some(now);
            // Only this target can have changed.
            let answer = rtt.map(|rtt| Answer { index: 0, rtt, late });
            evaluate(&ctx.targets[i..=i], &ctx.states[i..=i], ctx.health, ctx.changed, answer);
            None
        }
        _ => None,
    }
}

/// Whether `t` is up at `now`: it answered within its detection time
/// (interval × multiplier), or fewer than `multiplier` probes have gone to
/// it since it last answered — as BFD counts missed packets, not time. A
/// peer is judged only on probes it was sent: when the whole machine was
/// held up (a busy host; every lab node at once in a drill), this loop sent
/// nothing either, and judging by time alone declared every target down at
/// once and up again 6 ms later — a route group moved for a hold-down on
/// the way. A member site is alive whenever its own probes arrive, and is
/// probed too rarely to count probes: it is judged by time.
fn judged_up(t: &Target, st: &State, now: Instant) -> bool {
    let Some(last) = st.last_reply else { return false };
    if now.saturating_duration_since(last) <= t.interval * t.multiplier {
        return true;
    }
    let unanswered = st.sent.iter().filter(|e| e.1 > last).count();
    !t.member && unanswered < t.multiplier as usize
}

/// An answer a target's judgment follows.
#[derive(Debug, Clone, Copy)]
struct Answer {
    /// Which of the targets judged answered.
    index: usize,
    rtt: Duration,
    /// It answers the first probe sent after the target's previous answer:
    /// nothing was lost, the answers were only slow (a busy host held them
    /// up). A target judged down in between was judged wrongly: it gets
    /// back the `since` of its time up, as if it had never been down, and
    /// what moved away from it may move back at once — instead of every
    /// quiet tunnel waiting to see whether its answers were only late
    /// before its groups move (20 ms of every tunnel lost alone).
    late: bool,
}

/// Which of a socket's underlay paths failed with another one: a path over
/// the same local line was judged down, and this one went quiet about when
/// it did (its last answer not clearly later: within an interval) and has
/// missed two probes since. The line under both failed; the paths over one
/// line to two access points are probed half an interval apart, and
/// without this the second was judged up to an interval after the first —
/// the traffic to that access point (a fibre cut: the flows in from the
/// other region) stayed on the dead line that much longer. Nothing is kept:
/// it holds while the first path is down and this one silent, and each is
/// judged on its own again as soon as it answers.
/// `own` is each target's own judgment ([`judged_up`]).
fn failed_with_their_line(targets: &[Target], states: &[State], own: &[bool], now: Instant) -> Vec<bool> {
    let is_path = |t: &Target| !t.member && matches!(t.key, Key::Path { .. });
    // The last answers of the paths judged down.
    let down: Vec<(usize, Instant)> = targets
        .iter()
        .zip(states)
        .enumerate()
        .filter(|(i, (t, _))| is_path(t) && !own[*i])
        .filter_map(|(i, (_, st))| Some((i, st.last_reply?)))
        .collect();
    targets
        .iter()
        .zip(states)
        .enumerate()
        .map(|(i, (t, st))| {
            let Some(last) = st.last_reply.filter(|_| is_path(t) && !down.is_empty()) else { return false };
            let silent = now.saturating_duration_since(last) >= t.interval * 2;
            let missed = st.sent.iter().filter(|e| e.1 > last).count() >= 2;
            silent
                && missed
                && down.iter().any(|&(j, quiet)| j != i && last <= quiet + t.interval.max(targets[j].interval))
        })
        .collect()
}

fn evaluate(targets: &[Target], states: &[State], health: &Healths, changed: &Notify, answer: Option<Answer>) {
    let now = Instant::now();
    let own: Vec<bool> = targets.iter().zip(states).map(|(t, st)| judged_up(t, st, now)).collect();
    let with_line = if targets.len() > 1 { failed_with_their_line(targets, states, &own, now) } else { Vec::new() };
    let mut h = health.lock().unwrap_or_else(|p| p.into_inner());
    let mut flipped = false;
    for (i, (t, st)) in targets.iter().zip(states).enumerate() {
        let detect = t.interval * t.multiplier;
        // A peer that has never answered is not judged before the grace
        // (keys and the first handshake take a moment): neither up nor down.
        if st.last_reply.is_none() && now - st.started <= detect.max(GRACE) {
            continue;
        }
        let line_failed = with_line.get(i).copied().unwrap_or(false);
        let up = own[i] && !line_failed;
        // Probes old enough to have been answered.
        let settled: Vec<bool> =
            st.sent.iter().filter(|e| e.2 || now - e.1 > detect).map(|e| e.2).rev().take(WINDOW).collect();
        let lost = settled.iter().filter(|a| !**a).count();
        let loss_permille = if settled.is_empty() { 0 } else { (lost * 1000 / settled.len()) as u32 };
        let entry = h.entry(t.key.clone()).or_default();
        let late = answer.is_some_and(|a| a.index == i && a.late);
        if up && !entry.up && late && entry.up_before.is_some() {
            entry.since = entry.up_before.take();
            tracing::debug!(key = ?t.key, "answers were late, not lost: up all along");
        } else if entry.up != up || entry.since.is_none() {
            entry.up_before = if entry.up && !up { entry.since } else { None };
            entry.since = Some(now);
        }
        if entry.up != up {
            flipped = true;
            let state = if up { "up" } else { "down" };
            match &t.key {
                Key::Tunnel { segment, peer } => tracing::info!(%segment, %peer, up, "peer {state}"),
                Key::Path { local, remote } => {
                    tracing::info!(%local, %remote, interface = %t.interface, up, line_failed, "line path {state}")
                }
                Key::Heard { .. } => {}
            }
        }
        entry.up = up;
        entry.loss_permille = loss_permille;
        entry.last_reply = st.last_reply;
        entry.interval = t.interval;
        if let Some(a) = answer
            && a.index == i
        {
            entry.rtt_us = u32::try_from(a.rtt.as_micros()).unwrap_or(u32::MAX);
        }
    }
    drop(h);
    if flipped {
        changed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn targets(n: usize, interval_ms: u32) -> Vec<Target> {
        (0..n)
            .map(|i| {
                let probe = pb::ProbeSettings { interval_ms, multiplier: 3 };
                let address = IpAddr::from([100, 64, (i / 256) as u8, (i % 256) as u8]);
                Target::new(Key::tunnel("office", &format!("s{i}")), "mm-office", address, address, probe)
            })
            .collect()
    }

    /// A socket's targets are first probed spread over their interval, not
    /// all in one tick.
    #[test]
    fn first_probes_are_spread_over_the_interval() {
        let now = Instant::now();
        let two = first_states(&targets(2, 50), now);
        assert_eq!(two.iter().map(|s| s.next - now).collect::<Vec<_>>(), [Duration::ZERO, Duration::from_millis(25)]);
        let many = first_states(&targets(2000, 50), now);
        let every = targets(1, 50)[0].every();
        assert!(many.iter().all(|s| s.next >= now && s.next < now + every));
        assert_eq!(many[1000].next - now, every / 2, "half of them in the first half");
    }

    /// A target judged down whose answers then arrive late — the first
    /// probe sent after its last answer is answered, so none was lost — is
    /// up all along: it gets back the `since` of its time up. One whose
    /// first probes went unanswered and a later one is answered is up anew.
    #[test]
    fn late_answers_undo_a_wrong_judgment_and_a_real_return_is_up_anew() {
        let ms = Duration::from_millis;
        let reply = |seq: u64| {
            let mut msg = [0u8; 17];
            msg[0] = REPLY;
            msg[1..9].copy_from_slice(&seq.to_be_bytes());
            msg
        };
        for (answered, late) in [(1u64, true), (3, false)] {
            let targets = targets(1, 50);
            let from = SocketAddr::new(targets[0].address, PORT);
            let key = targets[0].key.clone();
            let now = Instant::now();
            let up_since = now - ms(60_000);
            let health: Healths = Arc::default();
            health.lock().expect("lock").insert(
                key.clone(),
                Health { up: true, since: Some(up_since), interval: ms(50), ..Default::default() },
            );
            // Answered 300 ms ago; the three probes since, unanswered.
            let mut states = vec![State {
                started: now - ms(60_000),
                last_reply: Some(now - ms(300)),
                sent: [(1, 250), (2, 200), (3, 150)].iter().map(|&(seq, ago)| (seq, now - ms(ago), false)).collect(),
                next: now,
            }];
            let changed = Notify::new();
            evaluate(&targets, &states, &health, &changed, None);
            let down = health.lock().expect("lock")[&key].clone();
            assert!(!down.up, "three probes unanswered for 300 ms: down");
            assert_eq!(down.up_before, Some(up_since), "its time up is kept while it is down");
            let by_address: HashMap<IpAddr, usize> = [(targets[0].address, 0)].into_iter().collect();
            let heard: Heard = Arc::default();
            let mut ctx = Context {
                targets: &targets,
                states: &mut states,
                by_address: &by_address,
                only: None,
                health: &health,
                heard: &heard,
                changed: &changed,
            };
            let mut msg = reply(answered);
            assert_eq!(take(&mut msg, from, &mut ctx), None, "a reply is not answered");
            let back = health.lock().expect("lock")[&key].clone();
            assert!(back.up, "probe {answered} answered: up");
            if late {
                assert_eq!(back.since, Some(up_since), "answers late, none lost: up all along");
            } else {
                assert!(back.since.is_some_and(|s| s > down.since.expect("down since")), "up anew: {back:?}");
            }
            assert_eq!(back.up_before, None);
        }
    }

    /// Down after `multiplier` probes unanswered and the detection time:
    /// a stall of the whole machine (no probe sent) judges nothing down.
    #[test]
    fn a_target_is_down_after_its_probes_went_unanswered_not_after_a_stall() {
        let t0 = Instant::now();
        let t = &targets(1, 50)[0];
        let ms = Duration::from_millis;
        let state = |sent: &[u64]| State {
            started: t0,
            last_reply: Some(t0),
            sent: sent.iter().map(|&at| (at, t0 + ms(at), false)).collect(),
            next: t0,
        };
        // Probes every 50 ms after the last answer, none answered.
        let st = state(&[50, 100, 150]);
        assert!(judged_up(t, &st, t0 + ms(150)), "within the detection time");
        assert!(!judged_up(t, &st, t0 + ms(160)), "three probes unanswered and 160 ms");
        // The machine was held up 400 ms after one probe: nothing else went out.
        let st = state(&[50]);
        assert!(judged_up(t, &st, t0 + ms(450)), "one probe unanswered is not a peer gone");
        let st = state(&[50, 460, 470]);
        assert!(!judged_up(t, &st, t0 + ms(470)), "three are");
        // A member site is judged by time: it is probed rarely.
        let mut member = t.clone();
        member.member = true;
        assert!(!judged_up(&member, &state(&[50]), t0 + ms(160)));
        // Never answered: not up.
        assert!(!judged_up(t, &State { last_reply: None, ..state(&[]) }, t0 + ms(10)));
    }

    /// A line cut: the path over it to one access point is judged down
    /// and the path over the same line to the other one, probed half an
    /// interval later, goes down with it (not an interval later on its
    /// own). Not when the other path answered after the first went quiet
    /// (only that access point failed), nor when it missed fewer than two
    /// probes (a stall sent nothing), nor for a tunnel; and each is judged
    /// on its own again once it answers.
    #[test]
    fn a_path_goes_down_with_its_line_when_a_sibling_over_it_is_judged_down() {
        let ms = Duration::from_millis;
        let now = Instant::now();
        let t0 = now - ms(151);
        let local = IpAddr::from([192, 0, 2, 10]);
        let probe = pb::ProbeSettings { interval_ms: 50, multiplier: 3 };
        let path = |last: u8| {
            let remote = IpAddr::from([198, 51, 100, last]);
            Target::new(Key::Path { local, remote }, "eth1", local, remote, probe)
        };
        let targets = vec![path(1), path(2), Target::new(Key::tunnel("office", "ap"), "eth1", local, local, probe)];
        // Last answered at `last` ms after t0, probes sent at `sent`.
        let state = |last: u64, sent: &[u64]| State {
            started: t0 - ms(60_000),
            last_reply: Some(t0 + ms(last)),
            sent: sent.iter().enumerate().map(|(i, &at)| (i as u64, t0 + ms(at), false)).collect(),
            next: now,
        };
        let judge = |states: &[State]| {
            let health: Healths = Arc::default();
            for t in &targets {
                health.lock().expect("lock").insert(
                    t.key.clone(),
                    Health { up: true, since: Some(t0 - ms(60_000)), interval: ms(50), ..Default::default() },
                );
            }
            evaluate(&targets, states, &health, &Notify::new(), None);
            let h = health.lock().expect("lock");
            targets.iter().map(|t| h[&t.key].up).collect::<Vec<_>>()
        };
        // The cut: the first path last answered at 0 (probes at 50, 100,
        // 150 unanswered: down by itself), the second at 25 (probes at 75,
        // 125 unanswered, 126 ms silent), the tunnel at 20 likewise.
        let cut = [state(0, &[50, 100, 150]), state(25, &[75, 125]), state(20, &[70, 120])];
        assert_eq!(judge(&cut), [false, false, true], "both paths over the line down together");
        // Only the first access point failed: the second path answered
        // since (at 125 ms, clearly after the first went quiet).
        let one = [state(0, &[50, 100, 150]), state(125, &[125]), state(20, &[70, 120])];
        assert_eq!(judge(&one), [false, true, true]);
        // Quiet for long, but went quiet much later than the first (its
        // access point died earlier): its own judgment decides.
        let later = [state(0, &[50, 100, 150]), state(60, &[75, 125]), state(20, &[70, 120])];
        assert_eq!(judge(&later), [false, true, true], "last answer more than an interval after the first's");
        // A stall: the second sent one probe since its answer.
        let stalled = [state(0, &[50, 100, 150]), state(25, &[75]), state(20, &[70, 120])];
        assert_eq!(judge(&stalled), [false, true, true]);
        // The first answers again: the second, not yet judged on its own, is up.
        let back = [state(150, &[50, 100, 150]), state(25, &[75, 125]), state(20, &[70, 120])];
        assert_eq!(judge(&back), [true, true, true]);
    }

    /// A site's few targets are judged every fifth of their interval (down
    /// within 10 ms of 50 ms × 3, not within 50); an access point's
    /// thousands of members at the interval, at most 50 ms.
    #[test]
    fn few_targets_are_judged_finely_and_many_at_their_interval() {
        assert_eq!(tick(&targets(2, 50)), Duration::from_millis(10));
        assert_eq!(tick(&targets(2, 300)), Duration::from_millis(60));
        assert_eq!(tick(&targets(2, 20)), Duration::from_millis(10), "never below 10 ms");
        assert_eq!(tick(&targets(2000, 50)), Duration::from_millis(50));
        assert_eq!(tick(&targets(2000, 300)), Duration::from_millis(50));
    }

    /// A member site is left out of `probe_now` (an access point's
    /// thousands) and probed by `probe_all_now` (after a key switch).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probe_all_now_probes_the_member_sites_too() {
        let peer = std::net::UdpSocket::bind(("127.0.0.4", PORT)).expect("the member's socket");
        peer.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        let probe = pb::ProbeSettings { interval_ms: 10_000, multiplier: 3 };
        let local = IpAddr::from([127, 0, 0, 1]);
        let mut target = Target::new(Key::tunnel("office", "school"), "lo", local, IpAddr::from([127, 0, 0, 4]), probe);
        target.member = true;
        let prober = Prober::start();
        prober.set(vec![target], BTreeSet::new());
        let mut buf = [0u8; 64];
        let (n, _) = peer.recv_from(&mut buf).expect("the first probe");
        assert_eq!((n, buf[0]), (17, REQUEST));
        prober.probe_now();
        assert!(peer.recv_from(&mut buf).is_err(), "probe_now left the member alone");
        peer.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let asked = Instant::now();
        prober.probe_all_now();
        let (n, _) = peer.recv_from(&mut buf).expect("a probe at once");
        assert_eq!((n, buf[0]), (17, REQUEST));
        assert!(asked.elapsed() < Duration::from_secs(2), "not at its next interval: {:?}", asked.elapsed());
        // And once: the next kick without members leaves it alone again.
        peer.set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        prober.probe_now();
        assert!(peer.recv_from(&mut buf).is_err());
    }

    /// `probe_now` sends every target a probe at once, off its schedule
    /// (real sockets on the loopback; a target probed every 10 s).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn probe_now_probes_at_once() {
        let peer = std::net::UdpSocket::bind(("127.0.0.3", PORT)).expect("the peer's socket");
        peer.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let probe = pb::ProbeSettings { interval_ms: 10_000, multiplier: 3 };
        let local = IpAddr::from([127, 0, 0, 1]);
        let target = Target::new(Key::tunnel("office", "ap"), "lo", local, IpAddr::from([127, 0, 0, 3]), probe);
        let prober = Prober::start();
        prober.set(vec![target], BTreeSet::new());
        let mut buf = [0u8; 64];
        let (n, _) = peer.recv_from(&mut buf).expect("the first probe");
        assert_eq!((n, buf[0]), (17, REQUEST));
        let first = u64::from_be_bytes(buf[1..9].try_into().expect("seq"));
        let asked = Instant::now();
        prober.probe_now();
        let (n, _) = peer.recv_from(&mut buf).expect("a probe at once");
        assert_eq!((n, buf[0]), (17, REQUEST));
        assert!(u64::from_be_bytes(buf[1..9].try_into().expect("seq")) > first);
        assert!(asked.elapsed() < Duration::from_secs(2), "not at its next interval: {:?}", asked.elapsed());
    }

    /// A site's targets are judged at their detection time: the earliest
    /// last answer + interval × multiplier (+ 1 ms) of those that answered
    /// and are not past it; members and large sockets only at ticks.
    #[test]
    fn a_sites_targets_are_judged_at_their_detection_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let ts = targets(3, 50);
        let state = |last: Option<u64>| State {
            started: t0,
            last_reply: last.map(|l| t0 + ms(l)),
            sent: VecDeque::new(),
            next: t0,
        };
        let states = [state(Some(40)), state(Some(10)), state(None)];
        assert_eq!(next_deadline(&ts, &states, t0 + ms(100)), Some(t0 + ms(161)), "the earlier answer's");
        assert_eq!(next_deadline(&ts, &states, t0 + ms(170)), Some(t0 + ms(191)), "one past: the next");
        assert_eq!(next_deadline(&ts, &states, t0 + ms(200)), None, "every one past");
        let mut members = ts.clone();
        members.iter_mut().for_each(|t| t.member = true);
        assert_eq!(next_deadline(&members, &states, t0), None);
        let many = targets(FINE_TARGETS + 1, 50);
        let states: Vec<State> = many.iter().map(|_| state(Some(10))).collect();
        assert_eq!(next_deadline(&many, &states, t0), None);
    }
}
