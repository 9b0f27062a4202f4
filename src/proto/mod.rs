//! The sans-IO core: pure functions and state machines that take bytes and return bytes and
//! decisions. No tokio, no sockets, no clock, no global RNG in here: the async shell
//! ([`Node`](crate::Node), [`Session`](crate::Session)) only moves bytes.

pub mod epochs;
pub mod hello;
pub mod reliable;
pub mod replay;
pub mod rpc;
pub mod seal;
pub mod session;
pub mod violation;
pub mod wire;
