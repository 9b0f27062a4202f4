//! quicseal side by side with raw quinn and with TLS over TCP (tokio-rustls), in the same run.
//!
//! ```text
//! cargo bench -p quicseal-benches --bench compare              # full run
//! cargo bench -p quicseal-benches --bench compare -- --quick   # under a minute (CI runs this; no thresholds)
//! cargo bench -p quicseal-benches --bench compare -- --only W2,W3 --stacks quicseal   # a subset, e.g. to profile
//! cargo bench -p quicseal-benches --bench compare -- --only W1,W2,W3 --one-thread   # every task on one thread
//! ```
//!
//! Every stack uses the same certificates, rustls on ring with TLS 1.3 and mutual
//! authentication; the raw quinn baseline uses quicseal's own transport settings
//! (`Limits::quinn_transport`). Baselines are written the way a competent user would:
//! length-prefixed frames, one write per frame batch, `TCP_NODELAY` and buffered writes on TCP,
//! a bidirectional stream per call for RPC over raw quinn. Runs of the stacks alternate; the
//! table shows medians and the ratios quicseal/quinn and quicseal/TCP. Results are also written
//! as JSON to `target/bench/compare.json` and as a chart to `target/bench/compare.svg`.
//!
//! Workloads: W1 bulk one way in 1 MiB messages; W2 small messages (64 B, 1 KiB) one way with 1
//! and 64 in flight (a message is in flight until the receiving application confirmed it);
//! W3 RPC of 64 B, closed loop at concurrency 1 and 64 (p50/p99); W4 mutual-TLS handshakes per
//! second including the first message; W5 goodput through the `netsim` link at 1% and 5% loss
//! (quicseal vs raw quinn); W6 resident memory per idle session (quicseal vs raw quinn, each in a
//! fresh process); W7 sessions per node: 1,000, 5,000 and 10,000 sessions dialled at one acceptor
//! by other processes (200 in the quick mode), with the dials that failed, the time it took, the
//! acceptor's memory per session and idle CPU, and one busy session's throughput (scale.rs);
//! W8 durable channels (quicseal only): 64 B and 1 KiB with 1 and 64 in flight, fsyncs per
//! message, and the recovery of a store holding 1,000,000 unacknowledged messages (durable.rs).
//! W1, W2 and W3 also report the process's CPU time per MiB, message or call (both ends run
//! in this process): steadier than the rates on a shared machine.
#![allow(missing_docs)]

use std::time::Duration;

mod durable;
mod report;
mod scale;
mod stacks;

use report::{Row, Stack, cpu_time, percentile, print_table, write_json, write_svg};
use stacks::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `--one-thread`: both ends of every stack on one thread (tokio's current-thread runtime),
    // so no task is ever handed to another worker and a row's time is its work. A diagnostic
    // for W1 to W3 (W4, W6 and W7 start child processes that keep the default runtime); the
    // targets are read from the default, multi-threaded run.
    let mut runtime = if args.iter().any(|a| a == "--one-thread") {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = runtime.enable_all().build().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--memory-child") {
        runtime.block_on(memory_child(&args[i + 1], args[i + 2].parse().unwrap()));
        return;
    }
    // W7's processes (see scale.rs): `--pki DIR` then their role.
    if let Some(i) = args.iter().position(|a| a == "--pki") {
        let pki = Pki::load(std::path::Path::new(&args[i + 1]));
        let (role, rest) = (&args[i + 2], &args[i + 3..]);
        match role.as_str() {
            "--w7-acceptor" => runtime.block_on(scale::acceptor_child(&pki, &rest[0], rest[1].parse().unwrap())),
            "--w7-dialler" => runtime.block_on(scale::dialler_child(
                &pki,
                &rest[0],
                rest[1].parse().unwrap(),
                rest[2].parse().unwrap(),
            )),
            "--w7-busy" => runtime.block_on(scale::busy_child(&pki, &rest[0], rest[1].parse().unwrap())),
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let list = |flag: &str| -> Option<Vec<String>> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).unwrap_or_else(|| panic!("{flag} needs a comma-separated list"));
        Some(v.split(',').map(str::to_owned).collect())
    };
    let select = Select { workloads: list("--only"), stacks: list("--stacks") };
    runtime.block_on(run(quick, &select));
}

/// What `--only W1,W2` and `--stacks quicseal,quinn,tcp` keep (everything by default).
struct Select {
    workloads: Option<Vec<String>>,
    stacks: Option<Vec<String>>,
}

impl Select {
    fn workload(&self, w: &str) -> bool {
        self.workloads.as_ref().is_none_or(|l| l.iter().any(|x| x.eq_ignore_ascii_case(w)))
    }
    fn stack(&self, s: Stack) -> bool {
        self.stacks.as_ref().is_none_or(|l| l.iter().any(|x| x == s.name()))
    }
}

