//! Docker's plugin protocol over HTTP (axum): every call is a POST to `/<Driver>.<Method>` with
//! a JSON body (or none), answered with JSON.

use std::sync::Arc;

use axum::{
    body::Bytes,
    http::{header, StatusCode, Uri},
    response::IntoResponse,
    Router,
};

use crate::Driver;

/// The media type Docker's plugin client expects.
const PLUGIN_JSON: &str = "application/vnd.docker.plugins.v1.2+json";

/// One router for both sockets: the call is the path, whatever the method.
pub fn router(driver: Arc<Driver>) -> Router {
    Router::new().fallback(move |uri: Uri, body: Bytes| {
        let driver = driver.clone();
        async move {
            let call = uri.path().trim_start_matches('/').to_owned();
            tracing::debug!(call, body = %String::from_utf8_lossy(&body), "request");
            let answer = driver.handle(&call, &body).await;
            tracing::debug!(call, %answer, "answer");
            respond(&answer)
        }
    })
}

fn respond(answer: &serde_json::Value) -> impl IntoResponse {
    // Docker reads `Err` from a non-200 answer; with 200 some calls (RequestPool) ignore it.
    let status = if answer.get("Err").is_some() {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    (
        status,
        [(header::CONTENT_TYPE, PLUGIN_JSON)],
        answer.to_string(),
    )
}
