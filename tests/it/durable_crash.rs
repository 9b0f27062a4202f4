//! Exactly once across `kill -9`: a durable sender and receiver (`examples/durable_node.rs`) as
//! real processes, talking through the `netsim` link (loss, duplication, reordering), each
//! killed with SIGKILL at random moments and started again on its store. The checker then reads
//! the receiver's application log, which the receiver writes in the same store transaction that
//! consumes each message, and the sender's log of every `send_durable` that returned `Ok`.
//!
//! 50 kills per run; `QUICSEAL_CRASH_KILLS=500` for the long mode. Two control runs must lose
//! messages, proof that the kills land where they matter: one where the receiver logs in a
//! transaction of its own after consuming, one where the sender's store does not fsync.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use quicseal::netsim::{LinkConfig, Proxy};
use quicseal::store::redb::{self, ReadableDatabase, ReadableTable};

use crate::examples::example;

const APP_LOG: redb::TableDefinition<u64, (u64, u16, &[u8])> = redb::TableDefinition::new("app_log");

/// Everything one crash run needs: certificates, the two stores, the sender's log.
struct Run {
    dir: tempfile::TempDir,
    receiver_addr: SocketAddr,
    /// The control the processes run (`QUICSEAL_CRASH_CONTROL`), if any.
    control: Option<&'static str>,
}

