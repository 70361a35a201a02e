//! Property tests: every envelope survives an encode and a decode.

use serde_json::Value;

use super::*;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._-]{1,40}"
}

proptest! {
    /// Whatever bytes arrive, decoding returns an answer; it never panics.
    #[test]
    fn any_bytes_decode_to_a_task_or_a_named_error(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_task(&bytes, 1 << 20);
        let _ = decode_result(&bytes, 1 << 20);
        let _ = decode_manifest(&bytes, 1 << 20);
        let _ = decode_cancellation(&bytes);
    }

    /// Arbitrary maps (the shape of a real envelope, with wrong or missing fields) never panic.
    #[test]
    fn any_map_decodes_or_is_refused(map in proptest::collection::btree_map(
        prop_oneof![Just("v".to_string()), Just("id".to_string()), Just("batch".to_string()),
                    Just("kind".to_string()), Just("reply_to".to_string()), Just("args".to_string()),
                    Just("timeout_s".to_string()), Just("max_retries".to_string()), Just("expires_at".to_string()), text()],
        prop_oneof![any::<i64>().prop_map(Value::from), any::<f64>().prop_map(Value::from),
                    text().prop_map(Value::from), Just(Value::Null), any::<bool>().prop_map(Value::from)],
        0..10)) {
        let bytes = rmp_serde::to_vec_named(&map).unwrap();
        if let Ok(task) = decode_task(&bytes, 1 << 20) {
            prop_assert!(!task.id.is_empty() && !task.kind.is_empty());
        }
    }

    /// A valid task survives encoding and decoding unchanged.
    #[test]
    fn valid_tasks_round_trip(id in text(), batch in text(), kind in text(), seq in any::<u32>(),
                              timeout in proptest::option::of(0.001f64..1e6), retries in proptest::option::of(0u32..=MAX_RETRIES),
                              labels in proptest::collection::btree_map(text(), text(), 0..4)) {
        let task = TaskEnvelope {
            v: PROTOCOL_VERSION, id, batch, seq: Some(seq), kind, args: serde_json::json!({"n": seq}),
            timeout_s: timeout, labels, reply_to: "warren.results.b".into(), submitted_at: None,
            max_retries: retries, retry_backoff_s: None, expires_at: None, token: Some("t".into()),
        };
        prop_assert_eq!(decode_task(&encode(&task), 1 << 20).unwrap(), task);
    }
}
