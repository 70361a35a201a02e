//! Whatever a task file holds, reading it gives tasks or an error naming a line.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_submitter::spec::read_specs;

fuzz_target!(|bytes: &[u8]| {
    match read_specs(bytes, "fuzz") {
        Ok(specs) => assert!(specs.iter().all(|s| !s.kind.trim().is_empty())),
        Err(e) => assert!(!e.message.is_empty()),
    }
});
