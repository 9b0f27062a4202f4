//! A durable sender or receiver (PROTOCOL.md section 10), made to be killed: the crash test
//! (`tests/it/durable_crash.rs`) runs two of these as processes, kills them with SIGKILL at
//! random moments and starts them again on their stores.
//!
//! ```text
//! cargo run --example gen_certs
//! cargo run --example durable_node -- receive /tmp/b-store 127.0.0.1:4500
//! cargo run --example durable_node -- send /tmp/a-store 127.0.0.1:4500 /tmp/a-sent.log 3
//! ```
//!
//! - `receive STORE ADDR`: listens on ADDR (as `server`), and for each durable message writes
//!   `(stream dseq, channel, payload)` to the table `app_log` **in the same transaction** that
//!   consumes it (`Store::consume_with`), so the log holds each delivered message exactly once
//!   even if the process dies at any instant. With `QUICSEAL_CRASH_CONTROL=log` it consumes
//!   first and logs in a second transaction instead: a control run, where a kill in between
//!   loses messages (the application is made slow there, 50 ms, so that kills land in between).
//!   With `drain` after ADDR it exits (printing `empty`) once the store's inbox is empty.
//! - `send STORE ADDR SENT_LOG CHANNELS`: dials ADDR (as `client`, again whenever the session
//!   ends), and sends numbered messages durably on `CHANNELS` channels, paced; after each
//!   `send_durable` that returned `Ok` it appends the message's `(generation, number)` to
//!   SENT_LOG. The generation is counted in `STORE/generation` at each start, so messages of
//!   different runs differ. With `drain` as CHANNELS it sends nothing new and exits once its
//!   store has no message left without a receipt. With `QUICSEAL_CRASH_CONTROL=fsync` its store
//!   does not fsync (`Store::set_fsync`): the other control run, where a kill loses messages
//!   that `send_durable` returned `Ok` for.
//!
//! Certificates come from `certs/examples/` or `QUICSEAL_EXAMPLE_CERTS`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use quicseal::store::StoreError;
use quicseal::store::redb::ReadableTable;
use quicseal::{Error, Identity, Limits, Node, NodeConfig, Session, TrustStore};
use tokio::sync::Mutex;

mod support;

/// The receiver's application log: position -> (dseq, channel, payload).
const APP_LOG: quicseal::store::redb::TableDefinition<u64, (u64, u16, &[u8])> =
    quicseal::store::redb::TableDefinition::new("app_log");

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["receive", store, addr] => receive(Path::new(store), addr, false).await,
        ["receive", store, addr, "drain"] => receive(Path::new(store), addr, true).await,
        ["send", store, addr, log, channels] => send(Path::new(store), addr, Path::new(log), channels).await,
        _ => Err(Error::InvalidInput(
            "usage: durable_node receive STORE ADDR [drain] | send STORE ADDR SENT_LOG CHANNELS|drain".into(),
        )),
    };
    support::exit(result)
}

fn config(name: &str, store: &Path) -> quicseal::Result<NodeConfig> {
    let certs = support::certs_dir();
    let identity = Identity::from_pem_files(certs.join(format!("{name}.crt")), certs.join(format!("{name}.key")))?;
    let trust = TrustStore::from_ca_file(certs.join("ca.crt"))?;
    let mut limits = Limits::default();
    // A killed peer is found out fast, and a session that cannot be resumed ends soon.
    limits.idle_timeout = Duration::from_secs(2);
    limits.keep_alive = Some(Duration::from_millis(500));
    limits.reconnect_backoff = (Duration::from_millis(20), Duration::from_millis(200));
    limits.resume_timeout = Duration::from_secs(2);
    Ok(NodeConfig::new(identity, trust).limits(limits).store(store))
}

fn parse(addr: &str) -> quicseal::Result<std::net::SocketAddr> {
    addr.parse().map_err(|e| Error::InvalidInput(format!("bad address {addr:?}: {e}")))
}

fn app_error(e: quicseal::store::redb::Error) -> StoreError {
    StoreError::Io { path: PathBuf::from("app_log"), reason: e.to_string() }
}

