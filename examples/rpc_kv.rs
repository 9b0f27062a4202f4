//! A small key-value service over quicseal RPC, with its client, using the certificates under
//! `certs/examples/` (or the directory in `QUICSEAL_EXAMPLE_CERTS`).
//!
//! ```text
//! cargo run --example gen_certs                        # once
//! cargo run --example rpc_kv                           # server and client in one process
//! cargo run --example rpc_kv -- server 127.0.0.1:4434  # or apart: the server...
//! cargo run --example rpc_kv -- client 127.0.0.1:4434 put colour blue
//! cargo run --example rpc_kv -- client 127.0.0.1:4434 get colour
//! ```
//!
//! `put` is not idempotent in general (it returns the previous value), so it relies on the
//! server's at-most-once cache when the client retries it; `get` is marked idempotent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quicseal::{
    ApplicationError, Call, CallOptions, Error, Identity, Node, NodeConfig, RemoteError, Router, RpcClient, TrustStore,
};

mod support;

/// Application error code: no such key.
const NOT_FOUND: u32 = 404;
/// Application error code: key or value too long.
const TOO_LONG: u32 = 413;
const MAX_LEN: usize = 4096;

type Store = Arc<Mutex<BTreeMap<String, String>>>;

fn router(store: Store) -> Router {
    let (put, get, list) = (store.clone(), store.clone(), store);
    Router::new()
        .handle("kv.put", move |call: Call, (key, value): (String, String)| {
            let store = put.clone();
            async move {
                if key.len() > MAX_LEN || value.len() > MAX_LEN {
                    return Err(ApplicationError::new(TOO_LONG, "keys and values are at most 4096 bytes"));
                }
                println!("{} put {key:?}", call.peer().display_name());
                Ok(store.lock().unwrap().insert(key, value))
            }
        })
        .handle("kv.get", move |_call: Call, key: String| {
            let store = get.clone();
            async move { store.lock().unwrap().get(&key).cloned().ok_or_else(|| ApplicationError::new(NOT_FOUND, key)) }
        })
        .handle("kv.list", move |_call: Call, ()| {
            let store = list.clone();
            async move { Ok::<_, ApplicationError>(store.lock().unwrap().keys().cloned().collect::<Vec<_>>()) }
        })
}

fn load(name: &str) -> quicseal::Result<(Identity, TrustStore)> {
    let certs = support::certs_dir();
    let identity = Identity::from_pem_files(certs.join(format!("{name}.crt")), certs.join(format!("{name}.key")))?;
    Ok((identity, TrustStore::from_ca_file(certs.join("ca.crt"))?))
}

fn parse_addr(s: &str) -> quicseal::Result<SocketAddr> {
    s.parse().map_err(|e| Error::Config(format!("bad address {s:?}: {e}")))
}

async fn start_server(addr: SocketAddr) -> quicseal::Result<Node> {
    let (identity, trust) = load("server")?;
    let node = Node::bind(addr, NodeConfig::new(identity, trust).rpc(router(Store::default())))?;
    let serving = node.clone();
    tokio::spawn(async move { serving.serve().await });
    Ok(node)
}

fn client(addr: SocketAddr) -> quicseal::Result<RpcClient> {
    let (identity, trust) = load("client")?;
    let node = Node::bind("127.0.0.1:0".parse().expect("literal"), NodeConfig::new(identity, trust))?;
    RpcClient::new(node, addr, "server")
}

async fn run_command(client: &RpcClient, args: &[String]) -> quicseal::Result<()> {
    let timeout = Duration::from_secs(5);
    match args {
        [op, key, value] if op == "put" => {
            let old: Option<String> = client.request("kv.put", &(key, value), timeout).await?;
            println!("put {key:?} = {value:?} (was {old:?})");
        }
        [op, key] if op == "get" => {
            let options = CallOptions::new(timeout).idempotent(true);
            match client.request_with::<_, String>("kv.get", key, options).await {
                Ok(v) => println!("get {key:?} = {v:?}"),
                Err(Error::Remote(RemoteError::Application(e))) if e.code == NOT_FOUND => {
                    println!("get {key:?}: no such key")
                }
                Err(e) => return Err(e),
            }
        }
        [op] if op == "list" => {
            let keys: Vec<String> = client.request("kv.list", &(), timeout).await?;
            println!("keys: {keys:?}");
        }
        _ => return Err(Error::Config("commands: put KEY VALUE | get KEY | list".into())),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    support::exit(run().await)
}

async fn run() -> quicseal::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("server") => {
            let addr = parse_addr(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:4434"))?;
            let node = start_server(addr).await?;
            println!("kv server on {}", node.local_addr()?);
            tokio::signal::ctrl_c().await?;
            Ok(())
        }
        Some("client") => {
            let addr = parse_addr(args.get(1).map(String::as_str).unwrap_or("127.0.0.1:4434"))?;
            run_command(&client(addr)?, &args[2..]).await
        }
        None => {
            // Both ends in one process.
            let server = start_server("127.0.0.1:0".parse().expect("literal")).await?;
            let client = client(server.local_addr()?)?;
            for command in [
                &["put", "colour", "blue"][..],
                &["put", "colour", "green"],
                &["get", "colour"],
                &["get", "shape"],
                &["list"],
            ] {
                let command: Vec<String> = command.iter().map(|s| s.to_string()).collect();
                run_command(&client, &command).await?;
            }
            Ok(())
        }
        Some(other) => Err(Error::Config(format!("unknown mode {other:?}: use server, client, or nothing"))),
    }
}
