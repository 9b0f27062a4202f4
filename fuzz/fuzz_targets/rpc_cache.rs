//! The server's at-most-once call cache under arbitrary operation sequences: bounded, never
//! forgets a running call, never answers with another call's response.
//!
//! The body is `quicseal::fuzzing::rpc_cache`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::rpc_cache(data));
