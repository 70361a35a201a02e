//! `pools.toml`: several queue → pool pairs served by one autoscaler, each with its own knobs.
//!
//! ```toml
//! [[pool]]
//! queue = "gdal"
//! backend = "kubernetes"
//! namespace = "pipelines"
//! deployment = "warren-gdal"
//! max = 20
//! tasks_per_worker = 1
//!
//! [[pool]]
//! queue = "downloads"
//! backend = "local"
//! command = ["warren", "worker", "--queue", "downloads", "--allow-exec", "curl"]
//! max = 4
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::error::DeployError;
use crate::policy::PolicyConfig;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsFile {
    /// One entry per pool.
    #[serde(rename = "pool")]
    pub pools: Vec<PoolEntry>,
}

/// Where a pool's workers run (`local` or `kubernetes`, in a pools file and on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// Worker processes on this machine.
    Local,
    /// A Kubernetes Deployment.
    Kubernetes,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "local" => Ok(BackendKind::Local),
            "kubernetes" => Ok(BackendKind::Kubernetes),
            other => Err(format!("unknown backend '{other}': local or kubernetes")),
        }
    }
}

/// One pool.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolEntry {
    /// Task queue.
    pub queue: String,
    /// Backend.
    pub backend: BackendKind,
    /// Kubernetes namespace (kubernetes backend).
    pub namespace: Option<String>,
    /// Deployment name (kubernetes backend).
    pub deployment: Option<String>,
    /// Kubeconfig context (kubernetes backend, outside a cluster).
    pub context: Option<String>,
    /// Worker command line (local backend).
    #[serde(default)]
    pub command: Vec<String>,
    /// Fewest workers.
    #[serde(default)]
    pub min: u32,
    /// Most workers.
    pub max: u32,
    /// Backlog per worker (default 4, the worker's default concurrency).
    #[serde(default = "default_tasks_per_worker")]
    pub tasks_per_worker: u32,
    /// Backlog that wakes the pool from zero.
    #[serde(default = "default_activation")]
    pub activation: u64,
    /// Seconds between polls.
    #[serde(default = "default_poll")]
    pub poll_s: f64,
    /// Seconds the target must stay lower before shrinking.
    #[serde(default = "default_window")]
    pub scale_down_window_s: f64,
    /// Seconds the queue must stay empty before the last worker stops.
    #[serde(default = "default_idle")]
    pub idle_to_zero_s: f64,
    /// Size after repeated probe failures.
    pub fallback_replicas: Option<u32>,
}

// A pool's defaults are the policy's own (`PolicyConfig::default`): one place for each.
fn default_tasks_per_worker() -> u32 {
    PolicyConfig::default().tasks_per_worker
}
fn default_activation() -> u64 {
    PolicyConfig::default().activation
}
fn default_poll() -> f64 {
    DEFAULT_POLL.as_secs_f64()
}
fn default_window() -> f64 {
    PolicyConfig::default().scale_down_window.as_secs_f64()
}
fn default_idle() -> f64 {
    PolicyConfig::default().idle_to_zero.as_secs_f64()
}

/// Default time between polls of a pool's queue.
pub const DEFAULT_POLL: Duration = Duration::from_secs(2);

/// A window (may be zero: act at once), checked.
fn window(field: &str, value: f64) -> Result<Duration, DeployError> {
    warren_broker::settings::seconds(field, value, true).map_err(DeployError::InvalidSetting)
}

/// An interval between actions (never zero), checked.
fn interval(field: &str, value: f64) -> Result<Duration, DeployError> {
    warren_broker::settings::seconds(field, value, false).map_err(DeployError::InvalidSetting)
}

