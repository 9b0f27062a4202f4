//! The anti-replay window against a set-based model (differential), any sequence of
//! check/commit operations.
//!
//! The body is `quicseal::fuzzing::replay_window`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::replay_window(data));