async fn receive(store: &Path, addr: &str, drain: bool) -> quicseal::Result<()> {
    let node = Node::bind(parse(addr)?, config("server", store)?)?;
    println!("receiving on {}", node.local_addr()?);
    // Sessions live as long as someone holds them: keep each until it ends.
    let acceptor = node.clone();
    tokio::spawn(async move {
        while let Ok(session) = acceptor.accept().await {
            tokio::spawn(async move { session.closed().await });
        }
    });
    let control = control() == "log";
    let store = node.store().expect("configured").clone();
    loop {
        if drain && store.stats().inbox_messages == 0 {
            println!("empty");
            return Ok(());
        }
        let m = node.recv_durable().await?;
        let entry = (m.dseq, m.channel, m.payload.to_vec());
        let log = move |txn: &quicseal::store::redb::WriteTransaction| {
            let mut t = txn.open_table(APP_LOG).map_err(|e| app_error(e.into()))?;
            let at = t.last().map_err(|e| app_error(e.into()))?.map(|(k, _)| k.value() + 1).unwrap_or(0);
            t.insert(at, (entry.0, entry.1, entry.2.as_slice())).map_err(|e| app_error(e.into()))?;
            Ok(())
        };
        if control {
            // The unsafe order: consumed, then logged in a transaction of its own.
            store.consume(&m).await.map_err(Error::Store)?;
            // A slow application: the window a kill must hit to lose the message. (Not while
            // draining at the end, when nothing is killed: the backlog goes at full speed.)
            if !drain {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            store.write_with(log).await.map_err(Error::Store)?;
        } else {
            store.consume_with(&m, log).await.map_err(Error::Store)?;
        }
    }
}

async fn send(store: &Path, addr: &str, log: &Path, channels: &str) -> quicseal::Result<()> {
    let generation = next_generation(store)?;
    let node = Node::bind(parse("127.0.0.1:0")?, config("client", store)?)?;
    if control() == "fsync" {
        node.store().expect("configured").set_fsync(false);
    }
    let to = parse(addr)?;
    let session = Arc::new(Mutex::new(dial(&node, to).await));
    // Dial again whenever the session ends (the receiver was killed, or the link dropped it).
    let (keeper, node2) = (session.clone(), node.clone());
    tokio::spawn(async move {
        loop {
            let current = keeper.lock().await.clone();
            current.closed().await;
            *keeper.lock().await = dial(&node2, to).await;
        }
    });
    if channels == "drain" {
        let store = node.store().expect("configured");
        while store.stats().outbox_messages > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("drained");
        return Ok(());
    }
    let channels: u16 = channels.parse().map_err(|_| Error::InvalidInput(format!("bad channel count {channels:?}")))?;
    let mut sent = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    println!("sending, generation {generation}");
    for number in 0u32.. {
        let channel = (number % u32::from(channels)) as u16;
        let s = session.lock().await.clone();
        s.send_durable(channel, &(generation, number)).await?;
        // One write(2) per line: `writeln!` on a `File` makes one per piece, and a kill between
        // them leaves a torn line that the next process's line would run into.
        sent.write_all(format!("{generation} {number} {channel}\n").as_bytes())?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

/// The control run asked for (`QUICSEAL_CRASH_CONTROL`): `log`, `fsync`, or none.
fn control() -> String {
    std::env::var("QUICSEAL_CRASH_CONTROL").unwrap_or_default()
}

/// Dials until a session is up.
async fn dial(node: &Node, to: std::net::SocketAddr) -> Session {
    loop {
        if let Ok(s) = node.connect(to, "server").await {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Counts this start in `STORE/generation` (written and synced before any message is sent).
fn next_generation(store: &Path) -> quicseal::Result<u32> {
    std::fs::create_dir_all(store)?;
    let path = store.join("generation");
    let previous: u32 = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let next = previous + 1;
    let tmp = store.join("generation.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{next}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(store)?.sync_all()?;
    Ok(next)
}
