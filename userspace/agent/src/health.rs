//! `/liveness`, `/readiness` and `/metrics` over plain HTTP/1.1 (one request per connection,
//! as probes and Prometheus scrapers use them).

use std::{sync::Arc, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpListener};

use crate::metrics::Metrics;

/// How long the main loop may go without turning before the agent reports itself dead.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            // The whole request head, however many segments it arrives in.
            let mut reader = tokio::io::BufReader::new(read);
            let request = tokio::time::timeout(
                Duration::from_secs(5),
                calico_libnetwork::http::read_request(&mut reader),
            )
            .await;
            let Ok(Ok(Some(request))) = request else {
                return;
            };
            let (status, body) = respond(&request.path, &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = write.write_all(response.as_bytes()).await;
        });
    }
}

fn respond(path: &str, metrics: &Metrics) -> (&'static str, String) {
    let probe = |ok: bool| {
        if ok {
            ("200 OK", "ok\n".to_owned())
        } else {
            ("503 Service Unavailable", "not ok\n".to_owned())
        }
    };
    match path {
        "/liveness" => probe(metrics.live(LIVENESS_LIMIT)),
        "/readiness" => probe(metrics.ready()),
        "/metrics" => ("200 OK", metrics.render()),
        _ => (
            "404 Not Found",
            "try /liveness, /readiness or /metrics\n".to_owned(),
        ),
    }
}
