//! `/liveness`, `/readiness` and `/metrics` over plain HTTP/1.1 (one request per connection,
//! as probes and Prometheus scrapers use them).

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::metrics::Metrics;

/// How long the main loop may go without turning before the agent reports itself dead.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = respond(path, &metrics);
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
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
