//! `warren logs`: every attempt of a run's or batch's tasks, from the logs stream the workers
//! append to: command, outcome, duration, worker and the end of stderr (all of it with --full).

use std::io::Write;
use std::time::Duration;

use clap::Args;
use warren_broker::AmqpSettings;
use warren_broker::connection::close_connection;
use warren_broker::connection::connect;
use warren_broker::protocol::{AttemptNext, AttemptRecord, TaskStatus};
use warren_submitter::logs::{LogEntry, LogFilter, Since, read_logs};

use crate::cli::*;

/// Lines of stderr shown per record without --full.
const STDERR_LINES: usize = 10;

/// `warren logs RUN|BATCH`.
#[derive(Args)]
pub struct LogsArgs {
    /// The run id (`warren run`) or batch id (`warren submit`).
    id: String,
    /// Only this stage of a run.
    #[arg(long)]
    stage: Option<String>,
    /// Only this item of a run (its path as `warren run` shows it).
    #[arg(long)]
    item: Option<String>,
    /// Only this task of a batch.
    #[arg(long, value_name = "ID")]
    task: Option<String>,
    /// Only attempts that did not succeed.
    #[arg(long)]
    failed: bool,
    /// Only this attempt number (1 is the first).
    #[arg(long, value_name = "N")]
    attempt: Option<u32>,
    /// Keep reading: show new records as workers append them, until Ctrl-C.
    #[arg(long, short = 'f')]
    follow: bool,
    /// One JSON object per record (docs/logs.md gives the fields).
    #[arg(long)]
    json: bool,
    /// Show the whole of stdout and stderr, not the last lines of stderr.
    #[arg(long)]
    full: bool,
    /// Read records appended in the last DURATION only (e.g. 30m, 2h); default: from when the
    /// run or batch was made.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
}

