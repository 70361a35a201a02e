//! The attempt record: what a worker appends to the logs stream (`warren.logs`) at the end of
//! every attempt of a task, whether a result or a retry followed, so `warren logs` can show why a
//! step failed long after, from any machine that reaches the broker. See docs/protocol.md,
//! "Attempt records".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::decode::decode_checked;
use super::{DecodeError, TaskError, TaskStatus};

/// AMQP `type` of an attempt record in the logs stream.
pub const MESSAGE_TYPE_ATTEMPT: &str = "warren.attempt";
/// AMQP `type` of a group of attempt records in one message: a MessagePack array whose elements
/// are attempt records. A busy worker writes the records that finished together as one group.
pub const MESSAGE_TYPE_ATTEMPTS: &str = "warren.attempts";
/// The largest group a worker writes (it starts a new one rather than pass this); readers take
/// groups up to [`MAX_RECORD_BYTES`], like a single record.
pub const MAX_GROUP_BYTES: usize = 512 << 10;
/// AMQP `type` of a marker a reader appends to the logs stream to learn where its end was.
pub const MESSAGE_TYPE_MARKER: &str = "warren.marker";
/// Bytes kept of each of a record's `stdout` and `stderr` (the head and the tail of what the
/// worker captured, with a note of what was left out between them).
pub const MAX_RECORD_STREAM_BYTES: usize = 64 << 10;
/// Bytes of a task's `args` kept in its record; larger args are replaced by a note.
pub const MAX_RECORD_ARGS_BYTES: usize = 16 << 10;
/// The largest record a reader accepts (the caps above keep a worker's records well below).
pub const MAX_RECORD_BYTES: usize = 1 << 20;

/// What came after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptNext {
    /// Its result was published: this was the task's last attempt (unless it is redelivered).
    Result,
    /// It failed and was set aside for another attempt (`retries`).
    Retry,
}

/// One attempt of one task, as the worker that ran it saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Envelope version; see [`super::PROTOCOL_VERSION`].
    pub v: u32,
    /// The task's batch (a run's id for the tasks of `warren run`).
    pub batch: String,
    /// The task's id.
    pub task_id: String,
    /// The task's position in its batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u32>,
    /// Handler name.
    pub kind: String,
    /// The task's labels (`warren run` sets `stage` and `item`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Attempt number, 1 for the first run of the task.
    pub attempt: u32,
    /// How the attempt ended.
    pub status: TaskStatus,
    /// Why it did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TaskError>,
    /// What followed it.
    pub next: AttemptNext,
    /// The task's arguments (for `exec`: `argv`, `cwd`, `outputs`), capped.
    #[serde(default)]
    pub args: Value,
    /// What the handler returned (for `exec`: exit code or signal, stdout, stderr, outputs), with
    /// `stdout` and `stderr` capped to [`MAX_RECORD_STREAM_BYTES`] each.
    #[serde(default)]
    pub output: Value,
    /// The worker that ran it.
    pub worker: String,
    /// The host the worker ran on.
    #[serde(default)]
    pub host: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// Seconds it took.
    pub duration_s: f64,
    /// The errors of the attempts before it, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_errors: Vec<TaskError>,
}

impl AttemptRecord {
    /// Readies the record for the logs stream, which every submitter of the namespace may read:
    /// the values of `args.env` and `args.stdin` are left out (they may hold a task's secrets;
    /// the variable names stay), each of `output.stdout` and `output.stderr` is capped to
    /// [`MAX_RECORD_STREAM_BYTES`], and `args` to [`MAX_RECORD_ARGS_BYTES`].
    pub fn capped(mut self) -> Self {
        redact_args(&mut self.args);
        for stream in ["stdout", "stderr"] {
            if let Some(Value::String(text)) = self.output.get_mut(stream) {
                cap_text(text, MAX_RECORD_STREAM_BYTES);
            }
        }
        let args_bytes = json_length(&self.args);
        if args_bytes > MAX_RECORD_ARGS_BYTES {
            self.args = Value::String(format!(
                "[the task's args, {args_bytes} bytes, are larger than a record keeps ({MAX_RECORD_ARGS_BYTES})]"
            ));
        }
        self
    }
}

/// The length of `value` written as JSON, counted without writing it anywhere.
fn json_length(value: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).map_or(0, |()| count.0)
}

/// What stands for a value a record leaves out.
pub const REDACTED: &str = "[not recorded]";

/// Replaces the values of an exec task's `env` and its `stdin` by [`REDACTED`].
fn redact_args(args: &mut Value) {
    if let Some(Value::Object(env)) = args.get_mut("env") {
        for value in env.values_mut() {
            *value = Value::String(REDACTED.into());
        }
    }
    if let Some(stdin) = args.get_mut("stdin").filter(|s| !s.is_null()) {
        *stdin = Value::String(REDACTED.into());
    }
}

