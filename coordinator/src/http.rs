//! HTTP on the coordinator: `/metrics` (Prometheus, `axial_coordinator_*`) and `/api/status`
//! (JSON: job, workers, progress, last checkpoint, recent events).

use std::net::SocketAddr;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::service::Service;

/// Serves the two endpoints on `addr` until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, service: Service) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = service.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let s = metrics.clone();
                async move {
                    let now = s.now();
                    let text = s
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .status(now)
                        .prometheus();
                    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
                }
            }),
        )
        .route(
            "/api/status",
            get(move || {
                let s = service.clone();
                async move {
                    let now = s.now();
                    let status = s
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .status(now);
                    let body = serde_json::to_string_pretty(&status)
                        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
                    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
                }
            }),
        );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(bound)
}
