use tokio::{
    io::{unix::AsyncFd, Interest},
    task::JoinHandle,
};

/// The aya-log reader of a loaded object, writing to the `log` facade.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// Forwards records that the eBPF programs log through aya-log to the `log` facade (and so to
/// `tracing` when its log bridge is installed).
///
/// aya-log 0.3 reads a ring buffer that only drains on `flush()`, so the logger is polled for
/// readability on the tokio reactor. Must be called from within a tokio runtime; the task owns
/// the logger, which keeps the ring buffer's fd open, and ends when aborted.
pub fn spawn_log_pump(logger: ProgramLogger) -> std::io::Result<JoinHandle<()>> {
    // SAFETY: the logger owns its ring buffer fd for its whole life, and the AsyncFd owns the
    // logger, so the registered fd stays open and unchanged until the AsyncFd is dropped.
    let mut logger = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(std::io::Error::from)?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match logger.readable_mut().await {
                Ok(guard) => guard,
                Err(err) => {
                    tracing::error!(%err, "eBPF log ring buffer became unreadable; stop forwarding");
                    return;
                }
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
