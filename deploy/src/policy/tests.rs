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
