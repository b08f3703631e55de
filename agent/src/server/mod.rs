//! The agent's own HTTP endpoint:
//!
//! - `/metrics`: host metrics after the pipeline plus self-metrics, as
//!   Prometheus text (kernel histograms as compact classic histograms) or,
//!   when the scraper's `Accept` asks for it, the protobuf format (kernel
//!   histograms as native histograms);
//! - `/healthz`: 200 while a collection finished within two intervals;
//! - `/readyz`: 200 once every enabled family has produced and the exporter
//!   is not in permanent failure, else 503 with the reason;
//! - `/status`: JSON for an operator (kernel, families, programs, exporter,
//!   pipeline, listener);
//! - `/features`: the gate's plan and kernel facts as JSON.
//!
//! Unknown paths answer 404, other methods on these paths 405. Handlers
//! only clone `Arc`s out of [`Shared`], so a scrape never holds a lock the
//! collection thread waits on. The listener's bounds are in [`listener`].

pub mod listener;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::gate::{HookStatus, Source};
use crate::model::Data;
use crate::state::Shared;

pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let selfm = shared.selfm.clone();
    listener::serve(listener, router(shared), selfm).await;
}

/// The routes, for the listener (and tests).
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .route("/status", get(status))
        .route("/features", get(features))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> impl IntoResponse {
    use crate::exporters::prometheus::{self, protobuf, Format};
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let snap = shared.last().map(|(_, snap)| snap);
    let metrics = snap.as_ref().map(|s| &s.metrics[..]).unwrap_or_default();
    match prometheus::negotiate(accept) {
        Format::Protobuf => (
            [(header::CONTENT_TYPE, protobuf::CONTENT_TYPE)],
            protobuf::render(metrics),
        ),
        Format::Text => (
            [(header::CONTENT_TYPE, prometheus::TEXT_CONTENT_TYPE)],
            prometheus::render(metrics, &shared.classic).into_bytes(),
        ),
    }
}

fn code(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// 200 while collections are on time (the last one is younger than two
/// intervals), 503 otherwise; the body says which families run where.
async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let age = shared.last().map(|(age, _)| age);
    let healthy = shared.healthy();
    let body = json!({
        "status": if healthy { "ok" } else if age.is_none() { "starting" } else { "stalled" },
        "last_collection_age_secs": age.map(|a| a.as_secs_f64()),
        "families": shared.plan.families,
    });
    (code(healthy), axum::Json(body))
}

/// 200 `ready`, or 503 with the one-line reason. Either way, what the
/// agent's placement costs (outside the host's pid namespace, a /proc that
/// is not the host's) follows on a `warning:` line each: the agent works,
/// with the losses named.
async fn ready(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    let warnings: String = shared
        .facts
        .warnings
        .iter()
        .map(|w| format!("warning: {w}\n"))
        .collect();
    match shared.readiness() {
        Ok(()) => (StatusCode::OK, format!("ready\n{warnings}")),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n{warnings}"),
        ),
    }
}

async fn status(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(status_json(&shared))
}

