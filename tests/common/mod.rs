//! Shared helpers for the end-to-end tests: the real `warren` binary against the real RabbitMQ
//! on 127.0.0.1:5672 (guest/guest), in the vhost [`TEST_VHOST`]. Every test uses queues of its
//! own, so tests run in parallel.

#![allow(dead_code)]

pub mod private_broker;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{Channel, Connection, ConnectionProperties};
use serde_json::Value;
use tokio::process::{Child, Command};

/// The vhost of the shared broker that every test uses. `tests/run` deletes and recreates it
/// before the suite, so what a run leaves behind (batches some tests leave uncollected on purpose)
/// never piles up: a RabbitMQ limited to 1024 open files stops answering new connections at about
/// 300 quorum queues.
pub const TEST_VHOST: &str = "warren-test";
/// The shared broker's test vhost.
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/warren-test";

/// The URL of the shared broker's test vhost at `127.0.0.1:PORT` (a proxy in front of it).
pub fn test_vhost_url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/{TEST_VHOST}")
}

/// How long one test binary may run before the watchdog ends it: the longest takes under two
/// minutes, and a hang must fail the suite rather than hold CI until its own limit.
const TEST_BINARY_LIMIT: Duration = Duration::from_secs(600);

/// Starts (once per test binary) a thread that exits the process when it runs past
/// [`TEST_BINARY_LIMIT`], naming the limit.
fn watchdog() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        std::thread::spawn(|| {
            std::thread::sleep(TEST_BINARY_LIMIT);
            eprintln!(
                "watchdog: this test binary ran for over {TEST_BINARY_LIMIT:?}: a test hangs; \
                 run it alone with --nocapture to see which"
            );
            std::process::exit(124);
        });
    });
}

/// The `warren` binary under test.
pub fn warren() -> Command {
    watchdog();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.env("WARREN_AMQP_URL", AMQP_URL)
        .env("WARREN_LOG", "info,lapin=off")
        .kill_on_drop(true);
    cmd
}

/// A queue name no other test uses.
pub fn unique_queue(test: &str) -> String {
    watchdog();
    format!("test.{test}.{}", uuid::Uuid::now_v7().simple())
}

/// A scratch directory for one test.
pub fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "warren-test-{test}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A running `warren worker`, with its stderr going to a log file the test can watch.
pub struct WorkerProcess {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProcess {
    /// Starts `warren worker --queue QUEUE EXTRA...`.
    pub fn start(queue: &str, dir: &Path, extra: &[&str]) -> Self {
        Self::start_with(queue, dir, extra, &[])
    }

    /// Like `start`, with extra environment variables.
    pub fn start_with(queue: &str, dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut args = vec!["worker", "--queue", queue];
        args.extend_from_slice(extra);
        Self::spawn(&args, dir, env)
    }

    /// Starts `warren ARGS...` in the background with its stderr in a log file.
    pub fn spawn(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Self {
        let log = dir.join(format!("{}-{}.log", args[0], uuid::Uuid::now_v7().simple()));
        let file = std::fs::File::create(&log).expect("process log");
        let mut cmd = warren();
        // A worker's default sandbox data root is its working folder: the test's scratch folder.
        cmd.args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start warren");
        Self { child, log }
    }

    /// The metrics URL the process logged (`metrics on http://ADDR/metrics`).
    pub async fn metrics_url(&self) -> String {
        self.wait_for_log("metrics on http://", 1, Duration::from_secs(30))
            .await;
        let log = self.log_text();
        let start = log.find("metrics on http://").expect("metrics line") + "metrics on ".len();
        log[start..]
            .split_whitespace()
            .next()
            .expect("url")
            .to_string()
    }

    /// The worker's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub async fn wait_for_log(&self, needle: &str, count: usize, within: Duration) {
        let until = Instant::now() + within;
        while self.log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < until,
                "worker log never showed {count}x '{needle}':\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal to the worker.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.child.id().expect("worker pid") as i32;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal worker");
    }

