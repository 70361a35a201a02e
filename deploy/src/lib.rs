//! Warren's autoscaler: a pure scaling policy (`policy`), a thin control loop around it
//! (`autoscaler`), and backends that size a Kubernetes Deployment (`kubernetes`) or a set of local
//! worker processes (`local`) by queue depth.

#![warn(missing_docs)]

pub mod autoscaler;
pub mod backend;
pub mod config;
pub mod error;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod probe;
pub mod run;
#[cfg(any(test, feature = "simulate"))]
pub mod simulate;
