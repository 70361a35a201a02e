//! End-to-end: a real Prometheus server (Debian's `prometheus` package) scrapes a worker and an
//! autoscaler during a batch, and the values are read back through its HTTP API; `promtool check
//! metrics` accepts every endpoint.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

const MINUTE: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs an instant query; returns the first sample's value.
async fn query(prometheus: &str, promql: &str) -> Option<f64> {
    let url = format!("{prometheus}/api/v1/query?query={}", percent_encode(promql));
    let reply: Value = http_get(url).await.ok()?.json().await.ok()?;
    reply["data"]["result"][0]["value"][1]
        .as_str()?
        .parse()
        .ok()
}

fn host_port(metrics_url: &str) -> String {
    metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_worker_and_an_autoscaler() {
    let queue = unique_queue("prom");
    let dir = scratch("prom");
    let worker = WorkerProcess::start(
        &queue,
        &dir,
        &[
            "--metrics-addr",
            "127.0.0.1:0",
            "--concurrency",
            "4",
            "--allow-exec",
            "true",
        ],
    );
    let worker_metrics = worker.metrics_url().await;
    let scaler = WorkerProcess::spawn(
        &[
            "autoscale",
            "--queue",
            &queue,
            "--backend",
            "local",
            "--max",
            "3",
            "--poll",
            "0.5",
            "--dry-run",
            "--metrics-addr",
            "127.0.0.1:0",
            "--",
            "true",
        ],
        &dir,
        &[],
    );
    let scaler_metrics = scaler.metrics_url().await;

    let port = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: warren-worker\n    static_configs:\n      - targets: ['{}']\n  - job_name: warren-autoscaler\n    static_configs:\n      - targets: ['{}']\n",
            host_port(&worker_metrics),
            host_port(&scaler_metrics)
        ),
    )
    .unwrap();
    let _prometheus = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus is installed (tests/run installs Debian's package)");
    let server = format!("http://127.0.0.1:{port}");
    eventually(MINUTE, "prometheus ready", || async {
        http_get(format!("{server}/-/ready"))
            .await
            .ok()
            .filter(|r| r.status() == 200)
            .map(|_| ())
    })
    .await;

    let mut tasks: Vec<Value> = (0..30)
        .map(|i| json!({"kind": "echo", "args": {"i": i}}))
        .collect();
    // Valid for submit, refused by the worker's exec handler.
    tasks.push(json!({"kind": "exec", "args": {"argv": ["true"], "env": {"LD_PRELOAD": "x.so"}}}));
    tasks.push(json!({"kind": "no-such-handler"}));
    let file = dir.join("tasks.jsonl");
    write_tasks(&file, &tasks);
    assert_eq!(submit_file(&queue, &file, &["--wait"]).await.code, Some(1));

    let expect = |promql: &'static str, value: f64| {
        let server = server.clone();
        async move {
            eventually(MINUTE, &format!("{promql} == {value}"), || async {
                (query(&server, promql).await == Some(value)).then_some(())
            })
            .await;
        }
    };
    expect("sum(up{job=~\"warren-.*\"})", 2.0).await;
    expect(
        "sum(warren_worker_tasks_finished_total{status=\"succeeded\"})",
        30.0,
    )
    .await;
    expect(
        "sum(warren_worker_tasks_finished_total{status=\"rejected\"})",
        1.0,
    )
    .await;
    expect(
        "sum(warren_worker_dead_lettered_total{reason=\"unknown_kind\"})",
        1.0,
    )
    .await;
    expect(
        "sum(warren_worker_task_duration_seconds_count{kind=\"echo\"})",
        30.0,
    )
    .await;
    expect("sum(warren_worker_tasks_in_flight)", 0.0).await;
    let pool = format!("warren_autoscaler_desired_replicas{{pool=\"{queue}\"}}");
    eventually(MINUTE, "the autoscaler's desired replicas", || async {
        query(&server, &pool).await
    })
    .await;

    for url in [&worker_metrics, &scaler_metrics] {
        let page = scrape(url).await;
        let mut check = tokio::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        check
            .stdin
            .take()
            .unwrap()
            .write_all(page.as_bytes())
            .await
            .unwrap();
        let out = check.wait_with_output().await.unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics {url}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    delete_queues(&queue).await;
}