    /// Waits for the worker to exit and returns its exit code.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let status = tokio::time::timeout(within, self.child.wait())
            .await
            .expect("worker did not exit in time")
            .expect("wait for worker");
        status.code()
    }
}

/// Output of a finished `warren` command.
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `warren ARGS` with `stdin`, failing the test if it takes longer than `within`.
pub async fn run_warren(args: &[&str], stdin: Option<&str>, within: Duration) -> Finished {
    let mut cmd = warren();
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("start warren");
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    // Read both pipes apart from the wait, so that a command that hangs still shows what it
    // printed before it was killed.
    let stdout = read_pipe(child.stdout.take());
    let stderr = read_pipe(child.stderr.take());
    let status = match tokio::time::timeout(within, child.wait()).await {
        Ok(status) => status.expect("wait for warren"),
        Err(_) => {
            let _ = child.start_kill();
            let said = tokio::time::timeout(Duration::from_secs(5), stderr)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            panic!(
                "warren {args:?} did not finish within {within:?}; its stderr until killed:\n{}",
                String::from_utf8_lossy(&said)
            );
        }
    };
    Finished {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout.await.unwrap_or_default()).into_owned(),
        stderr: String::from_utf8_lossy(&stderr.await.unwrap_or_default()).into_owned(),
    }
}

/// All a child's pipe gives until it closes, read by a task of its own.
fn read_pipe(
    pipe: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            use tokio::io::AsyncReadExt;
            let _ = pipe.read_to_end(&mut bytes).await;
        }
        bytes
    })
}

/// Runs `warren wait BATCH --output OUT`, asserts it succeeded, and returns its stderr and the
/// result lines in OUT.
pub async fn wait_into(batch: &str, out: &Path) -> (String, Vec<Value>) {
    wait_into_with(batch, out, &[]).await
}

/// [`wait_into`] with more arguments (`--amqp-url` of a private broker, say).
pub async fn wait_into_with(batch: &str, out: &Path, extra: &[&str]) -> (String, Vec<Value>) {
    let out_arg = out.to_str().expect("utf-8 path");
    let mut args = vec!["wait", batch, "--output", out_arg];
    args.extend_from_slice(extra);
    let waited = run_warren(&args, None, Duration::from_secs(60)).await;
    assert_eq!(waited.code, Some(0), "{}", waited.stderr);
    let results = read_results(&std::fs::read_to_string(out).expect("output file"));
    (waited.stderr, results)
}

/// Result lines keyed by task id.
pub fn by_task_id(results: Vec<Value>) -> std::collections::BTreeMap<String, Value> {
    results
        .into_iter()
        .map(|r| (r["task_id"].as_str().expect("task_id").to_string(), r))
        .collect()
}

/// Writes task lines to a file.
pub fn write_tasks(path: &Path, tasks: &[Value]) {
    let text: String = tasks.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(path, text).expect("write tasks");
}

/// Parses result lines.
pub fn read_results(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad result line {l}: {e}")))
        .collect()
}

/// A raw AMQP channel for publishing hand-made messages and inspecting queues.
pub async fn raw_channel() -> (Connection, Channel) {
    watchdog();
    let within = Duration::from_secs(30);
    let conn = tokio::time::timeout(
        within,
        Connection::connect(AMQP_URL, ConnectionProperties::default()),
    )
    .await
    .unwrap_or_else(|_| panic!("the broker did not answer a connection within {within:?}"))
    .unwrap_or_else(|e| {
        panic!("connect to {AMQP_URL}: {e} (tests/run creates the vhost {TEST_VHOST})")
    });
    let channel = tokio::time::timeout(within, conn.create_channel())
        .await
        .unwrap_or_else(|_| panic!("the broker did not open a channel within {within:?}"))
        .expect("channel");
    (conn, channel)
}

