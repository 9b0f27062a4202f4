//! The bodies of the cargo-fuzz targets (`fuzz/fuzz_targets/`), in the library so that
//! `cargo test` replays every committed corpus file through exactly the code the fuzzer runs
//! (`fuzzing/tests.rs`), on stable Rust, and a past crash stays fixed. Compiled only for tests
//! and for cargo-fuzz (which sets `cfg(fuzzing)`): not part of the library a user links.
//!
//! Each function takes arbitrary bytes, must never panic on its own account, and asserts the
//! invariants of what it drives; a failed assertion is a finding. Not part of the public API.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::reliable::{Inbox, InboxConfig, Outbox, OutboxConfig};
use crate::proto::replay::{ReferenceWindow, ReplayWindow};
use crate::proto::rpc::{Begin, CacheConfig, ResponseCache, RpcFrame, Status};
use crate::proto::seal::{self, ChannelSealer, OpenConfig, Opener, Role};
use crate::proto::wire::{self, Frame};

/// A target's body.
pub type Target = fn(&[u8]);

/// Every target, by the name of its cargo-fuzz binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("frame_decode", frame_decode),
    ("open_message", open_message),
    ("replay_window", replay_window),
    ("reliable_ops", reliable_ops),
    ("session_core", session_core),
    ("rpc_decode", rpc_decode),
    ("durable_decode", durable_decode),
    ("rpc_cache", rpc_cache),
    ("pem_load", pem_load),
];

/// Frame and stream-header decoding: never panics, whatever decodes re-encodes to the same
/// bytes, and a HELLO a node takes announces at least the protocol's floors.
pub fn frame_decode(data: &[u8]) {
    if let Some(head) = data.get(..wire::STREAM_HEADER_LEN) {
        let head: [u8; wire::STREAM_HEADER_LEN] = head.try_into().expect("length checked");
        if let Ok(kind) = wire::decode_stream_header(head) {
            assert_eq!(wire::encode_stream_header(kind), head);
        }
    }
    let buf = Bytes::copy_from_slice(data);
    let mut offset = 0;
    // Decode a sequence of frames as a reader would, with a small limit.
    while let Ok(Some((frame, used))) = Frame::decode(&buf.slice(offset..), 1024) {
        let mut again = Vec::new();
        frame.encode(&mut again);
        assert_eq!(&again[..], &buf[offset..offset + used]);
        // A HELLO's announcement, as a node reads it: valid only within the protocol's floors.
        if let Ok((hello, _)) = crate::proto::hello::PeerHello::from_frame(&frame) {
            let early = crate::proto::hello::PeerHello::EARLY;
            assert!(hello.epoch != 0 && hello.max_message_size >= early.max_message_size);
            assert!(hello.max_channels >= early.max_channels && hello.window >= early.window);
        }
        offset += used;
    }
}

/// The fixed key material of [`open_message`] (and its seed corpus).
pub const TEST_KEY_MATERIAL: [u8; 64] = {
    let mut m = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        m[i] = i as u8;
        i += 1;
    }
    m
};
/// The fixed clock of [`open_message`], ms since the Unix epoch.
pub const TEST_NOW_MS: u64 = 1_700_000_000_000;
/// The sender's epoch [`open_message`] expects.
pub const TEST_EPOCH: u64 = 0x0102_0304_0506_0708;

/// The opening rules of [`open_message`]: small limits, fixed clock horizons.
fn test_open_config() -> OpenConfig {
    OpenConfig { max_payload: 4096, window_width: 128, freshness_ms: 120_000, max_future_ms: 30_000, max_windows: 4 }
}

