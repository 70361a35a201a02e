//! `warren status`: depth, consumers and dead letters of a task queue.

use serde::Serialize;
use warren_broker::connection::close_connection;
use warren_broker::connection::connect_to_any;
use warren_broker::depth::{
    Management, ManagementTarget, QueueDepth, WorkerLoad, combine, passive_depth,
};
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
    /// The broker's resource alarms (management API only); publishers are blocked while any is set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alarms: Vec<String>,
    /// The broker address (node) the AMQP connection reached, without its password.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<String>,
}

/// Reads the status of `queue`: exact waiting counts from passive declares, and in-flight counts,
/// rates and busy workers from the management API when it answers.
pub async fn queue_status(
    settings: &AmqpSettings,
    management: &ManagementTarget,
    queue: &str,
) -> Result<QueueStatus, BrokerError> {
    let dead = dead_letter_queue(queue);
    let (mut passive_tasks, mut passive_dead) = (Err(unavailable()), Err(unavailable()));
    let mut broker = None;
    match connect_to_any(settings, "warren-status").await {
        Ok((connection, address)) => {
            broker = Some(address);
            // A failed passive declare closes its channel, so each queue gets its own. The channels
            // live until the connection closes: dropping one starts a close that races it.
            let mut channels = Vec::new();
            for (name, slot) in [
                (queue, &mut passive_tasks),
                (dead.as_str(), &mut passive_dead),
            ] {
                *slot = match connection.create_channel().await {
                    Ok(channel) => {
                        let depth = passive_depth(&channel, name).await;
                        channels.push(channel);
                        depth
                    }
                    Err(e) => Err(e.into()),
                };
            }
            close_connection(&connection, "done").await;
        }
        Err(e) if e.is_fatal() => return Err(e),
        Err(e) => {
            // Kept so that, if the management API fails too, the error says why.
            passive_tasks = Err(BrokerError::Unavailable(e.to_string()));
            passive_dead = Err(BrokerError::Unavailable(e.to_string()));
        }
    }
    let api = Management::new(management, settings);
    let alarms = match &api {
        Ok(api) => api.alarms().await.unwrap_or_default(),
        Err(_) => Vec::new(),
    };
    let (api_tasks, api_dead, workers, api_error) = match &api {
        Ok(api) => {
            let (tasks, dead_letters) = (api.queue(queue).await, api.queue(&dead).await);
            let mut workers = api.worker_loads(queue).await.unwrap_or_default();
            workers.sort_by(|a, b| b.unacked.cmp(&a.unacked).then(a.name.cmp(&b.name)));
            let error = match (&tasks, &dead_letters) {
                (Err(e), _) | (_, Err(e)) if !matches!(e, BrokerError::QueueNotFound { .. }) => {
                    Some(e.to_string())
                }
                _ => None,
            };
            (tasks, dead_letters, workers, error)
        }
        Err(e) => (
            Err(unavailable()),
            Err(unavailable()),
            Vec::new(),
            Some(e.to_string()),
        ),
    };
    Ok(QueueStatus {
        tasks: combine(passive_tasks, api_tasks)?,
        dead_letters: combine(passive_dead, api_dead)?,
        workers,
        management_unavailable: api_error,
        alarms,
        broker,
    })
}

fn unavailable() -> BrokerError {
    BrokerError::Unavailable("not available".into())
}

/// Renders a status as a small table.
pub fn render(status: &QueueStatus) -> String {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    let rate = |v: Option<f64>| v.map_or("-".to_string(), |r| format!("{r:.1}/s"));
    let mut out = status
        .broker
        .as_ref()
        .map_or(String::new(), |b| format!("broker: {b}\n"));
    out += &format!(
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
    for alarm in &status.alarms {
        out += &format!(
            "ALARM: {alarm}: RabbitMQ is blocking publishes until it clears (free memory or disk on the broker)\n"
        );
    }
    if status.management_unavailable.is_none() {
        out += "(READY and CONSUMERS are read now; UNACKED, rates and WORKERS are the management API's \
                statistics, which RabbitMQ refreshes every 5 s by default: they may lag a change)\n";
    }
    if let Some(why) = &status.management_unavailable {
        out += &format!("(management API not used: {why}; unacked counts and rates need it)\n");
    }
    out
}
