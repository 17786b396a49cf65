use clap::Parser;

/// mimalloc returns freed pages to the system: a large cluster's snapshot is decoded once at
/// start (hundreds of MB for a moment), and with glibc's allocator the agent kept that peak as
/// its resident size for good.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    calico_node::allocator::purge_freed_memory_at_once();
    let flags = calico_node::config::Flags::parse();
    let level = match flags.log_level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_owned(),
        "fatal" | "panic" => "error".to_owned(),
        l => l.to_owned(),
    };
    calico_libnetwork::logging::init(&level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("calico-node: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(calico_node::run(flags)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("calico-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
