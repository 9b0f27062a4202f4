//! The fuzz corpora are tests: every committed file under `fuzz/corpus/<target>/` runs through
//! the same code the fuzz target runs (this module's parent), on stable Rust, so a past crash
//! stays fixed. The seed files (`seed-*`) are generated here from real encoded messages:
//! `QUICSEAL_WRITE_SEEDS=1 cargo test --lib fuzzing` rewrites them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fuzzing::{self, TARGETS, TEST_EPOCH, TEST_KEY_MATERIAL, TEST_NOW_MS, open_message, test_open_config};
use crate::pki::{Ca, KeyType, NodeCert};
use crate::proto::durable::{DurableFrame, StreamId};
use crate::proto::reliable::AckRanges;
use crate::proto::rpc::{CallId, RpcFrame, Status};
use crate::proto::seal::{self, ChannelSealer, Opener, Role};
use crate::proto::wire::{self, Frame, MessageKind, StreamKind};
use bytes::Bytes;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target)
}

#[test]
fn every_committed_corpus_file_replays_cleanly() {
    let mut total = 0;
    for (target, run) in TARGETS {
        let dir = corpus(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target has a committed corpus)", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.iter().any(|f| f.file_name().unwrap().to_string_lossy().starts_with("seed-")), "{target}");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            if std::panic::catch_unwind(|| run(&data)).is_err() {
                panic!("{target}: {} fails", file.display());
            }
        }
        total += files.len();
    }
    assert!(total >= TARGETS.len());
}

fn sealed(kind: MessageKind, channel: u16, seq: u64, payload: &[u8]) -> Vec<u8> {
    let (key, _) = seal::derive_keys(&TEST_KEY_MATERIAL, Role::Dialler);
    let mut sealer = ChannelSealer::new(Arc::new(key), TEST_EPOCH, kind, channel);
    let mut out = Vec::new();
    sealer.skip_to(seq - 1);
    sealer.seal(seq, TEST_NOW_MS, payload, &mut out).unwrap();
    out
}

fn records(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u16).to_be_bytes());
        out.extend_from_slice(f);
    }
    out
}

fn rpc(frame: RpcFrame) -> Vec<u8> {
    let mut v = Vec::new();
    frame.encode(&mut v).unwrap();
    v
}

/// Deterministic seeds: (target, name, bytes).
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut hello = wire::encode_stream_header(StreamKind::Control).to_vec();
    Frame::Hello { max_message_size: 1 << 20, epoch: TEST_EPOCH, resume: false, max_channels: 64, window: 2048 }
        .encode(&mut hello);
    Frame::Ack(AckRanges { channel: 7, cumulative: 258, ranges: vec![(260, 261), (270, 280)] }).encode(&mut hello);
    let mut channel = wire::encode_stream_header(StreamKind::Channel(2)).to_vec();
    channel.extend(sealed(MessageKind::Stream, 2, 1, b"first"));
    channel.extend(sealed(MessageKind::Stream, 2, 2, b"second"));
    let datagram = sealed(MessageKind::Datagram, 1, 1, b"datagram");
    let stream = sealed(MessageKind::Stream, 2, 1, b"stream");
    let mut tampered = sealed(MessageKind::Datagram, 1, 2, b"tampered");
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let call = CallId { epoch: TEST_EPOCH, id: 7 };
    let request = rpc(RpcFrame::Request {
        call,
        method: "kv.get".into(),
        budget_ms: 1500,
        idempotent: true,
        body: Bytes::from_static(b"key"),
    });
    let response = rpc(RpcFrame::Response {
        call,
        status: Status::Application { code: 404, message: "no such key".into() },
        body: Bytes::new(),
    });
    let ok = rpc(RpcFrame::Response { call, status: Status::Ok, body: Bytes::from_static(b"value") });
    let cancel = rpc(RpcFrame::Cancel { call });
    // Replay-window operations: [width selector] then 9-byte (op, u64) records.
    let mut window = vec![1u8];
    for (op, n) in [(0x80u8, 1u64), (0x80, 3), (0x81, 2), (0x80, 200), (0x01, 2), (0x82, 70), (0x00, u64::MAX)] {
        window.push(op);
        window.extend_from_slice(&n.to_be_bytes());
    }
    vec![
        ("frame_decode", "seed-control-stream", hello),
        ("frame_decode", "seed-channel-stream", channel),
        ("open_message", "seed-genuine-replayed-tampered", records(&[&datagram, &datagram, &stream, &tampered])),
        ("replay_window", "seed-ops", window),
        ("reliable_ops", "seed-push-send-deliver-ack", [0, 1, 64, 2, 3, 3, 3, 4, 5, 5, 6, 7, 2, 3, 4, 5].repeat(4)),
        // Push on two channels, send, deliver (one copy kept, one flipped), take, acknowledge,
        // time, reconnect, resend, raw bytes into a channel stream.
        ("session_core", "seed-ops", [0, 64, 1, 2, 3, 131, 67, 3, 4, 5, 6, 7, 2, 3, 3, 4, 5, 0x18, 1, 2, 3].repeat(4)),
        ("rpc_decode", "seed-request", request),
        ("rpc_decode", "seed-response-error", response),
        ("rpc_decode", "seed-response-ok", ok),
        ("rpc_decode", "seed-cancel", cancel),
        (
            "durable_decode",
            "seed-data",
            durable(DurableFrame::Data {
                stream: StreamId([7; 16]),
                dseq: 3,
                channel: 1,
                payload: Bytes::from_static(b"hi"),
            }),
        ),
        ("durable_decode", "seed-receipt", durable(DurableFrame::Receipt { stream: StreamId([7; 16]), dseq: 3 })),
        ("rpc_cache", "seed-ops", vec![0x23, 0, 1, 1, 0, 2, 1, 2, 1, 5, 0, 1, 9, 3, 2, 0, 0, 1, 100, 1, 2, 0]),
    ]
}