/// Opening messages with a fixed test key: decode, epoch, freshness, replay window, tag. The
/// input is a sequence of `[length u16][frame]` records. Never panics; a message opens only if
/// it is exactly what the test key seals for its header (no forgery); nothing refused moves a
/// window.
pub fn open_message(data: &[u8]) {
    let (_, opening) = seal::derive_keys(&TEST_KEY_MATERIAL, Role::Acceptor);
    let (sealing, _) = seal::derive_keys(&TEST_KEY_MATERIAL, Role::Dialler);
    let sealing = Arc::new(sealing);
    let mut opener = Opener::new(opening, TEST_EPOCH, test_open_config());
    let mut rest = data;
    while let [a, b, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(tail.len());
        let (chunk, next) = tail.split_at(len);
        rest = next;
        let bytes = Bytes::copy_from_slice(chunk);
        let tops = |o: &Opener| -> Vec<u64> {
            [wire::MessageKind::Datagram, wire::MessageKind::Stream]
                .into_iter()
                .flat_map(|k| (0..4).map(move |c| (k, c)))
                .map(|(k, c)| o.window(k, c).map_or(0, |w| w.top()))
                .collect()
        };
        let before = tops(&opener);
        match opener.open_bytes(&bytes, TEST_NOW_MS) {
            Err(_) => assert_eq!(before, tops(&opener), "a refused message moved a window"),
            Ok(opened) => {
                // Genuine only: sealing what was opened must give back these very bytes.
                let mut sealer = ChannelSealer::new(sealing.clone(), TEST_EPOCH, opened.kind, opened.channel);
                let mut again = Vec::new();
                sealer.seal(opened.seq, opened.sent_at_ms, &opened.payload, &mut again).expect("opened seals");
                assert_eq!(&again[..], chunk, "a forged message opened");
            }
        }
    }
}

/// The anti-replay window against a set-based model (differential): for any sequence of
/// check/commit operations, the window accepts exactly what the documented rule says.
pub fn replay_window(data: &[u8]) {
    let Some((&w, ops)) = data.split_first() else { return };
    let width = 64 * (1 + u64::from(w % 8));
    let mut window = ReplayWindow::new(width);
    let mut model = ReferenceWindow::new(width);
    for op in ops.chunks_exact(9) {
        let raw = u64::from_be_bytes(op[1..9].try_into().expect("9-byte chunk"));
        // Mostly numbers near the top, sometimes anywhere (including 0 and past MAX_SEQ).
        let seq = match op[0] % 4 {
            0 => raw,
            _ => model.top().saturating_sub(raw % (2 * width)).saturating_add(raw >> 60),
        };
        assert_eq!(window.check(seq), model.check(seq));
        if op[0] & 0x80 != 0 {
            assert_eq!(window.commit(seq), model.commit(seq));
        }
        assert_eq!(window.top(), model.top());
    }
}

/// Arbitrary sequences of reliability-core operations (push, transmit, deliver through a lossy,
/// duplicating, reordering queue, acknowledge, time passing, reconnect): the inbox never
/// delivers a message twice or out of order per channel, memory stays bounded, and a genuine
/// acknowledgement is never refused.
pub fn reliable_ops(data: &[u8]) {
    let out_cfg = OutboxConfig {
        max_messages: 16,
        max_bytes: 1024,
        max_per_channel: 32,
        initial_rto_ms: 10,
        min_rto_ms: 5,
        max_rto_ms: 100,
        retransmit_on_timeout: true,
    };
    let in_cfg =
        InboxConfig { reorder_window: 32, max_buffered_bytes: 1024, max_channels: 4, ..InboxConfig::default() };
    let mut outbox = Outbox::new(out_cfg.clone(), 1);
    let mut inbox = Inbox::new(in_cfg.clone());
    let mut wire: Vec<(u16, u64, Bytes)> = Vec::new();
    let mut acks = Vec::new();
    let mut delivered = [0u64; 4];
    let mut now = 0u64;
    for &op in data.iter().take(4096) {
        match op % 8 {
            0 | 1 => {
                let ch = u16::from(op >> 6);
                let _ = outbox.push(ch, Bytes::from(vec![op; usize::from(op % 32)]), now);
            }
            2 => {
                while let Some(t) = outbox.poll_transmit(now) {
                    wire.push((t.channel, t.seq, t.payload));
                }
            }
            3 if !wire.is_empty() => {
                // Deliver one packet from somewhere in the queue (reordering); sometimes keep a copy.
                let i = usize::from(op >> 3) % wire.len();
                let (ch, seq, p) = if op & 0x80 != 0 { wire[i].clone() } else { wire.swap_remove(i) };
                inbox.on_message(ch, seq, p, now);
            }
            4 => {
                while let Some((ch, seq, _)) = inbox.poll_deliver(now) {
                    let d = &mut delivered[usize::from(ch)];
                    assert_eq!(seq, *d + 1, "channel {ch}: out of order or twice");
                    *d = seq;
                }
                while let Some(a) = inbox.poll_ack(now) {
                    acks.push(a);
                }
            }
            5 if !acks.is_empty() => {
                let a = acks.remove(usize::from(op >> 3) % acks.len());
                outbox.on_ack(&a, now).expect("a genuine ack is never refused");
            }
            6 => now += u64::from(op >> 3),
            7 => outbox.retransmit_all(now),
            _ => {}
        }
        let (n, bytes) = outbox.in_flight();
        assert!(n <= out_cfg.max_messages && bytes <= out_cfg.max_bytes + 31);
        assert!(inbox.held_bytes() <= in_cfg.max_buffered_bytes + 4 * 31);
        // Bound the simulated network too.
        if wire.len() > 256 {
            wire.drain(..128);
        }
    }
}

