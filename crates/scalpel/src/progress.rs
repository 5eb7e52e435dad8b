//! Progress on stderr: a spinner while something slow runs, and the writer log lines go through
//! so that they print above the spinner instead of through it.

use std::io::{self, IsTerminal, Write};
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// The spinner on screen, if any; [`LogWriter`] suspends it while a log line is written.
static ACTIVE: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// A spinner with elapsed time, shown only when stderr is a terminal and info logs are on.
/// It disappears when dropped.
pub struct Spinner(Option<ProgressBar>);

impl Spinner {
    pub fn start(msg: String) -> Spinner {
        if !io::stderr().is_terminal() || !tracing::enabled!(tracing::Level::INFO) {
            return Spinner(None);
        }
        let pb = ProgressBar::new_spinner().with_message(msg);
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
            pb.set_style(style);
        }
        pb.enable_steady_tick(Duration::from_millis(100));
        if let Ok(mut active) = ACTIVE.lock() {
            *active = Some(pb.clone());
        }
        Spinner(Some(pb))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            if let Ok(mut active) = ACTIVE.lock() {
                *active = None;
            }
            pb.finish_and_clear();
        }
    }
}

/// Stderr for the tracing subscriber, hiding the spinner while a line is written.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let active = ACTIVE.lock().ok().and_then(|a| a.clone());
        match active {
            Some(pb) => pb.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// A progress bar over a known count of `unit`s (tokens, steps), with rate and ETA, shown only
/// when stderr is a terminal and info logs are on. It disappears when dropped.
pub struct CountBar(Option<ProgressBar>);

impl CountBar {
    pub fn start(total: u64, done: u64, msg: String, unit: &str) -> CountBar {
        if !io::stderr().is_terminal() || !tracing::enabled!(tracing::Level::INFO) {
            return CountBar(None);
        }
        let pb = ProgressBar::new(total).with_message(msg);
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "{{msg}} {{wide_bar}} {{human_pos}}/{{human_len}} {unit} ({{per_sec}}, ETA {{eta}})"
        )) {
            pb.set_style(style);
        }
        pb.set_position(done);
        pb.reset_eta();
        if let Ok(mut active) = ACTIVE.lock() {
            *active = Some(pb.clone());
        }
        CountBar(Some(pb))
    }

    pub fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }

    /// Replaces the text before the bar (e.g. the current loss).
    pub fn set_message(&self, msg: String) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg);
        }
    }
}

impl Drop for CountBar {
    fn drop(&mut self) {
        if let Some(pb) = self.0.take() {
            if let Ok(mut active) = ACTIVE.lock() {
                *active = None;
            }
            pb.finish_and_clear();
        }
    }
}
