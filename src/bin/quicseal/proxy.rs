//! `quicseal proxy`: the `netsim` fault-injecting UDP link as a command, for trying quicseal
//! (or anything on UDP) over a bad network on loopback.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use quicseal::netsim::{BurstLoss, LinkConfig, Proxy};

/// `quicseal proxy`.
#[derive(clap::Args, Debug)]
pub(crate) struct ProxyArgs {
    /// Loopback address to listen on (clients send here).
    #[arg(long)]
    listen: SocketAddr,
    /// Loopback address to forward to.
    #[arg(long)]
    target: SocketAddr,
    /// Chance a datagram is lost (0 to 1).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Burst loss as ENTER:EXIT chances per datagram (Gilbert-Elliott).
    #[arg(long, value_parser = parse_burst)]
    burst: Option<BurstLoss>,
    /// Chance a datagram is duplicated.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// Chance a datagram is held back by up to --jitter-ms (reordering).
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Delay added to every datagram, ms.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Largest extra delay of a reordered datagram, ms.
    #[arg(long, default_value_t = 20)]
    jitter_ms: u64,
    /// Chance one byte of a datagram is flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// A blackout as START_MS:LENGTH_MS after start (repeatable).
    #[arg(long, value_parser = parse_blackout)]
    blackout: Vec<(Duration, Duration)>,
    /// Seed of the random decisions.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    duration: Option<f64>,
}

fn parse_pair(s: &str) -> Result<(&str, &str), String> {
    s.split_once(':').ok_or_else(|| format!("expected A:B, got {s:?}"))
}

fn parse_burst(s: &str) -> Result<BurstLoss, String> {
    let (a, b) = parse_pair(s)?;
    let p = |x: &str| x.parse::<f64>().map_err(|e| format!("{x:?}: {e}"));
    Ok(BurstLoss { enter: p(a)?, exit: p(b)? })
}

fn parse_blackout(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = parse_pair(s)?;
    let ms = |x: &str| x.parse::<u64>().map(Duration::from_millis).map_err(|e| format!("{x:?}: {e}"));
    Ok((ms(a)?, ms(b)?))
}

pub(crate) async fn run(args: ProxyArgs, out: &mut impl Write) -> quicseal::Result<()> {
    let mut config = LinkConfig::default();
    config.loss = args.loss;
    config.burst = args.burst;
    config.duplicate = args.dup;
    config.reorder = args.reorder;
    config.delay = Duration::from_millis(args.delay_ms);
    config.jitter = Duration::from_millis(args.jitter_ms);
    config.corrupt = args.corrupt;
    config.blackouts = args.blackout;
    config.seed = args.seed;
    config.validate().map_err(quicseal::Error::Config)?;
    let duration = match args.duration {
        Some(d) if d.is_finite() && d > 0.0 => Some(Duration::from_secs_f64(d)),
        Some(_) => return Err(quicseal::Error::Config("--duration must be a positive number of seconds".into())),
        None => None,
    };
    let proxy = Proxy::start(args.listen, args.target, config).await?;
    writeln!(out, "proxy listening on {} -> {}", proxy.local_addr(), args.target)?;
    out.flush()?;
    match duration {
        Some(d) => tokio::time::sleep(d).await,
        None => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    writeln!(out, "{:?}", proxy.stats())?;
    Ok(())
}
