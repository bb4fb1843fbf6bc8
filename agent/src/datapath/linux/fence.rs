//! The fence written through one long-lived `nft -i`.
//!
//! A line switch rewrites the fence (the two sets of line addresses not in
//! use, see [`super::nft`]) on the way to the new line, and traffic towards
//! the site waits for it: the access point's answers from its new line are
//! dropped until then. A fresh `nft` process for it (start, JSON parse,
//! cache load) costs 25–55 ms on a lab router; a command line given to an
//! `nft -i` that is already running costs under a millisecond.
//!
//! Each write is one line — both sets flushed and filled, one nft
//! transaction — followed by a listing of both sets, and counts only when
//! the listing shows exactly the wanted addresses. Anything else (nft's
//! error on its standard error, a listing that differs, no answer within
//! [`ANSWER_WITHIN`], nft gone) ends the session; the caller writes the
//! fence with a process of its own instead, which reports nft's error.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use musubi_process::session::{Ended, Line, Session};

use super::nft::TABLE;

/// How long a write waits for nft's listing before it gives up on the session.
pub const ANSWER_WITHIN: Duration = Duration::from_millis(500);

/// Starts `program` (then `-i`).
fn start(program: &[String]) -> std::io::Result<Session> {
    let (first, rest) = program.split_first().ok_or_else(|| std::io::Error::other("no nft program"))?;
    let mut command = Command::new(first);
    command.args(rest).arg("-i");
    Session::start(command)
}

/// Writes the fence through a kept `nft -i` session (started on first use).
pub struct Writer {
    /// `nft`, or a command that runs it elsewhere (a test's namespace).
    program: Vec<String>,
    session: Option<Session>,
    /// A fence sent ahead and when, its answer not read yet.
    sent: Option<(BTreeSet<IpAddr>, Instant)>,
}

impl Default for Writer {
    fn default() -> Self {
        Writer::with_program(vec!["nft".into()])
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("running", &self.session.is_some()).finish()
    }
}

impl Writer {
    /// A writer that runs `program` (then `-i`) for its session.
    pub fn with_program(program: Vec<String>) -> Writer {
        Writer { program, session: None, sent: None }
    }

    /// Starts the session ahead of the first write (a line cut should not
    /// wait for nft to start: 8 ms on a lab router); a failure is left to
    /// the write.
    pub fn warm(&mut self) {
        if self.session.is_none() {
            match start(&self.program) {
                Ok(s) => self.session = Some(s),
                Err(e) => tracing::debug!(error = %e, "nft -i not started ahead"),
            }
        }
    }

    /// Makes the fence exactly `fence`; `Err` says why the session could
    /// not (it is ended: the next write starts another). A fence sent ahead
    /// ([`Writer::send`]) with the same addresses is only waited for.
    pub fn write(&mut self, fence: &BTreeSet<IpAddr>) -> Result<(), String> {
        let result = match self.sent.take() {
            Some((ahead, at)) if &ahead == fence => self.answer(fence, at),
            // Another fence was sent ahead: its answer is read first.
            Some((ahead, at)) => self.answer(&ahead, at).and_then(|()| self.try_write(fence)),
            None => self.try_write(fence),
        };
        if result.is_err() {
            self.session = None;
        }
        result
    }

    /// Sends `fence` to the session without waiting for its answer, which
    /// the next [`Writer::write`] reads. A failure ends the session; the
    /// write then starts another.
    pub fn send(&mut self, fence: &BTreeSet<IpAddr>) {
        if let Some((ahead, at)) = self.sent.take()
            && self.answer(&ahead, at).is_err()
        {
            self.session = None;
        }
        match self.try_send(fence) {
            Ok(()) => self.sent = Some((fence.clone(), Instant::now())),
            Err(e) => {
                tracing::debug!(error = %e, "the fence not sent ahead");
                self.session = None;
            }
        }
    }

    fn try_send(&mut self, fence: &BTreeSet<IpAddr>) -> Result<(), String> {
        if self.session.is_none() {
            self.session = Some(start(&self.program).map_err(|e| format!("starting nft -i: {e}"))?);
        }
        let session = self.session.as_mut().ok_or("no nft session")?;
        session.send(&script(fence)).map_err(|e| format!("writing to nft -i: {e}"))
    }

