//! `cargo bench --bench pipeline`: Warren against a raw-lapin ceiling, same broker, same run.
//!
//! (a) Ceiling: tasks published with confirms to a quorum queue; a consumer with manual acks
//!     publishes a reply with confirms to a quorum reply queue and then acks; the client consumes
//!     the replies. No framework.
//! (b) Warren: `warren worker` processes, one with metrics off and one with them on; `echo` tasks
//!     submitted and collected through the submitter library (batch path for throughput,
//!     open-batch path for latency).
//!
//! Prints tasks/s, their ratio, round-trip latency p50/p99 of single sequential tasks, and the
//! worker's idle resident memory and CPU per task. Environment: BENCH_TASKS (default 20000),
//! BENCH_ROUNDS (500), BENCH_CONCURRENCY (64), BENCH_REPEATS (4: even, so each Warren run follows
//! the ceiling's as often as the other), and BENCH_CEILING_MESSAGES: `minimal` (default: a
//! 7-byte body, persistent, nothing else) or `warren` (the ceiling sends a real Warren echo task
//! and replies with a real Warren result, bodies and properties built by `warren_broker`, without
//! decoding either), which tells the framework's cost from the cost of what Warren's messages
//! carry.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use warren_broker::protocol::ResultEnvelope;
use warren_broker::topology::declare_task_queue;
use warren_submitter::{
    CollectOptions, OpenBatch, Outcome, ResultSink, SubmitOptions, Submitter, TaskSpec,
};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Sequential round trips measured on one side before the next side takes its turn.
const LATENCY_BLOCK: usize = 50;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the ceiling's tasks and replies carry (`BENCH_CEILING_MESSAGES`).
struct CeilingMessages {
    task_body: Vec<u8>,
    /// The task's properties, but for `reply_to`, which each client sets to its reply queue.
    task_properties: BasicProperties,
    /// The reply's body; `None`: the task's own body echoed back.
    reply_body: Option<Vec<u8>>,
    reply_properties: BasicProperties,
}

static CEILING_MESSAGES: std::sync::OnceLock<CeilingMessages> = std::sync::OnceLock::new();

/// The ceiling's messages, chosen in `main`.
fn ceiling_messages() -> &'static CeilingMessages {
    CEILING_MESSAGES.get().expect("chosen at the start of main")
}

/// Reads `BENCH_CEILING_MESSAGES`; returns its name for the report.
fn choose_ceiling_messages() -> Result<&'static str, String> {
    let persistent = BasicProperties::default().with_delivery_mode(2);
    let (name, messages) = match std::env::var("BENCH_CEILING_MESSAGES").as_deref() {
        Ok("warren") => ("warren", warren_shaped_messages()),
        Ok("minimal") | Err(std::env::VarError::NotPresent) => (
            "minimal",
            CeilingMessages {
                task_body: RAW_BODY.to_vec(),
                task_properties: persistent.clone(),
                reply_body: None,
                reply_properties: persistent,
            },
        ),
        Ok(other) => {
            return Err(format!(
                "BENCH_CEILING_MESSAGES={other}: expected minimal or warren"
            ));
        }
        Err(e) => {
            return Err(format!(
                "BENCH_CEILING_MESSAGES: {e}; expected minimal or warren"
            ));
        }
    };
    let _ = CEILING_MESSAGES.set(messages);
    Ok(name)
}