impl Run {
    fn new(control: Option<&'static str>) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(example("gen_certs"))
            .env("QUICSEAL_EXAMPLE_CERTS", dir.path().join("certs"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        // A port for the receiver that stays the same across its restarts.
        let receiver_addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        Run { dir, receiver_addr, control }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(example("durable_node"));
        c.env("QUICSEAL_EXAMPLE_CERTS", self.path("certs")).stderr(Stdio::null());
        if let Some(control) = self.control {
            c.env("QUICSEAL_CRASH_CONTROL", control);
        }
        c
    }

    /// Starts the receiver and waits until it listens (its port may take a moment to be free
    /// after a kill: it retries until then, a condition with a deadline).
    fn receiver(&self, drain: bool) -> (Child, Out) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut c = self.command();
            c.args(["receive", self.path("b").to_str().unwrap(), &self.receiver_addr.to_string()]);
            if drain {
                c.arg("drain");
            }
            let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
            let mut out = BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            if line.starts_with("receiving on") {
                return (child, out);
            }
            let _ = child.wait();
            assert!(std::time::Instant::now() < deadline, "the receiver does not start: {line:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sender(&self, to: SocketAddr, mode: &str) -> (Child, Out) {
        let mut c = self.command();
        c.args([
            "send",
            self.path("a").to_str().unwrap(),
            &to.to_string(),
            self.path("sent.log").to_str().unwrap(),
            mode,
        ]);
        let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        (child, out)
    }
}

/// A child's standard output, read line by line (kept with the child: a reader dropped after
/// one line could take the next ones with it).
type Out = BufReader<std::process::ChildStdout>;

fn kill((child, _): &mut (Child, Out)) {
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// Waits up to 60 s for a child's line starting with `what`, then for its exit; false if it
/// did not come (the child is killed then).
async fn expect_line((child, out): (Child, Out), what: &'static str) -> bool {
    let pid = child.id();
    let reading = tokio::task::spawn_blocking(move || {
        let mut child = child;
        let found = out.lines().any(|l| l.is_ok_and(|l| l.starts_with(what)));
        child.wait().unwrap();
        found
    });
    match tokio::time::timeout(Duration::from_secs(60), reading).await {
        Ok(found) => found.unwrap(),
        Err(_) => {
            // SIGKILL, by pid: the child is with the blocked reader.
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            false
        }
    }
}

/// What both stores hold, for a failure message (both processes must be gone).
fn stores(run: &Run) -> String {
    let inspect = |dir: &str| match quicseal::store::Store::open(run.path(dir)) {
        Ok(s) => format!(
            "{:?} outbox {:?} inbox {:?}",
            s.inspect(),
            s.outbox(3).map(|v| v.iter().map(|m| m.dseq).collect::<Vec<_>>()),
            s.inbox(None, 3).map(|v| v.iter().map(|m| m.dseq).collect::<Vec<_>>())
        ),
        Err(e) => format!("{e}"),
    };
    format!("sender's store: {}\nreceiver's store: {}", inspect("a"), inspect("b"))
}

/// What the checker found.
#[derive(Debug, Default)]
struct Verdict {
    /// Messages in the receiver's application log.
    logged: usize,
    /// `send_durable` calls that returned `Ok` (the sender's log).
    sent_ok: usize,
    /// Stream sequence numbers missing from the application log (below its highest).
    gaps: Vec<u64>,
    /// Sequence numbers or payloads logged more than once.
    duplicates: usize,
    /// Messages whose send returned `Ok` and that are not in the application log.
    lost: usize,
    /// Channels whose messages were logged out of order.
    out_of_order: usize,
    /// Lines of the sender's log that are not `generation number channel`.
    malformed_lines: usize,
}

fn check(run: &Run) -> Verdict {
    let db = redb::Database::open(run.path("b").join(quicseal::store::FILE_NAME)).unwrap();
    let r = db.begin_read().unwrap();
    let mut v = Verdict::default();
    let mut dseqs = Vec::new();
    let mut payloads = HashSet::new();
    let mut last_per_channel: BTreeMap<u16, (u32, u32)> = BTreeMap::new();
    if let Ok(t) = r.open_table(APP_LOG) {
        for e in t.iter().unwrap() {
            let (_, value) = e.unwrap();
            let (dseq, channel, payload) = value.value();
            let (generation, number): (u32, u32) = postcard::from_bytes(payload).unwrap();
            dseqs.push(dseq);
            if !payloads.insert((generation, number)) {
                v.duplicates += 1;
            }
            if let Some(&last) = last_per_channel.get(&channel)
                && last >= (generation, number)
            {
                v.out_of_order += 1;
            }
            last_per_channel.insert(channel, (generation, number));
        }
    }
    v.logged = dseqs.len();
    let mut seen = HashSet::new();
    for &d in &dseqs {
        if !seen.insert(d) {
            v.duplicates += 1;
        }
    }
    let high = dseqs.iter().copied().max().unwrap_or(0);
    v.gaps = (1..=high).filter(|d| !seen.contains(d)).collect();
    let sent = std::fs::read_to_string(run.path("sent.log")).unwrap_or_default();
    for line in sent.lines() {
        let f: Vec<u32> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [generation, number, _channel] = f[..] else {
            // A torn line would name a message that was never sent (the sender writes each
            // line with one write, so there must be none).
            v.malformed_lines += 1;
            continue;
        };
        v.sent_ok += 1;
        if !payloads.contains(&(generation, number)) {
            v.lost += 1;
        }
    }
    v
}

/// Runs senders and receivers with `kills` kills at random moments (seeded), then lets both
/// finish what they hold and checks.
///
/// With `pairs`, each round kills the receiver and then, while it is down, the sender.
async fn crash_run(kills: usize, control: Option<&'static str>, pairs: bool, seed: u64) -> (Verdict, usize, usize) {
    let run = Run::new(control);
    let mut receiver = run.receiver(false);
    let mut link = LinkConfig::default();
    (link.loss, link.duplicate, link.reorder) = (0.01, 0.01, 0.05);
    link.jitter = Duration::from_millis(5);
    link.seed = seed;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), run.receiver_addr, link).await.unwrap();
    let to = proxy.local_addr();
    let mut sender = run.sender(to, "3");
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let (mut sender_kills, mut receiver_kills) = (0, 0);
    for _ in 0..kills {
        // Pacing of the kills (not a wait for a result): 50 to 400 ms of traffic between them.
        tokio::time::sleep(Duration::from_millis(50 + next() % 350)).await;
        if pairs {
            // The case a sender's fsync is for: its peer is down, so what it sends waits in its
            // store, and then it dies too.
            kill(&mut receiver);
            receiver_kills += 1;
            tokio::time::sleep(Duration::from_millis(50 + next() % 150)).await; // pacing
            kill(&mut sender);
            sender_kills += 1;
            sender = run.sender(to, "3");
            receiver = run.receiver(false);
        } else if next() % 2 == 0 {
            kill(&mut sender);
            sender_kills += 1;
            sender = run.sender(to, "3");
        } else {
            kill(&mut receiver);
            receiver_kills += 1;
            receiver = run.receiver(false);
        }
    }
    // The end: the sender stops sending and exits once everything it stored is in the
    // receiver's store; then the receiver hands what its store holds to the application.
    kill(&mut sender);
    let drain = run.sender(to, "drain");
    if !expect_line(drain, "drained").await {
        kill(&mut receiver);
        let report = stores(&run);
        let dir = run.dir.keep();
        panic!("the sender did not drain its store in 60 s (kept in {}):\n{report}", dir.display());
    }
    kill(&mut receiver);
    let last = run.receiver(true);
    assert!(expect_line(last, "empty").await, "the receiver did not empty its inbox in 60 s:\n{}", stores(&run));
    drop(proxy);
    (check(&run), sender_kills, receiver_kills)
}

fn kills() -> usize {
    std::env::var("QUICSEAL_CRASH_KILLS").ok().and_then(|k| k.parse().ok()).unwrap_or(50)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_sent_is_logged_exactly_once_in_order_through_kill_9_of_either_side() {
    let (v, sender_kills, receiver_kills) = crash_run(kills(), None, false, 0xc0ffee).await;
    println!("{sender_kills} sender kills, {receiver_kills} receiver kills: {v:?}");
    assert!(v.sent_ok > 0 && v.logged >= v.sent_ok, "{v:?}");
    assert!(v.gaps.is_empty(), "stream messages never logged: {v:?}");
    assert_eq!((v.duplicates, v.lost, v.out_of_order, v.malformed_lines), (0, 0, 0, 0), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_logging_outside_the_consuming_transaction_loses_messages() {
    let (v, _, receiver_kills) = crash_run(30, Some("log"), false, 0xbad).await;
    println!("control, {receiver_kills} receiver kills: {v:?}");
    assert!(!v.gaps.is_empty() || v.lost > 0, "the kills never landed between consume and log: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_a_sender_store_without_fsync_loses_messages_it_said_were_sent() {
    // Each sender kill takes back every commit since the store was opened: the messages whose
    // `send_durable` returned `Ok` and that had no receipt yet are gone (and the stream starts
    // again under a new id, which the receiver takes as a new stream). Each sender is killed
    // while the receiver is down, so such messages wait in its store.
    let (v, sender_kills, _) = crash_run(15, Some("fsync"), true, 0xf5c).await;
    println!("control without fsync, {sender_kills} sender kills: {v:?}");
    assert!(sender_kills > 0 && v.lost > 0, "no message was lost without fsync: {v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_killed_while_its_peer_is_down_loses_nothing() {
    // The fsync control's schedule, with fsync.
    let (v, sender_kills, receiver_kills) = crash_run(15, None, true, 0xf5c).await;
    println!("{sender_kills} sender kills while the receiver was down: {v:?}");
    assert!(sender_kills > 0 && v.sent_ok > 0, "{v:?}");
    assert!(v.gaps.is_empty(), "stream messages never logged: {v:?}");
    assert_eq!((v.duplicates, v.lost, v.out_of_order, v.malformed_lines), (0, 0, 0, 0), "{v:?}");
    assert_eq!(receiver_kills, sender_kills);
}
