//! HTTP endpoints of a long-running Warren process: `/healthz` (the process is alive), `/readyz`
//! (connected and working), and `/metrics` (Prometheus text format). Workers and the autoscaler
//! both serve them through [`Endpoints`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tracing::{info, warn};

/// Liveness path.
pub const HEALTH_PATH: &str = "/healthz";
/// Readiness path.
pub const READY_PATH: &str = "/readyz";
/// Metrics path.
pub const METRICS_PATH: &str = "/metrics";

/// A metrics registry and a readiness flag, served over HTTP.
#[derive(Clone, Default)]
pub struct Endpoints {
    /// Where the process registers its metrics.
    pub registry: Registry,
    ready: Arc<AtomicBool>,
}

impl Endpoints {
    /// Marks the process ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The registry's metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Binds `addr`, logs `metrics on http://ADDR/metrics`, and serves in the background.
    pub async fn spawn(self, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        info!("metrics on http://{bound}{METRICS_PATH}");
        tokio::spawn(async move {
            if let Err(e) = self.serve(listener).await {
                warn!("metrics server stopped: {e}");
            }
        });
        Ok(bound)
    }

    /// Serves the endpoints on `listener` until the process ends.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let ready = Arc::clone(&self.ready);
        let app = Router::new()
            .route(HEALTH_PATH, get(|| async { "ok" }))
            .route(
                READY_PATH,
                get(move || {
                    let ok = ready.load(Ordering::Relaxed);
                    async move {
                        if ok {
                            (StatusCode::OK, "ready").into_response()
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
                        }
                    }
                }),
            )
            .route(
                METRICS_PATH,
                get(move || {
                    let body = self.render();
                    async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
                }),
            );
        axum::serve(listener, app).await
    }
}

/// The worker's metrics and readiness.
#[derive(Clone)]
pub struct Health {
    /// Served endpoints; ready while consuming.
    pub endpoints: Endpoints,
    /// Tasks finished, by kind and status.
    pub finished: IntCounterVec,
    /// Tasks running now.
    pub in_flight: IntGauge,
}

impl Health {
    /// Registers the worker's metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let endpoints = Endpoints::default();
        let finished = IntCounterVec::new(
            Opts::new(
                "warren_worker_tasks_finished_total",
                "Tasks finished, by kind and status.",
            ),
            &["kind", "status"],
        )?;
        let in_flight = IntGauge::new("warren_worker_tasks_in_flight", "Tasks running now.")?;
        endpoints.registry.register(Box::new(finished.clone()))?;
        endpoints.registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            endpoints,
            finished,
            in_flight,
        })
    }

    /// Marks the worker ready (consuming) or not.
    pub fn set_ready(&self, ready: bool) {
        self.endpoints.set_ready(ready);
    }
}
