//! What Musubi's binaries (`musubi`, `musubi-controller`, `musubi-agent`)
//! share as processes: one way to set up logs, one shutdown signal, and
//! output that ends the process quietly when its reader goes away
//! (`musubi status --json | head`).

use std::io::Write;

/// Logs to standard error, filtered by `MUSUBI_LOG` (default `default`).
pub fn logs(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("MUSUBI_LOG").unwrap_or_else(|_| default.into()))
        .init();
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
