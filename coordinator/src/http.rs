//! HTTP on the coordinator: `/` (a dashboard page: the group, workers, loss, checkpoints,
//! changes and events, refreshed every 2 s from `/api/status`), `/metrics` (Prometheus,
//! `axial_coordinator_*`), `/api/status`
//! (JSON: job, workers, progress, last checkpoint, hyperparameter changes, recent events), and
//! `POST /api/hyperparameters` (a JSON change such as `{"lr": 0.05}`, authenticated by the job
//! token as `Authorization: Bearer <token>`; the reply is the change as accepted, with the step
//! it takes effect from).
//!
//! With the gRPC certificate (`serve --tls-cert/--tls-key`) the same endpoints are served over
//! HTTPS instead, so that the token of `POST /api/hyperparameters` never crosses the network in
//! clear text.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axial_common::hparams::HyperParameterChange;
use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse};
use axum::routing::{get, post};

use crate::service::Service;

/// A certificate and its key (PEM), for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The TLS acceptor for `files`; errors name the file at fault.
fn acceptor(files: &TlsFiles) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("--tls-cert {}: {e}", files.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| anyhow::anyhow!("--tls-key {}: {e}", files.key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the HTTPS certificate and key")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Serves the endpoints on `addr` until the process ends, over HTTPS when `tls` is given;
/// returns the bound address. `token` guards the one that changes anything.
pub async fn serve(
    addr: SocketAddr,
    service: Service,
    token: String,
    tls: Option<TlsFiles>,
) -> anyhow::Result<SocketAddr> {
    let tls = tls.as_ref().map(acceptor).transpose()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = service.clone();
    let exporter = Arc::new(crate::metrics::CoordinatorMetrics::new());
    let changes = service.clone();
    let app = Router::new()
        .route("/", get(|| async { Html(include_str!("dashboard.html")) }))
        .route(
            "/metrics",
            get(move || {
                let (s, exporter) = (metrics.clone(), exporter.clone());
                async move {
                    let now = s.now();
                    let status = s
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .status(now);
                    let text = exporter.render(&status);
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
        )
        .route(
            "/api/hyperparameters",
            post(move |headers: HeaderMap, body: String| {
                let s = changes.clone();
                let token = token.clone();
                async move { set_hyperparameters(&s, &token, &headers, &body) }
            }),
        );
    let Some(tls) = tls else {
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        return Ok(bound);
    };
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (tls, app) = (tls.clone(), app.clone());
            tokio::spawn(async move {
                // A client that never finishes its handshake is dropped.
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), tls.accept(stream));
                let Ok(Ok(stream)) = handshake.await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(bound)
}

fn set_hyperparameters(
    s: &Service,
    token: &str,
    headers: &HeaderMap,
    body: &str,
) -> (StatusCode, String) {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = crate::auth::check(auth, token) {
        eprintln!("coordinator: refused a hyperparameter change over HTTP: {e}");
        return (StatusCode::UNAUTHORIZED, format!("{e}\n"));
    }
    let change: HyperParameterChange = match serde_json::from_str(body) {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                format!(
                    "the body is not a change ({e}); expected JSON with any of lr, weight_decay, clip_grad_norm, checkpoint_every_steps, from_step\n"
                ),
            );
        }
    };
    let now = s.now();
    let result = s
        .state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .set_hyperparameters(change, now);
    match result {
        Ok(c) => (
            StatusCode::OK,
            serde_json::to_string_pretty(&c).unwrap_or_default() + "\n",
        ),
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")),
    }
}
