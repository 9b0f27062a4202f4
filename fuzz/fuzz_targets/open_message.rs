//! Opening messages with a fixed test key (decode, epoch, freshness, replay window, tag): never
//! panics, a forged message never opens, nothing refused moves a window.
//!
//! The body is `quicseal::fuzzing::open_message`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::open_message(data));
