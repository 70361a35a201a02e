//! A discrete-time simulation of a worker pool under a scaling policy, to compare Warren's policy
//! with KEDA's defaults on the same arrival trace
//! (`cargo bench -p warren-deploy --features simulate --bench autoscale`).
//!
//! The model, the same for both policies: tasks queue FIFO; each pod runs up to `concurrency`
//! tasks once it is ready, `startup_delay` after it was created; a pod chosen for removal drains
//! (finishes its tasks, takes no new ones) and then exits. Worker-seconds count every pod alive:
//! starting, working, idle or draining.
//!
//! Built only for the bench (feature `simulate`) and for the crate's own tests, so that its tests
//! run with the suite while the autoscaler does not carry it.

use std::collections::VecDeque;
use std::time::Duration;

use crate::policy::{Depth, Input, PolicyConfig, PolicyState, decide};

/// One task of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Seconds from the start.
    pub at: f64,
    /// How long it runs, in seconds.
    pub duration: f64,
}

/// The shape of the simulated cluster.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cluster {
    /// Seconds from pod creation to ready (image pull, start).
    pub startup_delay: f64,
    /// Tasks a pod runs at once.
    pub concurrency: u32,
    /// Most pods.
    pub max_pods: u32,
}

/// Which pods a policy removes when it shrinks the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victims {
    /// Idle pods first (Warren marks them with pod-deletion-cost).
    IdleFirst,
    /// Newest pods first, whatever they run (the ReplicaSet's default).
    NewestFirst,
}

/// A scaling policy under simulation.
pub trait SimPolicy {
    /// Name in the report.
    fn name(&self) -> &str;
    /// Called every simulated second; returns a new size when the policy acts.
    fn tick(&mut self, now: f64, ready: u64, unacked: u64, current: u32) -> Option<u32>;
    /// How the pool is shrunk.
    fn victims(&self) -> Victims;
}

/// What a run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Policy name.
    pub policy: String,
    /// 95th percentile of the time a task waited before it started, seconds.
    pub p95_wait: f64,
    /// Mean wait, seconds.
    pub mean_wait: f64,
    /// Pod-seconds spent (starting, working, idle, draining).
    pub worker_seconds: f64,
    /// Times the policy changed the pool size.
    pub scale_events: u32,
    /// Largest pool.
    pub peak_pods: u32,
    /// Tasks that never started before the simulation gave up.
    pub unfinished: usize,
}

struct Pod {
    ready_at: f64,
    created: f64,
    running: Vec<f64>,
    draining: bool,
}

