//! `/liveness`, `/readiness` and `/metrics` over HTTP (axum), as probes and Prometheus scrapers
//! use them.

use std::{sync::Arc, time::Duration};

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use tokio::net::TcpListener;

use crate::metrics::{Metrics, CONTENT_TYPE};

/// How long the main loop may go without turning before the agent reports itself dead.
pub const LIVENESS_LIMIT: Duration = Duration::from_secs(30);

/// The routes, on their own so tests can drive them without a socket.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/liveness", get(liveness))
        .route("/readiness", get(readiness))
        .route("/metrics", get(exposition))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "try /liveness, /readiness or /metrics\n",
            )
        })
        .with_state(metrics)
}

/// Serves until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Err(e) = axum::serve(listener, router(metrics)).await {
        tracing::error!(error = %e, "health server stopped");
    }
}

fn probe(ok: bool) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ok\n")
    }
}

async fn liveness(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    probe(metrics.live(LIVENESS_LIMIT))
}

async fn readiness(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    probe(metrics.ready())
}

async fn exposition(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render())
}