impl PoolEntry {
    /// The policy knobs, checked.
    pub fn policy(&self) -> Result<PolicyConfig, DeployError> {
        let config = PolicyConfig {
            min: self.min,
            max: self.max,
            tasks_per_worker: self.tasks_per_worker,
            activation: self.activation,
            scale_down_window: window("scale_down_window_s", self.scale_down_window_s)?,
            idle_to_zero: window("idle_to_zero_s", self.idle_to_zero_s)?,
            fallback_replicas: self.fallback_replicas,
            ..PolicyConfig::default()
        };
        config.validate()?;
        Ok(config)
    }

    /// Poll interval, checked.
    pub fn poll(&self) -> Result<Duration, DeployError> {
        interval("poll_s", self.poll_s)
    }

    /// Checks everything a pool needs before it starts: its backend, policy and poll interval.
    pub fn check(&self) -> Result<(), DeployError> {
        self.check_backend()?;
        self.policy().map_err(|e| e.in_pool(&self.queue))?;
        self.poll().map_err(|e| e.in_pool(&self.queue))?;
        Ok(())
    }

    /// Checks that the backend has what it needs.
    pub fn check_backend(&self) -> Result<(), DeployError> {
        match self.backend {
            BackendKind::Kubernetes
                if self.deployment.is_none()
                    || (self.namespace.is_none()
                        && crate::kubernetes::own_namespace().is_none()) =>
            {
                Err(DeployError::Backend(
                    "the kubernetes backend needs namespace and deployment (the namespace \
                     defaults to the pod's own when the autoscaler runs in a pod)"
                        .into(),
                )
                .in_pool(&self.queue))
            }
            BackendKind::Local if self.command.is_empty() => Err(DeployError::Backend(format!(
                "the local backend needs the worker command, after `--` on the command \
                 line (`warren autoscale --queue {q} -- warren worker --allow-exec PROGRAM`), or as \
                 command = [\"warren\", \"worker\", ...] in a pools file",
                q = self.queue
            ))
            .in_pool(&self.queue)),
            _ => Ok(()),
        }
    }
}

/// Parses and checks a pools file; errors name the pool and the field.
pub fn parse(text: &str) -> Result<PoolsFile, DeployError> {
    let file: PoolsFile = toml::from_str(text)
        .map_err(|e| DeployError::InvalidPools(format!("invalid pools file: {e}")))?;
    if file.pools.is_empty() {
        return Err(DeployError::InvalidPools(
            "the pools file has no [[pool]] entries".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for pool in &file.pools {
        if !seen.insert(&pool.queue) {
            return Err(DeployError::InvalidPools(format!(
                "queue '{}' appears in two pools",
                pool.queue
            )));
        }
        pool.check()?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_two_pools_with_defaults() {
        let file = parse(include_str!("../examples/pools.toml")).unwrap();
        assert_eq!(file.pools.len(), 2);
        let gdal = &file.pools[0];
        assert_eq!(
            (gdal.backend, gdal.max, gdal.tasks_per_worker),
            (BackendKind::Kubernetes, 20, 1)
        );
        let downloads = &file.pools[1];
        assert_eq!(
            downloads.policy().unwrap().idle_to_zero,
            Duration::from_secs(120)
        );
        assert_eq!(downloads.poll().unwrap(), Duration::from_secs(2));
    }

    #[test]
    fn mistakes_are_named() {
        let err = parse("[[pool]]\nqueue = \"q\"\nbackend = \"kubernetes\"\nmax = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("namespace and deployment"), "{err}");
        let err = parse(
            "[[pool]]\nqueue = \"q\"\nbackend = \"local\"\ncommand = [\"w\"]\nmin = 4\nmax = 3\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("pool 'q'") && err.contains("below min"),
            "{err}"
        );
        let err = parse(
            "[[pool]]\nqueue = \"q\"\nbackend = \"local\"\ncommand = [\"w\"]\nmax = 3\nmaxx = 4\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("maxx"), "{err}");
        let err = parse("[[pool]]\nqueue = \"q\"\nbackend = \"docker\"\nmax = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker"), "{err}");
    }
}
