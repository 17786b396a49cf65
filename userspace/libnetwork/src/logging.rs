//! Logging for the daemons: to stderr, at `default_level`, or per target as `RUST_LOG` says
//! (`info,calico_node=debug`: a default level, then `target=level` pairs).

use std::io::IsTerminal;

use tracing_subscriber::{filter::Targets, layer::SubscriberExt, util::SubscriberInitExt};

pub fn init(default_level: &str) {
    let targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| spec.parse::<Targets>().ok())
        .or_else(|| default_level.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only for a person at a terminal, not in log files.
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(targets)
        .init();
}