/// Takes every message from `queue` (acking them).
/// Publishes `body` to `queue` as a persistent message with no properties (as anyone allowed to
/// publish there could), and waits for the broker to take it.
pub async fn publish_raw(channel: &Channel, queue: &str, body: &[u8]) {
    // Without confirm mode the confirm below resolves at once, and a message still on its way to
    // a quorum queue can be dropped when the test closes the connection right after.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    let confirmation = channel
        .basic_publish(
            "".into(),
            queue.into(),
            lapin::options::BasicPublishOptions::default(),
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(
        confirmation.is_ack(),
        "the broker refused a message to '{queue}'"
    );
}

pub async fn drain(channel: &Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        out.push(m.delivery);
    }
    out
}

/// Deletes a task queue and its dead-letter queue.
pub async fn delete_queues(queue: &str) {
    let (conn, channel) = raw_channel().await;
    for q in [queue.to_string(), format!("{queue}.dead")] {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "bye".into()).await;
}

/// Reads a string header.
pub fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    warren_header(&delivery.properties, name)
}

fn warren_header(props: &lapin::BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Polls `check` until it returns Some, failing after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `count` lines of `text`, for a failure message.
pub fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// Runs `warren submit --queue QUEUE --file FILE EXTRA...`.
pub async fn submit_file(queue: &str, file: &Path, extra: &[&str]) -> Finished {
    let file = file.to_str().expect("utf-8 path");
    let mut args = vec!["submit", "--create-queue", "--queue", queue, "--file", file];
    args.extend_from_slice(extra);
    run_warren(&args, None, Duration::from_secs(60)).await
}

/// Declares a durable classic queue, as another tool might.
pub async fn declare_classic(channel: &Channel, queue: &str) {
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions::durable(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("declare classic queue");
}

/// GET `url` with reqwest. Warren builds reqwest with rustls and no built-in crypto provider, so
/// the process must install one (ring, as the broker crate does) before any client exists.
pub async fn http_get(url: impl reqwest::IntoUrl) -> reqwest::Result<reqwest::Response> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::get(url).await
}

/// GET a path of the shared broker's management API (e.g. `/api/queues/warren-test/q`) as guest.
pub async fn management_get(path: &str) -> Option<String> {
    management_get_at("http://127.0.0.1:15672", path).await
}

/// GET a path of the management API at `base` (e.g. a private node's) as guest.
pub async fn management_get_at(base: &str, path: &str) -> Option<String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Fetches a Prometheus text page.
pub async fn scrape(url: &str) -> String {
    http_get(url)
        .await
        .expect("scrape")
        .text()
        .await
        .expect("metrics body")
}

/// The value of the sample `name{labels}` in a Prometheus text page (labels as written, sorted).
pub fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// How many messages wait in `queue`'s dead-letter queue (taking them out).
pub async fn dead_letter_count(queue: &str) -> usize {
    let (conn, channel) = raw_channel().await;
    let count = drain(&channel, &format!("{queue}.dead")).await.len();
    let _ = conn.close(200, "bye".into()).await;
    count
}

/// Creates (again) the user `name` with password `name`, allowed everything in the test vhost.
pub async fn rabbit_user(name: &str) -> String {
    rabbit_user_with(name, [".*", ".*", ".*"]).await
}

/// Creates (again) the user `name` (password `name`) with these configure, write and read
/// patterns in the test vhost; returns its URL.
pub async fn rabbit_user_with(name: &str, [configure, write, read]: [&str; 3]) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let api = "http://127.0.0.1:15672/api";
    for (url, body) in [
        (
            format!("{api}/users/{name}"),
            serde_json::json!({"password": name, "tags": ""}),
        ),
        (
            format!("{api}/permissions/{TEST_VHOST}/{name}"),
            serde_json::json!({"configure": configure, "write": write, "read": read}),
        ),
    ] {
        let response = client
            .put(&url)
            .basic_auth("guest", Some("guest"))
            .json(&body)
            .send()
            .await
            .expect("management API");
        assert!(
            response.status().is_success(),
            "{url}: {}",
            response.status()
        );
    }
    format!("amqp://{name}:{name}@127.0.0.1:5672/{TEST_VHOST}")
}
