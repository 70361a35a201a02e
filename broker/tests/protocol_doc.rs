//! Holds `docs/protocol.md` to the code: its tables of fields, headers and error kinds are read and
//! compared with the envelopes, constants and enums they describe, so neither can drift alone.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::json;
use warren_broker::protocol::{
    self, BatchManifest, Cancellation, ErrorKind, ExecArgs, MESSAGE_TYPE_CANCEL,
    MESSAGE_TYPE_MANIFEST, MESSAGE_TYPE_RESULT, MESSAGE_TYPE_TASK, PROTOCOL_VERSION,
    ResultEnvelope, TASK_HEADERS, TaskEnvelope, TaskError, TaskStatus,
};
use warren_broker::topology::DELIVERY_LIMIT;

fn document() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md is readable")
}

/// The rows (cells, trimmed) of the first table after the line that starts with `marker`.
fn table(doc: &str, marker: &str) -> Vec<Vec<String>> {
    let start = doc
        .lines()
        .position(|l| l.starts_with(marker))
        .unwrap_or_else(|| panic!("docs/protocol.md has no line starting with {marker:?}"));
    let rows: Vec<Vec<String>> = doc
        .lines()
        .skip(start + 1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect();
    assert!(rows.len() > 2, "no table after {marker:?}");
    // Drop the header and the separator.
    rows.into_iter().skip(2).collect()
}

/// The `code` spans of a cell.
fn names(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn first_names(rows: &[Vec<String>]) -> BTreeSet<String> {
    rows.iter().flat_map(|r| names(&r[0])).collect()
}

/// The keys of an envelope encoded with every optional field set.
fn keys(value: &impl serde::Serialize) -> BTreeSet<String> {
    let bytes = protocol::encode(value);
    let map: BTreeMap<String, serde_json::Value> = rmp_serde::from_slice(&bytes).unwrap();
    map.into_keys().collect()
}

fn full_task() -> TaskEnvelope {
    TaskEnvelope {
        v: PROTOCOL_VERSION,
        id: "t".into(),
        batch: "b".into(),
        seq: Some(0),
        kind: "echo".into(),
        args: json!({"a": 1}),
        timeout_s: Some(1.0),
        labels: BTreeMap::from([("k".into(), "v".into())]),
        reply_to: "warren.results.b".into(),
        submitted_at: Some("2026-11-30T00:00:00Z".into()),
        max_retries: Some(1),
        retry_backoff_s: Some(1.0),
        expires_at: Some("2026-12-30T00:00:00Z".into()),
        token: Some("x".into()),
    }
}

#[test]
fn the_envelope_table_lists_every_task_field_and_which_are_required() {
    let doc = document();
    let rows = table(&doc, "Envelope:");
    assert_eq!(first_names(&rows), keys(&full_task()));
    let full: BTreeMap<String, serde_json::Value> =
        rmp_serde::from_slice(&protocol::encode(&full_task())).unwrap();
    for row in &rows {
        let field = &names(&row[0])[0];
        let required = row[2].starts_with("yes");
        let mut without = full.clone();
        without.remove(field);
        let decoded = protocol::decode_task(&rmp_serde::to_vec_named(&without).unwrap(), 1 << 20);
        match (required, decoded) {
            (true, Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::MissingField, "{field}: {e}");
                assert!(e.to_string().contains(field.as_str()), "{field}: {e}");
            }
            (true, Ok(_)) => {
                panic!("{field} is documented as required, but a task without it is accepted")
            }
            (false, Err(e)) => {
                panic!("{field} is documented as optional, but a task without it is refused: {e}")
            }
            (false, Ok(_)) => {}
        }
    }
}

#[test]
fn the_result_and_manifest_tables_list_every_field() {
    let doc = document();
    let result = ResultEnvelope {
        v: PROTOCOL_VERSION,
        task_id: "t".into(),
        batch: "b".into(),
        seq: Some(0),
        kind: "echo".into(),
        status: TaskStatus::Failed,
        output: json!(1),
        error: Some(TaskError::new("k", "m")),
        worker: "w".into(),
        attempt: 2,
        labels: BTreeMap::from([("k".into(), "v".into())]),
        started_at: "s".into(),
        finished_at: "f".into(),
        previous_errors: vec![TaskError::new("k", "m")],
        replayed: Some(1),
        token: Some("x".into()),
    };
    let rows = table(&doc, "## Result message");
    assert_eq!(first_names(&rows), keys(&result));
    let status_row = rows.iter().find(|r| r[0] == "`status`").unwrap();
    let documented: BTreeSet<String> = names(&status_row[2]).into_iter().collect();
    for status in TaskStatus::ALL {
        assert!(
            documented.contains(status.as_str()),
            "status {}",
            status.as_str()
        );
    }

    let manifest = BatchManifest {
        v: PROTOCOL_VERSION,
        batch: "b".into(),
        total: 1,
        queue: "q".into(),
        generation: 0,
        collected: vec![[0, 0]],
        replays: vec![[0, 1]],
        replays_collected: vec![[0, 1]],
        token: Some("x".into()),
        answerers: Some(vec!["w".into()]),
    };
    let rows = table(&doc, "## Batches and `warren wait`");
    assert_eq!(first_names(&rows), keys(&manifest));
}

#[test]
fn the_error_kind_table_is_the_enum_with_its_statuses() {
    let doc = document();
    let rows = table(&doc, "Error kinds:");
    let documented: BTreeMap<String, String> = rows
        .iter()
        .flat_map(|r| names(&r[0]).into_iter().map(|k| (k, r[1].clone())))
        .collect();
    let code: BTreeMap<String, String> = ErrorKind::ALL
        .iter()
        .map(|k| (k.as_str().to_string(), k.status().as_str().to_string()))
        .collect();
    assert_eq!(documented, code);
}

#[test]
fn headers_types_and_limits_in_the_text_are_the_code_s() {
    let doc = document();
    let rows = table(&doc, "AMQP properties:");
    let documented: BTreeSet<String> = rows
        .iter()
        .flat_map(|r| names(&r[0]))
        .filter(|n| n.starts_with("x-warren-"))
        .collect();
    let code: BTreeSet<String> = TASK_HEADERS.iter().map(|h| h.to_string()).collect();
    assert_eq!(documented, code);
    for needle in [
        protocol::HEADER_DEAD_REASON,
        protocol::HEADER_DEAD_DETAIL,
        protocol::HEADER_DEAD_QUEUE,
        protocol::HEADER_DEAD_WORKER,
        MESSAGE_TYPE_TASK,
        MESSAGE_TYPE_RESULT,
        MESSAGE_TYPE_MANIFEST,
        MESSAGE_TYPE_CANCEL,
        protocol::CONTENT_TYPE,
    ] {
        assert!(doc.contains(needle), "{needle} is not documented");
    }
    assert!(doc.contains(&format!("x-delivery-limit={DELIVERY_LIMIT}")));
    assert!(doc.contains(&protocol::DEFAULT_MAX_MESSAGE_BYTES.to_string()));
    assert!(doc.contains(&format!(
        "# Warren wire protocol, version {PROTOCOL_VERSION}"
    )));
}

#[test]
fn the_exec_arguments_and_cancellation_records_are_described_field_by_field() {
    let doc = document();
    let section: String = doc
        .split("Handler arguments:")
        .nth(1)
        .and_then(|rest| rest.split("### Field rules").next())
        .unwrap()
        .to_string();
    let exec = ExecArgs {
        argv: vec!["x".into()],
        env: BTreeMap::from([("A".into(), "b".into())]),
        cwd: Some("/".into()),
        stdin: Some(String::new()),
        outputs: vec!["o".into()],
        retry_exit_codes: Some(vec![1]),
        limits: Some(warren_broker::protocol::ExecLimits {
            memory_bytes: Some(1),
            cpu_s: Some(1),
            file_bytes: Some(1),
            open_files: Some(1),
            processes: Some(1),
        }),
    };
    for key in keys(&exec) {
        assert!(
            section.contains(&format!("\"{key}\"")) || section.contains(&format!("`{key}")),
            "exec argument {key} is not documented"
        );
    }
    for key in keys(exec.limits.as_ref().unwrap()) {
        assert!(
            section.contains(&format!("`{key}`")),
            "exec limit {key} is not documented"
        );
    }
    let cancel = Cancellation {
        v: 1,
        batch: "b".into(),
        task_id: Some("t".into()),
        at: "a".into(),
    };
    let record = doc
        .split("MessagePack map `{")
        .nth(1)
        .and_then(|rest| rest.split('}').next())
        .unwrap();
    let documented: BTreeSet<String> = record
        .split(',')
        .map(|f| f.trim().trim_end_matches('?').to_string())
        .collect();
    assert_eq!(documented, keys(&cancel));
}

#[test]
fn the_queue_table_gives_each_queue_the_arguments_it_is_declared_with() {
    use warren_broker::topology::QueueKind;
    let doc = document();
    let rows = table(&doc, "## Queues");
    let hour = std::time::Duration::from_secs(3600);
    let kinds = [
        ("`<tasks>` ", QueueKind::Task { task_queue: "t" }),
        ("`<tasks>.dead`", QueueKind::Dead),
        (
            "`warren.results.<batch>`",
            QueueKind::Results {
                task_queue: "t",
                expiry: hour,
            },
        ),
        (
            "`warren.batches.<batch>`",
            QueueKind::Expiring { expiry: hour },
        ),
        ("`warren.runs.<run>`", QueueKind::Expiring { expiry: hour }),
        ("`warren.cancellations`", QueueKind::Cancellations),
        ("`warren.logs`", QueueKind::Logs),
        (
            "`<tasks>.retry.<ms>ms`",
            QueueKind::Retry {
                task_queue: "t",
                delay: hour,
            },
        ),
    ];
    for (name, kind) in kinds {
        let row = rows
            .iter()
            .find(|r| format!("{} ", r[0]).starts_with(name))
            .unwrap_or_else(|| panic!("the queue table has no row {name}"));
        // `x-name=value` pairs in the arguments column.
        let documented: BTreeSet<String> = row[2]
            .split('`')
            .skip(1)
            .step_by(2)
            .filter_map(|pair| pair.split('=').next())
            .map(str::to_string)
            .collect();
        let declared: BTreeSet<String> = kind
            .arguments()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(documented, declared, "queue {name}: the table's arguments");
    }
}

#[test]
fn the_attempt_record_table_lists_every_field_of_a_record() {
    use protocol::{AttemptNext, AttemptRecord};
    let doc = document();
    let rows = table(&doc, "## Attempt records");
    let record = AttemptRecord {
        v: PROTOCOL_VERSION,
        batch: "b".into(),
        task_id: "t".into(),
        seq: Some(0),
        kind: "exec".into(),
        labels: BTreeMap::from([("stage".into(), "s".into())]),
        attempt: 1,
        status: TaskStatus::Failed,
        error: Some(TaskError::new("exit_status", "1")),
        next: AttemptNext::Retry,
        args: json!({"argv": ["false"]}),
        output: json!({}),
        worker: "w".into(),
        host: "h".into(),
        started_at: "a".into(),
        finished_at: "b".into(),
        duration_s: 0.1,
        previous_errors: vec![TaskError::new("timeout", "slow")],
    };
    assert_eq!(first_names(&rows), keys(&record));
    assert!(doc.contains(&format!("`type={}`", protocol::MESSAGE_TYPE_ATTEMPT)));
    assert!(doc.contains(&format!("`type={}`", protocol::MESSAGE_TYPE_MARKER)));
    assert!(doc.contains(&format!("`type={}`", protocol::MESSAGE_TYPE_ATTEMPTS)));
    assert!(doc.contains(&format!(
        "at most {} KiB, and readers take up to {} MiB",
        protocol::MAX_GROUP_BYTES >> 10,
        protocol::MAX_RECORD_BYTES >> 20
    )));
    assert!(doc.contains(&format!(
        "at most {} KiB each",
        protocol::MAX_RECORD_STREAM_BYTES >> 10
    )));
}