/// Two [`SessionCore`](crate::proto::session::SessionCore)s driven by arbitrary operations:
/// pushes, transmissions, frames delivered from anywhere in flight (reordered, duplicated,
/// corrupted), raw peer bytes fed to every input, time, and reconnects with new keys. Never
/// panics; what the receiving application gets is in order, once, and unaltered per channel;
/// memory stays within bounds. A violation closes the connection (a reconnect here).
pub fn session_core(data: &[u8]) {
    use crate::proto::session::{SessionConfig, SessionCore, Stop};
    use crate::proto::wire::{FRAME_HEADER_LEN, STREAM_HEADER_LEN, StreamKind};

    let config = |epoch, peer_epoch| SessionConfig {
        epoch,
        peer_epoch,
        open: test_open_config(),
        outbox: OutboxConfig {
            max_messages: 16,
            max_bytes: 1024,
            max_per_channel: 64,
            initial_rto_ms: 10,
            min_rto_ms: 5,
            max_rto_ms: 100,
            retransmit_on_timeout: true,
        },
        inbox: InboxConfig { reorder_window: 64, max_buffered_bytes: 512, max_channels: 4, ..InboxConfig::default() },
        max_tag_failures: 8,
        max_recv: 64,
        max_send: 64,
        max_channels: 4,
        receive_buffer: 512,
    };
    let mut key_counter = 0u8;
    let mut keys = || {
        key_counter = key_counter.wrapping_add(1);
        let mut material = TEST_KEY_MATERIAL;
        material[0] = key_counter;
        (seal::derive_keys(&material, Role::Dialler), seal::derive_keys(&material, Role::Acceptor))
    };
    let (ka, kb) = keys();
    let mut a = SessionCore::new(config(1, 2), ka, 1);
    let mut b = SessionCore::new(config(2, 1), kb, 2);
    // In flight: A's frames to B (channel, frame), B's ACK frames to A.
    let mut to_b: Vec<(u16, Bytes)> = Vec::new();
    let mut to_a: Vec<Bytes> = Vec::new();
    let mut opened: Vec<u16> = Vec::new();
    let mut sent = [0u64; 4];
    let mut delivered = [0u64; 4];
    let mut now = 0u64;
    let wall = |now: u64| TEST_NOW_MS + now;
    let mut reconnect =
        |a: &mut SessionCore, b: &mut SessionCore, to_b: &mut Vec<_>, to_a: &mut Vec<_>, opened: &mut Vec<u16>, now| {
            let (ka, kb) = keys();
            a.new_connection(ka, now);
            b.new_connection(kb, now);
            to_b.clear();
            to_a.clear();
            opened.clear();
        };
    let mut ops = data.iter().copied().take(4096);
    while let Some(op) = ops.next() {
        match op % 10 {
            0 | 1 => {
                let ch = u16::from(op >> 6);
                let n = sent[usize::from(ch)];
                let len = 8 + usize::from(op >> 4 & 3) * 16;
                let mut p = n.to_be_bytes().to_vec();
                p.resize(len, ch as u8);
                if a.push(ch, Bytes::from(p), true, now).is_ok() {
                    sent[usize::from(ch)] += 1;
                }
            }
            2 => loop {
                match a.poll_transmit(now, wall(now), |_| false) {
                    Ok(out) => {
                        let more = out.more;
                        to_b.extend(out.seal_all(&mut a).1);
                        if !more {
                            break;
                        }
                    }
                    Err(Stop::FreshKeys(_)) => {
                        reconnect(&mut a, &mut b, &mut to_b, &mut to_a, &mut opened, now);
                        break;
                    }
                    Err(Stop::Seal(e)) => panic!("cannot seal: {e}"),
                }
            },
            3 if !to_b.is_empty() => {
                // One frame from anywhere in flight; sometimes a copy stays, sometimes a bit flips.
                let i = usize::from(op >> 3) % to_b.len();
                let (ch, mut frame) = if op & 0x80 != 0 { to_b[i].clone() } else { to_b.swap_remove(i) };
                if op & 0x40 != 0 {
                    let mut f = frame.to_vec();
                    let at = usize::from(op) % f.len();
                    f[at] ^= 1;
                    frame = Bytes::from(f);
                }
                let mut read = || -> Result<(), crate::proto::session::Violation> {
                    if !opened.contains(&ch) {
                        opened.push(ch);
                        b.on_channel_stream(wire::encode_stream_header(StreamKind::Channel(ch)))?;
                    }
                    let Some(head) = frame.get(..FRAME_HEADER_LEN) else { return Ok(()) };
                    let head: [u8; FRAME_HEADER_LEN] = head.try_into().expect("length checked");
                    let header = b.on_message_header(head)?;
                    let len = header.length as usize;
                    if frame.len() != FRAME_HEADER_LEN + len {
                        return Ok(()); // truncated by the flip: the stream would wait for more
                    }
                    if b.reserve(ch, len, |_| true) {
                        b.on_message(ch, header, frame.slice(FRAME_HEADER_LEN..), len, wall(now), now)?;
                    }
                    Ok(())
                };
                if read().is_err() {
                    reconnect(&mut a, &mut b, &mut to_b, &mut to_a, &mut opened, now);
                }
            }
            4 => {
                while let Some(d) = b.poll_deliver(now) {
                    let ch = usize::from(d.channel);
                    let index = u64::from_be_bytes(d.payload[..8].try_into().expect("8 bytes"));
                    assert_eq!(index, delivered[ch], "channel {ch}: out of order, twice or altered");
                    assert!(d.payload[8..].iter().all(|&x| x == d.channel as u8), "payload altered");
                    delivered[ch] += 1;
                }
                if let Ok(out) = b.poll_transmit(now, wall(now), |_| false) {
                    to_a.extend(out.control);
                }
            }
            5 if !to_a.is_empty() => {
                let acks = to_a.remove(usize::from(op >> 3) % to_a.len());
                let mut at = acks;
                while at.len() >= FRAME_HEADER_LEN {
                    let head: [u8; FRAME_HEADER_LEN] = at[..FRAME_HEADER_LEN].try_into().expect("length checked");
                    let Ok(header) = a.on_control_header(head) else { break };
                    let len = header.length as usize;
                    let body = at.slice(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len);
                    at = at.slice(FRAME_HEADER_LEN + len..);
                    a.on_control(header, body, now).expect("a genuine ack is never refused");
                }
            }
            6 => now += u64::from(op >> 2) * 10,
            7 => reconnect(&mut a, &mut b, &mut to_b, &mut to_a, &mut opened, now),
            8 => {
                // Raw peer bytes into one of B's inputs: the next `n` bytes of the input.
                let n = usize::from(op >> 4) * 4;
                let raw: Vec<u8> = ops.by_ref().take(n).collect();
                let raw = Bytes::from(raw);
                let failed = match op >> 2 & 3 {
                    0 => raw
                        .get(..STREAM_HEADER_LEN)
                        .map(|h| b.on_channel_stream(h.try_into().expect("length checked")).map(drop)),
                    1 => raw.get(..FRAME_HEADER_LEN).map(|h| {
                        let head: [u8; FRAME_HEADER_LEN] = h.try_into().expect("length checked");
                        b.on_message_header(head).and_then(|header| {
                            let body = raw.slice(FRAME_HEADER_LEN..);
                            if body.len() == header.length as usize {
                                b.on_message(0, header, body, 0, wall(now), now).map(drop)
                            } else {
                                Ok(())
                            }
                        })
                    }),
                    2 => raw.get(..FRAME_HEADER_LEN).map(|h| {
                        let head: [u8; FRAME_HEADER_LEN] = h.try_into().expect("length checked");
                        b.on_control_header(head).and_then(|header| {
                            let body = raw.slice(FRAME_HEADER_LEN..);
                            if body.len() == header.length as usize {
                                b.on_control(header, body, now).map(drop)
                            } else {
                                Ok(())
                            }
                        })
                    }),
                    _ => Some(b.on_datagram(&raw, wall(now), |_| true).map(drop)),
                };
                if matches!(failed, Some(Err(_))) {
                    reconnect(&mut a, &mut b, &mut to_b, &mut to_a, &mut opened, now);
                }
            }
            _ => {}
        }
        let (n, bytes) = a.in_flight();
        assert!(n <= 16 && bytes <= 1024 + 64);
        assert!(b.unread() <= 2 * 512 + 64);
        if to_b.len() > 256 {
            to_b.drain(..128);
        }
        if to_a.len() > 64 {
            to_a.drain(..32);
        }
    }
}