/// An echo task and its result as `warren submit` and `warren worker` would send them, with the
/// `user_id` their publisher adds.
fn warren_shaped_messages() -> CeilingMessages {
    use warren_broker::properties::{result_properties, task_properties};
    use warren_broker::protocol::{self, PROTOCOL_VERSION, TaskEnvelope, TaskStatus};
    let batch = protocol::new_id();
    let token = protocol::new_token();
    let now = protocol::timestamp(std::time::SystemTime::now());
    let task = TaskEnvelope {
        v: PROTOCOL_VERSION,
        id: format!("{batch}-0"),
        batch: batch.clone(),
        seq: Some(0),
        kind: "echo".into(),
        args: json!({"i": 1}),
        timeout_s: None,
        labels: Default::default(),
        reply_to: warren_broker::topology::result_queue(&batch),
        submitted_at: Some(now.clone()),
        max_retries: None,
        retry_backoff_s: None,
        expires_at: None,
        token: Some(token.clone()),
    };
    let result = ResultEnvelope {
        v: PROTOCOL_VERSION,
        task_id: task.id.clone(),
        batch,
        seq: Some(0),
        kind: "echo".into(),
        status: TaskStatus::Succeeded,
        output: json!({"i": 1}),
        error: None,
        worker: "bench-worker".into(),
        attempt: 1,
        labels: Default::default(),
        started_at: now.clone(),
        finished_at: now,
        previous_errors: Vec::new(),
        replayed: None,
        token: Some(token),
    };
    let user = "guest";
    CeilingMessages {
        task_body: protocol::encode(&task),
        task_properties: task_properties(&task)
            .expect("an echo task's properties")
            .with_user_id(user.into()),
        reply_body: Some(protocol::encode(&result)),
        reply_properties: result_properties(&result).with_user_id(user.into()),
    }
}

/// Raw lapin: the echo "worker" of the ceiling.
async fn raw_worker(conn: &Connection, queue: &str, prefetch: u16) -> lapin::Result<()> {
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let publish = conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            queue.into(),
            "raw-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let publish = publish.clone();
            tokio::spawn(async move {
                let reply_to = delivery.properties.reply_to().clone().unwrap_or_default();
                let messages = ceiling_messages();
                let options = BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                };
                let body = messages.reply_body.as_deref().unwrap_or(&delivery.data);
                let properties = messages.reply_properties.clone();
                let confirm = publish
                    .basic_publish("".into(), reply_to, options, body, properties)
                    .await;
                if let Ok(confirm) = confirm
                    && confirm.await.is_ok()
                {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            });
        }
    });
    Ok(())
}

/// The ceiling's reply queue: a durable quorum queue, as Warren's result queues are (a classic
/// queue would measure a broker doing less work for each reply).
async fn declare_reply_queue(channel: &Channel, name: &str) -> lapin::Result<()> {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
        .await?;
    Ok(())
}

/// The client side of the ceiling: a confirm-mode publishing channel, a consumer of the replies,
/// and the properties every task carries.
async fn raw_client(
    client: &Connection,
    replies: &str,
    prefetch: u16,
) -> lapin::Result<(Channel, lapin::Consumer, BasicProperties)> {
    let publish = client.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consume = client.create_channel().await?;
    consume
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = consume
        .basic_consume(
            replies.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let props = ceiling_messages()
        .task_properties
        .clone()
        .with_reply_to(replies.into());
    Ok((publish, consumer, props))
}

const RAW_BODY: &[u8] = br#"{"i":1}"#;

async fn raw_publish(
    channel: &Channel,
    queue: &str,
    props: &BasicProperties,
) -> lapin::Result<lapin::PublisherConfirm> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            options,
            &ceiling_messages().task_body,
            props.clone(),
        )
        .await
}

/// Raw lapin: publish `n` tasks with confirms (1024 in flight) while consuming the replies.
async fn raw_throughput(
    client: &Connection,
    queue: &str,
    replies: &str,
    n: usize,
) -> lapin::Result<Duration> {
    let (publish, mut consumer, props) = raw_client(client, replies, 1000).await?;
    let started = Instant::now();
    let queue = queue.to_string();
    let publisher = tokio::spawn(async move {
        let mut window = std::collections::VecDeque::new();
        for _ in 0..n {
            if window.len() >= 1024 {
                let confirm: lapin::PublisherConfirm = window.pop_front().expect("window");
                confirm.await?;
            }
            window.push_back(raw_publish(&publish, &queue, &props).await?);
        }
        for confirm in window {
            confirm.await?;
        }
        lapin::Result::Ok(())
    });
    for _ in 0..n {
        let delivery = consumer.next().await.expect("reply stream")?;
        delivery.ack(BasicAckOptions::default()).await?;
    }
    publisher.await.expect("publisher task")?;
    Ok(started.elapsed())
}

/// Raw lapin, one task at a time: publish with a confirm, then consume and ack the reply.
struct RawRoundTrips {
    publish: Channel,
    replies: lapin::Consumer,
    props: BasicProperties,
    queue: String,
}