/// Runs `warren logs`; returns the exit status.
pub async fn logs(amqp: AmqpSettings, args: LogsArgs) -> u8 {
    let filter = LogFilter {
        batch: args.id.clone(),
        stage: args.stage.clone(),
        item: args.item.clone(),
        task: args.task.clone(),
        failed: args.failed,
        attempt: args.attempt,
    };
    let since = args.since.map_or(Since::BatchStart, |d| {
        Since::Time(std::time::SystemTime::now() - d)
    });
    let connection = match connect(&amqp, &connection_name("logs")).await {
        Ok(c) => c,
        Err(e) => return fail(&format!("cannot read the logs: {e}")),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut show = |entry: LogEntry| {
        let text = if args.json {
            json_line(&entry)
        } else {
            human(&entry.record, entry.sent_by.as_deref(), args.full)
        };
        // A closed pipe (`| head`) ends the output; the rest is not wanted.
        let _ = writeln!(out, "{text}");
        if args.follow {
            let _ = out.flush();
        }
    };
    let read = tokio::select! {
        read = read_logs(&connection, &filter, since, args.follow, &mut show) => read,
        _ = tokio::signal::ctrl_c() => Ok(0),
    };
    let _ = out.flush();
    drop(out);
    close_connection(&connection, "done").await;
    match read {
        Ok(0) if !args.follow => {
            eprintln!(
                "no attempt records of '{}'{} (records are kept 7 days by default; tasks of workers older \
                 than this release write none)",
                args.id,
                if narrowed(&filter) {
                    " match these filters"
                } else {
                    ""
                }
            );
            EXIT_OK
        }
        Ok(_) => EXIT_OK,
        Err(e) => fail(&format!("cannot read the logs: {e}")),
    }
}

fn narrowed(filter: &LogFilter) -> bool {
    filter.stage.is_some()
        || filter.item.is_some()
        || filter.task.is_some()
        || filter.failed
        || filter.attempt.is_some()
}

/// The record as one JSON object, with `sent_by`: the user RabbitMQ verified as its publisher.
fn json_line(entry: &LogEntry) -> String {
    let mut value = serde_json::to_value(&entry.record).unwrap_or_default();
    if let Some(object) = value.as_object_mut() {
        object.insert(
            "sent_by".into(),
            entry
                .sent_by
                .clone()
                .map_or(serde_json::Value::Null, serde_json::Value::String),
        );
    }
    value.to_string()
}

/// A record for people: what ran, how it ended, where, and the end of its stderr. `sent_by` is
/// the user RabbitMQ saw append it (anyone who may publish can append a record).
// Long: formats every field of an attempt record for people, in display order.
pub fn human(record: &AttemptRecord, sent_by: Option<&str>, full: bool) -> String {
    let mut text = String::new();
    let what = match (record.labels.get("stage"), record.labels.get("item")) {
        (Some(stage), Some(item)) => format!("{stage} {item} · task {}", record.task_id),
        _ => format!("task {}", record.task_id),
    };
    text.push_str(&format!("== {what} · attempt {} ==\n", record.attempt));
    let outcome = match &record.error {
        Some(e) => format!("{} ({}: {})", record.status.as_str(), e.kind, e.message),
        None => record.status.as_str().to_string(),
    };
    let next = match record.next {
        AttemptNext::Retry => "; tried again",
        AttemptNext::Result => "",
    };
    let recorder = sent_by.map_or_else(
        || "recorded by an unverified publisher".to_string(),
        |user| format!("recorded by user '{user}'"),
    );
    text.push_str(&format!(
        "{outcome}{next}\n{:.1}s on {}{} · {} → {} · {recorder}\n",
        record.duration_s,
        record.worker,
        if record.host.is_empty() {
            String::new()
        } else {
            format!(" (host {})", record.host)
        },
        record.started_at,
        record.finished_at
    ));
    if let Some(argv) = record.args["argv"].as_array() {
        let words: Vec<&str> = argv.iter().filter_map(|a| a.as_str()).collect();
        let quoted = shlex::try_join(words.iter().copied()).unwrap_or_else(|_| words.join(" "));
        text.push_str(&format!("$ {quoted}\n"));
        if let Some(cwd) = record.args["cwd"].as_str() {
            text.push_str(&format!("  in {cwd}\n"));
        }
    }
    let output = &record.output;
    match (output["exit_code"].as_i64(), output["signal"].as_i64()) {
        (Some(code), _) if record.status != TaskStatus::Succeeded => {
            text.push_str(&format!("exit status {code}\n"));
        }
        (None, Some(signal)) => text.push_str(&format!("killed by signal {signal}\n")),
        _ => {}
    }
    if let Some(outputs) = output["outputs"].as_array().filter(|o| !o.is_empty()) {
        let made: Vec<String> = outputs
            .iter()
            .map(|o| {
                format!(
                    "{} ({} bytes)",
                    o["path"].as_str().unwrap_or("?"),
                    o["size"]
                )
            })
            .collect();
        text.push_str(&format!("outputs: {}\n", made.join(", ")));
    }
    for earlier in &record.previous_errors {
        text.push_str(&format!(
            "earlier attempt: {}: {}\n",
            earlier.kind, earlier.message
        ));
    }
    if full {
        for stream in ["stdout", "stderr"] {
            if let Some(body) = output[stream].as_str().filter(|s| !s.is_empty()) {
                text.push_str(&format!("--- {stream} ---\n{}", body));
                if !body.ends_with('\n') {
                    text.push('\n');
                }
            }
        }
    } else if let Some(stderr) = output["stderr"].as_str().filter(|s| !s.trim().is_empty()) {
        let lines: Vec<&str> = stderr.lines().collect();
        let shown = &lines[lines.len().saturating_sub(STDERR_LINES)..];
        if shown.len() < lines.len() {
            text.push_str(&format!(
                "stderr (last {} of {} lines; --full for all):\n",
                shown.len(),
                lines.len()
            ));
        } else {
            text.push_str("stderr:\n");
        }
        for line in shown {
            text.push_str(&format!("  {line}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;
    use warren_broker::protocol::{PROTOCOL_VERSION, TaskError};

    #[test]
    fn a_failed_step_shows_its_command_exit_and_the_end_of_its_stderr() {
        let stderr: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        let record = AttemptRecord {
            v: PROTOCOL_VERSION,
            batch: "run".into(),
            task_id: "warp-0a".into(),
            seq: Some(3),
            kind: "exec".into(),
            labels: BTreeMap::from([
                ("stage".to_string(), "warp".to_string()),
                ("item".to_string(), "raw/bad tile.tif".to_string()),
            ]),
            attempt: 2,
            status: TaskStatus::Failed,
            error: Some(TaskError::new(
                "exit_status",
                "'gdalwarp' exited with status 1",
            )),
            next: AttemptNext::Result,
            args: json!({"argv": ["gdalwarp", "raw/bad tile.tif", "out.tif"], "cwd": "/data"}),
            output: json!({"exit_code": 1, "stderr": stderr, "stdout": "progress"}),
            worker: "w-1".into(),
            host: "node-a".into(),
            started_at: "2026-12-02T10:00:00Z".into(),
            finished_at: "2026-12-02T10:00:02Z".into(),
            duration_s: 2.0,
            previous_errors: vec![TaskError::new("timeout", "too slow")],
        };
        let text = human(&record, Some("warren-worker"), false);
        assert!(
            text.contains("warp raw/bad tile.tif · task warp-0a · attempt 2"),
            "{text}"
        );
        assert!(
            text.contains("$ gdalwarp 'raw/bad tile.tif' out.tif"),
            "{text}"
        );
        assert!(
            text.contains("in /data") && text.contains("exit status 1"),
            "{text}"
        );
        assert!(
            text.contains("host node-a") && text.contains("earlier attempt: timeout"),
            "{text}"
        );
        assert!(
            text.contains("last 10 of 30 lines") && text.contains("  line 30\n"),
            "{text}"
        );
        assert!(
            !text.contains("line 20\n") && !text.contains("progress"),
            "{text}"
        );
        let full = human(&record, None, true);
        assert!(
            full.contains("line 1\n") && full.contains("--- stdout ---\nprogress"),
            "{full}"
        );
    }
}
