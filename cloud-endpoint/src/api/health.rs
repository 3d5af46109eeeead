//! The probes of a service manager or container engine, on the API's port, without a
//! session: `/healthz` (the process answers) and `/readyz` (it can take migrations: the
//! inventory answers, every datastore folder takes a write, the QUIC server listens and
//! no stop is under way). A failing `/readyz` is 503 with what is not ready, e.g.
//! `{"status":"not ready","not_ready":[{"check":"quic","detail":"draining for a stop"}]}`.
//! The bodies name no path, user or version: anyone who reaches the port may ask.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use crate::health::QuicState;
use crate::Domain;

/// A check that failed, and why.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NotReady {
    pub check: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
struct Report {
    status: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    not_ready: Vec<NotReady>,
}

pub(super) fn router(domain: Arc<Domain>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(domain)
}

async fn healthz() -> Json<Report> {
    Json(Report {
        status: "alive",
        not_ready: Vec::new(),
    })
}

async fn readyz(State(domain): State<Arc<Domain>>) -> (StatusCode, Json<Report>) {
    // The inventory and the files block: off the async workers.
    let not_ready = tokio::task::spawn_blocking(move || check(&domain))
        .await
        .unwrap_or_else(|_| {
            vec![NotReady {
                check: "endpoint",
                detail: "the readiness check failed inside the endpoint".into(),
            }]
        });
    if not_ready.is_empty() {
        (
            StatusCode::OK,
            Json(Report {
                status: "ready",
                not_ready,
            }),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Report {
                status: "not ready",
                not_ready,
            }),
        )
    }
}

/// Every readiness check that fails, in a fixed order.
pub fn check(domain: &Domain) -> Vec<NotReady> {
    let mut failed = Vec::new();
    match domain.health.quic() {
        QuicState::Listening => {}
        QuicState::NotListening => failed.push(NotReady {
            check: "quic",
            detail: "the migration port is not listening".into(),
        }),
        QuicState::Draining => failed.push(NotReady {
            check: "quic",
            detail: "draining for a stop: new migrations are refused".into(),
        }),
    }
    if let Err(e) = domain.inventory.datastore() {
        tracing::warn!(error = %e, "readiness: the inventory does not answer");
        failed.push(NotReady {
            check: "inventory",
            detail: "the inventory does not answer".into(),
        });
    }
    for ds in domain.datastores() {
        if let Err(e) = probe_write(ds.root()) {
            tracing::warn!(datastore = ds.name(), error = %e, "readiness: the datastore folder takes no write");
            failed.push(NotReady {
                check: "datastore",
                detail: format!("datastore {} takes no write", ds.name()),
            });
        }
    }
    failed
}

/// Creates, writes and removes a small file in `dir` (a name of its own per probe, so
/// probes at once do not meet).
fn probe_write(dir: &std::path::Path) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let path = dir.join(format!(
        ".readyz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::write(&path, b"ready");
    let removed = std::fs::remove_file(&path);
    written.and(removed)
}