fn durable(frame: DurableFrame) -> Vec<u8> {
    frame.to_bytes().to_vec()
}

/// PEM seeds (fresh keys each time, so only their presence is checked).
fn pem_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ca = Ca::new("seed CA", KeyType::EcdsaP256, std::time::Duration::from_secs(3600)).unwrap();
    let node = ca.issue(&NodeCert::new("seed").dns("seed")).unwrap();
    let ed = ca.issue(&NodeCert::new("seed-ed").dns("seed-ed").key_type(KeyType::Ed25519)).unwrap();
    let crl = ca.crl(&[], 1, std::time::SystemTime::now(), std::time::SystemTime::now()).unwrap();
    let identity = |i: &crate::pki::Issued| [i.chain_pem.as_bytes(), b"\0", i.key_pem.as_bytes()].concat();
    vec![
        ("seed-ca", ca.cert_pem().as_bytes().to_vec()),
        ("seed-crl", crl.into_bytes()),
        ("seed-identity-p256", identity(&node)),
        ("seed-identity-ed25519", identity(&ed)),
    ]
}

#[test]
fn seed_corpora_are_generated_from_real_messages() {
    let write = std::env::var_os("QUICSEAL_WRITE_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        // Each seed is a real, well-formed input: it runs clean.
        let run = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        run(&bytes);
        let path = corpus(target).join(name);
        if write {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(committed, bytes, "{} is stale: QUICSEAL_WRITE_SEEDS=1 rewrites it", path.display());
        }
    }
    for (name, bytes) in pem_seeds() {
        fuzzing::pem_load(&bytes);
        let path = corpus("pem_load").join(name);
        if write {
            std::fs::create_dir_all(corpus("pem_load")).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            assert!(path.exists(), "{} missing: QUICSEAL_WRITE_SEEDS=1 writes it", path.display());
        }
    }
}

/// The forgery check of `open_message` is live: a genuine message does open under its
/// configuration, and the same bytes with one bit flipped do not.
#[test]
fn open_message_opens_a_genuine_message() {
    let (sealing, _) = seal::derive_keys(&TEST_KEY_MATERIAL, Role::Dialler);
    let mut sealer = ChannelSealer::new(Arc::new(sealing), TEST_EPOCH, wire::MessageKind::Datagram, 1);
    let mut frame = Vec::new();
    sealer.seal(1, TEST_NOW_MS, b"genuine", &mut frame).unwrap();
    let (_, opening) = seal::derive_keys(&TEST_KEY_MATERIAL, Role::Acceptor);
    let mut opener = Opener::new(opening, TEST_EPOCH, test_open_config());
    let mut flipped = frame.clone();
    flipped[20] ^= 1;
    assert!(opener.open_bytes(&Bytes::from(flipped), TEST_NOW_MS).is_err());
    assert_eq!(&opener.open_bytes(&Bytes::from(frame.clone()), TEST_NOW_MS).unwrap().payload[..], b"genuine");
    let mut record = (frame.len() as u16).to_be_bytes().to_vec();
    record.extend_from_slice(&frame);
    open_message(&record);
}