    fn try_write(&mut self, fence: &BTreeSet<IpAddr>) -> Result<(), String> {
        self.try_send(fence)?;
        self.answer(fence, Instant::now())
    }

    /// Reads the answer to `fence`, sent at `sent`: both sets listed, and
    /// exactly `fence` in them.
    fn answer(&mut self, fence: &BTreeSet<IpAddr>, sent: Instant) -> Result<(), String> {
        let session = self.session.as_mut().ok_or("no nft session")?;
        let deadline = sent + ANSWER_WITHIN;
        let mut listing = Vec::new();
        let mut ends = 0;
        while ends < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            match session.next(left) {
                Ok(Line::Out(line)) => {
                    ends += usize::from(line == "}");
                    listing.push(line);
                }
                Ok(Line::Err(line)) => return Err(format!("nft: {line}")),
                Err(Ended::Silent) => return Err(format!("nft -i did not answer within {ANSWER_WITHIN:?}")),
                Err(Ended::Gone) => return Err("nft -i ended".into()),
            }
        }
        let found = elements(&listing.join("\n"))?;
        if &found != fence {
            return Err(format!("the fence reads {found:?} after writing {fence:?}"));
        }
        Ok(())
    }
}

/// One nft transaction that makes both sets exactly `fence`, then a listing
/// of each (a listing in the same transaction would show them before it).
pub fn script(fence: &BTreeSet<IpAddr>) -> String {
    let mut line = format!("flush set inet {TABLE} unused4; flush set inet {TABLE} unused6");
    for (v6, set) in [(false, "unused4"), (true, "unused6")] {
        let elems: Vec<String> = fence.iter().filter(|a| a.is_ipv6() == v6).map(ToString::to_string).collect();
        if !elems.is_empty() {
            line.push_str(&format!("; add element inet {TABLE} {set} {{ {} }}", elems.join(", ")));
        }
    }
    format!("{line}\nlist set inet {TABLE} unused4\nlist set inet {TABLE} unused6\n")
}

