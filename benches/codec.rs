//! Micro benchmarks of the wire codec: MESSAGE and ACK frames, and RPC frames, encoded and
//! decoded as the session does it (sealing and the replay window are in `benches/seal.rs`).
//!
//! ```text
//! cargo bench -p quicseal-benches --bench codec
//! ```
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quicseal::proto::reliable::AckRanges;
use quicseal::proto::rpc::{CallId, RpcFrame};
use quicseal::proto::wire::{Frame, MessageFrame, MessageKind};

const MAX_PAYLOAD: usize = 1 << 20;

fn message(size: usize) -> Frame {
    Frame::Message(MessageFrame {
        kind: MessageKind::Stream,
        channel: 7,
        epoch: 0x0123_4567_89ab_cdef,
        seq: 1_000_000,
        sent_at_ms: 1_700_000_000_000,
        // Ciphertext and tag, as sealed.
        sealed: Bytes::from(vec![0xa5u8; size + 16]),
    })
}

fn encoded(frame: &Frame) -> Bytes {
    let mut out = Vec::new();
    frame.encode(&mut out);
    Bytes::from(out)
}

fn bench(c: &mut Criterion) {
    for size in [64usize, 1024, 64 * 1024] {
        let mut g = c.benchmark_group(format!("message_{size}B"));
        g.throughput(Throughput::Bytes(size as u64));
        let frame = message(size);
        let mut out = Vec::with_capacity(size + 64);
        g.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                black_box(&frame).encode(&mut out);
                black_box(&out);
            })
        });
        let bytes = encoded(&frame);
        // Decoding slices the sealed payload out of the buffer: no copy, whatever the size.
        g.bench_function("decode", |b| b.iter(|| black_box(Frame::decode_exact(black_box(&bytes), MAX_PAYLOAD))));
        g.finish();
    }

    let mut g = c.benchmark_group("ack");
    // The common ACK (cumulative only) and the largest one (32 ranges).
    for (name, ranges) in
        [("cumulative", vec![]), ("32_ranges", (0..32u64).map(|i| (100 + 4 * i, 101 + 4 * i)).collect())]
    {
        let frame = Frame::Ack(AckRanges { channel: 7, cumulative: 99, ranges });
        let mut out = Vec::with_capacity(1024);
        g.bench_function(format!("encode_{name}"), |b| {
            b.iter(|| {
                out.clear();
                black_box(&frame).encode(&mut out);
                black_box(&out);
            })
        });
        let bytes = encoded(&frame);
        g.bench_function(format!("decode_{name}"), |b| {
            b.iter(|| black_box(Frame::decode_exact(black_box(&bytes), MAX_PAYLOAD)))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("rpc_request_64B");
    let request = RpcFrame::Request {
        call: CallId { epoch: 0x0123_4567_89ab_cdef, id: 42 },
        method: "echo".into(),
        budget_ms: 30_000,
        idempotent: false,
        body: Bytes::from(vec![1u8; 64]),
    };
    let mut out = Vec::with_capacity(256);
    g.bench_function("encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&request).encode(&mut out).unwrap();
            black_box(&out);
        })
    });
    let mut buf = Vec::new();
    request.encode(&mut buf).unwrap();
    let bytes = Bytes::from(buf);
    g.bench_function("decode", |b| b.iter(|| black_box(RpcFrame::decode(black_box(&bytes)))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench
}
criterion_main!(benches);
