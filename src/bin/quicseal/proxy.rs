//! `quicseal proxy`: the `netsim` fault-injecting UDP link as a command, for trying quicseal
//! (or anything on UDP) over a bad network on loopback.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use quicseal::netsim::{BurstLoss, LinkConfig, Proxy};

use crate::args;

/// `quicseal proxy`.
#[derive(clap::Args, Debug)]
pub(crate) struct ProxyArgs {
    /// Loopback address to listen on (clients send here).
    #[arg(long, value_parser = args::address)]
    listen: SocketAddr,
    /// Loopback address to forward to.
    #[arg(long, value_parser = args::address)]
    target: SocketAddr,
    /// Chance a datagram is lost (0 to 1).
    #[arg(long, default_value = "0", value_parser = args::chance)]
    loss: f64,
    /// Burst loss as ENTER:EXIT chances per datagram (Gilbert-Elliott).
    #[arg(long, value_parser = parse_burst)]
    burst: Option<BurstLoss>,
    /// Chance a datagram is duplicated.
    #[arg(long, default_value = "0", value_parser = args::chance)]
    dup: f64,
    /// Chance a datagram is held back by up to --jitter-ms (reordering).
    #[arg(long, default_value = "0", value_parser = args::chance)]
    reorder: f64,
    /// Delay added to every datagram, ms (at most one hour).
    #[arg(long, default_value = "0", value_parser = args::millis)]
    delay_ms: Duration,
    /// Largest extra delay of a reordered datagram, ms (at most one hour).
    #[arg(long, default_value = "20", value_parser = args::millis)]
    jitter_ms: Duration,
    /// Chance one byte of a datagram is flipped.
    #[arg(long, default_value = "0", value_parser = args::chance)]
    corrupt: f64,
    /// A blackout as START_MS:LENGTH_MS after start (repeatable).
    #[arg(long, value_parser = parse_blackout)]
    blackout: Vec<(Duration, Duration)>,
    /// Seed of the random decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long, value_parser = args::seconds)]
    duration: Option<Duration>,
}

fn parse_pair(s: &str) -> Result<(&str, &str), String> {
    s.split_once(':').ok_or_else(|| format!("expected A:B, got {s:?}"))
}

fn parse_burst(s: &str) -> Result<BurstLoss, String> {
    let (a, b) = parse_pair(s)?;
    Ok(BurstLoss { enter: args::chance(a)?, exit: args::chance(b)? })
}

fn parse_blackout(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = parse_pair(s)?;
    Ok((args::millis(a)?, args::millis(b)?))
}

pub(crate) async fn run(args: ProxyArgs, out: &mut impl Write) -> crate::Result<()> {
    let mut config = LinkConfig::default();
    config.loss = args.loss;
    config.burst = args.burst;
    config.duplicate = args.dup;
    config.reorder = args.reorder;
    config.delay = args.delay_ms;
    config.jitter = args.jitter_ms;
    config.corrupt = args.corrupt;
    config.blackouts = args.blackout;
    config.seed = args.seed;
    config.validate().map_err(crate::CliError::Input)?;
    let duration = args.duration;
    let proxy = Proxy::start(args.listen, args.target, config).await?;
    writeln!(out, "proxy listening on {} -> {}", proxy.local_addr(), args.target)?;
    out.flush()?;
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    writeln!(out, "proxy stopped: {}", proxy.stats())?;
    Ok(())
}
