//! Unit tests of the wire format: each envelope's encode and decode, and what bad input gets.

use std::collections::BTreeMap;

use serde_json::Value;

use super::*;

fn task() -> TaskEnvelope {
    TaskEnvelope {
        v: PROTOCOL_VERSION,
        id: "t1".into(),
        batch: "b1".into(),
        seq: Some(0),
        kind: "echo".into(),
        args: serde_json::json!({"x": [1, 2.5, "s", null, true]}),
        timeout_s: Some(3.0),
        labels: BTreeMap::from([("file".into(), "a.tif".into())]),
        reply_to: "warren.results.b1".into(),
        submitted_at: None,
        max_retries: None,
        retry_backoff_s: None,
        expires_at: None,
        token: Some("secret".into()),
    }
}

#[test]
fn task_round_trips() {
    let t = task();
    assert_eq!(decode_task(&encode(&t), 1 << 20).unwrap(), t);
}

#[test]
fn oversize_is_reported_before_decoding() {
    let err = decode_task(&encode(&task()), 10).unwrap_err();
    assert_eq!(err.kind().as_str(), "oversize");
}

#[test]
fn garbage_is_undecodable() {
    let err = decode_task(b"\xc1\xc1 not msgpack", 1 << 20).unwrap_err();
    assert_eq!(err.kind().as_str(), "undecodable");
}

#[test]
fn newer_version_is_named() {
    let mut t = task();
    t.v = 2;
    let err = decode_task(&encode(&t), 1 << 20).unwrap_err();
    assert_eq!(err.kind().as_str(), "unsupported_version");
    assert!(err.to_string().contains('2'), "{err}");
}

#[test]
fn missing_field_is_named() {
    let bytes = rmp_serde::to_vec_named(
        &serde_json::json!({"v": 1, "id": "x", "batch": "b", "reply_to": "q"}),
    )
    .unwrap();
    let err = decode_task(&bytes, 1 << 20).unwrap_err();
    assert_eq!(err.kind().as_str(), "missing_field");
    assert!(err.to_string().contains("kind"), "{err}");
}

#[test]
fn unknown_fields_are_ignored() {
    let bytes = rmp_serde::to_vec_named(&serde_json::json!({
        "v": 1, "id": "x", "batch": "b", "seq": 0, "kind": "echo", "reply_to": "q", "future_field": 7
    }))
    .unwrap();
    assert_eq!(decode_task(&bytes, 1 << 20).unwrap().kind, "echo");
}

#[test]
fn bad_ids_and_timeouts_are_invalid() {
    let mut long_id = task();
    long_id.id = "x".repeat(MAX_ID_LEN + 1);
    let mut negative_timeout = task();
    negative_timeout.timeout_s = Some(-1.0);
    for t in [long_id, negative_timeout] {
        let error = decode_task(&encode(&t), 1 << 20).unwrap_err();
        assert_eq!(error.kind().as_str(), "invalid_field", "{t:?}");
    }
}

/// A task map with one field replaced (or removed, with `None`), encoded with rmpv so that
/// values serde would never produce (binary, integer keys, NaN) can be sent.
fn raw_task(field: &str, value: Option<rmpv::Value>) -> Vec<u8> {
    use rmpv::Value as V;
    let mut fields: Vec<(V, V)> = vec![
        (V::from("v"), V::from(1)),
        (V::from("id"), V::from("t1")),
        (V::from("batch"), V::from("b1")),
        (V::from("seq"), V::from(0)),
        (V::from("kind"), V::from("echo")),
        (V::from("reply_to"), V::from("warren.results.b1")),
    ];
    fields.retain(|(k, _)| k.as_str() != Some(field));
    if let Some(value) = value {
        fields.push((V::from(field), value));
    }
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &V::Map(fields)).unwrap();
    bytes
}

fn refusal(bytes: &[u8]) -> (String, String) {
    let err = decode_task(bytes, 1 << 20).unwrap_err();
    (err.kind().as_str().to_string(), err.to_string())
}

#[test]
fn binary_strings_are_refused_with_the_field_named() {
    for field in ["id", "batch", "kind", "reply_to", "token", "expires_at"] {
        let (kind, message) = refusal(&raw_task(field, Some(rmpv::Value::Binary(b"abc".to_vec()))));
        assert_eq!(kind, "invalid_field", "{field}: {message}");
        assert!(
            message.contains(field) && message.contains("binary"),
            "{field}: {message}"
        );
    }
    let labels = rmpv::Value::Map(vec![("k".into(), rmpv::Value::Binary(b"v".to_vec()))]);
    let (kind, message) = refusal(&raw_task("labels", Some(labels)));
    assert_eq!(kind, "invalid_field", "{message}");
    assert!(message.contains("labels"), "{message}");
}

