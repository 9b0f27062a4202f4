//! W7: sessions per node. One acceptor process holds `n` concurrent authenticated sessions
//! dialled by `DIALLERS` other processes on loopback, each keeping at most `PACE` handshakes in
//! flight. Measured at the acceptor: how many sessions it established and how fast, its resident
//! memory per session, its CPU while they all idle (keep-alives), and the throughput of one busy
//! session (1 KiB messages, 64 in flight, from one more process) while the others idle.
//!
//! Each QUIC node uses one UDP socket whatever its number of sessions, so no open-file limit
//! needs raising. All dialling processes share the address 127.0.0.1, which here stands for many
//! hosts: the acceptor's per-address handshake limit is raised to its node-wide one.
//!
//! The processes talk over their standard input and output, a line at a time.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quicseal::{Limits, Node, NodeConfig};

use crate::report::Stack;
use crate::stacks::{
    Pki, framed_stream, loopback, quinn_client_config, quinn_endpoint, quinn_server, quinn_stream, rss_bytes,
};

/// Dialling processes.
const DIALLERS: usize = 4;
/// Handshakes each dialling process keeps in flight at most.
const PACE: usize = 64;
/// How long the idle CPU is measured, and the busy session runs.
const IDLE_FOR: Duration = Duration::from_secs(5);
const BUSY_FOR: Duration = Duration::from_secs(2);

/// What one W7 run measured at the acceptor.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Scale {
    /// Sessions established of those dialled.
    pub(crate) established: usize,
    pub(crate) dialled: usize,
    /// From starting the dialling processes until the last of them reported (every dial
    /// established or failed): includes their start-up, some milliseconds.
    pub(crate) seconds: f64,
    pub(crate) kib_per_session: f64,
    /// CPU time of the acceptor per second of wall time while every session idles, percent of
    /// one core.
    pub(crate) idle_cpu_percent: f64,
    /// Messages per second on one busy session (1 KiB, 64 in flight) while the others idle.
    pub(crate) busy_msgs_per_sec: f64,
}

fn limits(n: usize) -> Limits {
    let mut l = Limits::default();
    l.max_connections = n + 64;
    l.max_connections_per_peer = n + 64;
    l.max_handshakes_per_address = l.max_handshakes;
    l
}

fn cpu_seconds() -> f64 {
    // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 per second here).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn child(args: &[String]) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

fn read_line(child: &mut BufReader<std::process::ChildStdout>) -> String {
    let mut line = String::new();
    child.read_line(&mut line).unwrap();
    line.trim().to_owned()
}

/// Runs W7 for `stack` with `n` sessions: an acceptor process, the dialling processes and the
/// busy session's process; returns what the acceptor measured.
pub(crate) fn scale_of(pki: &Pki, stack: Stack, n: usize) -> Scale {
    let dir = std::env::temp_dir().join(format!("quicseal-w7-{}", std::process::id()));
    pki.save(&dir);
    let dir_arg = dir.display().to_string();
    // Every process of the run reads the same certificates.
    let spawn = |args: &[String]| {
        let mut all = vec!["--pki".to_owned(), dir_arg.clone()];
        all.extend_from_slice(args);
        child(&all)
    };
    let name = stack.name().to_owned();
    let mut acceptor = spawn(&["--w7-acceptor".into(), name.clone(), n.to_string()]);
    let mut from_acceptor = BufReader::new(acceptor.stdout.take().unwrap());
    let mut to_acceptor = acceptor.stdin.take().unwrap();
    let addr = read_line(&mut from_acceptor);
    let started = Instant::now();
    let per = n.div_ceil(DIALLERS);
    let mut diallers: Vec<(Child, BufReader<std::process::ChildStdout>)> = (0..DIALLERS)
        .map(|i| {
            let count = per.min(n - (i * per).min(n));
            let mut c = spawn(&["--w7-dialler".into(), name.clone(), addr.clone(), count.to_string()]);
            let out = BufReader::new(c.stdout.take().unwrap());
            (c, out)
        })
        .collect();
    let mut established = 0;
    for (_, out) in &mut diallers {
        established += read_line(out).parse::<usize>().unwrap_or(0);
    }
    let seconds = started.elapsed().as_secs_f64();
    // The acceptor measures memory and idle CPU now that everyone is connected.
    writeln!(to_acceptor, "measure {established}").unwrap();
    let measured = read_line(&mut from_acceptor);
    let mut m = measured.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(0.0));
    let (kib_per_session, idle_cpu_percent) = (m.next().unwrap_or(0.0), m.next().unwrap_or(0.0));
    let mut busy = spawn(&["--w7-busy".into(), name, addr]);
    let busy_msgs_per_sec = read_line(&mut BufReader::new(busy.stdout.take().unwrap())).parse().unwrap_or(0.0);
    let _ = busy.wait();
    for (mut c, _) in diallers {
        drop(c.stdin.take());
        let _ = c.kill();
        let _ = c.wait();
    }
    drop(to_acceptor);
    let _ = acceptor.kill();
    let _ = acceptor.wait();
    let _ = std::fs::remove_dir_all(&dir);
    Scale { established, dialled: n, seconds, kib_per_session, idle_cpu_percent, busy_msgs_per_sec }
}

