//! `warren autoscale`: builds each pool's backend, serves metrics, runs the loops until shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::info;
use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;

use crate::autoscaler::{PoolSpec, run_pool};
use crate::config::{BackendKind, PoolEntry};
use crate::error::DeployError;
use crate::kubernetes::{KubernetesBackend, client};
use crate::local::LocalBackend;
use crate::metrics::Metrics;
use crate::probe::DepthProbe;

/// Settings shared by every pool of one autoscaler.
#[derive(Debug, Clone)]
pub struct AutoscaleOptions {
    /// Broker connection (for passive declares and the management API's credentials).
    pub amqp: AmqpSettings,
    /// Where the management API is.
    pub management: ManagementTarget,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`; None serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Observe and log only.
    pub dry_run: bool,
    /// How long local workers get to finish when the autoscaler stops.
    pub stop_grace: Duration,
    /// Set pod-deletion-cost on pods before a scale-down (needs `patch pods` in the Role).
    pub patch_pods: bool,
    /// A pod not ready this long (since its Ready condition last changed) counts as stalled.
    pub stall_after: Duration,
}

/// Runs every pool until `shutdown` completes. Errors are configuration problems found at start.
pub async fn autoscale(
    pools: Vec<PoolEntry>,
    options: AutoscaleOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), DeployError> {
    let metrics = Metrics::new()?;
    if let Some(addr) = options.metrics_addr {
        // A poll may legitimately spend a few API timeouts; longer than that, the loop is stuck.
        let slowest_poll = pools
            .iter()
            .filter_map(|p| p.poll().ok())
            .max()
            .unwrap_or_default();
        let stale_after = slowest_poll * 3 + crate::kubernetes::API_TIMEOUT * 3;
        metrics
            .endpoints
            .clone()
            .fail_health_when_stale(stale_after)
            .spawn(addr)
            .await
            .map_err(|source| DeployError::Serve { addr, source })?;
    }
    let stop = CancellationToken::new();
    let mut loops = tokio::task::JoinSet::new();
    for pool in pools {
        pool.check()?;
        let spec = PoolSpec {
            queue: pool.queue.clone(),
            policy: pool.policy()?,
            poll: pool.poll()?,
            dry_run: options.dry_run,
        };
        let probe = DepthProbe::new(options.amqp.clone(), &options.management)
            .declaring_missing(!options.dry_run);
        let (metrics, stop) = (metrics.clone(), stop.clone());
        match pool.backend {
            BackendKind::Local => {
                let prefix = format!("{}-{}", pool.queue, std::process::id());
                let backend = LocalBackend::new(pool.command.clone(), prefix, options.stop_grace)?
                    .for_queue(&pool.queue)?;
                loops.spawn(run_pool(spec, backend, probe, metrics, stop));
            }
            BackendKind::Kubernetes => {
                let client = client(pool.context.as_deref()).await?;
                let (namespace, deployment) = (
                    pool.namespace
                        .or_else(crate::kubernetes::own_namespace)
                        .unwrap_or_default(),
                    pool.deployment.unwrap_or_default(),
                );
                let mut backend =
                    KubernetesBackend::new(client, &namespace, &deployment, options.stall_after)
                        .rebuilding_on_unauthorized(pool.context.clone());
                if !options.patch_pods {
                    backend = backend.without_pod_patching();
                }
                loops.spawn(run_pool(spec, backend, probe, metrics, stop));
            }
        }
    }
    shutdown.await;
    info!("shutdown requested");
    stop.cancel();
    while loops.join_next().await.is_some() {}
    Ok(())
}
