//! A kept child process spoken to line by line (`nft -i`): its standard
//! output and error read on threads of their own, each line handed over
//! as it comes. A transaction written to a running `nft -i` costs well
//! under a millisecond, where a fresh process costs its start and, at its
//! exit, the kernel's flush of nf_tables' deferred work under the
//! namespace's commit lock (an RCU grace period: up to a second on a
//! loaded machine, and every other transaction in the namespace waits).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A line of the child's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Out(String),
    Err(String),
}

/// A running child and its output, line by line. Dropping it kills the child.
pub struct Session {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Line>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("pid", &self.child.id()).finish()
    }
}

impl Session {
    /// Starts `command` with its three standard streams piped.
    pub fn start(mut command: Command) -> std::io::Result<Session> {
        let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let (tx, lines) = mpsc::channel();
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no standard input"))?;
        let out = child.stdout.take().ok_or_else(|| std::io::Error::other("no standard output"))?;
        let err = child.stderr.take().ok_or_else(|| std::io::Error::other("no standard error"))?;
        // The readers end when the child does (end of file).
        let tx2 = tx.clone();
        std::thread::Builder::new().name("session-out".into()).spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(Line::Out(line)).is_err() {
                    break;
                }
            }
        })?;
        std::thread::Builder::new().name("session-err".into()).spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if tx2.send(Line::Err(line)).is_err() {
                    break;
                }
            }
        })?;
        Ok(Session { child, stdin, lines })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes `text` to the child's standard input, after dropping what an
    /// earlier, abandoned exchange left unread.
    pub fn send(&mut self, text: &str) -> std::io::Result<()> {
        while self.lines.try_recv().is_ok() {}
        self.stdin.write_all(text.as_bytes())?;
        self.stdin.flush()
    }

    /// The next line of output, waiting at most `within`; `None` when
    /// nothing came in time or the child's output ended.
    pub fn next(&self, within: Duration) -> Result<Line, Ended> {
        match self.lines.recv_timeout(within) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Ended::Silent),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Ended::Gone),
        }
    }
}

/// Why [`Session::next`] has no line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Nothing within the time given.
    Silent,
    /// The child's output ended.
    Gone,
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_back_in_order_and_an_ended_child_is_told_apart_from_a_silent_one() {
        let mut cat = Command::new("sh");
        cat.args(["-c", "while read l; do echo \"out $l\"; echo \"err $l\" >&2; done"]);
        let mut s = Session::start(cat).expect("sh");
        s.send("a\nb\n").expect("send");
        let mut out = Vec::new();
        let mut err = Vec::new();
        while out.len() < 2 || err.len() < 2 {
            match s.next(Duration::from_secs(5)).expect("a line") {
                Line::Out(l) => out.push(l),
                Line::Err(l) => err.push(l),
            }
        }
        assert_eq!(out, ["out a", "out b"]);
        assert_eq!(err, ["err a", "err b"]);
        assert_eq!(s.next(Duration::from_millis(50)), Err(Ended::Silent));

        let mut once = Command::new("sh");
        once.args(["-c", "echo one"]);
        let s = Session::start(once).expect("sh");
        assert_eq!(s.next(Duration::from_secs(5)), Ok(Line::Out("one".into())));
        assert_eq!(s.next(Duration::from_secs(5)), Err(Ended::Gone));
    }
}
