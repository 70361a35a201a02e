//! The control loop of one pool: probe the queue, read the pool, ask the policy, apply the answer.
//! All judgement is in `policy::decide`; this loop only talks to the outside world.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use warren_broker::depth::DepthSource;

use crate::backend::{Backend, BackendError, PoolStatus};
use crate::metrics::Metrics;
use crate::policy::{Decision, Depth, Input, LoopState, PolicyConfig, Reason, Step, step};
use crate::probe::DepthProbe;

/// One pool: a queue, its policy, and how often to look.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    /// Task queue whose depth sizes the pool (also the metrics' `pool` label).
    pub queue: String,
    /// The policy's knobs.
    pub policy: PolicyConfig,
    /// Time between polls.
    pub poll: Duration,
    /// Observe and log decisions, change nothing.
    pub dry_run: bool,
}

/// Runs the loop for one pool until `stop` is cancelled, then shuts the backend down.
// Long: the control loop: observe, decide (policy::decide), record, act; each step is a function,
// what remains is their order.
pub async fn run_pool<B: Backend>(
    spec: PoolSpec,
    mut backend: B,
    mut probe: DepthProbe,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let pool = spec.queue.as_str();
    info!(pool, backend = %backend.describe(), min = spec.policy.min, max = spec.policy.max, dry_run = spec.dry_run, "autoscaling");
    let started = Instant::now();
    let mut state = LoopState::default();
    let mut last_logged = None;
    let mut woke_at: Option<Instant> = None;
    let mut ticker = tokio::time::interval(spec.poll);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        // The loop came round: `/healthz` fails when it stops doing so (a hung call).
        metrics.endpoints.beat();
        let depth = read_depth(&mut probe, &metrics, pool).await;
        let status = read_status(&mut backend, &metrics, pool).await;
        let seen = status.as_ref().map(|s| (s.replicas, s.stalled));
        let (next_step, next) = step(&spec.policy, &state, started.elapsed(), depth, seen);
        state = next;
        let (
            Step::Act {
                decision,
                input,
                kept_after_outage,
            },
            Some(status),
        ) = (next_step, status)
        else {
            continue;
        };
        if kept_after_outage {
            info!(
                pool,
                current = status.replicas,
                "the backend answers again; not shrinking on the first poll after an outage"
            );
        }
        record_pool(&metrics, pool, &status, &decision, &mut woke_at);
        metrics.set_ready(true);
        log_decision(
            pool,
            &decision,
            &input,
            status.stalled_detail.as_deref(),
            spec.dry_run,
            &mut last_logged,
        );
        if decision.desired == status.replicas || spec.dry_run {
            continue;
        }
        let shrinking = decision.desired < status.replicas;
        let loads = if shrinking {
            probe.worker_loads(pool).await
        } else {
            Vec::new()
        };
        match backend.scale(decision.desired, &loads).await {
            Ok(()) => {
                let direction = if shrinking { "down" } else { "up" };
                metrics
                    .scale_events
                    .with_label_values(&[pool, direction])
                    .inc();
                if status.replicas == 0 {
                    woke_at = Some(Instant::now());
                }
            }
            Err(e) => report(&metrics, pool, &e),
        }
    }
    info!(pool, "autoscaler stopping");
    if !spec.dry_run {
        backend.shutdown().await;
    }
}

/// The queue's depth now (also as metrics), or `None` when it cannot be read.
async fn read_depth(probe: &mut DepthProbe, metrics: &Metrics, pool: &str) -> Option<Depth> {
    match probe.depth(pool).await {
        Ok(d) => {
            record_depth(metrics, pool, &d);
            Some(Depth {
                ready: d.ready,
                unacked: d.unacked,
            })
        }
        Err(e) => {
            warn!(pool, "cannot read the queue depth: {e}");
            metrics.errors.with_label_values(&[pool, "probe"]).inc();
            None
        }
    }
}

