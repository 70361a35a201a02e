//! What the autoscaler needs from a place that runs workers.

use std::future::Future;

use warren_broker::depth::WorkerLoad;

/// The state of a pool as its backend sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStatus {
    /// Workers running or starting (the Deployment's replicas; live local processes).
    pub replicas: u32,
    /// Workers ready to work.
    pub ready: u32,
    /// Workers that exist but are not becoming ready.
    pub stalled: u32,
    /// Why they are stalled (e.g. `pod warren-worker-x: ImagePullBackOff`), for the log.
    pub stalled_detail: Option<String>,
}

/// Kinds of backend failure, for messages and the `errors_total` metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendErrorKind {
    /// The pool does not exist (Deployment not found).
    NotFound,
    /// The autoscaler is not allowed to do something (RBAC).
    Forbidden,
    /// The API server rejected the autoscaler's credentials (an expired or revoked token).
    Unauthorized,
    /// A concurrent change conflicted; retried.
    Conflict,
    /// The API server or the process table could not be reached.
    Unreachable,
    /// Anything else.
    Other,
}

impl BackendErrorKind {
    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendErrorKind::NotFound => "not_found",
            BackendErrorKind::Forbidden => "forbidden",
            BackendErrorKind::Unauthorized => "unauthorized",
            BackendErrorKind::Conflict => "conflict",
            BackendErrorKind::Unreachable => "unreachable",
            BackendErrorKind::Other => "other",
        }
    }
}

/// A backend failure with a message that says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// What kind of failure.
    pub kind: BackendErrorKind,
    /// What happened and what to do.
    pub message: String,
}

/// A place that runs the workers of one pool.
pub trait Backend: Send {
    /// Describes the pool for logs, e.g. `deployment pipelines/warren-worker`.
    fn describe(&self) -> String;

    /// Reads the pool's state.
    fn status(&mut self) -> impl Future<Output = Result<PoolStatus, BackendError>> + Send;

    /// Sizes the pool to `desired`. When shrinking, `loads` tells which workers are idle so they
    /// go first.
    fn scale(
        &mut self,
        desired: u32,
        loads: &[WorkerLoad],
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Stops what the backend itself started (local processes); Kubernetes leaves the pool as is.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
