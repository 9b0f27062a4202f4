//! DURABLE frame decoding from arbitrary bytes: never panics, and what decodes re-encodes to the
//! same bytes.
//!
//! The body is `quicseal::fuzzing::durable_decode`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::durable_decode(data));
