//! Program logs (aya-log) reach the `tracing` side when enabled. Its own test binary because it
//! installs a global subscriber.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use calico_dataplane::{spawn_log_pump, Direction, LoadOptions, SourceFilter};
use harness::{require, NetNs, Requirement, Veth};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture lock")).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_is_logged_through_tracing() -> anyhow::Result<()> {
    if !require(
        "drop_is_logged_through_tracing",
        &[Requirement::Root, Requirement::NetNs, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let captured = Captured::default();
    let writer = captured.clone();
    // `init` also bridges the `log` facade, which aya-log writes to, into tracing.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let client = NetNs::new("lcli")?;
    let server = NetNs::new("lsrv")?;
    let veth = Veth::between(&client, &server)?;
    client.add_address(&veth.a_name, "198.18.1.1/30")?;
    server.add_address(&veth.b_name, "198.18.1.2/30")?;

    let (mut filter, logger) = SourceFilter::load(&LoadOptions {
        log_level: Some(aya_log::Level::Debug),
        ..Default::default()
    })?;
    let pump = spawn_log_pump(logger.expect("logging was enabled"))?;
    let server_if = veth.b_name.clone();
    server.run(|| filter.attach(&server_if, Direction::Ingress))??;
    filter.deny("198.18.1.1/32".parse()?, 4242)?;

    let ping_client = &client;
    let reached = tokio::task::block_in_place(|| ping_client.ping("198.18.1.2".parse().unwrap()))?;
    assert!(!reached, "denied ping got through");

    let deadline = Instant::now() + Duration::from_secs(5);
    while !captured.text().contains("deny rule 4242") {
        assert!(
            Instant::now() < deadline,
            "no program log line reached tracing; captured:\n{}",
            captured.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pump.abort();
    Ok(())
}
