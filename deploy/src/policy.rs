//! The scaling policy: a pure function from what was observed to how many workers there should
//! be. No I/O and no clock: time is an input, so every rule is tested on tables.
//!
//! Rules, in order:
//! - The backlog is ready + unacked: in-flight tasks count, so busy workers are not scaled away.
//! - The target is `ceil(backlog / tasks_per_worker)`, clamped to `[min, max]`.
//! - From zero, workers start only once the backlog reaches `activation`.
//! - Scaling up is immediate, unless the pool has workers that cannot start (image pull errors,
//!   crash loops): then it holds, because more of them would not help.
//! - Scaling down follows the highest target of the last `scale_down_window`, so a dip in the
//!   input never shrinks the pool. Nothing shrinks before a full window has been observed.
//! - The last worker goes only after the queue has been empty for `idle_to_zero`.
//! - A failed probe keeps the current size; after `probe_failures_before_fallback` failures in a
//!   row, `fallback_replicas` applies when set.

use std::collections::VecDeque;
use std::time::Duration;

use crate::error::DeployError;

/// The knobs of one pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyConfig {
    /// Fewest workers.
    pub min: u32,
    /// Most workers.
    pub max: u32,
    /// Backlog each worker is meant to carry (usually its concurrency).
    pub tasks_per_worker: u32,
    /// Backlog needed to start workers when there are none.
    pub activation: u64,
    /// How long the target must stay lower before the pool shrinks.
    pub scale_down_window: Duration,
    /// How long the queue must stay empty before the last worker stops.
    pub idle_to_zero: Duration,
    /// Size to fall back to after repeated probe failures; None keeps the current size.
    pub fallback_replicas: Option<u32>,
    /// Probe failures in a row before `fallback_replicas` applies.
    pub probe_failures_before_fallback: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            min: 0,
            max: 10,
            tasks_per_worker: 4,
            activation: 1,
            scale_down_window: Duration::from_secs(60),
            idle_to_zero: Duration::from_secs(120),
            fallback_replicas: None,
            probe_failures_before_fallback: 3,
        }
    }
}

impl PolicyConfig {
    /// Checks that the knobs make sense together.
    pub fn validate(&self) -> Result<(), DeployError> {
        let invalid = |message: String| Err(DeployError::InvalidSetting(message));
        if self.max < self.min {
            return invalid(format!("max ({}) is below min ({})", self.max, self.min));
        }
        if self.tasks_per_worker == 0 {
            return invalid("tasks-per-worker must be at least 1".into());
        }
        if let Some(f) = self.fallback_replicas
            && f > self.max
        {
            return invalid(format!(
                "fallback-replicas ({f}) is above max ({})",
                self.max
            ));
        }
        Ok(())
    }
}

/// Queue depth as probed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Depth {
    /// Messages waiting.
    pub ready: u64,
    /// Messages being worked on; None when the probe cannot tell (passive declare).
    pub unacked: Option<u64>,
}

/// One observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// Time since the autoscaler started (monotonic).
    pub now: Duration,
    /// Queue depth; None when the probe failed.
    pub depth: Option<Depth>,
    /// Workers the backend runs or is starting now.
    pub current: u32,
    /// Workers that exist but are not becoming ready (crash loops, image pull errors).
    pub stalled: u32,
}

/// Why the policy chose its size; logged and exported as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Target equals the current size.
    Steady,
    /// Growing to meet the backlog.
    ScaleUp,
    /// Starting workers from zero.
    WakeFromZero,
    /// Backlog below `activation` with no workers: staying at zero.
    BelowActivation,
    /// The target is lower, but not yet for a whole window.
    WaitingToScaleDown,
    /// Shrinking after the window.
    ScaleDown,
    /// Keeping one worker until the queue has been idle long enough.
    WaitingForIdle,
    /// Stopping the last workers after the idle time.
    IdleToZero,
    /// The probe failed: holding the current size.
    ProbeFailedHolding,
    /// The probe kept failing: using the fallback size.
    ProbeFailedFallback,
    /// Workers cannot start: not growing the pool.
    PoolUnhealthy,
}

impl Reason {
    /// Snake-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Steady => "steady",
            Reason::ScaleUp => "scale_up",
            Reason::WakeFromZero => "wake_from_zero",
            Reason::BelowActivation => "below_activation",
            Reason::WaitingToScaleDown => "waiting_to_scale_down",
            Reason::ScaleDown => "scale_down",
            Reason::WaitingForIdle => "waiting_for_idle",
            Reason::IdleToZero => "idle_to_zero",
            Reason::ProbeFailedHolding => "probe_failed_holding",
            Reason::ProbeFailedFallback => "probe_failed_fallback",
            Reason::PoolUnhealthy => "pool_unhealthy",
        }
    }
}

/// The policy's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Workers there should be.
    pub desired: u32,
    /// Why.
    pub reason: Reason,
}

/// What the policy remembers between observations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyState {
    /// Targets of the last scale-down window: (time, target).
    recent: VecDeque<(Duration, u32)>,
    /// When the first successful probe happened.
    observed_since: Option<Duration>,
    /// When the queue last had work.
    last_busy: Option<Duration>,
    /// Failed probes in a row.
    probe_failures: u32,
}