/// Runs `trace` (sorted by arrival) under `policy` until every task is done and the pool is back
/// to zero, or `give_up_after` seconds past the last arrival.
// Long: a discrete-time simulation loop (arrivals, pods, scaling) whose state is local to the loop;
// benchmark-only code behind the `simulate` feature.
pub fn simulate(
    trace: &[Arrival],
    cluster: Cluster,
    policy: &mut dyn SimPolicy,
    give_up_after: f64,
) -> Report {
    let last_arrival = trace.last().map_or(0.0, |a| a.at);
    let mut queue: VecDeque<Arrival> = VecDeque::new();
    let mut pending = trace.iter().copied().peekable();
    let mut pods: Vec<Pod> = Vec::new();
    let mut waits = Vec::with_capacity(trace.len());
    let (mut worker_seconds, mut scale_events, mut peak) = (0.0, 0u32, 0u32);
    let mut now = 0.0;
    loop {
        while let Some(a) = pending.next_if(|a| a.at <= now) {
            queue.push_back(a);
        }
        for pod in &mut pods {
            pod.running.retain(|end| *end > now);
        }
        pods.retain(|p| !(p.draining && p.running.is_empty()));
        for pod in pods.iter_mut().filter(|p| !p.draining && p.ready_at <= now) {
            while pod.running.len() < cluster.concurrency as usize {
                let Some(task) = queue.pop_front() else { break };
                waits.push(now - task.at);
                pod.running.push(now + task.duration);
            }
        }
        let active: Vec<usize> = (0..pods.len()).filter(|i| !pods[*i].draining).collect();
        let current = u32::try_from(active.len()).unwrap_or(u32::MAX);
        let unacked: u64 = pods.iter().map(|p| p.running.len() as u64).sum();
        if let Some(desired) = policy.tick(now, queue.len() as u64, unacked, current) {
            let desired = desired.min(cluster.max_pods);
            if desired != current {
                scale_events += 1;
            }
            for _ in current..desired {
                pods.push(Pod {
                    ready_at: now + cluster.startup_delay,
                    created: now,
                    running: Vec::new(),
                    draining: false,
                });
            }
            if desired < current {
                let mut order = active.clone();
                // Pods not yet ready go first under both policies (the ReplicaSet prefers them too).
                match policy.victims() {
                    Victims::IdleFirst => {
                        order.sort_by_key(|i| (pods[*i].ready_at <= now, pods[*i].running.len()))
                    }
                    Victims::NewestFirst => order.sort_by(|a, b| {
                        (pods[*a].ready_at <= now)
                            .cmp(&(pods[*b].ready_at <= now))
                            .then(pods[*b].created.total_cmp(&pods[*a].created))
                    }),
                }
                for i in order.into_iter().take((current - desired) as usize) {
                    pods[i].draining = true;
                }
            }
        }
        let alive = u32::try_from(pods.len()).unwrap_or(u32::MAX);
        peak = peak.max(alive);
        worker_seconds += f64::from(alive);
        let done = pending.peek().is_none() && queue.is_empty() && pods.is_empty();
        if done || now > last_arrival + give_up_after {
            break;
        }
        now += 1.0;
    }
    waits.sort_by(f64::total_cmp);
    let p95 = waits
        .get(((waits.len() as f64 * 0.95) as usize).min(waits.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    let mean = if waits.is_empty() {
        0.0
    } else {
        waits.iter().sum::<f64>() / waits.len() as f64
    };
    Report {
        policy: policy.name().to_string(),
        p95_wait: p95,
        mean_wait: mean,
        worker_seconds,
        scale_events,
        peak_pods: peak,
        unfinished: queue.len() + pending.count(),
    }
}

/// Warren's policy (`policy::decide`), polling every `poll` seconds.
pub struct WarrenPolicy {
    config: PolicyConfig,
    state: PolicyState,
    poll: f64,
    next_poll: f64,
}

impl WarrenPolicy {
    /// Warren's policy with `config`, polling every `poll` seconds.
    pub fn new(config: PolicyConfig, poll: f64) -> Self {
        Self {
            config,
            state: PolicyState::default(),
            poll,
            next_poll: 0.0,
        }
    }
}

impl SimPolicy for WarrenPolicy {
    fn name(&self) -> &str {
        "warren"
    }

    fn tick(&mut self, now: f64, ready: u64, unacked: u64, current: u32) -> Option<u32> {
        if now < self.next_poll {
            return None;
        }
        self.next_poll = now + self.poll;
        let input = Input {
            now: Duration::from_secs_f64(now),
            depth: Some(Depth {
                ready,
                unacked: Some(unacked),
            }),
            current,
            stalled: 0,
        };
        let (decision, state) = decide(&self.config, &self.state, &input);
        self.state = state;
        Some(decision.desired)
    }

    fn victims(&self) -> Victims {
        Victims::IdleFirst
    }
}

/// KEDA's defaults driving an HPA: the scaler polls every 30 s (activation 0 ↔ 1, and the metric
/// the HPA sees), the HPA syncs every 15 s with `ceil(metric / target)`, 10 % tolerance, scale-up
/// limited to max(100 %, 4 pods) per 15 s, a 300 s scale-down stabilization window, and KEDA
/// returns to zero after a 300 s cooldown without activity.
pub struct Keda {
    target: f64,
    max: u32,
    metric: f64,
    last_active: f64,
    next_poll: f64,
    next_sync: f64,
    recommendations: VecDeque<(f64, u32)>,
}

impl Keda {
    /// KEDA with a per-replica queue-length target and a replica cap.
    pub fn new(target_per_replica: u32, max: u32) -> Self {
        Self {
            target: f64::from(target_per_replica.max(1)),
            max,
            metric: 0.0,
            last_active: f64::NEG_INFINITY,
            next_poll: 0.0,
            next_sync: 0.0,
            recommendations: VecDeque::new(),
        }
    }
}

impl SimPolicy for Keda {
    fn name(&self) -> &str {
        "keda defaults"
    }

    fn tick(&mut self, now: f64, ready: u64, unacked: u64, current: u32) -> Option<u32> {
        let mut decision = None;
        if now >= self.next_poll {
            self.next_poll = now + 30.0;
            // The RabbitMQ scaler's QueueLength over HTTP counts ready and unacknowledged messages.
            self.metric = (ready + unacked) as f64;
            if self.metric > 0.0 {
                self.last_active = now;
                if current == 0 {
                    decision = Some(1);
                }
            } else if current > 0 && now - self.last_active >= 300.0 {
                self.recommendations.clear();
                return Some(0);
            }
        }
        if current == 0 || now < self.next_sync {
            return decision;
        }
        self.next_sync = now + 15.0;
        let usage = self.metric / (self.target * f64::from(current));
        let mut recommended = if (usage - 1.0).abs() <= 0.1 {
            current
        } else {
            (self.metric / self.target).ceil() as u32
        };
        recommended = recommended.clamp(1, self.max);
        self.recommendations.push_back((now, recommended));
        while self
            .recommendations
            .front()
            .is_some_and(|(at, _)| *at < now - 300.0)
        {
            self.recommendations.pop_front();
        }
        let desired = if recommended > current {
            recommended.min((current * 2).max(current + 4))
        } else {
            let stabilized = self
                .recommendations
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(recommended);
            stabilized.min(current)
        };
        Some(desired)
    }

    fn victims(&self) -> Victims {
        Victims::NewestFirst
    }
}

/// A bursty day of a GDAL pipeline, compressed to about two hours: fan-outs of a few hundred
/// files, quiet gaps, a trickle of small jobs, and a few long tasks.
pub fn bursty_trace() -> Vec<Arrival> {
    let mut trace = Vec::new();
    let mut burst = |at: f64, count: usize, duration: f64, spread: f64| {
        for i in 0..count {
            // Durations vary ±30 % in a fixed pattern, so the trace is the same on every run.
            let jitter = 0.7 + 0.6 * ((i * 37 % 101) as f64 / 100.0);
            trace.push(Arrival {
                at: at + spread * i as f64 / count as f64,
                duration: duration * jitter,
            });
        }
    };
    burst(60.0, 300, 45.0, 20.0);
    burst(900.0, 80, 20.0, 5.0);
    burst(1500.0, 500, 90.0, 60.0);
    burst(3000.0, 12, 900.0, 0.0);
    for k in 0..40 {
        burst(3300.0 + 45.0 * k as f64, 2, 15.0, 0.0);
    }
    burst(5400.0, 200, 30.0, 10.0);
    burst(6600.0, 150, 60.0, 300.0);
    trace.sort_by(|a, b| a.at.total_cmp(&b.at));
    trace
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        Cluster {
            startup_delay: 30.0,
            concurrency: 4,
            max_pods: 50,
        }
    }

    #[test]
    fn every_task_runs_and_the_pool_returns_to_zero() {
        let trace = bursty_trace();
        for policy in [
            &mut WarrenPolicy::new(
                PolicyConfig {
                    max: 50,
                    ..PolicyConfig::default()
                },
                2.0,
            ) as &mut dyn SimPolicy,
            &mut Keda::new(4, 50),
        ] {
            let report = simulate(&trace, cluster(), policy, 7200.0);
            assert_eq!(report.unfinished, 0, "{report:?}");
            assert!(report.peak_pods <= 50);
        }
    }

    #[test]
    fn warren_beats_keda_defaults_on_wait_and_cost() {
        let trace = bursty_trace();
        let ours = simulate(
            &trace,
            cluster(),
            &mut WarrenPolicy::new(
                PolicyConfig {
                    max: 50,
                    ..PolicyConfig::default()
                },
                2.0,
            ),
            7200.0,
        );
        let keda = simulate(&trace, cluster(), &mut Keda::new(4, 50), 7200.0);
        assert!(ours.p95_wait < keda.p95_wait, "{ours:?} vs {keda:?}");
        assert!(
            ours.worker_seconds < keda.worker_seconds,
            "{ours:?} vs {keda:?}"
        );
    }

    #[test]
    fn a_single_task_wakes_the_pool_after_the_startup_delay() {
        let trace = [Arrival {
            at: 10.0,
            duration: 5.0,
        }];
        let report = simulate(
            &trace,
            cluster(),
            &mut WarrenPolicy::new(PolicyConfig::default(), 2.0),
            3600.0,
        );
        assert_eq!(report.unfinished, 0);
        assert!((30.0..=33.0).contains(&report.p95_wait), "{report:?}");
        assert_eq!(report.peak_pods, 1);
    }
}
