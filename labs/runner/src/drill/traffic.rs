//! The drill's traffic: steady UDP streams between LAN hosts. Every packet
//! carries its stream and sequence number, so the outage of each flow is
//! measured from the gaps in what arrived; every host listens on every
//! stream's port, so a packet that reaches a host of another segment (the
//! lab numbers segments alike on purpose) is counted as a leak.

use std::sync::atomic::{AtomicU64, Ordering};
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
