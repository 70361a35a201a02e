//! `warren status`: depth, consumers and dead letters of a task queue.

use serde::Serialize;
use warren_broker::connection::connect;
use warren_broker::depth::{Management, QueueDepth, WorkerLoad, passive_depth};
use warren_broker::topology::dead_letter_queue;
use warren_broker::{AmqpSettings, BrokerError};

/// The state of a task queue and its dead-letter queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    /// The task queue.
    pub tasks: QueueDepth,
    /// Its dead-letter queue.
    pub dead_letters: QueueDepth,
    /// Consumers of the task queue and the tasks each is running (management API only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<WorkerLoad>,
    /// Why the management API was not used, when it was not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub management_unavailable: Option<String>,
}

/// Reads the status of `queue`, from the management API when it answers, else over AMQP.
pub async fn queue_status(
    settings: &AmqpSettings,
    management_url: Option<&str>,
    queue: &str,
) -> Result<QueueStatus, BrokerError> {
    let dead = dead_letter_queue(queue);
    let api_error = match Management::new(management_url, settings) {
        Ok(api) => match (api.queue(queue).await, api.queue(&dead).await) {
            (Ok(tasks), Ok(dead_letters)) => {
                let mut workers = api.worker_loads(queue).await.unwrap_or_default();
                workers.sort_by(|a, b| b.unacked.cmp(&a.unacked).then(a.name.cmp(&b.name)));
                return Ok(QueueStatus {
                    tasks,
                    dead_letters,
                    workers,
                    management_unavailable: None,
                });
            }
            (Err(e @ BrokerError::QueueNotFound { .. }), _) => return Err(e),
            (Err(e), _) | (_, Err(e)) => e.to_string(),
        },
        Err(e) => e.to_string(),
    };
    let connection = connect(settings, "warren-status").await?;
    let channel = connection.create_channel().await?;
    let tasks = passive_depth(&channel, queue).await?;
    let dead_letters = passive_depth(&channel, &dead).await?;
    let _ = connection.close(200, "done".into()).await;
    Ok(QueueStatus {
        tasks,
        dead_letters,
        workers: Vec::new(),
        management_unavailable: Some(api_error),
    })
}

/// Renders a status as a small table.
pub fn render(status: &QueueStatus) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |r| format!("{r:.1}/s"));
    let mut out = format!(
        "{:<32} {:>8} {:>8} {:>9} {:>10} {:>10}\n",
        "QUEUE", "READY", "UNACKED", "CONSUMERS", "PUBLISH", "ACK"
    );
    for q in [&status.tasks, &status.dead_letters] {
        out += &format!(
            "{:<32} {:>8} {:>8} {:>9} {:>10} {:>10}\n",
            q.queue,
            q.ready,
            opt(q.unacked),
            q.consumers,
            rate(q.publish_rate),
            rate(q.ack_rate)
        );
    }
    if !status.workers.is_empty() {
        let busy = status.workers.iter().filter(|w| w.unacked > 0).count();
        out += &format!(
            "\nWORKERS ({} busy, {} idle)\n",
            busy,
            status.workers.len() - busy
        );
        for w in &status.workers {
            let state = if w.unacked > 0 {
                format!("busy, {} task(s)", w.unacked)
            } else {
                "idle".to_string()
            };
            out += &format!("  {:<40} {state}\n", w.name);
        }
    }
    if let Some(why) = &status.management_unavailable {
        out += &format!("(management API not used: {why}; unacked counts and rates need it)\n");
    }
    out
}
