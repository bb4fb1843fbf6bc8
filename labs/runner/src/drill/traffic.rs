//! The drill's traffic: steady UDP streams between LAN hosts. Every packet
//! carries its stream and sequence number, so the outage of each flow is
//! measured from the gaps in what arrived; every host listens on every
//! stream's port, so a packet that reaches a host of another segment (the
//! lab numbers segments alike on purpose) is counted as a leak.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::MAGIC;
use super::file::StreamSpec;
use crate::lab::Lab;

/// Runs `f` in a thread that has entered `node`'s network namespace (what
/// it creates, sockets, stays there).
pub(super) fn in_netns<T: Send>(lab: &Lab, node: &str, f: impl FnOnce() -> std::io::Result<T> + Send) -> Result<T> {
    let path = format!("/run/netns/{}", lab.ns(node));
    std::thread::scope(|s| {
        s.spawn(|| -> Result<T> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {path}"))?;
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("a thread entering {path} panicked"))?
    })
}

/// One running stream's record.
pub(super) struct Flow {
    pub(super) spec: StreamSpec,
    pub(super) sent: Mutex<Vec<u32>>,
    /// (sequence number, arrival) in µs since the drill began, at the receiver.
    pub(super) arrived: Mutex<Vec<(u64, u32)>>,
    pub(super) received: AtomicU64,
    /// Packets of this stream that reached a host of another segment, and
    /// another host of its own segment.
    pub(super) leaked: AtomicU64,
    pub(super) misdelivered: AtomicU64,
    /// Why a TCP stream's connection broke, if it did.
    pub(super) broken: Mutex<Option<String>>,
}

impl Flow {
    pub(super) fn new(spec: StreamSpec) -> Flow {
        Flow {
            spec,
            sent: Mutex::new(Vec::new()),
            arrived: Mutex::new(Vec::new()),
            received: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            misdelivered: AtomicU64::new(0),
            broken: Mutex::new(None),
        }
    }

    fn record(&self, seq: u64, started: Instant) {
        self.received.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut a) = self.arrived.lock() {
            a.push((seq, micros(started)));
        }
    }

    fn broke(&self, why: String) {
        if let Ok(mut b) = self.broken.lock() {
            b.get_or_insert(why);
        }
    }
}

/// A TCP stream's receiving end: accepts one connection on `listener` and
/// records every record that arrives over it, until `stop`.
pub(super) fn tcp_receiver(listener: TcpListener, flow: Arc<Flow>, stop: Arc<AtomicBool>, started: Instant) {
    let mut conn = None;
    while conn.is_none() && !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((c, _)) => conn = Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return flow.broke(format!("accepting: {e}")),
        }
    }
    let Some(mut conn) = conn else { return };
    if let Err(e) = conn.set_nonblocking(false).and_then(|()| conn.set_read_timeout(Some(Duration::from_millis(50)))) {
        return flow.broke(format!("setting up the connection: {e}"));
    }
    let (mut pending, mut buf) = (Vec::new(), [0u8; 4096]);
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            // The sender stops with the drill, maybe first: not a break.
            Ok(0) if stop.load(Ordering::Relaxed) => return,
            Ok(0) => return flow.broke("the sender closed the connection".into()),
            Ok(n) => {
                pending.extend_from_slice(&buf[..n]);
                let whole = pending.len() / 16 * 16;
                for record in pending[..whole].chunks(16) {
                    if let Some((_, seq)) = parse(record) {
                        flow.record(seq, started);
                    }
                }
                pending.drain(..whole);
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return flow.broke(format!("receiving: {e}")),
        }
    }
}

/// A stream's sending end: a packet (UDP) or a record (TCP) every
/// 1/rate s, until `stop`; each one's time goes to the flow's `sent`.
pub(super) fn sender(mut out: Sender, stream: u32, flow: Arc<Flow>, stop: Arc<AtomicBool>, started: Instant) {
    let interval = Duration::from_secs_f64(1.0 / f64::from(flow.spec.rate));
    let begin = Instant::now();
    let mut seq: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = begin + interval.mul_f64(seq as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let at = micros(started);
        match &mut out {
            // Sending fails while the host has no route: still a packet lost.
            Sender::Udp(sock, target) => {
                let _ = sock.send_to(&packet(stream, seq), *target);
            }
            Sender::Tcp(conn) => {
                if let Err(e) = conn.write_all(&packet(stream, seq)) {
                    // The receiver stops with the drill, maybe first, and
                    // closing a socket with data unread resets the
                    // connection: a broken pipe then is the drill's end
                    // (it failed policy-flow-during-ap-outage once, loaded).
                    if !stop.load(Ordering::Relaxed) {
                        flow.broke(format!("sending: {e}"));
                    }
                    return;
                }
            }
        }
        if let Ok(mut s) = flow.sent.lock() {
            s.push(at);
        }
        seq += 1;
    }
}

/// Where a sender's packets go.
pub(super) enum Sender {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream),
}

pub(super) fn packet(stream: u32, seq: u64) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[..4].copy_from_slice(MAGIC);
    p[4..8].copy_from_slice(&stream.to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p
}

pub(super) fn parse(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < 16 || &p[..4] != MAGIC {
        return None;
    }
    Some((u32::from_be_bytes(p[4..8].try_into().ok()?), u64::from_be_bytes(p[8..16].try_into().ok()?)))
}

pub(super) fn micros(since: Instant) -> u32 {
    u32::try_from(since.elapsed().as_micros()).unwrap_or(u32::MAX)
}

/// Waits until every flow has delivered at least 80 % of its rate for half a
/// second; returns how many packets each had sent by then.
pub(super) fn steady(flows: &[Arc<Flow>], limit: Duration) -> Result<Vec<usize>> {
    let begin = Instant::now();
    let mut last: Vec<u64> = flows.iter().map(|f| f.received.load(Ordering::Relaxed)).collect();
    let mut good = 0;
    while good < 5 {
        if begin.elapsed() > limit {
            let slow: Vec<String> = flows.iter().map(|f| format!("{} → {}", f.spec.from, f.spec.to)).collect();
            bail!("the streams did not flow steadily within {limit:?} ({})", slow.join(", "));
        }
        std::thread::sleep(Duration::from_millis(100));
        let now: Vec<u64> = flows.iter().map(|f| f.received.load(Ordering::Relaxed)).collect();
        let ok =
            flows.iter().zip(now.iter().zip(&last)).all(|(f, (n, l))| (n - l) * 10 >= u64::from(f.spec.rate) * 8 / 10);
        good = if ok { good + 1 } else { 0 };
        last = now;
    }
    Ok(flows.iter().map(|f| f.sent.lock().map(|s| s.len()).unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_carry_their_stream_and_number() {
        assert_eq!(parse(&packet(3, 77)), Some((3, 77)));
        assert_eq!(parse(b"something else entirely"), None);
    }
}
