//! Whatever bytes arrive in a queue, the decoders return an envelope or a named error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_broker::protocol;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(task) = protocol::decode_task(bytes, 1 << 20) {
        // What decodes is valid, and survives a round trip.
        assert!(!task.id.is_empty() && !task.kind.is_empty());
        let again = protocol::decode_task(&protocol::encode(&task), 1 << 20);
        assert!(again.is_ok());
    }
    let _ = protocol::decode_result(bytes, 1 << 20);
    let _ = protocol::decode_manifest(bytes, 1 << 20);
    let _ = protocol::decode_cancellation(bytes);
});
