//! `cargo bench -p warren-deploy --features simulate --bench autoscale`: Warren's policy against
//! KEDA's defaults on a bursty trace with a pod start-up delay. Deterministic: the same table on every run.
//! Environment: SIM_STARTUP (pod start-up seconds, default 30), SIM_MAX (pods, 50).

use warren_deploy::policy::PolicyConfig;
use warren_deploy::simulate::{Cluster, Keda, SimPolicy, WarrenPolicy, bursty_trace, simulate};

fn env_or(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let trace = bursty_trace();
    let max = env_or("SIM_MAX", 50.0) as u32;
    let cluster = Cluster {
        startup_delay: env_or("SIM_STARTUP", 30.0),
        concurrency: 4,
        max_pods: max,
    };
    println!(
        "autoscale simulation: {} tasks over {:.0} min, pod start-up {:.0}s, {} tasks per pod, max {} pods",
        trace.len(),
        trace.last().map_or(0.0, |a| a.at) / 60.0,
        cluster.startup_delay,
        cluster.concurrency,
        cluster.max_pods
    );
    let mut warren = WarrenPolicy::new(
        PolicyConfig {
            max,
            tasks_per_worker: 4,
            ..PolicyConfig::default()
        },
        2.0,
    );
    let mut keda = Keda::new(4, max);
    let policies: [&mut dyn SimPolicy; 2] = [&mut warren, &mut keda];
    println!();
    println!(
        "{:<16} {:>12} {:>13} {:>14} {:>13} {:>10}",
        "policy", "p95 wait s", "mean wait s", "worker-hours", "scale events", "peak pods"
    );
    let mut rows = Vec::new();
    for policy in policies {
        let r = simulate(&trace, cluster, policy, 7200.0);
        println!(
            "{:<16} {:>12.1} {:>13.1} {:>14.2} {:>13} {:>10}",
            r.policy,
            r.p95_wait,
            r.mean_wait,
            r.worker_seconds / 3600.0,
            r.scale_events,
            r.peak_pods
        );
        rows.push(r);
    }
    let (ours, keda) = (&rows[0], &rows[1]);
    println!();
    println!(
        "warren vs keda: p95 wait {:.2}x, worker-hours {:.2}x (targets: both below 1)",
        ours.p95_wait / keda.p95_wait,
        ours.worker_seconds / keda.worker_seconds
    );
}
