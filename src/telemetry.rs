//! Logging: `tracing` to stderr, JSON for machines or pretty for people.
//!
//! A runtime thread does not write each line as it is made: it collects them and writes them
//! in one `write(2)` when it is about to park (nothing left to do) or when 64 KiB have piled
//! up. An idle proxy's lines are out at once; a busy one's take one system call per batch, not
//! one per request (that call, to a log collector's pipe, was a tenth of the proxy's CPU).

use std::cell::RefCell;
use std::io::{IsTerminal, Write};

use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod json;

/// `RUST_LOG` filters as usual and defaults to `info`; a filter that does not parse is reported
/// and replaced by the default rather than silently ignored.
pub fn init(format: LogFormat) {
    let terminal = std::io::stderr().is_terminal();
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !terminal,
    };
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(error) => (
            EnvFilter::new("info"),
            std::env::var("RUST_LOG").ok().map(|v| (v, error)),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| BatchingStderr);
    if json {
        builder
            .fmt_fields(JsonFields::new())
            .event_format(json::JsonLines)
            .init();
    } else {
        // Colours are escape sequences: in a pipe or a file they are noise, even when `pretty`
        // was asked for.
        builder.with_ansi(terminal).init();
    }
    if let Some((value, error)) = bad_filter {
        tracing::warn!(rust_log = %value, %error, "RUST_LOG does not parse; logging at info");
    }
}

/// Past this, a thread's lines are written even though it is still busy.
const BATCH_LIMIT: usize = 64 * 1024;

thread_local! {
    /// `None` until the thread first parks: threads that never do (the main thread before the
    /// runtime, the blocking pool) write each line at once.
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

struct Batch(Vec<u8>);

impl Batch {
    fn write_out(&mut self) {
        if !self.0.is_empty() {
            // Logging has nowhere to report its own failure.
            let _ = std::io::stderr().write_all(&self.0);
            self.0.clear();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.write_out();
    }
}

/// For the runtime's `on_thread_park`: writes this thread's collected lines, and collects its
/// lines from now on.
pub fn on_park() {
    BATCH.with_borrow_mut(|batch| batch.get_or_insert_with(|| Batch(Vec::new())).write_out());
}

/// Writes this thread's collected lines, if it collects any: before a forced exit, which runs
/// no thread's destructors. (Otherwise each runtime thread writes its last lines as it ends.)
pub fn flush() {
    BATCH.with_borrow_mut(|batch| batch.as_mut().map_or((), Batch::write_out));
}

/// One line at a time from `tracing_subscriber`, whole: it formats a line, then writes it.
struct BatchingStderr;

impl Write for BatchingStderr {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        BATCH.with_borrow_mut(|batch| match batch {
            Some(batch) => {
                batch.0.extend_from_slice(line);
                if batch.0.len() >= BATCH_LIMIT {
                    batch.write_out();
                }
                Ok(line.len())
            }
            None => std::io::stderr().write(line),
        })
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Collects what a subscriber writes, for unit tests that read log lines.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct Captured(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Captured {
    /// A subscriber writing its lines here.
    pub(crate) fn subscriber(&self) -> impl tracing::Subscriber {
        tracing_subscriber::fmt()
            .with_writer(self.clone())
            .with_ansi(false)
            .finish()
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

#[cfg(test)]
impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}
