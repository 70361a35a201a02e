//! `warren autoscale`: sizes worker pools (a Kubernetes Deployment, or local processes) by
//! queue depth.

use std::path::PathBuf;

use clap::Args;
use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;
use warren_broker::topology::DEFAULT_TASK_QUEUE;
use warren_deploy::config;
use warren_deploy::policy::PolicyConfig;
use warren_deploy::run::{AutoscaleOptions, autoscale};

use crate::cli::{fail, seconds};

#[derive(Args)]
pub struct AutoscaleArgs {
    /// Pools file (TOML) describing several queue → pool pairs; replaces the one-pool flags.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Task queue whose depth sizes the pool.
    #[arg(long, default_value = DEFAULT_TASK_QUEUE)]
    queue: String,
    /// Where the workers run: local or kubernetes.
    #[arg(long, default_value = "local")]
    backend: config::BackendKind,
    /// Namespace of the worker Deployment (kubernetes backend); default: the autoscaler pod's
    /// own namespace.
    #[arg(long, env = "WARREN_K8S_NAMESPACE")]
    namespace: Option<String>,
    /// Name of the worker Deployment (kubernetes backend). The manifests set it through the
    /// variable, which kustomize renames with the Deployment (namePrefix, nameSuffix).
    #[arg(long, env = "WARREN_DEPLOYMENT")]
    deployment: Option<String>,
    /// Kubeconfig context (kubernetes backend outside a cluster; inside a pod the service account is used).
    #[arg(long)]
    context: Option<String>,
    /// Fewest workers.
    #[arg(long, default_value_t = PolicyConfig::default().min)]
    min: u32,
    /// Most workers.
    #[arg(long, default_value_t = PolicyConfig::default().max)]
    max: u32,
    /// Backlog (ready + running tasks) each worker should carry; usually the worker's --concurrency.
    #[arg(long, default_value_t = PolicyConfig::default().tasks_per_worker)]
    tasks_per_worker: u32,
    /// Backlog needed to start workers when there are none.
    #[arg(long, default_value_t = PolicyConfig::default().activation)]
    activation: u64,
    /// Seconds between polls of the queue.
    #[arg(long, default_value_t = config::DEFAULT_POLL.as_secs_f64())]
    poll: f64,
    /// Seconds the wanted size must stay lower before workers are stopped.
    #[arg(long, default_value_t = PolicyConfig::default().scale_down_window.as_secs_f64())]
    scale_down_window: f64,
    /// Seconds the queue must stay empty before the last worker is stopped.
    #[arg(long, default_value_t = PolicyConfig::default().idle_to_zero.as_secs_f64())]
    idle_to_zero: f64,
    /// Size to fall back to when the queue cannot be probed three times in a row.
    #[arg(long)]
    fallback_replicas: Option<u32>,
    /// Observe and log decisions; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Where to serve /metrics, /healthz and /readyz (this machine only by default; the
    /// Kubernetes manifests set 0.0.0.0:9478).
    #[arg(long, default_value = "127.0.0.1:9478")]
    metrics_addr: std::net::SocketAddr,
    /// Management API base URL (default: https://HOST:15671 for amqps://, http://HOST:15672 for amqp://).
    #[arg(long, env = "WARREN_MANAGEMENT_URL")]
    pub management_url: Option<String>,
    /// Never patch pods (kubernetes backend): no pod-deletion-cost ranking before a scale-down,
    /// so the Role needs no `patch pods`. The ReplicaSet picks which pods go; their tasks still
    /// finish (SIGTERM drain).
    #[arg(long)]
    no_pod_patching: bool,
    /// Seconds a worker pod may stay not ready (counted from its Ready condition's last change,
    /// so a pod reconnecting after a broker blip is not stalled) before it counts as stalled.
    /// Growth stops while half or more of the pool is stalled. (`--start-timeout` is its old name.)
    #[arg(long, alias = "start-timeout", default_value_t = 300.0)]
    stall_after: f64,
    /// Seconds local workers get to finish their tasks when the autoscaler stops.
    #[arg(long, default_value_t = 60.0)]
    stop_grace: f64,
    /// Worker command for the local backend, after `--`.
    #[arg(last = true, value_name = "WORKER COMMAND")]
    command: Vec<String>,
}

/// Runs `warren autoscale`; returns the exit status.
pub async fn run(args: AutoscaleArgs, amqp: AmqpSettings, management: ManagementTarget) -> u8 {
    let pools = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => match config::parse(&text) {
                Ok(file) => file.pools,
                Err(e) => return fail(&format!("{}: {e}", path.display())),
            },
            Err(e) => return fail(&format!("cannot read {}: {e}", path.display())),
        },
        None => vec![config::PoolEntry {
            queue: args.queue,
            backend: args.backend,
            namespace: args.namespace,
            deployment: args.deployment,
            context: args.context,
            command: args.command,
            min: args.min,
            max: args.max,
            tasks_per_worker: args.tasks_per_worker,
            activation: args.activation,
            poll_s: args.poll,
            scale_down_window_s: args.scale_down_window,
            idle_to_zero_s: args.idle_to_zero,
            fallback_replicas: args.fallback_replicas,
        }],
    };
    let Some(stop_grace) = seconds(args.stop_grace) else {
        return fail("--stop-grace must be a positive number of seconds");
    };
    let Some(stall_after) = seconds(args.stall_after) else {
        return fail("--stall-after must be a positive number of seconds");
    };
    let options = AutoscaleOptions {
        amqp,
        management,
        metrics_addr: Some(args.metrics_addr),
        dry_run: args.dry_run,
        stop_grace,
        stall_after,
        patch_pods: !args.no_pod_patching,
    };
    match autoscale(pools, options, warren_broker::endpoints::shutdown_signal()).await {
        Ok(()) => 0,
        Err(e) => fail(&e.to_string()),
    }
}