/// The addresses of `nft list set` listings (`elements = { a, b, … }`, over
/// several lines when long).
pub fn elements(listing: &str) -> Result<BTreeSet<IpAddr>, String> {
    let mut found = BTreeSet::new();
    let mut rest = listing;
    while let Some(at) = rest.find("elements = {") {
        let after = &rest[at + "elements = {".len()..];
        let end = after.find('}').ok_or_else(|| format!("an unterminated element list in {listing:?}"))?;
        for word in after[..end].split([',', ' ', '\n', '\t']).filter(|w| !w.is_empty()) {
            found.insert(word.parse().map_err(|_| format!("{word:?} in the fence's listing is not an address"))?);
        }
        rest = &after[end..];
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::Stdio;

    fn ips(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| a.parse().expect("address")).collect()
    }

    #[test]
    fn a_write_is_one_transaction_then_a_listing_of_each_set() {
        let s = script(&ips(&["192.0.2.1", "198.51.100.1", "2001:db8::1"]));
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 3, "{s}");
        assert_eq!(
            lines[0],
            "flush set inet musubi unused4; flush set inet musubi unused6; \
             add element inet musubi unused4 { 192.0.2.1, 198.51.100.1 }; \
             add element inet musubi unused6 { 2001:db8::1 }"
        );
        assert_eq!(lines[1..], ["list set inet musubi unused4", "list set inet musubi unused6"]);
        // An empty fence only flushes.
        assert!(!script(&BTreeSet::new()).contains("add element"));
    }

    #[test]
    fn listings_are_read_back_whatever_their_layout() {
        // As nft 1.0 prints them: one set empty, one wrapped over lines.
        let listing = "table inet musubi {\n\tset unused4 {\n\t\ttype ipv4_addr\n\t}\n}\n\
                       table inet musubi {\n\tset unused6 {\n\t\ttype ipv6_addr\n\
                       \t\telements = { 2001:db8::1, 2001:db8::2,\n\t\t\t     2001:db8::3 }\n\t}\n}";
        assert_eq!(elements(listing), Ok(ips(&["2001:db8::1", "2001:db8::2", "2001:db8::3"])));
        assert!(elements("elements = { 192.0.2.1, x }").is_err());
        assert!(elements("elements = { 192.0.2.1").is_err());
    }

    /// With real nft in a namespace of its own (root only): writes land and
    /// are read back, one session serves them all, and a table gone is an
    /// error with nft's message, after which the next write starts afresh.
    #[test]
    fn a_kept_nft_session_writes_the_fence_and_reports_nfts_errors() {
        use std::process::Command;
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0")));
        if !root {
            eprintln!("skipped: needs root for a network namespace");
            return;
        }
        let ns = format!("mfence{}", std::process::id());
        let run = |args: &[&str], input: Option<&str>| {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", &ns]).args(args).stdin(Stdio::piped()).stdout(Stdio::piped());
            let mut child = cmd.spawn().expect("ip netns exec");
            if let Some(text) = input {
                child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
            }
            drop(child.stdin.take());
            let out = child.wait_with_output().expect("wait");
            assert!(out.status.success(), "{args:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert!(Command::new("ip").args(["netns", "add", &ns]).status().expect("ip").success());
        struct Gone(String);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = Command::new("ip").args(["netns", "delete", &self.0]).status();
            }
        }
        let _gone = Gone(ns.clone());
        let table = "table inet musubi {\n set unused4 { type ipv4_addr; }\n set unused6 { type ipv6_addr; }\n}\n";
        run(&["nft", "-f", "-"], Some(table));
        let mut w = Writer::with_program(["ip", "netns", "exec", &ns, "nft"].map(String::from).to_vec());
        for fence in [ips(&["192.0.2.1", "2001:db8::1"]), ips(&["198.51.100.1"]), BTreeSet::new()] {
            w.write(&fence).expect("written");
            let listed = run(&["nft", "list", "table", "inet", "musubi"], None);
            assert_eq!(elements(&listed), Ok(fence.clone()), "{listed}");
        }
        let pid = w.session.as_ref().map(|s| s.pid());
        w.write(&ips(&["192.0.2.9"])).expect("written");
        assert_eq!(w.session.as_ref().map(|s| s.pid()), pid, "one session for every write");
        run(&["nft", "delete", "table", "inet", "musubi"], None);
        let err = w.write(&ips(&["192.0.2.1"])).expect_err("no table");
        assert!(err.starts_with("nft: Error"), "{err}");
        assert!(w.session.is_none(), "a failed session is ended");
        run(&["nft", "-f", "-"], Some(table));
        w.write(&ips(&["192.0.2.2"])).expect("a new session");

        // Sent ahead, the fence lands without a write; the write of the same
        // addresses reads its answer; one of others reads it, then writes.
        let pid = w.session.as_ref().map(|s| s.pid());
        w.send(&ips(&["192.0.2.3"]));
        let deadline = Instant::now() + Duration::from_secs(5);
        while elements(&run(&["nft", "list", "table", "inet", "musubi"], None)) != Ok(ips(&["192.0.2.3"])) {
            assert!(Instant::now() < deadline, "the fence sent ahead never landed");
            std::thread::sleep(Duration::from_millis(10));
        }
        w.write(&ips(&["192.0.2.3"])).expect("its answer read");
        assert!(w.sent.is_none(), "nothing left to read");
        w.send(&ips(&["192.0.2.4"]));
        w.write(&ips(&["192.0.2.5"])).expect("another fence after the one sent ahead");
        assert_eq!(elements(&run(&["nft", "list", "table", "inet", "musubi"], None)), Ok(ips(&["192.0.2.5"])));
        assert_eq!(w.session.as_ref().map(|s| s.pid()), pid, "still the one session");
        // A fence sent ahead that nft refuses fails the write that reads it.
        run(&["nft", "delete", "table", "inet", "musubi"], None);
        w.send(&ips(&["192.0.2.6"]));
        let err = w.write(&ips(&["192.0.2.6"])).expect_err("no table");
        assert!(err.starts_with("nft: Error"), "{err}");
        assert!(w.session.is_none(), "a failed session is ended");
    }
}
