//! What Musubi's binaries (`musubi`, `musubi-controller`, `musubi-agent`)
//! share as processes: one way to set up logs, one shutdown signal, and
//! output that ends the process quietly when its reader goes away
//! (`musubi status --json | head`).

use std::io::Write;

pub mod metrics;
pub mod progress;
pub mod session;

/// Logs to standard error as text, filtered by `MUSUBI_LOG` (default
/// `default`).
pub fn logs(default: &str) {
    logs_as(default, LogFormat::Text);
}

/// How the daemons write their logs (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (colours on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for a log shipper. Its fields are stable:
    /// `timestamp` (RFC 3339, UTC), `level` (`ERROR` … `TRACE`), `target`
    /// (the module that logged), `message`, then the event's own fields by
    /// name (`site`, `revision`, `error`, …), numbers as numbers.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("unknown log format {other:?}: expected text or json")),
        }
    }
}

/// Logs to standard error in `format`, filtered by `MUSUBI_LOG` (default
/// `default`).
pub fn logs_as(default: &str, format: LogFormat) {
    let filter = || tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG").unwrap_or_else(|_| default.into());
    match format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(filter())
            .init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .with_env_filter(filter())
            .init(),
    }
}

/// An error and its causes on one line, `a: b: c`. Musubi's error messages
/// already carry their cause; a cause whose words the line already holds is
/// not said twice.
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Resolves on SIGTERM or SIGINT (never, if they cannot be caught).
pub async fn shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Writes to standard output. A reader that went away (a closed pipe) ends
/// the process at once and quietly, as `cat` or `grep` do; any other
/// failure to write is reported on standard error and exits with 1.
pub fn out(args: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        closed(e);
    }
}

fn closed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    let _ = writeln!(std::io::stderr(), "error: writing to standard output: {e}");
    std::process::exit(1);
}

/// `print!` that ends the process quietly on a closed pipe (see [`out`]).
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::out(format_args!($($arg)*)) };
}

/// `println!` that ends the process quietly on a closed pipe (see [`out`]).
#[macro_export]
macro_rules! println {
    () => { $crate::out(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::out(format_args!("{}\n", format_args!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    use super::error_text;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let inner = E("nft failed", None);
        let outer = E("writing the policy: nft failed", Some(Box::new(inner)));
        assert_eq!(error_text(&outer), "writing the policy: nft failed");
        let top = E("configuration not applied", Some(Box::new(outer)));
        assert_eq!(error_text(&top), "configuration not applied: writing the policy: nft failed");
    }
}