/// Decides the pool size for `input`; returns the decision and the state for the next call.
pub fn decide(
    config: &PolicyConfig,
    state: &PolicyState,
    input: &Input,
) -> (Decision, PolicyState) {
    let mut next = state.clone();
    let current = input.current;
    let Some(depth) = input.depth else {
        next.probe_failures = next.probe_failures.saturating_add(1);
        let decision = match config.fallback_replicas {
            Some(fallback) if next.probe_failures >= config.probe_failures_before_fallback => {
                Decision {
                    desired: fallback.clamp(config.min, config.max),
                    reason: Reason::ProbeFailedFallback,
                }
            }
            _ => Decision::hold(current, Reason::ProbeFailedHolding),
        };
        return (decision, next);
    };
    next.probe_failures = 0;
    let since = *next.observed_since.get_or_insert(input.now);
    let backlog = depth.ready.saturating_add(depth.unacked.unwrap_or(0));
    if backlog > 0 {
        next.last_busy = Some(input.now);
    }

    let needed = backlog.div_ceil(u64::from(config.tasks_per_worker.max(1)));
    let mut target = u32::try_from(needed)
        .unwrap_or(u32::MAX)
        .clamp(config.min, config.max);
    let asleep = current == 0 && backlog < config.activation;
    if asleep {
        target = config.min;
    }
    let window_start = input.now.saturating_sub(config.scale_down_window);
    while next
        .recent
        .front()
        .is_some_and(|(at, _)| *at < window_start)
    {
        next.recent.pop_front();
    }
    next.recent.push_back((input.now, target));

    let decision = if target > current {
        grow(input, target)
    } else if target == current {
        let reason = if asleep && current == 0 {
            Reason::BelowActivation
        } else {
            Reason::Steady
        };
        Decision::hold(current, reason)
    } else {
        shrink(config, &next, input, target, since)
    };
    (decision, next)
}

/// Growing to `target`, unless the pool is too unhealthy for more pods to help.
fn grow(input: &Input, target: u32) -> Decision {
    let current = input.current;
    // One stalled pod among healthy ones does not stop growth; half or more of them does
    // (new pods would most likely stall the same way).
    if input.stalled > 0 && input.stalled.saturating_mul(2) >= current {
        return Decision::hold(current, Reason::PoolUnhealthy);
    }
    let reason = if current == 0 {
        Reason::WakeFromZero
    } else {
        Reason::ScaleUp
    };
    Decision {
        desired: target,
        reason,
    }
}

/// Shrinking towards a lower `target`: to the highest target of a whole observed window, and to
/// zero only after `idle_to_zero` without work (observed from `since`).
fn shrink(
    config: &PolicyConfig,
    next: &PolicyState,
    input: &Input,
    target: u32,
    since: Duration,
) -> Decision {
    let current = input.current;
    let watched_long_enough = input.now.saturating_sub(since) >= config.scale_down_window;
    let stabilized = next.recent.iter().map(|(_, t)| *t).max().unwrap_or(target);
    let desired = if watched_long_enough {
        stabilized.min(current)
    } else {
        current
    };
    if desired == current {
        return Decision::hold(current, Reason::WaitingToScaleDown);
    }
    if desired > 0 {
        return Decision {
            desired,
            reason: Reason::ScaleDown,
        };
    }
    let idle_for = input.now.saturating_sub(next.last_busy.unwrap_or(since));
    if idle_for >= config.idle_to_zero {
        return Decision {
            desired: 0,
            reason: Reason::IdleToZero,
        };
    }
    if current == 1 {
        return Decision::hold(current, Reason::WaitingForIdle);
    }
    Decision {
        desired: 1,
        reason: Reason::ScaleDown,
    }
}

impl Decision {
    /// Keeping the pool at `current` workers.
    fn hold(current: u32, reason: Reason) -> Self {
        Self {
            desired: current,
            reason,
        }
    }
}

/// What the control loop remembers between polls: the policy's state, the pool as last seen,
/// and whether the backend failed since.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopState {
    /// The policy's windows.
    pub policy: PolicyState,
    /// Workers at the last poll the backend answered.
    pub last_seen: Option<u32>,
    /// The backend failed since it last answered.
    pub outage: bool,
}

/// What one poll of the control loop does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// The backend did not answer: change nothing.
    Hold,
    /// Act on this decision (`desired == input.current` means no change).
    Act {
        /// The decision.
        decision: Decision,
        /// What it was made from.
        input: Input,
        /// The policy wanted fewer workers, but this is the first poll after an outage.
        kept_after_outage: bool,
    },
}

/// One poll: the queue's `depth` and the backend's `(replicas, stalled)` (None when it failed)
/// at `now`. During an outage the policy still gets the queue's readings (so its windows stay
/// honest) but nothing is changed, and the first poll after one never shrinks the pool.
pub fn step(
    config: &PolicyConfig,
    state: &LoopState,
    now: Duration,
    depth: Option<Depth>,
    pool: Option<(u32, u32)>,
) -> (Step, LoopState) {
    let mut next = state.clone();
    let Some((current, stalled)) = pool else {
        next.outage = true;
        if let Some(current) = state.last_seen {
            let input = Input {
                now,
                depth,
                current,
                stalled: 0,
            };
            next.policy = decide(config, &state.policy, &input).1;
        }
        return (Step::Hold, next);
    };
    let input = Input {
        now,
        depth,
        current,
        stalled,
    };
    let (mut decision, policy) = decide(config, &state.policy, &input);
    let kept_after_outage = state.outage && decision.desired < current;
    if kept_after_outage {
        decision.desired = current;
    }
    next.policy = policy;
    next.last_seen = Some(current);
    next.outage = false;
    (
        Step::Act {
            decision,
            input,
            kept_after_outage,
        },
        next,
    )
}

#[cfg(test)]
mod tests;