/// The `/status` document.
pub fn status_json(shared: &Shared) -> Value {
    let selfm = &shared.selfm;
    let facts = &shared.facts;
    let families: Vec<Value> = shared
        .plan
        .families
        .iter()
        .map(|fp| {
            json!({
                "family": fp.family.name(),
                "mode": fp.requested.name(),
                "source": fp.source.name(),
                "hook": fp.hook.map(|h| h.name()),
                "reason": fp.reason,
                "produced": shared.has_produced(fp.family),
            })
        })
        .collect();
    // Per program of every variant the agent tried: attached (the plan
    // uses that variant), loaded but unused, refused with the kernel's
    // message, or not tried and why.
    let mut programs = Vec::new();
    for ((family, hook), st) in &facts.hooks {
        let used = shared
            .plan
            .get(*family)
            .is_some_and(|p| p.source == Source::Ebpf && p.hook == Some(*hook));
        let names: Vec<&str> = family
            .rule()
            .variants
            .iter()
            .filter(|v| v.hook == *hook)
            .flat_map(|v| v.programs.iter().map(|p| p.program))
            .collect();
        for program in names {
            let (state, error) = match st {
                HookStatus::Ok if used && facts.unused_programs.contains(program) => {
                    ("unattached", None)
                }
                HookStatus::Ok if used => ("attached", None),
                HookStatus::Ok => ("loaded_unused", None),
                HookStatus::Failed(e) => ("refused", Some(e.as_str())),
                HookStatus::NotTried(e) => ("not_tried", Some(e.as_str())),
            };
            programs.push(json!({
                "family": family.name(),
                "hook": hook.name(),
                "program": program,
                "state": state,
                "error": error,
            }));
        }
    }
    let gauge = |name: &str| selfm.value(name, &Vec::new());
    let exporter = match shared.exporter.get() {
        Some(e) => json!({
            "enabled": true,
            "endpoint": e.endpoint,
            "protocol": e.protocol,
            "circuit": crate::state::circuit_name(gauge(crate::catalogue::EXPORT_CIRCUIT_STATE)),
            "queue_bytes": gauge(crate::catalogue::EXPORT_QUEUE_BYTES),
            "queue_batches": gauge(crate::catalogue::EXPORT_QUEUE_BATCHES),
            "disk_bytes": gauge(crate::catalogue::EXPORT_DISK_BYTES),
            "last_success_age_secs": e.last_success_age().map(|a| a.as_secs_f64()),
            "last_error": e.last_error(),
        }),
        None => json!({ "enabled": false }),
    };
    let last = shared.last();
    let mut series: BTreeMap<&str, usize> = BTreeMap::new();
    if let Some((_, snap)) = &last {
        for m in &snap.metrics {
            let n = match &m.data {
                Data::Sum { points, .. } | Data::Gauge { points } => points.len(),
                Data::Histogram { points } => points.len(),
            };
            *series.entry(m.name).or_default() += n;
        }
    }
    let detail = ["reduced", "full"].into_iter().find(|m| {
        selfm.value(crate::catalogue::DETAIL_MODE, &vec![("mode", (*m).into())]) == Some(1.0)
    });
    let memory_state = match shared.memory.get() as u8 {
        0 => "normal",
        1 => "soft",
        _ => "hard",
    };
    let ready = shared.readiness();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": shared.started.elapsed().as_secs_f64(),
        "interval_secs": shared.interval.as_secs_f64(),
        "kernel": {
            "release": facts.release,
            "btf": facts.btf,
            "btf_source": facts.btf_source,
            "tracefs": facts.tracefs,
            "object_error": facts.object_error,
        },
        "healthy": shared.healthy(),
        "last_collection_age_secs": last.as_ref().map(|(a, _)| a.as_secs_f64()),
        "ready": ready.is_ok(),
        "not_ready_reason": ready.err(),
        "families": families,
        "programs": programs,
        "capabilities": shared.capabilities,
        "bpf_stats": match crate::probes::bpf_stats_enabled() {
            Some(true) => serde_json::json!({"enabled": true}),
            Some(false) => serde_json::json!({
                "enabled": false,
                "note": "kernel.bpf_stats_enabled=0: perch.bpf.program.run.* are not published \
                         (the kernel counts nothing); `sysctl kernel.bpf_stats_enabled=1` turns \
                         them on at two clock reads per program run",
            }),
            None => serde_json::json!({"enabled": null, "note": "kernel.bpf_stats_enabled unreadable"}),
        },
        "exporter": exporter,
        "pipeline": {
            "max_series_per_metric": shared.max_series_per_metric,
            "series_per_metric": series,
            "detail_mode": detail,
            "memory_state": memory_state,
            "memory_rss_bytes": gauge(crate::catalogue::PROCESS_MEMORY_USAGE),
        },
        "http": {
            "active_connections": gauge(crate::catalogue::HTTP_CONNECTIONS_ACTIVE),
            "max_connections": listener::MAX_CONNECTIONS,
            "header_read_timeout_secs": listener::HEADER_READ_TIMEOUT.as_secs_f64(),
            "idle_timeout_secs": listener::IDLE_TIMEOUT.as_secs_f64(),
            "max_header_bytes": listener::MAX_BUF_BYTES,
        },
    })
}

async fn features(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    axum::Json(json!({ "kernel": shared.facts, "plan": shared.plan }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{FamilyPlan, KernelFacts, Mode, Plan};
    use crate::pipeline::memory::MemoryGauge;
    use crate::selfmetrics::SelfMetrics;
    use std::time::Duration;

    /// Each program of a refused variant is listed with the kernel's
    /// message; those of the variant in use are attached.
    #[test]
    fn status_lists_programs_attached_and_refused() {
        let (family, used, refused) = crate::gate::Family::ALL
            .iter()
            .find_map(|f| match f.rule().variants {
                [a, b, ..] => Some((*f, a, b)),
                _ => None,
            })
            .expect("a family with two eBPF variants");
        let mut facts = KernelFacts::default();
        facts.hooks.insert((family, used.hook), HookStatus::Ok);
        facts.hooks.insert(
            (family, refused.hook),
            HookStatus::Failed("EPERM: permission denied".into()),
        );
        let plan = Plan {
            families: vec![FamilyPlan {
                family,
                requested: Mode::default(),
                source: Source::Ebpf,
                hook: Some(used.hook),
                reads: String::new(),
                reason: "test".into(),
            }],
        };
        let shared = Shared::new(
            Arc::new(SelfMetrics::new()),
            plan,
            facts,
            Duration::from_secs(10),
            2000,
            MemoryGauge::default(),
        );
        let s = status_json(&shared);
        let programs = s["programs"].as_array().expect("programs");
        for p in used.programs {
            assert!(
                programs.iter().any(|r| r["program"] == p.program
                    && r["hook"] == used.hook.name()
                    && (r["state"] == "attached" || r["state"] == "unattached")),
                "{}: {programs:?}",
                p.program
            );
        }
        for p in refused.programs {
            assert!(
                programs.iter().any(|r| r["program"] == p.program
                    && r["state"] == "refused"
                    && r["error"] == "EPERM: permission denied"),
                "{}: {programs:?}",
                p.program
            );
        }
        assert_eq!(s["families"][0]["produced"], false);
        assert_eq!(s["ready"], false);
        assert_eq!(s["pipeline"]["max_series_per_metric"], 2000);
        assert_eq!(s["exporter"]["enabled"], false);
    }
}
