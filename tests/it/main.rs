//! quicseal's integration tests, one binary with a module per area (one binary links the
//! library and its dependencies once, instead of once per file).
//!
//! Real parts throughout: quinn connections over loopback, certificates made by
//! `quicseal::pki`, files in temp dirs, the `quicseal` binary as a real process.

mod common;

mod cert_cli;
mod cli;
mod durable;
mod durable_crash;
mod examples;
mod first_message;
mod identity;
mod limits;
mod metrics_export;
mod mtls;
mod netsim;
mod receiving;
mod reconnect;
mod rpc;
mod sealing;
mod soak;
mod spiffe;
mod workload_api;
