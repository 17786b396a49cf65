use thiserror::Error;

/// Errors at the dataplane crate's boundary. Each names the object it concerns.
#[derive(Debug, Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object into the kernel failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("eBPF program `{program}` {action} failed: {source}")]
    Program {
        program: &'static str,
        action: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map `{map}` is missing from the object or has the wrong type: {source}")]
    MapType {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("eBPF map `{map}` {action} failed: {source}")]
    Map {
        map: &'static str,
        action: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("interface `{interface}`: {action} failed: {source}")]
    Interface {
        interface: String,
        action: &'static str,
        #[source]
        source: aya::programs::tc::TcError,
    },
    #[error("eBPF logger could not be set up: {0}")]
    Logger(#[source] aya_log::Error),
    #[error("{what} {value} does not fit the map's 16-bit field")]
    TooLarge { what: &'static str, value: u32 },
    #[error("pinning at {}: {action} failed: {source}", path.display())]
    Pin {
        path: std::path::PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} has no room for {needed} more entries ({in_use} of {capacity} in use)")]
    MapFull {
        map: &'static str,
        needed: usize,
        in_use: usize,
        capacity: u32,
    },
    #[error("pinned map layout: {0}")]
    Layout(String),
    #[error("{what} is not attached to `{interface}`")]
    NotAttached {
        what: &'static str,
        interface: String,
    },
}
