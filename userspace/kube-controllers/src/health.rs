//! `/liveness`, `/readiness` and `/metrics` over HTTP.

use std::sync::Arc;

use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use tokio::net::TcpListener;

use crate::metrics::{Metrics, CONTENT_TYPE};

pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/liveness", get(|| async { (StatusCode::OK, "ok\n") }))
        .route("/readiness", get(readiness))
        .route("/metrics", get(exposition))
        .with_state(metrics)
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    if let Err(e) = axum::serve(listener, router(metrics)).await {
        tracing::error!(error = %e, "health server stopped");
    }
}

async fn readiness(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    if metrics.ready() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ok\n")
    }
}

async fn exposition(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render())
}
