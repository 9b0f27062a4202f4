//! PEM certificate, CRL and key loading as TrustStore, Identity and `quicseal cert inspect`
//! do it: never panics.
//!
//! The body is `quicseal::fuzzing::pem_load`, which `cargo test` also runs on the corpus.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| quicseal::fuzzing::pem_load(data));
