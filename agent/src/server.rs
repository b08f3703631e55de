//! The agent's own HTTP endpoint: `/metrics` (Prometheus text: host metrics
//! after the pipeline, plus self-metrics), `/healthz`, and `/features` (the
//! gate's plan and kernel facts as JSON).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::state::Shared;

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .route("/features", get(features))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let body = match shared.last() {
        Some((_, snap)) => crate::exporters::prometheus::render(&snap.metrics),
        None => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// 200 while collections are on time (the last one is younger than three
/// intervals), 503 otherwise; the body says which families run where.
async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let age = shared.last().map(|(age, _)| age);
    let healthy = age.is_some_and(|a| a < shared.interval * 3);
    let body = serde_json::json!({
        "status": if healthy { "ok" } else if age.is_none() { "starting" } else { "stalled" },
        "last_collection_age_secs": age.map(|a| a.as_secs_f64()),
        "families": shared.plan.families,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn features(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(serde_json::json!({ "kernel": shared.facts, "plan": shared.plan }))
}