impl RawRoundTrips {
    async fn open(client: &Connection, queue: &str, replies: &str) -> lapin::Result<Self> {
        let (publish, replies, props) = raw_client(client, replies, 1).await?;
        Ok(Self {
            publish,
            replies,
            props,
            queue: queue.to_string(),
        })
    }

    async fn round(&mut self) -> lapin::Result<RoundTrip> {
        let started = Instant::now();
        raw_publish(&self.publish, &self.queue, &self.props)
            .await?
            .await?;
        let confirmed = started.elapsed();
        let delivery = self.replies.next().await.expect("reply")?;
        delivery.ack(BasicAckOptions::default()).await?;
        Ok(RoundTrip {
            total: started.elapsed(),
            confirmed,
        })
    }
}

struct Discard(usize);

impl ResultSink for Discard {
    fn write(&mut self, _: &ResultEnvelope) -> std::io::Result<()> {
        self.0 += 1;
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// CPU time (user + system) a process has used so far.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second =
        u64::try_from(nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??).ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Median of three or more durations.
fn median(mut runs: Vec<Duration>) -> Duration {
    runs.sort();
    runs[runs.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let tasks = env_or("BENCH_TASKS", 20_000);
    let rounds = env_or("BENCH_ROUNDS", 500);
    let concurrency = env_or("BENCH_CONCURRENCY", 64);
    let repeats = env_or("BENCH_REPEATS", 4).max(1);
    let tag = std::process::id();
    let ceiling_messages = choose_ceiling_messages()?;
    println!(
        "pipeline benchmark: {tasks} echo tasks x {repeats} interleaved runs (median), \
         {rounds} sequential round trips, concurrency {concurrency}, \
         ceiling messages {ceiling_messages}"
    );

    // (a) the raw-lapin ceiling: its worker runs in this process, on its own connection.
    let raw_queue = format!("bench.raw.{tag}");
    let raw_replies = format!("bench.raw.{tag}.replies");
    let worker_conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let client = Connection::connect(URL, ConnectionProperties::default()).await?;
    let setup = client.create_channel().await?;
    declare_task_queue(&setup, &raw_queue).await?;
    declare_reply_queue(&setup, &raw_replies).await?;
    raw_worker(&worker_conn, &raw_queue, concurrency as u16).await?;

    // (b) Warren: the real worker binary, once with metrics off and once with them on (and
    // scraped every second); tasks through the submitter library.
    let off = WarrenWorker::start(&format!("bench.warren.off.{tag}"), concurrency, false).await?;
    let on = WarrenWorker::start(&format!("bench.warren.on.{tag}"), concurrency, true).await?;
    let idle_rss = rss_kib(off.pid);
    let scraper = on.metrics_url.clone().map(|url| {
        tokio::spawn(async move {
            loop {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let _ = reqwest::get(&url).await.and_then(|r| r.error_for_status());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    });
    let mut submitter = Submitter::new(Default::default(), "bench");
    let specs: Vec<TaskSpec> = (0..tasks)
        .map(|i| TaskSpec {
            kind: "echo".into(),
            args: json!({ "i": i }),
            ..TaskSpec::default()
        })
        .collect();

    // Throughput, interleaved so all three see the same broker state over the rounds.
    raw_throughput(&client, &raw_queue, &raw_replies, 1000).await?;
    run_batch(&mut submitter, &off.options, &specs[..1000]).await?;
    run_batch(&mut submitter, &on.options, &specs[..1000]).await?;
    let (mut raw_runs, mut off_runs, mut on_runs) = (Vec::new(), Vec::new(), Vec::new());
    let cpu_before = cpu_time(off.pid);
    // Where the CPU goes, per task: this 2-core machine runs everything, so each side's share
    // bounds the others'. The ceiling's client and consumer are this process; Warren's client
    // is this process and its worker the `warren` one.
    let broker = broker_pid();
    let here = std::process::id();
    let mut spent = CpuSpent::default();
    let readings = || (broker.and_then(cpu_time), cpu_time(here), cpu_time(off.pid));
    for round in 0..repeats {
        let start = readings();
        raw_runs.push(raw_throughput(&client, &raw_queue, &raw_replies, tasks).await?);
        spent.add_raw(start, readings());
        // The Warren run right after the ceiling's is the slower of the two (5-15% here, even
        // with the broker left idle for 3 s, or a quarter-size run of the same worker, between
        // them): the two take that place in turn, so the order does not favour either.
        let off_first = round % 2 == 0;
        if !off_first {
            on_runs.push(run_batch(&mut submitter, &on.options, &specs).await?);
        }
        let before = readings();
        off_runs.push(run_batch(&mut submitter, &off.options, &specs).await?);
        spent.add_warren(before, readings());
        if off_first {
            on_runs.push(run_batch(&mut submitter, &on.options, &specs).await?);
        }
    }
    let busy_rss = rss_kib(off.pid);
    let worker_cpu = cpu_before
        .zip(cpu_time(off.pid))
        .map(|(before, after)| (after - before) / (tasks * repeats) as u32);

    // Latency of single sequential tasks, in interleaved blocks (as the throughput runs are) so
    // that a broker or machine slowing down over the run weighs on all three alike.
    let mut raw_trips = RawRoundTrips::open(&client, &raw_queue, &raw_replies).await?;
    let mut off_open = submitter.open_batch(&off.options).await?;
    let mut on_open = submitter.open_batch(&on.options).await?;
    // The same worker as "metrics off", its results acknowledged only at the next `next_result`.
    let mut late_open = submitter.open_batch(&off.options).await?;
    let (mut raw_lat, mut off_lat, mut on_lat, mut late_lat) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let spec = &specs[0];
    for block in 0..rounds.div_ceil(LATENCY_BLOCK) {
        let size = LATENCY_BLOCK.min(rounds - block * LATENCY_BLOCK);
        for _ in 0..size {
            raw_lat.push(raw_trips.round().await?);
        }
        for _ in 0..size {
            off_lat.push(open_batch_round(&mut off_open, spec, Ack::Handled).await?);
        }
        for _ in 0..size {
            on_lat.push(open_batch_round(&mut on_open, spec, Ack::Handled).await?);
        }
        for _ in 0..size {
            late_lat.push(open_batch_round(&mut late_open, spec, Ack::AtNext).await?);
        }
    }
    for open in [off_open, on_open, late_open] {
        open.close().await?;
    }
    let parts: Vec<(&str, (f64, f64, f64))> = [
        ("raw lapin ceiling", &raw_lat),
        ("warren, metrics off", &off_lat),
        ("warren, metrics on", &on_lat),
    ]
    .into_iter()
    .map(|(name, trips)| (name, round_trip_parts(trips)))
    .collect();
    let [raw_lat, off_lat, on_lat, late_lat] = [raw_lat, off_lat, on_lat, late_lat].map(|trips| {
        let mut totals: Vec<Duration> = trips.iter().map(|t| t.total).collect();
        totals.sort();
        totals
    });

    if let Some(task) = scraper {
        task.abort();
    }
    let _ = worker_conn.close(200, "done".into()).await;
    for q in [
        raw_queue.clone(),
        raw_replies.clone(),
        format!("{raw_queue}.dead"),
        off.queue(),
        format!("{}.dead", off.queue()),
        on.queue(),
        format!("{}.dead", on.queue()),
    ] {
        let _ = setup
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    drop((off, on));

    let rate = |runs: &[Duration]| tasks as f64 / median(runs.to_vec()).as_secs_f64();
    let rates = |runs: &[Duration]| {
        runs.iter()
            .map(|d| format!("{:.0}", tasks as f64 / d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let p50 = |l: &[Duration]| percentile(l, 0.5).as_secs_f64();
    println!();
    println!(
        "{:<24} {:>10} {:>9} {:>9}   runs (tasks/s)",
        "", "tasks/s", "p50 ms", "p99 ms"
    );
    for (name, runs, latencies) in [
        ("raw lapin ceiling", &raw_runs, &raw_lat),
        ("warren, metrics off", &off_runs, &off_lat),
        ("warren, metrics on", &on_runs, &on_lat),
    ] {
        let (p50, p99) = (
            ms(percentile(latencies, 0.5)),
            ms(percentile(latencies, 0.99)),
        );
        println!(
            "{name:<24} {:>10.0} {p50:>9.2} {p99:>9.2}   {}",
            rate(runs),
            rates(runs)
        );
    }
    println!(
        "{:<24} {:>10} {:>9.2} {:>9.2}   (results acknowledged at the next next_result)",
        "warren, metrics off",
        "",
        ms(percentile(&late_lat, 0.5)),
        ms(percentile(&late_lat, 0.99)),
    );
    println!(
        "round trip p50s, ms: whole = the task's publish until its confirm + the wait for the \
         result after it (each part's own p50)"
    );
    for (name, (total, confirmed, rest)) in &parts {
        println!("{name:<24} {total:>6.3} = {confirmed:.3} + {rest:.3}");
    }
    println!(
        "warren/ceiling (metrics on): throughput {:.2}x (target >= 0.9), p50 latency {:.2}x (target <= 1.0)",
        rate(&on_runs) / rate(&raw_runs),
        p50(&on_lat) / p50(&raw_lat)
    );
    // Each round runs the three back to back, so a round's own ratio is the least disturbed by
    // the machine's load changing over the whole run.
    let mut sorted: Vec<f64> = raw_runs
        .iter()
        .zip(&on_runs)
        .map(|(raw, on)| raw.as_secs_f64() / on.as_secs_f64())
        .collect();
    sorted.sort_by(f64::total_cmp);
    println!(
        "per-round throughput ratios (metrics on / ceiling): median {:.2}x, from {:.2}x to {:.2}x",
        sorted[sorted.len() / 2],
        sorted[0],
        sorted[sorted.len() - 1]
    );
    // Metrics off followed the ceiling's run in even rounds, metrics on in odd ones.
    let place = |runs: &[Duration], first: usize| {
        let picked: Vec<Duration> = runs.iter().skip(first).step_by(2).copied().collect();
        if picked.is_empty() {
            "-".to_string()
        } else {
            rates(&picked)
        }
    };
    println!(
        "warren tasks/s by place in the round: right after the ceiling's run: off {}; on {}. \
         After the other warren run: off {}; on {}",
        place(&off_runs, 0),
        place(&on_runs, 1),
        place(&off_runs, 1),
        place(&on_runs, 0),
    );
    println!(
        "metrics on/off: throughput {:.3}x, p50 latency {:.3}x (target: within 5%)",
        rate(&on_runs) / rate(&off_runs),
        p50(&on_lat) / p50(&off_lat)
    );
    let mib = |v: Option<u64>| v.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0));
    println!(
        "warren worker resident memory: idle {} (target <= 15 MiB), after the runs {}; CPU per task (metrics off): {}",
        mib(idle_rss),
        mib(busy_rss),
        worker_cpu.map_or("unknown".into(), |d| format!("{} µs", d.as_micros()))
    );
    let per_task = |d: Option<Duration>| {
        d.map_or("?".into(), |d| {
            format!("{:.0}", d.as_micros() as f64 / (tasks * repeats) as f64)
        })
    };
    println!(
        "CPU per task, µs (metrics off): broker {} raw vs {} warren; clients and consumers {} raw \
         (in-process) vs {} warren (client {} + worker {})",
        per_task(spent.broker_raw),
        per_task(spent.broker_warren),
        per_task(spent.raw),
        per_task(
            spent
                .client_warren
                .zip(spent.worker_warren)
                .map(|(c, w)| c + w)
        ),
        per_task(spent.client_warren),
        per_task(spent.worker_warren),
    );
    println!("load average before the runs: {load}");
    Ok(())
}

/// CPU time spent by each side over the throughput runs; None when a process could not be read.
#[derive(Default)]
struct CpuSpent {
    broker_raw: Option<Duration>,
    broker_warren: Option<Duration>,
    raw: Option<Duration>,
    client_warren: Option<Duration>,
    worker_warren: Option<Duration>,
}

type Reading = Option<Duration>;

/// CPU times of (the broker, this process, the metrics-off worker) at one moment.
type Readings = (Reading, Reading, Reading);

impl CpuSpent {
    /// Adds one ceiling run, from the readings before and after it.
    fn add_raw(&mut self, before: Readings, after: Readings) {
        add_span(&mut self.broker_raw, before.0, after.0);
        add_span(&mut self.raw, before.1, after.1);
    }

    /// Adds one Warren run with metrics off, from the readings before and after it.
    fn add_warren(&mut self, before: Readings, after: Readings) {
        add_span(&mut self.broker_warren, before.0, after.0);
        add_span(&mut self.client_warren, before.1, after.1);
        add_span(&mut self.worker_warren, before.2, after.2);
    }
}

/// Adds the time from `from` to `to` to `total`; unknown once any reading is.
fn add_span(total: &mut Option<Duration>, from: Reading, to: Reading) {
    *total = Some(total.unwrap_or_default())
        .zip(from.zip(to))
        .map(|(t, (a, b))| t + (b - a));
}

/// The RabbitMQ node's process (`beam.smp`) on this machine, if there is one.
fn broker_pid() -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            (comm.trim() == "beam.smp").then_some(pid)
        })
}

/// A `warren worker` process under benchmark.
struct WarrenWorker {
    child: tokio::process::Child,
    pid: u32,
    options: SubmitOptions,
    metrics_url: Option<String>,
}

impl WarrenWorker {
    async fn start(
        queue: &str,
        concurrency: usize,
        metrics: bool,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_warren"));
        command
            .args([
                "worker",
                "--queue",
                queue,
                "--concurrency",
                &concurrency.to_string(),
            ])
            .env("WARREN_AMQP_URL", URL)
            .env(
                "WARREN_LOG",
                std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "info,lapin=off".into()),
            )
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut metrics_url = None;
        if metrics {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            command
                .arg("--metrics-addr")
                .arg(format!("127.0.0.1:{port}"));
            metrics_url = Some(format!("http://127.0.0.1:{port}/metrics"));
        }
        let child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(Self {
            child,
            pid,
            options: SubmitOptions::new(queue),
            metrics_url,
        })
    }

    fn queue(&self) -> String {
        self.options.queue.clone()
    }
}

impl Drop for WarrenWorker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Submits and collects one batch; returns how long it took.
async fn run_batch(
    submitter: &mut Submitter,
    options: &SubmitOptions,
    specs: &[TaskSpec],
) -> Result<Duration, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let receipt = submitter.submit(specs, options).await?;
    let mut sink = Discard(0);
    let outcome = submitter
        .collect(
            &receipt.batch,
            &mut sink,
            &mut (),
            &CollectOptions::default(),
            std::future::pending(),
        )
        .await?;
    assert!(matches!(outcome, Outcome::Complete(_)) && sink.0 == specs.len());
    Ok(started.elapsed())
}

/// One sequential round trip, and how long of it the task's publish took to be confirmed (the
/// rest is the wait for the result: the worker and the result's way back).
#[derive(Clone, Copy)]
struct RoundTrip {
    total: Duration,
    confirmed: Duration,
}

/// The p50 of each part of `trips`, in ms: (total, until the task's confirm, after it).
fn round_trip_parts(trips: &[RoundTrip]) -> (f64, f64, f64) {
    let p50 = |part: &dyn Fn(&RoundTrip) -> Duration| {
        let mut samples: Vec<Duration> = trips.iter().map(part).collect();
        samples.sort();
        ms(percentile(&samples, 0.5))
    };
    (
        p50(&|t| t.total),
        p50(&|t| t.confirmed),
        p50(&|t| t.total - t.confirmed),
    )
}

/// When an open batch's client acknowledges each result.
#[derive(Clone, Copy)]
enum Ack {
    /// Once handled, before the next task (`acknowledge`), as the ceiling's client does.
    Handled,
    /// Only when the next result is requested.
    AtNext,
}

/// Round trips of single tasks through an open batch.
async fn open_batch_round(
    open: &mut OpenBatch,
    spec: &TaskSpec,
    ack: Ack,
) -> Result<RoundTrip, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let seq = open.submit(spec).await?;
    let confirmed = started.elapsed();
    let result = open.next_result().await?;
    assert_eq!(result.seq, Some(seq));
    if let Ack::Handled = ack {
        open.acknowledge().await?;
    }
    Ok(RoundTrip {
        total: started.elapsed(),
        confirmed,
    })
}
