//! What every long-running Warren process (worker, autoscaler) serves and obeys: HTTP endpoints
//! `/healthz` (the process is alive), `/readyz` (connected and working) and `/metrics`
//! (Prometheus text format) through [`Endpoints`], and [`shutdown_signal`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::core::Collector;
use prometheus::{Encoder, Registry, TextEncoder};
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
    /// While any is set, `/readyz` fails with its reason even when connected; keyed by cause, so
    /// that one cause ending does not hide another.
    problems: Arc<Mutex<std::collections::BTreeMap<&'static str, String>>>,
    names: Arc<Mutex<Vec<String>>>,
    /// When set, `/healthz` fails once no [`Endpoints::beat`] came for this long.
    stale_after: Option<std::time::Duration>,
    last_beat: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Endpoints {
    /// Registers `collector` and remembers its metric names; returns it for use.
    pub fn register<C: Collector + Clone + 'static>(
        &self,
        collector: C,
    ) -> Result<C, prometheus::Error> {
        let names = collector
            .desc()
            .iter()
            .map(|d| d.fq_name.clone())
            .collect::<Vec<_>>();
        self.registry.register(Box::new(collector.clone()))?;
        if let Ok(mut known) = self.names.lock() {
            known.extend(names);
        }
        Ok(collector)
    }

    /// Every metric name registered through [`Endpoints::register`], including those that have
    /// no samples yet (Prometheus pages omit those).
    pub fn metric_names(&self) -> Vec<String> {
        self.names.lock().map(|n| n.clone()).unwrap_or_default()
    }

    /// Makes `/healthz` fail when [`Endpoints::beat`] has not been called for `after` (once it
    /// has been called at all): a control loop that hangs is then restarted by its supervisor.
    pub fn fail_health_when_stale(mut self, after: std::time::Duration) -> Self {
        self.stale_after = Some(after);
        self
    }

    /// Records that the process's loop completed a round.
    pub fn beat(&self) {
        if let Ok(mut last) = self.last_beat.lock() {
            *last = Some(std::time::Instant::now());
        }
    }

    /// Why `/healthz` fails, if it does.
    fn unhealthy(&self) -> Option<String> {
        let after = self.stale_after?;
        let last = (*self.last_beat.lock().ok()?)?;
        (last.elapsed() > after).then(|| {
            format!(
                "the control loop has not completed a poll for {:.0?} (limit {after:?})",
                last.elapsed()
            )
        })
    }

    /// Marks the process ready or not.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Sets (or clears, with None) the problem of one `cause` that makes `/readyz` fail with its
    /// text although the process is connected: it cannot do its work now (e.g. a queue without
    /// quorum, results refused).
    pub fn set_problem(&self, cause: &'static str, problem: Option<String>) {
        if let Ok(mut problems) = self.problems.lock() {
            match problem {
                Some(text) => problems.insert(cause, text),
                None => problems.remove(cause),
            };
        }
    }

    /// Why `/readyz` fails, if it does.
    fn not_ready(&self) -> Option<String> {
        let problems = self
            .problems
            .lock()
            .map(|p| p.values().cloned().collect::<Vec<_>>().join("; "))
            .unwrap_or_default();
        if !problems.is_empty() {
            return Some(format!("not ready: {problems}"));
        }
        (!self.ready.load(Ordering::Relaxed)).then(|| "not ready".to_string())
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
        let ready = self.clone();
        let health = self.clone();
        let app = Router::new()
            .route(
                HEALTH_PATH,
                get(move || {
                    let problem = health.unhealthy();
                    async move {
                        match problem {
                            None => (StatusCode::OK, "ok".to_string()).into_response(),
                            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                        }
                    }
                }),
            )
            .route(
                READY_PATH,
                get(move || {
                    let problem = ready.not_ready();
                    async move {
                        match problem {
                            None => (StatusCode::OK, "ready".to_string()).into_response(),
                            Some(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
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

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod liveness_tests {
    use super::*;

    #[test]
    fn health_fails_once_the_loop_stops_beating() {
        let plain = Endpoints::default();
        assert!(
            plain.unhealthy().is_none(),
            "without a limit, always healthy"
        );
        let endpoints =
            Endpoints::default().fail_health_when_stale(std::time::Duration::from_millis(50));
        assert!(
            endpoints.unhealthy().is_none(),
            "healthy before the first beat"
        );
        endpoints.beat();
        assert!(endpoints.unhealthy().is_none());
        std::thread::sleep(std::time::Duration::from_millis(120));
        let why = endpoints.unhealthy().expect("stale");
        assert!(why.contains("has not completed a poll"), "{why}");
        endpoints.beat();
        assert!(endpoints.unhealthy().is_none());
    }
}
