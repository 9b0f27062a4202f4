//! Two session cores driven by arbitrary operations and raw peer bytes: never panics, delivers
//! in order and once per channel, memory bounded; a violation closes (reconnects).
//!
//! The body is `quicseal::fuzzing::session_core`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::session_core(data));
