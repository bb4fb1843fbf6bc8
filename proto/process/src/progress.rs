//! Progress where work is long (`musubi lab up`, `musubi lab drill`,
//! `musubi-agent simulate`): a bar on a terminal, nothing otherwise — the
//! commands' own lines stay as they are, one per event, for logs and pipes.

use std::io::IsTerminal as _;
use std::time::Duration;

/// A progress bar on standard error when it is a terminal (and `NO_COLOR`
/// or `MUSUBI_NO_PROGRESS` is not set); otherwise nothing.
#[derive(Debug, Clone)]
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// `len` steps of `what`.
    pub fn new(len: u64, what: &str) -> Progress {
        let on = std::io::stderr().is_terminal() && std::env::var_os("MUSUBI_NO_PROGRESS").is_none();
        if !on {
            return Progress(None);
        }
        // Cleared when its last clone goes, on an error path too.
        let bar = indicatif::ProgressBar::new(len).with_finish(indicatif::ProgressFinish::AndClear);
        let style =
            indicatif::ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress(Some(bar))
    }

    /// Whether a bar is drawn.
    pub fn shown(&self) -> bool {
        self.0.is_some()
    }

    pub fn set(&self, position: u64) {
        if let Some(b) = &self.0 {
            b.set_position(position);
        }
    }

    pub fn inc(&self) {
        if let Some(b) = &self.0 {
            b.inc(1);
        }
    }

    pub fn message(&self, message: impl Into<String>) {
        if let Some(b) = &self.0 {
            b.set_message(message.into());
        }
    }

    /// Prints `line` on standard output, above the bar when one is drawn.
    pub fn line(&self, line: &str) {
        match &self.0 {
            Some(b) => b.suspend(|| crate::out(format_args!("{line}\n"))),
            None => crate::out(format_args!("{line}\n")),
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
