//! Logging: `tracing` to stderr, JSON for machines or pretty for people.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// `IDMATCH_LOG_FORMAT=json|pretty`; unset means JSON unless stderr is a terminal. `RUST_LOG`
/// filters as usual and defaults to `info`.
pub fn init(format: Option<&str>) -> Result<(), String> {
    let json = match format {
        Some("json") => true,
        Some("pretty") => false,
        Some(other) => {
            return Err(format!(
                "IDMATCH_LOG_FORMAT (environment): expected json or pretty, got {other:?}"
            ))
        }
        None => !std::io::stderr().is_terminal(),
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init();
    } else {
        builder.init();
    }
    Ok(())
}
