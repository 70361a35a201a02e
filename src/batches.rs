//! `warren batches`: the batches the broker holds.

use std::time::Duration;

use warren_broker::AmqpSettings;
use warren_broker::depth::ManagementTarget;
use warren_submitter::batches::list_batches;

use crate::cli::*;

/// Runs `warren batches`; returns the exit status.
pub async fn batches(amqp: AmqpSettings, management: &ManagementTarget, json: bool) -> u8 {
    let batches = match list_batches(&amqp, management).await {
        Ok(b) => b,
        Err(e) => {
            return fail(&format!(
                "cannot list batches (it needs the management API): {e}"
            ));
        }
    };
    if json {
        for b in &batches {
            match serde_json::to_string(b) {
                Ok(line) => println!("{line}"),
                Err(e) => return fail(&e.to_string()),
            }
        }
        return EXIT_OK;
    }
    if batches.is_empty() {
        println!("no batches in the broker: every batch was collected, or expired");
        return EXIT_OK;
    }
    let span = |s: Option<u64>| {
        s.map_or("-".to_string(), |s| {
            humantime::format_duration(Duration::from_secs(s)).to_string()
        })
    };
    println!(
        "{:<38} {:<20} {:>7} {:>9} {:>8}  {:<16} {:<14} EXPIRES IN",
        "BATCH", "QUEUE", "TOTAL", "COLLECTED", "WAITING", "STATE", "AGE"
    );
    for b in &batches {
        let state = match (b.collecting, b.total) {
            (true, _) => "being collected",
            (false, None) => "no manifest yet",
            (false, Some(t)) if b.collected + b.waiting >= u64::from(t) => "all results in",
            (false, Some(_)) => "running",
        };
        println!(
            "{:<38} {:<20} {:>7} {:>9} {:>8}  {:<16} {:<14} {}",
            b.batch,
            b.queue.as_deref().unwrap_or("-"),
            b.total.map_or("?".to_string(), |t| t.to_string()),
            b.collected,
            b.waiting,
            state,
            span(b.age_s),
            span(b.expires_in_s),
        );
    }
    println!("collect one with `warren wait BATCH`; stop one with `warren cancel BATCH`");
    EXIT_OK
}
