//! Why the autoscaler refuses to start: its settings, a pools file, a pool's backend, or its
//! own endpoints. Failures while it runs are [`crate::backend::BackendError`]s, counted and
//! retried, never fatal.

use std::net::SocketAddr;

use crate::backend::BackendError;

/// A problem found before any pool is sized; the message says what to change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// A setting out of range, or settings that contradict each other.
    #[error("{0}")]
    InvalidSetting(String),
    /// A pools file that does not parse, or contradicts itself.
    #[error("{0}")]
    InvalidPools(String),
    /// A pool's backend lacks what it needs (a Deployment, a worker command that runs).
    #[error("{0}")]
    Backend(String),
    /// A problem of one pool.
    #[error("pool '{queue}': {source}")]
    Pool {
        /// The pool's queue.
        queue: String,
        /// What is wrong with it.
        source: Box<DeployError>,
    },
    /// The autoscaler's metrics could not be registered.
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The metrics endpoint could not listen.
    #[error("cannot serve metrics on {addr}: {source}")]
    Serve {
        /// The address asked for.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The Kubernetes API could not be set up (kubeconfig, in-cluster credentials).
    #[error(transparent)]
    Kubernetes(#[from] BackendError),
}

impl DeployError {
    /// The same problem, naming the pool of `queue` (once).
    pub fn in_pool(self, queue: &str) -> DeployError {
        match self {
            DeployError::Pool { .. } => self,
            other => DeployError::Pool {
                queue: queue.to_string(),
                source: Box::new(other),
            },
        }
    }
}