async fn run(quick: bool, select: &Select) {
    let pki = Pki::new();
    let mut q = Quicseal::new(&pki).await;
    let mut r = RawQuinn::new(&pki).await;
    let mut t = Tcp::new(&pki).await;
    let rounds = if quick { 3 } else { 5 };
    let bulk_mib = if quick { 64 } else { 1024 };
    let small = if quick { 5_000 } else { 50_000 };
    let rpcs = if quick { 2_000 } else { 20_000 };
    let handshakes = if quick { 20 } else { 200 };
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |name: String, unit, higher_better| {
        rows.push(Row { workload: name, unit, higher_better, ..Row::default() });
        rows.len() - 1
    };
    let w1 = row(format!("W1 bulk {bulk_mib} MiB in 1 MiB messages"), "MiB/s", true);
    // CPU time per unit of work (both ends, every thread of this process): steadier than the
    // rates on a shared machine, whose other tenants take wall time but not our CPU time.
    let w1_cpu = row("W1 bulk: CPU per MiB, both ends".into(), "ms", false);
    // The W2 targets are against baselines writing one frame per `write_all`; the last row has
    // them gather frames into 64 KiB writes, the best a user can do by hand.
    let w2_sets = [(64, 1, false), (64, 64, false), (1024, 1, false), (1024, 64, false), (64, 64, true)];
    let w2_name = |size, window, coalesce| {
        format!(
            "W2 {size} B messages, {window} in flight{}",
            if coalesce { ", baselines coalescing writes" } else { "" }
        )
    };
    let w2: Vec<(usize, usize, usize, bool)> = w2_sets
        .iter()
        .map(|&(size, window, coalesce)| (row(w2_name(size, window, coalesce), "msg/s", true), size, window, coalesce))
        .collect();
    let w2_cpu: Vec<usize> = w2_sets
        .iter()
        .map(|&(size, window, coalesce)| {
            row(format!("{}: CPU per message, both ends", w2_name(size, window, coalesce)), "µs", false)
        })
        .collect();
    let w3: Vec<(usize, usize, usize)> = [1, 64]
        .iter()
        .flat_map(|&c| {
            [
                (row(format!("W3 RPC 64 B, concurrency {c}, p50"), "µs", false), c, 50),
                (row(format!("W3 RPC 64 B, concurrency {c}, p99"), "µs", false), c, 99),
            ]
        })
        .collect();
    let w3_cpu: Vec<usize> = [1, 64]
        .iter()
        .map(|c| row(format!("W3 RPC 64 B, concurrency {c}: CPU per call, both ends"), "µs", false))
        .collect();
    let w4 = row("W4 handshakes + first message".into(), "per s", true);
    let lossy_mib = if quick { 4 } else { 32 };
    let w5: Vec<(usize, f64)> = [0.01, 0.05]
        .iter()
        .map(|&l| (row(format!("W5 goodput at {}% loss ({lossy_mib} MiB)", l * 100.0), "MiB/s", true), l))
        .collect();
    let sessions = if quick { 100 } else { 1000 };
    let w6 = row(format!("W6 memory per idle session ({sessions})"), "KiB", false);
    // W7: one acceptor, many sessions from other processes (see scale.rs); its own rows per size.
    let w7: Vec<(usize, [usize; 5])> = (if quick { vec![200] } else { vec![1_000, 5_000, 10_000] })
        .into_iter()
        .map(|n| {
            let rows = [
                row(format!("W7 {n} sessions: dials that failed"), "dials", false),
                row(format!("W7 {n} sessions: time to establish all"), "ms", false),
                row(format!("W7 {n} sessions: acceptor memory per session"), "KiB", false),
                row(format!("W7 {n} sessions: acceptor CPU while idle"), "% core", false),
                row(format!("W7 {n} sessions: one busy session, 1 KiB x 64 in flight"), "msg/s", true),
            ];
            (n, rows)
        })
        .collect();
    // W8: durable channels, quicseal only.
    let durable_count = if quick { 500 } else { 5_000 };
    let w8: Vec<(usize, usize, usize)> = [(64, 1), (64, 64), (1024, 1), (1024, 64)]
        .iter()
        .map(|&(size, window)| {
            (row(format!("W8 durable {size} B messages, {window} in flight"), "msg/s", true), size, window)
        })
        .collect();
    let w8_fsyncs =
        row("W8 durable 64 B, 64 in flight: fsyncs per 1,000 messages (both nodes)".into(), "fsyncs", false);
    let recovered = if quick { 100_000 } else { 1_000_000 };
    let w8_recovery = row(format!("W8 recovery of a store holding {recovered} unacknowledged messages"), "ms", false);
    for round in 0..rounds {
        // Alternate the order of the stacks from round to round.
        let order: Vec<Stack> = (0..3).map(|i| Stack::ALL[(round + i) % 3]).collect();
        for &stack in order.iter().filter(|&&s| select.stack(s)) {
            let pair: &mut dyn PairDyn = match stack {
                Stack::Quicseal => &mut q,
                Stack::Quinn => &mut r,
                Stack::Tcp => &mut t,
            };
            if select.workload("W1") {
                let cpu = cpu_time();
                let d = pair.stream_dyn(bulk_mib, 1 << 20, 8, false).await;
                rows[w1].values[stack].push(bulk_mib as f64 / d.as_secs_f64());
                rows[w1_cpu].values[stack].push((cpu_time() - cpu).as_secs_f64() * 1e3 / bulk_mib as f64);
            }
            for (&(i, size, window, coalesce), &i_cpu) in w2.iter().zip(&w2_cpu).filter(|_| select.workload("W2")) {
                let n = small / if window == 1 { 10 } else { 1 };
                let cpu = cpu_time();
                let d = pair.stream_dyn(n, size, window, coalesce).await;
                rows[i].values[stack].push(n as f64 / d.as_secs_f64());
                rows[i_cpu].values[stack].push((cpu_time() - cpu).as_secs_f64() * 1e6 / n as f64);
            }
            for (&(i, c, _), &i_cpu) in w3.iter().step_by(2).zip(&w3_cpu).filter(|_| select.workload("W3")) {
                let calls = rpcs / if c == 1 { 4 } else { 1 };
                let cpu = cpu_time();
                let mut lat = pair.rpc_dyn(calls, 64, c).await;
                rows[i_cpu].values[stack].push((cpu_time() - cpu).as_secs_f64() * 1e6 / calls as f64);
                let (p50, p99) = (percentile(&mut lat, 0.5), percentile(&mut lat, 0.99));
                rows[i].values[stack].push(p50);
                rows[i + 1].values[stack].push(p99);
            }
            if select.workload("W4") {
                let d = match stack {
                    Stack::Quicseal => handshake_quicseal(&pki, handshakes).await,
                    Stack::Quinn => handshake_quinn(&pki, handshakes).await,
                    Stack::Tcp => handshake_tcp(&t, handshakes).await,
                };
                rows[w4].values[stack].push(handshakes as f64 / d.as_secs_f64());
            }
            // W5 and W6 compare with raw quinn only (TCP is not QUIC over the netsim link).
            for &(i, loss) in w5.iter().filter(|_| select.workload("W5")) {
                let d = match stack {
                    Stack::Quicseal => Some(lossy_quicseal(&pki, loss, lossy_mib).await),
                    Stack::Quinn => Some(lossy_quinn(&pki, loss, lossy_mib).await),
                    Stack::Tcp => None,
                };
                rows[i].values[stack].extend(d.map(|d| lossy_mib as f64 / d.as_secs_f64()));
            }
            if round == 0 && stack != Stack::Tcp && select.workload("W6") {
                rows[w6].values[stack].push(memory_of(stack.name(), sessions));
            }
            for &(i, size, window) in w8.iter().filter(|_| stack == Stack::Quicseal && select.workload("W8")) {
                let d =
                    durable::durable_stream(&pki, durable_count / if window == 1 { 5 } else { 1 }, size, window).await;
                rows[i].values[stack].push(d.per_second);
                if size == 64 && window == 64 {
                    rows[w8_fsyncs].values[stack].push(d.fsyncs_per_message * 1000.0);
                }
            }
            if round == 0 && stack == Stack::Quicseal && select.workload("W8") {
                rows[w8_recovery].values[stack].push(durable::recovery(recovered).await.as_secs_f64() * 1000.0);
            }
            for &(n, r) in w7.iter().filter(|_| round == 0 && stack != Stack::Tcp && select.workload("W7")) {
                let m = scale::scale_of(&pki, stack, n);
                let figures = [
                    (m.dialled - m.established) as f64,
                    m.seconds * 1000.0,
                    m.kib_per_session,
                    m.idle_cpu_percent,
                    m.busy_msgs_per_sec,
                ];
                for (i, v) in r.into_iter().zip(figures) {
                    rows[i].values[stack].push(v);
                }
            }
        }
    }
    print_table(&rows, quick);
    write_json(&rows);
    write_svg(&rows);
    drop((q.server, q.client));
    drop(r.client);
}

/// A boxed workload future (what makes [`PairDyn`] object-safe).
type Workload<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + 'a>>;

/// Object-safe wrappers (the workloads pick a stack at run time).
trait PairDyn {
    fn stream_dyn<'a>(&'a mut self, count: usize, size: usize, window: usize, coalesce: bool)
    -> Workload<'a, Duration>;
    fn rpc_dyn<'a>(&'a mut self, calls: usize, size: usize, concurrency: usize) -> Workload<'a, Vec<Duration>>;
}

impl<P: Pair> PairDyn for P {
    fn stream_dyn<'a>(
        &'a mut self,
        count: usize,
        size: usize,
        window: usize,
        coalesce: bool,
    ) -> Workload<'a, Duration> {
        Box::pin(self.stream(count, size, window, coalesce))
    }
    fn rpc_dyn<'a>(&'a mut self, calls: usize, size: usize, concurrency: usize) -> Workload<'a, Vec<Duration>> {
        Box::pin(self.rpc(calls, size, concurrency))
    }
}