#[test]
fn args_outside_the_json_model_are_refused_with_the_path_named() {
    use rmpv::Value as V;
    let nan = V::Map(vec![(
        "x".into(),
        V::Array(vec![V::from(1), V::F64(f64::NAN)]),
    )]);
    let (kind, message) = refusal(&raw_task("args", Some(nan)));
    assert_eq!(kind, "invalid_field", "{message}");
    assert!(
        message.contains("args.x[1]") && message.contains("finite"),
        "{message}"
    );
    let int_key = V::Map(vec![(V::from(1), V::from("one"))]);
    let (kind, message) = refusal(&raw_task("args", Some(int_key)));
    assert_eq!(kind, "invalid_field", "{message}");
    assert!(
        message.contains("args") && message.contains("keys"),
        "{message}"
    );
    let binary = V::Map(vec![("data".into(), V::Binary(vec![0, 1]))]);
    let (kind, message) = refusal(&raw_task("args", Some(binary)));
    assert_eq!(kind, "invalid_field", "{message}");
    assert!(message.contains("args.data"), "{message}");
}

#[test]
fn nil_in_an_optional_field_is_the_same_as_absent() {
    for field in [
        "args",
        "timeout_s",
        "labels",
        "submitted_at",
        "token",
        "max_retries",
        "expires_at",
        "retry_backoff_s",
    ] {
        let task = decode_task(&raw_task(field, Some(rmpv::Value::Nil)), 1 << 20);
        assert!(task.is_ok(), "nil {field}: {:?}", task.err());
    }
    // nil in a required field is invalid_field, whichever field it is (v and seq too).
    for field in ["v", "id", "batch", "kind", "reply_to", "seq"] {
        let (kind, message) = refusal(&raw_task(field, Some(rmpv::Value::Nil)));
        assert_eq!(kind, "invalid_field", "nil {field}: {message}");
        assert!(message.contains(field), "{message}");
    }
}

#[test]
fn an_envelope_is_a_map_with_string_keys_never_read_by_position() {
    use rmpv::Value as V;
    // Integer keys 0..5 would be read as the struct's fields in order.
    let positional = V::Map(
        [
            V::from(1),
            V::from("t1"),
            V::from("b1"),
            V::from(0),
            V::from("echo"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, v)| (V::from(i as u64), v))
        .collect(),
    );
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &positional).unwrap();
    let (kind, message) = refusal(&bytes);
    assert_eq!(kind, "undecodable", "{message}");
    assert!(message.contains("string map key"), "{message}");
    // A valid envelope with an extra integer key is refused the same way, not as a
    // duplicate field.
    let mut extra = Vec::new();
    let mut fields = match rmpv::decode::read_value(&mut &raw_task("x", None)[..]).unwrap() {
        V::Map(fields) => fields,
        _ => unreachable!(),
    };
    fields.push((V::from(0), V::from("x")));
    rmpv::encode::write_value(&mut extra, &V::Map(fields)).unwrap();
    let (kind, message) = refusal(&extra);
    assert_eq!(kind, "undecodable", "{message}");
    assert!(!message.contains("duplicate"), "{message}");
}

#[test]
fn wrong_types_name_the_field_and_garbage_is_undecodable() {
    let (kind, message) = refusal(&raw_task("timeout_s", Some("soon".into())));
    assert_eq!(kind, "invalid_field");
    assert!(message.contains("timeout_s"), "{message}");
    let (kind, message) = refusal(&raw_task("seq", Some(rmpv::Value::from(-1))));
    assert_eq!(kind, "invalid_field");
    assert!(message.contains("seq"), "{message}");
    let mut not_a_map = Vec::new();
    rmpv::encode::write_value(&mut not_a_map, &rmpv::Value::from("hello")).unwrap();
    assert_eq!(refusal(&not_a_map).0, "undecodable");
    let mut truncated = raw_task("args", Some(rmpv::Value::from("x".repeat(100))));
    truncated.truncate(truncated.len() - 10);
    assert_eq!(refusal(&truncated).0, "undecodable");
}

#[test]
fn a_task_without_seq_is_refused() {
    let (kind, message) = refusal(&raw_task("seq", None));
    assert_eq!(kind, "missing_field");
    assert!(message.contains("seq"), "{message}");
}

#[test]
fn status_names_match_serde() {
    for s in TaskStatus::ALL {
        assert_eq!(
            serde_json::to_value(s).unwrap(),
            Value::String(s.as_str().into())
        );
    }
}
