//! The worker and submitter libraries used from Rust, against the real broker: custom handlers,
//! and a panicking handler that must become a failed result rather than a stuck task.

use std::time::Duration;

use serde_json::{Value, json};
use warren_broker::AmqpSettings;
use warren_broker::protocol::ResultEnvelope;
use warren_submitter::{CollectOptions, Outcome, ResultSink, SubmitOptions, Submitter, TaskSpec};
use warren_worker::{HandlerResult, Task, TaskFailure, Worker, WorkerConfig};

#[derive(Default)]
struct Collected(Vec<ResultEnvelope>);

impl ResultSink for Collected {
    fn write(&mut self, result: &ResultEnvelope) -> std::io::Result<()> {
        self.0.push(result.clone());
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The shared broker's test vhost, which `tests/run` recreates before the suite (see
/// `tests/common`), so nothing this test leaves piles up in a vhost someone else uses.
const TEST_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/warren-test";

fn spec(kind: &str, args: Value) -> TaskSpec {
    TaskSpec {
        kind: kind.into(),
        args,
        id: Some(kind.into()),
        ..TaskSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_handlers_run_and_a_panic_is_a_failed_result() {
    let queue = format!("test.library.{}", uuid_like());
    let worker = Worker::new(WorkerConfig {
        concurrency: 2,
        amqp: AmqpSettings::new(TEST_AMQP_URL),
        ..WorkerConfig::new(queue.clone())
    })
    .handler("double", |task: Task| async move {
        let n: i64 = task.args_as()?;
        HandlerResult::Ok(json!(n * 2))
    })
    .handler("refuse", |_task: Task| async move {
        HandlerResult::Err(TaskFailure::failed("nope", "refused on purpose"))
    })
    .handler("panic", |_task: Task| async move {
        if true {
            panic!("handler bug");
        }
        HandlerResult::Ok(Value::Null)
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));

    let mut submitter = Submitter::new(AmqpSettings::new(TEST_AMQP_URL), "library-test");
    let tasks = vec![
        spec("double", json!(21)),
        spec("refuse", Value::Null),
        spec("panic", Value::Null),
        spec("double", json!("x")).with_id("bad-args"),
    ];
    let receipt = submitter
        .submit(&tasks, &SubmitOptions::new(queue.clone()))
        .await
        .expect("submit");
    let mut sink = Collected::default();
    let options = CollectOptions {
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let outcome = submitter
        .collect(
            &receipt.batch,
            &mut sink,
            &mut (),
            &options,
            std::future::pending(),
        )
        .await
        .expect("collect");
    assert!(matches!(outcome, Outcome::Complete(_)), "{outcome:?}");
    let by_id = |id: &str| sink.0.iter().find(|r| r.task_id == id).cloned().expect(id);
    assert_eq!(by_id("double").output, json!(42));
    assert_eq!(by_id("refuse").error.unwrap().kind, "nope");
    let panicked = by_id("panic");
    let error = panicked.error.unwrap();
    assert_eq!(
        (panicked.status.as_str(), error.kind.as_str()),
        ("failed", "handler_panicked")
    );
    // The result says what the panic said, so the bug can be found from the result alone.
    assert_eq!(
        error.message, "the 'panic' handler panicked: handler bug",
        "{error:?}"
    );
    let bad = by_id("bad-args");
    assert_eq!(
        (bad.status.as_str(), bad.error.unwrap().kind.as_str()),
        ("rejected", "invalid_args")
    );

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("worker stops")
        .expect("join")
        .expect("clean exit");
    let (connection, _) = submitter.connection().await.expect("connection");
    let channel = connection.create_channel().await.expect("channel");
    for q in [queue.clone(), format!("{queue}.dead")] {
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
}

trait WithId {
    fn with_id(self, id: &str) -> Self;
}

impl WithId for TaskSpec {
    fn with_id(mut self, id: &str) -> Self {
        self.id = Some(id.into());
        self
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_retried_twice_is_attempt_3_for_its_handler_and_its_result() {
    use std::sync::{Arc, Mutex};
    let queue = format!("test.library.retry.{}", uuid_like());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let worker = Worker::new(WorkerConfig {
        amqp: AmqpSettings::new(TEST_AMQP_URL),
        ..WorkerConfig::new(queue.clone())
    })
    .handler("flaky", move |task: Task| {
        let recorded = Arc::clone(&recorded);
        async move {
            recorded.lock().unwrap().push(task.attempt);
            if task.attempt < 3 {
                return HandlerResult::Err(TaskFailure::failed("flaky", "not yet"));
            }
            HandlerResult::Ok(json!(task.attempt))
        }
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stop_rx.await;
    }));
    let mut submitter = Submitter::new(AmqpSettings::new(TEST_AMQP_URL), "library-test");
    let task = TaskSpec {
        max_retries: Some(2),
        retry_backoff_s: Some(0.1),
        ..spec("flaky", Value::Null)
    };
    let receipt = submitter
        .submit(&vec![task], &SubmitOptions::new(queue.clone()))
        .await
        .expect("submit");
    let mut sink = Collected::default();
    let options = CollectOptions {
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    submitter
        .collect(
            &receipt.batch,
            &mut sink,
            &mut (),
            &options,
            std::future::pending(),
        )
        .await
        .expect("collect");
    assert_eq!(*seen.lock().unwrap(), [1, 2, 3], "the handler's attempts");
    let result = &sink.0[0];
    assert_eq!(result.status.as_str(), "succeeded");
    assert_eq!(result.attempt, 3, "the result's attempt is the handler's");
    assert_eq!(result.output, json!(3));
    assert_eq!(result.previous_errors.len(), 2);
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;
}