/// The acceptor's process: prints its address, accepts sessions (consuming whatever they send),
/// and on "measure K" prints its resident memory per session and its idle CPU.
pub(crate) async fn acceptor_child(pki: &Pki, stack: &str, n: usize) {
    let before = rss_bytes();
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut keep: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    let addr = match stack {
        "quicseal" => {
            let node =
                Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.server), pki.trust()).limits(limits(n)))
                    .unwrap();
            let addr = node.local_addr().unwrap();
            let (node2, accepted2) = (node.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(s) = node2.accept().await else { continue };
                    accepted2.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(async move { while s.recv().await.is_ok() {} });
                }
            });
            keep.push(Box::new(node));
            addr
        }
        _ => {
            let endpoint = quinn_server(pki);
            let addr = endpoint.local_addr().unwrap();
            let (e2, accepted2) = (endpoint.clone(), accepted.clone());
            tokio::spawn(async move {
                while let Some(incoming) = e2.accept().await {
                    let accepted = accepted2.clone();
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        accepted.fetch_add(1, Ordering::Relaxed);
                        while let Ok((send, recv)) = conn.accept_bi().await {
                            tokio::spawn(quinn_stream(send, recv));
                        }
                    });
                }
            });
            keep.push(Box::new(endpoint));
            addr
        }
    };
    println!("{addr}");
    let mut lines = BufReader::new(std::io::stdin()).lines();
    // The orchestrator's lines come on a thread of their own, so the runtime keeps serving.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        while let Some(Ok(l)) = lines.next() {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        if let Some(k) = line.strip_prefix("measure ") {
            let k: usize = k.parse().unwrap_or(0);
            // Sessions the diallers count as established may still be on their way here.
            let deadline = Instant::now() + Duration::from_secs(10);
            while accepted.load(Ordering::Relaxed) < k && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let held = accepted.load(Ordering::Relaxed).max(1);
            let kib = rss_bytes().saturating_sub(before) as f64 / held as f64 / 1024.0;
            let (cpu0, t0) = (cpu_seconds(), Instant::now());
            tokio::time::sleep(IDLE_FOR).await;
            let idle = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
            println!("{kib} {idle}");
        }
    }
    drop(keep);
}

/// A dialling process: opens `count` sessions to `addr`, `PACE` handshakes at a time, prints how
/// many succeeded, and holds them until its standard input closes.
pub(crate) async fn dialler_child(pki: &Pki, stack: &str, addr: SocketAddr, count: usize) {
    let ok = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(PACE));
    let kept: Arc<std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>>> = Arc::default();
    let mut tasks = Vec::with_capacity(count);
    match stack {
        "quicseal" => {
            let node =
                Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust()).limits(limits(count)))
                    .unwrap();
            for _ in 0..count {
                let (node, ok, gate, kept) = (node.clone(), ok.clone(), gate.clone(), kept.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = gate.acquire().await.unwrap();
                    if let Ok(s) = node.connect(addr, "server").await {
                        ok.fetch_add(1, Ordering::Relaxed);
                        kept.lock().unwrap().push(Box::new(s));
                    }
                }));
            }
            kept.lock().unwrap().push(Box::new(node));
        }
        _ => {
            let mut endpoint = quinn_endpoint(None);
            endpoint.set_default_client_config(quinn_client_config(pki));
            for _ in 0..count {
                let (endpoint, ok, gate, kept) = (endpoint.clone(), ok.clone(), gate.clone(), kept.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = gate.acquire().await.unwrap();
                    let Ok(connecting) = endpoint.connect(addr, "server") else { return };
                    if let Ok(conn) = connecting.await {
                        ok.fetch_add(1, Ordering::Relaxed);
                        kept.lock().unwrap().push(Box::new(conn));
                    }
                }));
            }
            kept.lock().unwrap().push(Box::new(endpoint));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    println!("{}", ok.load(Ordering::Relaxed));
    // Hold the sessions until the orchestrator is done with them.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin().read_line(&mut sink).is_ok_and(|n| n > 0) {}
    })
    .await;
    drop(kept);
}

/// The busy session's process: one more session to `addr`, 1 KiB messages with 64 in flight
/// for `BUSY_FOR`; prints messages per second.
pub(crate) async fn busy_child(pki: &Pki, stack: &str, addr: SocketAddr) {
    let payload = Bytes::from(vec![7u8; 1024]);
    let window = 64;
    let (sent, elapsed) = match stack {
        "quicseal" => {
            let node = Node::bind(loopback(), NodeConfig::new(Pki::identity(&pki.client), pki.trust())).unwrap();
            let s = node.connect(addr, "server").await.unwrap();
            let start = Instant::now();
            let mut seqs = std::collections::VecDeque::with_capacity(window);
            let mut sent = 0u64;
            while start.elapsed() < BUSY_FOR {
                if seqs.len() == window {
                    s.wait_acked(1, seqs.pop_front().unwrap()).await.unwrap();
                }
                seqs.push_back(s.send_bytes(1, payload.clone()).await.unwrap());
                sent += 1;
            }
            s.delivered(1).await.unwrap();
            (sent, start.elapsed())
        }
        _ => {
            let mut endpoint = quinn_endpoint(None);
            endpoint.set_default_client_config(quinn_client_config(pki));
            let conn = endpoint.connect(addr, "server").unwrap().await.unwrap();
            // Batches of 1,000 messages, a stream each (its confirmations count from 1), until
            // the time is up.
            let start = Instant::now();
            let mut sent = 0u64;
            while start.elapsed() < BUSY_FOR {
                let (mut send, mut recv) = conn.open_bi().await.unwrap();
                send.write_all(&[0]).await.unwrap();
                framed_stream(&mut send, &mut recv, 1000, 1024, window, false).await;
                let _ = send.finish();
                sent += 1000;
            }
            (sent, start.elapsed())
        }
    };
    println!("{}", sent as f64 / elapsed.as_secs_f64());
    let _ = std::io::stdout().flush();
}