/// Keeps the head and the tail of `text` within `limit` bytes, noting what was left out.
fn cap_text(text: &mut String, limit: usize) {
    if text.len() <= limit {
        return;
    }
    let half = limit / 2;
    let head_end = floor_char_boundary(text, half);
    let tail_start = ceil_char_boundary(text, text.len() - half);
    let left_out = tail_start - head_end;
    *text = format!(
        "{}\n[… {left_out} bytes left out of this record …]\n{}",
        &text[..head_end],
        &text[tail_start..]
    );
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn ceil_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// Decodes an attempt record.
pub fn decode_attempt(bytes: &[u8]) -> Result<AttemptRecord, DecodeError> {
    decode_checked(bytes, MAX_RECORD_BYTES, &[])
}

/// A group of encoded attempt records as one message body (a MessagePack array of them).
pub fn encode_attempt_group(records: &[Vec<u8>]) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + records.iter().map(Vec::len).sum::<usize>());
    // Writing to a Vec cannot fail; a group has far fewer than 2^32 records.
    let _ = rmp::encode::write_array_len(&mut body, records.len() as u32);
    for record in records {
        body.extend_from_slice(record);
    }
    body
}

/// Decodes a group of attempt records: each element on its own, so one bad record does not hide
/// the others. Fails when the body is not an array of at most [`MAX_RECORD_BYTES`].
pub fn decode_attempt_group(
    bytes: &[u8],
) -> Result<Vec<Result<AttemptRecord, DecodeError>>, DecodeError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(DecodeError::Oversize {
            size: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    let mut rest = bytes;
    let count = rmp::decode::read_array_len(&mut rest)
        .map_err(|e| DecodeError::Undecodable(format!("a group of records is an array: {e}")))?;
    let mut records = Vec::new();
    for _ in 0..count {
        let before = rest;
        rmpv::decode::read_value_ref_with_max_depth(&mut rest, MAX_GROUP_DEPTH)
            .map_err(|e| DecodeError::Undecodable(e.to_string()))?;
        records.push(decode_attempt(&before[..before.len() - rest.len()]));
    }
    Ok(records)
}

/// How deep a record in a group may nest (what a task's `args` and `output` may hold).
const MAX_GROUP_DEPTH: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(output: Value, args: Value) -> AttemptRecord {
        AttemptRecord {
            v: super::super::PROTOCOL_VERSION,
            batch: "b".into(),
            task_id: "t".into(),
            seq: Some(0),
            kind: "exec".into(),
            labels: BTreeMap::new(),
            attempt: 1,
            status: TaskStatus::Failed,
            error: Some(TaskError::new("exit_status", "exit 1")),
            next: AttemptNext::Result,
            args,
            output,
            worker: "w".into(),
            host: "h".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            finished_at: "2026-01-01T00:00:01Z".into(),
            duration_s: 1.0,
            previous_errors: vec![],
        }
    }

    #[test]
    fn a_group_holds_its_records_in_order_and_a_bad_one_hides_no_other() {
        let first = record(json!({"stdout": "a"}), json!({"argv": ["x"]}));
        let second = record(json!({"stdout": "b"}), json!({"argv": ["y"]}));
        let bad = b"\x81\xa1v\x05".to_vec();
        let body = encode_attempt_group(&[
            super::super::encode(&first),
            bad,
            super::super::encode(&second),
        ]);
        let back = decode_attempt_group(&body).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[0].as_ref().unwrap(), &first);
        assert!(back[1].is_err());
        assert_eq!(back[2].as_ref().unwrap(), &second);
        assert!(decode_attempt_group(&super::super::encode(&first)).is_err());
        assert!(decode_attempt_group(&[0x93, 0x01]).is_err());
    }

    #[test]
    fn a_record_round_trips() {
        let r = record(
            json!({"stderr": "oops\n", "exit_code": 1}),
            json!({"argv": ["false"]}),
        );
        let back = decode_attempt(&super::super::encode(&r)).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn long_output_keeps_its_head_and_tail_and_says_what_was_left_out() {
        let long = format!("first line\n{}last line é\n", "é".repeat(100_000));
        let r = record(json!({"stderr": long, "stdout": "short"}), json!({})).capped();
        let kept = r.output["stderr"].as_str().unwrap();
        assert!(
            kept.len() <= MAX_RECORD_STREAM_BYTES + 100,
            "{}",
            kept.len()
        );
        assert!(kept.starts_with("first line\n"));
        assert!(kept.ends_with("last line é\n"));
        assert!(kept.contains("bytes left out of this record"));
        assert_eq!(r.output["stdout"], "short");
    }

    #[test]
    fn a_tasks_env_values_and_stdin_stay_out_of_its_record() {
        let r = record(
            json!({}),
            json!({"argv": ["sh"], "env": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}, "stdin": "password\n"}),
        )
        .capped();
        let text = r.args.to_string();
        assert!(
            !text.contains("s3cr3t") && !text.contains("password"),
            "{text}"
        );
        assert_eq!(r.args["env"]["AWS_SECRET_ACCESS_KEY"], REDACTED);
        assert_eq!(r.args["argv"][0], "sh");
    }

    #[test]
    fn huge_args_are_replaced_by_a_note() {
        let r = record(json!({}), json!({"argv": ["x".repeat(20_000)]})).capped();
        assert!(
            r.args
                .as_str()
                .unwrap()
                .contains("larger than a record keeps")
        );
        let small = record(json!({}), json!({"argv": ["true"]})).capped();
        assert_eq!(small.args, json!({"argv": ["true"]}));
    }
}
