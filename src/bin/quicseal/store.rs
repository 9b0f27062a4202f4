//! `quicseal store inspect`: what a node's durable store holds (PROTOCOL.md section 10).

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use quicseal::store::{Store, StoreError, Stored};

#[derive(Args, Debug)]
pub(crate) struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// List a store's streams and the messages in its outbox and inbox. The node must not be
    /// running (a store is opened by one process at a time).
    Inspect(InspectArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The store's directory (what `NodeConfig::store` was given).
    dir: PathBuf,
    /// Messages listed from each of the outbox and the inbox, at most.
    #[arg(long, default_value_t = 20)]
    messages: usize,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(args: StoreArgs, out: &mut impl Write) -> crate::Result<u8> {
    let StoreCommand::Inspect(a) = args.command;
    let file = a.dir.join(quicseal::store::FILE_NAME);
    if !file.exists() {
        return Err(crate::CliError::Input(format!(
            "{}: no quicseal store here (no {})",
            a.dir.display(),
            quicseal::store::FILE_NAME
        )));
    }
    let store = Store::open(&a.dir).map_err(|e| match e {
        StoreError::InUse(p) => {
            crate::CliError::Input(format!("{}: in use by a running node; stop it first", p.display()))
        }
        e => crate::CliError::Lib(quicseal::Error::Store(e)),
    })?;
    let lib = |e: StoreError| crate::CliError::Lib(quicseal::Error::Store(e));
    let i = store.inspect().map_err(lib)?;
    let outbox = store.outbox(a.messages).map_err(lib)?;
    let inbox = store.inbox(None, a.messages).map_err(lib)?;
    let message = |m: &Stored| {
        serde_json::json!({
            "peer": m.peer.to_string(), "stream": m.stream.to_string(), "dseq": m.dseq,
            "channel": m.channel, "bytes": m.payload.len(),
        })
    };
    let report = serde_json::json!({
        "file": file.display().to_string(),
        "outbox_messages": i.outbox_len,
        "inbox_messages": i.inbox_len,
        "sending_streams": i.out_streams.iter().map(|(p, s, next)| serde_json::json!({"peer": p.to_string(), "stream": s.to_string(), "next_dseq": next})).collect::<Vec<_>>(),
        "receiving_streams": i.in_streams.iter().map(|(p, s, high)| serde_json::json!({"peer": p.to_string(), "stream": s.to_string(), "high_mark": high})).collect::<Vec<_>>(),
        "outbox": outbox.iter().map(message).collect::<Vec<_>>(),
        "inbox": inbox.iter().map(message).collect::<Vec<_>>(),
    });
    if a.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report).map_err(|e| crate::CliError::Input(e.to_string()))?)?;
        return Ok(0);
    }
    writeln!(out, "store    {}", file.display())?;
    writeln!(out, "outbox   {} messages waiting for a receipt", i.outbox_len)?;
    writeln!(out, "inbox    {} messages received, not consumed", i.inbox_len)?;
    for (p, s, next) in &i.out_streams {
        writeln!(out, "sending   to peer {p}  stream {s}  next dseq {next}")?;
    }
    for (p, s, high) in &i.in_streams {
        writeln!(out, "receiving from peer {p}  stream {s}  high mark {high}")?;
    }
    for (name, list, total) in [("outbox", &outbox, i.outbox_len), ("inbox", &inbox, i.inbox_len)] {
        for m in list.iter() {
            writeln!(
                out,
                "{name:<8} peer {}  dseq {}  channel {}  {} bytes",
                &m.peer.to_string()[..16],
                m.dseq,
                m.channel,
                m.payload.len()
            )?;
        }
        if total as usize > list.len() {
            writeln!(out, "{name:<8} ... {} more (--messages N lists more)", total as usize - list.len())?;
        }
    }
    Ok(0)
}