/// The pool as the backend sees it now, or `None` when the backend does not answer.
async fn read_status<B: Backend>(
    backend: &mut B,
    metrics: &Metrics,
    pool: &str,
) -> Option<PoolStatus> {
    match backend.status().await {
        Ok(s) => {
            metrics.backend_up.with_label_values(&[pool]).set(1.0);
            Some(s)
        }
        Err(e) => {
            report(metrics, pool, &e);
            metrics.backend_up.with_label_values(&[pool]).set(0.0);
            metrics.set_ready(false);
            None
        }
    }
}

/// Publishes the pool and the decision as metrics; the first ready worker after waking from zero
/// (`woke_at`) ends the wake-up's timing.
fn record_pool(
    metrics: &Metrics,
    pool: &str,
    status: &PoolStatus,
    decision: &Decision,
    woke_at: &mut Option<Instant>,
) {
    metrics
        .current
        .with_label_values(&[pool])
        .set(f64::from(status.replicas));
    metrics
        .stalled
        .with_label_values(&[pool])
        .set(f64::from(status.stalled));
    if let Some(at) = *woke_at
        && status.ready > 0
    {
        metrics
            .backlog_to_ready
            .with_label_values(&[pool])
            .observe(at.elapsed().as_secs_f64());
        info!(
            pool,
            seconds = format!("{:.1}", at.elapsed().as_secs_f64()),
            "first worker ready after waking from zero"
        );
        *woke_at = None;
    }
    metrics
        .desired
        .with_label_values(&[pool])
        .set(f64::from(decision.desired));
    metrics
        .unhealthy
        .with_label_values(&[pool])
        .set(if decision.reason == Reason::PoolUnhealthy {
            1.0
        } else {
            0.0
        });
}

/// Publishes a queue reading as metrics.
fn record_depth(metrics: &Metrics, pool: &str, d: &warren_broker::depth::QueueDepth) {
    metrics.ready.with_label_values(&[pool]).set(d.ready as f64);
    metrics
        .unacked
        .with_label_values(&[pool])
        .set(d.unacked.unwrap_or(0) as f64);
    metrics
        .consumers
        .with_label_values(&[pool])
        .set(d.consumers as f64);
    for source in DepthSource::ALL {
        let using = if source == d.source { 1.0 } else { 0.0 };
        metrics
            .probe_source
            .with_label_values(&[pool, source.as_str()])
            .set(using);
    }
}

/// Logs a backend error and counts it by kind.
fn report(metrics: &Metrics, pool: &str, error: &BackendError) {
    error!(pool, "{error}");
    metrics
        .errors
        .with_label_values(&[pool, error.kind.as_str()])
        .inc();
}

/// Logs a decision when it differs from the last one logged (what the pool should be, and why),
/// so a steady pool, or a dry run that changes nothing, does not log every poll.
fn log_decision(
    pool: &str,
    decision: &Decision,
    input: &Input,
    stalled: Option<&str>,
    dry_run: bool,
    last: &mut Option<(u32, Reason)>,
) {
    let (ready, unacked) = input
        .depth
        .map_or((None, None), |d| (Some(d.ready), d.unacked));
    let changed = decision.desired != input.current;
    if *last != Some((decision.desired, decision.reason)) {
        match decision.reason {
            Reason::PoolUnhealthy => warn!(
                pool,
                current = input.current,
                ready,
                unacked,
                dry_run,
                "not growing the pool: workers are not starting ({})",
                stalled.unwrap_or("unknown reason")
            ),
            reason => info!(
                pool,
                current = input.current,
                desired = decision.desired,
                ready,
                unacked,
                reason = reason.as_str(),
                dry_run,
                "{}",
                match (changed, dry_run) {
                    (true, false) => "scaling",
                    (true, true) => "would scale (dry run: nothing changed)",
                    (false, _) => "holding",
                }
            ),
        }
    }
    *last = Some((decision.desired, decision.reason));
}
