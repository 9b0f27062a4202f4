//! Arbitrary sequences of reliability-core operations (push, transmit, deliver through a
//! lossy/duplicating/reordering queue, acknowledge, time passing, reconnect): the inbox never
//! delivers a message twice or out of order per channel, memory stays bounded, and a peer's
//! acknowledgement is never refused.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quicseal::proto::reliable::{Inbox, InboxConfig, Outbox, OutboxConfig};

fuzz_target!(|data: &[u8]| {
    let out_cfg = OutboxConfig {
        max_messages: 16,
        max_bytes: 1024,
        initial_rto_ms: 10,
        min_rto_ms: 5,
        max_rto_ms: 100,
        retransmit_on_timeout: true,
    };
    let mut in_cfg = InboxConfig::default();
    in_cfg.reorder_window = 32;
    in_cfg.max_buffered_bytes = 1024;
    in_cfg.max_channels = 4;
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
});
