//! Arbitrary sequences of reliability-core operations through a lossy, duplicating, reordering
//! queue: never delivered twice or out of order, memory bounded, genuine acks never refused.
//!
//! The body is `quicseal::fuzzing::reliable_ops`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::reliable_ops(data));
