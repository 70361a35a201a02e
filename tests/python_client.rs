//! End-to-end: the Python package `clients/python` (warren_client) against the real worker and
//! broker. Its own unittest suite does the checking; this starts the worker it needs.

mod common;

use std::time::Duration;

use common::*;

/// The interpreter with warren_client installed: tests/run makes a virtualenv and names it in
/// WARREN_PYTHON.
fn python() -> String {
    std::env::var("WARREN_PYTHON").unwrap_or_else(|_| "python3".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_package_submits_collects_and_interoperates_with_the_cli() {
    let queue = unique_queue("python");
    let dir = scratch("python");
    let worker = WorkerProcess::start(
        &queue,
        &dir,
        &[
            "--allow-exec",
            "sh",
            "--allow-task-env",
            "WHO",
            "--concurrency",
            "8",
        ],
    );
    worker
        .wait_for_log("consuming", 1, Duration::from_secs(60))
        .await;
    let run = tokio::process::Command::new(python())
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/tests"))
        .env("WARREN_TEST_QUEUE", &queue)
        .env("WARREN_BIN", env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_AMQP_URL", AMQP_URL)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run)
        .await
        .expect("the Python tests finished")
        .expect("python runs (tests/run installs warren_client into a virtualenv)");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    delete_queues(&queue).await;
}
