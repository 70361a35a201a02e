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
    let hold = |reason| Decision {
        desired: current,
        reason,
    };

    let Some(depth) = input.depth else {
        next.probe_failures = next.probe_failures.saturating_add(1);
        let decision = match config.fallback_replicas {
            Some(fallback) if next.probe_failures >= config.probe_failures_before_fallback => {
                Decision {
                    desired: fallback.clamp(config.min, config.max),
                    reason: Reason::ProbeFailedFallback,
                }
            }
            _ => hold(Reason::ProbeFailedHolding),
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

    if target > current {
        // One stalled pod among healthy ones does not stop growth; half or more of them does
        // (new pods would most likely stall the same way).
        if input.stalled > 0 && input.stalled.saturating_mul(2) >= current {
            return (hold(Reason::PoolUnhealthy), next);
        }
        let reason = if current == 0 {
            Reason::WakeFromZero
        } else {
            Reason::ScaleUp
        };
        return (
            Decision {
                desired: target,
                reason,
            },
            next,
        );
    }
    if target == current {
        let reason = if asleep && current == 0 {
            Reason::BelowActivation
        } else {
            Reason::Steady
        };
        return (hold(reason), next);
    }

    // Lower target: follow the highest target of a whole observed window.
    let watched_long_enough = input.now.saturating_sub(since) >= config.scale_down_window;
    let stabilized = next.recent.iter().map(|(_, t)| *t).max().unwrap_or(target);
    let mut desired = if watched_long_enough {
        stabilized.min(current)
    } else {
        current
    };
    if desired == current {
        return (hold(Reason::WaitingToScaleDown), next);
    }
    if desired == 0 {
        let idle_for = input.now.saturating_sub(next.last_busy.unwrap_or(since));
        if idle_for < config.idle_to_zero {
            desired = 1;
            if desired == current {
                return (hold(Reason::WaitingForIdle), next);
            }
            return (
                Decision {
                    desired,
                    reason: Reason::ScaleDown,
                },
                next,
            );
        }
        return (
            Decision {
                desired,
                reason: Reason::IdleToZero,
            },
            next,
        );
    }
    (
        Decision {
            desired,
            reason: Reason::ScaleDown,
        },
        next,
    )
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
mod tests {
    use super::*;

    fn config() -> PolicyConfig {
        PolicyConfig {
            min: 0,
            max: 10,
            tasks_per_worker: 4,
            activation: 3,
            scale_down_window: Duration::from_secs(60),
            idle_to_zero: Duration::from_secs(120),
            fallback_replicas: Some(2),
            probe_failures_before_fallback: 3,
        }
    }

    /// One row: at second `t`, with `ready`/`unacked` (None = probe failed), `stalled` workers,
    /// the pool at its size from the previous row, expect `desired` for `reason`.
    struct Row {
        t: u64,
        depth: Option<(u64, Option<u64>)>,
        stalled: u32,
        desired: u32,
        reason: Reason,
    }

    fn row(t: u64, ready: u64, unacked: u64, desired: u32, reason: Reason) -> Row {
        Row {
            t,
            depth: Some((ready, Some(unacked))),
            stalled: 0,
            desired,
            reason,
        }
    }

    /// Replays rows, applying each decision as the next row's current size.
    fn replay(config: &PolicyConfig, start: u32, rows: &[Row]) {
        let mut state = PolicyState::default();
        let mut current = start;
        for (i, r) in rows.iter().enumerate() {
            let input = Input {
                now: Duration::from_secs(r.t),
                depth: r.depth.map(|(ready, unacked)| Depth { ready, unacked }),
                current,
                stalled: r.stalled,
            };
            let (decision, next) = decide(config, &state, &input);
            assert_eq!(
                (decision.desired, decision.reason),
                (r.desired, r.reason),
                "row {i} (t={}s, current={current})",
                r.t
            );
            state = next;
            current = decision.desired;
        }
    }

    #[test]
    fn wakes_from_zero_only_at_the_activation_backlog() {
        replay(
            &config(),
            0,
            &[
                row(0, 0, 0, 0, Reason::BelowActivation),
                row(2, 2, 0, 0, Reason::BelowActivation),
                row(4, 3, 0, 1, Reason::WakeFromZero),
                row(6, 1, 2, 1, Reason::Steady),
            ],
        );
    }

    #[test]
    fn a_burst_scales_up_at_once_and_is_capped_at_max() {
        replay(
            &config(),
            1,
            &[
                row(0, 4, 0, 1, Reason::Steady),
                row(2, 30, 4, 9, Reason::ScaleUp),
                row(4, 500, 36, 10, Reason::ScaleUp),
                row(6, 400, 40, 10, Reason::Steady),
            ],
        );
    }

    #[test]
    fn in_flight_tasks_keep_busy_workers() {
        // Nothing waiting, but 20 tasks running on 5 workers: the target stays 5.
        replay(
            &config(),
            5,
            &[
                row(0, 0, 20, 5, Reason::Steady),
                row(100, 0, 20, 5, Reason::Steady),
            ],
        );
    }

    #[test]
    fn draining_shrinks_after_the_window_then_idles_to_zero() {
        replay(
            &config(),
            8,
            &[
                row(0, 20, 12, 8, Reason::Steady),
                row(10, 0, 8, 8, Reason::WaitingToScaleDown),
                row(60, 0, 8, 8, Reason::WaitingToScaleDown), // 8 still in the window (t=0)
                row(71, 0, 8, 2, Reason::ScaleDown),
                row(72, 0, 0, 2, Reason::WaitingToScaleDown),
                row(133, 0, 0, 1, Reason::ScaleDown), // window passed, but busy until t=71
                row(190, 0, 0, 1, Reason::WaitingForIdle),
                row(192, 0, 0, 0, Reason::IdleToZero),
                row(194, 0, 0, 0, Reason::BelowActivation),
            ],
        );
    }

    #[test]
    fn flapping_input_does_not_shrink_the_pool() {
        let mut rows = Vec::new();
        for i in 0..60 {
            let t = i * 2;
            let (ready, unacked) = if i % 2 == 0 { (40, 0) } else { (0, 4) };
            let reason = if i == 0 {
                Reason::ScaleUp
            } else if i % 2 == 0 {
                Reason::Steady
            } else {
                Reason::WaitingToScaleDown
            };
            rows.push(row(t, ready, unacked, 10, reason));
        }
        replay(&config(), 1, &rows);
    }

    #[test]
    fn nothing_shrinks_before_a_whole_window_was_observed() {
        // The autoscaler restarts next to a large idle pool: it waits a window before acting.
        replay(
            &config(),
            6,
            &[
                row(0, 0, 0, 6, Reason::WaitingToScaleDown),
                row(30, 0, 0, 6, Reason::WaitingToScaleDown),
                row(60, 0, 0, 1, Reason::ScaleDown),
                row(120, 0, 0, 0, Reason::IdleToZero),
            ],
        );
    }

    #[test]
    fn probe_failures_hold_then_fall_back() {
        let failed = |t, desired, reason| Row {
            t,
            depth: None,
            stalled: 0,
            desired,
            reason,
        };
        replay(
            &config(),
            5,
            &[
                failed(0, 5, Reason::ProbeFailedHolding),
                failed(2, 5, Reason::ProbeFailedHolding),
                failed(4, 2, Reason::ProbeFailedFallback),
                failed(6, 2, Reason::ProbeFailedFallback),
                row(8, 16, 0, 4, Reason::ScaleUp), // a good probe resets the count
                failed(10, 4, Reason::ProbeFailedHolding),
            ],
        );
        let no_fallback = PolicyConfig {
            fallback_replicas: None,
            ..config()
        };
        let failed_rows: Vec<Row> = (0..5)
            .map(|i| failed(i * 2, 3, Reason::ProbeFailedHolding))
            .collect();
        replay(&no_fallback, 3, &failed_rows);
    }

    #[test]
    fn an_unhealthy_pool_is_not_grown_but_may_shrink() {
        let stalled = |t, ready, desired, reason| Row {
            t,
            depth: Some((ready, Some(0))),
            stalled: 2,
            desired,
            reason,
        };
        replay(
            &config(),
            3,
            &[
                stalled(0, 100, 3, Reason::PoolUnhealthy),
                stalled(2, 100, 3, Reason::PoolUnhealthy),
                row(4, 100, 0, 10, Reason::ScaleUp), // healthy again
                stalled(6, 0, 10, Reason::WaitingToScaleDown),
            ],
        );
    }

    #[test]
    fn one_stalled_pod_among_healthy_ones_does_not_stop_growth() {
        let with_stalled = |t, ready, stalled, desired, reason| Row {
            t,
            depth: Some((ready, Some(0))),
            stalled,
            desired,
            reason,
        };
        replay(&config(), 5, &[with_stalled(0, 40, 1, 10, Reason::ScaleUp)]);
        // Half or more of the pool stalled: hold.
        replay(
            &config(),
            4,
            &[with_stalled(0, 40, 2, 4, Reason::PoolUnhealthy)],
        );
    }

    #[test]
    fn unknown_in_flight_counts_ready_only_and_min_is_respected() {
        let cfg = PolicyConfig { min: 2, ..config() };
        let passive = |t, ready, desired, reason| Row {
            t,
            depth: Some((ready, None)),
            stalled: 0,
            desired,
            reason,
        };
        replay(
            &cfg,
            0,
            &[
                passive(0, 0, 2, Reason::WakeFromZero), // min applies even when idle
                passive(2, 9, 3, Reason::ScaleUp),
                passive(70, 0, 2, Reason::ScaleDown),
                passive(300, 0, 2, Reason::Steady),
            ],
        );
    }

    #[test]
    fn config_validation_names_the_problem() {
        assert!(
            PolicyConfig {
                min: 5,
                max: 2,
                ..config()
            }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("below min")
        );
        assert!(
            PolicyConfig {
                tasks_per_worker: 0,
                ..config()
            }
            .validate()
            .is_err()
        );
        assert!(
            PolicyConfig {
                fallback_replicas: Some(11),
                ..config()
            }
            .validate()
            .is_err()
        );
        assert!(config().validate().is_ok());
    }

    #[test]
    fn the_loop_holds_during_an_outage_and_does_not_shrink_right_after_one() {
        let config = PolicyConfig {
            min: 0,
            max: 10,
            tasks_per_worker: 1,
            scale_down_window: Duration::ZERO,
            ..PolicyConfig::default()
        };
        let empty = Some(Depth {
            ready: 0,
            unacked: Some(0),
        });
        let busy = Some(Depth {
            ready: 8,
            unacked: Some(0),
        });
        let mut state = LoopState::default();
        let poll = |state: &mut LoopState, at: u64, depth, replicas: Option<u32>| {
            let (got, next) = step(
                &config,
                state,
                Duration::from_secs(at * 1000),
                depth,
                replicas.map(|r| (r, 0)),
            );
            *state = next;
            match got {
                Step::Hold => None,
                Step::Act {
                    decision,
                    kept_after_outage,
                    ..
                } => Some((decision.desired, kept_after_outage)),
            }
        };
        assert_eq!(poll(&mut state, 1, busy, Some(0)), Some((8, false)));
        // The backend fails: nothing is changed, whatever the queue does meanwhile.
        assert_eq!(poll(&mut state, 2, busy, None), None);
        assert_eq!(poll(&mut state, 3, empty, None), None);
        assert!(state.outage);
        // It answers again; the queue emptied during the outage, but the pool is kept this once.
        assert_eq!(poll(&mut state, 4, empty, Some(8)), Some((8, true)));
        // From the next poll on, the policy's own windows decide.
        let after = poll(&mut state, 5, empty, Some(8)).unwrap();
        assert!(after.0 < 8 && !after.1, "{after:?}");
        assert!(!state.outage);
        assert_eq!(state.last_seen, Some(8));
    }
}
