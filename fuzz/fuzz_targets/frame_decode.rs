//! Frame and stream-header decoding on arbitrary bytes: never panics, and whatever decodes
//! re-encodes to the same bytes.
//!
//! The body is `quicseal::fuzzing::frame_decode`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::frame_decode(data));