/// RPC frame decoding: never panics, and what decodes re-encodes to the same bytes.
pub fn rpc_decode(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(frame) = RpcFrame::decode(&bytes) {
        let mut again = Vec::new();
        frame.encode(&mut again).expect("a decoded frame encodes");
        assert_eq!(&again[..], data);
    }
}

/// DURABLE frame decoding: never panics, and what decodes re-encodes to the same bytes.
pub fn durable_decode(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(frame) = crate::proto::durable::DurableFrame::decode(&bytes) {
        assert_eq!(&frame.to_bytes()[..], data);
    }
}

/// The server's at-most-once call cache under any sequence of begin/finish/abandon operations
/// and clock steps: within its bounds, never forgets a running call, never answers a call with
/// a response that is not its own.
pub fn rpc_cache(data: &[u8]) {
    let Some((&cfg, ops)) = data.split_first() else { return };
    let config = CacheConfig {
        max_entries: 1 + usize::from(cfg & 0x0f),
        max_bytes: 16 * usize::from(cfg >> 4),
        horizon_ms: 100,
    };
    let mut cache = ResponseCache::new(config);
    // What the model knows: running keys, and the response each finished key got. Keys are
    // (caller, call), four callers.
    let mut running: HashMap<(u8, u8), ()> = HashMap::new();
    let mut finished: HashMap<(u8, u8), Bytes> = HashMap::new();
    let mut now = 0u64;
    for op in ops.chunks_exact(3) {
        let key = (op[1] % 4, op[1] % 32);
        now += u64::from(op[2] % 16);
        match op[0] % 4 {
            0 | 1 => match cache.begin(key, now) {
                Some(Begin::Run) => {
                    assert!(!running.contains_key(&key), "a running call was forgotten");
                    running.insert(key, ());
                }
                Some(Begin::Running) => assert!(running.contains_key(&key)),
                Some(Begin::Answer(status, body)) => {
                    assert_eq!(status, Status::Ok);
                    assert_eq!(finished.get(&key), Some(&body), "answered with another call's response");
                }
                None => assert!(cache.len() >= config.max_entries),
            },
            2 => {
                if running.remove(&key).is_some() {
                    let body = Bytes::from(vec![key.1; usize::from(op[2] % 24)]);
                    cache.finish(key, Status::Ok, body.clone(), now);
                    finished.insert(key, body);
                }
            }
            _ => {
                if running.remove(&key).is_some() {
                    cache.abandon(&key);
                }
            }
        }
        assert!(cache.len() <= config.max_entries);
        assert!(cache.bytes() <= config.max_bytes, "{} bytes over {}", cache.bytes(), config.max_bytes);
        assert!(cache.len() >= running.len());
    }
}

/// PEM loading as the library and `quicseal cert inspect` do it: CA certificates and CRLs into
/// a trust store, a certificate chain and key into an identity (split at the first NUL byte),
/// and the inspection report. Never panics; whatever loads is usable.
pub fn pem_load(data: &[u8]) {
    let mut trust = crate::TrustStore::new();
    if trust.add_ca_pem(data).is_ok() && trust.ca_count() > 0 {
        // Every CA that loaded must be one webpki can at least try to use.
        let _ = trust.verify(trust.cas(), None);
    }
    let _ = crate::TrustStore::new().add_crl_pem(data);
    // A chain and a key, separated by the first NUL byte (or the whole input as both).
    let (chain, key) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, data),
    };
    if let Ok(identity) = crate::Identity::from_pem(chain, key) {
        assert!(!identity.chain().is_empty());
        let _ = identity.certificate();
    }
    if let Ok(inspection) = crate::pki::inspect_pem(data) {
        assert!(!inspection.reports.is_empty());
    }
}

#[cfg(test)]
mod tests;
