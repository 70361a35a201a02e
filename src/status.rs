//! `warren status`: a task queue's depth, consumers, dead letters and alarms.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use warren_broker::AmqpSettings;
use warren_broker::BrokerError;
use warren_broker::depth::{Management, ManagementTarget};
use warren_submitter::status::{queue_status, render};

use crate::cli::*;

/// Runs `warren status`, once or every `watch` interval until Ctrl-C; returns the exit status.
pub async fn status(
    amqp: AmqpSettings,
    management: &ManagementTarget,
    queue: &str,
    json: bool,
    watch: Option<Duration>,
) -> u8 {
    let in_place = watch.is_some() && !json && std::io::stdout().is_terminal();
    loop {
        let status = match queue_status(&amqp, management, queue).await {
            Ok(status) => status,
            Err(BrokerError::QueueNotFound { .. }) => {
                return fail(&missing_queue(&amqp, management, queue).await);
            }
            Err(e) => return fail(&e.to_string()),
        };
        let text = if json {
            // A watch prints one compact JSON document per line, for scripts that follow it.
            let rendered = if watch.is_some() {
                serde_json::to_string(&status)
            } else {
                serde_json::to_string_pretty(&status)
            };
            match rendered {
                Ok(t) => format!("{t}\n"),
                Err(e) => return fail(&e.to_string()),
            }
        } else {
            render(&status)
        };
        let mut out = std::io::stdout().lock();
        let written = if in_place {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            write!(out, "\x1b[H\x1b[2J{text}\nupdated {now}; Ctrl-C to stop\n")
        } else {
            write!(out, "{text}")
        };
        if written.and_then(|()| out.flush()).is_err() {
            return EXIT_OK; // stdout closed (e.g. piped into head)
        }
        drop(out);
        let Some(every) = watch else { return EXIT_OK };
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => return EXIT_OK,
        }
        if !in_place && !json {
            println!();
        }
    }
}

/// Says that `queue` does not exist, and which task queues do (those with a `.dead` sibling).
async fn missing_queue(amqp: &AmqpSettings, management: &ManagementTarget, queue: &str) -> String {
    let mut message = format!(
        "task queue '{queue}' does not exist yet: the first `warren worker --queue {queue}` or \
         `warren autoscale --queue {queue}` creates it (or `warren submit --create-queue`)"
    );
    let listed = match Management::new(management, amqp) {
        Ok(api) => api.queues("").await.ok(),
        Err(_) => None,
    };
    if let Some(queues) = listed {
        let names: std::collections::BTreeSet<&str> =
            queues.iter().map(|q| q.name.as_str()).collect();
        let tasks: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| names.contains(format!("{n}.dead").as_str()))
            .collect();
        message += &if tasks.is_empty() {
            ". There are no task queues yet".to_string()
        } else {
            format!(
                ". Task queues here: {} (pick one with --queue)",
                tasks.join(", ")
            )
        };
    }
    message
}
