//! Micro benchmarks of the per-message cost of quicseal's sealing layer, next to a bare ring
//! AES-256-GCM seal of the same payload (the floor: what any AEAD costs).
//!
//! ```text
//! cargo bench -p quicseal-benches --bench seal
//! ```
#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use quicseal::proto::replay::ReplayWindow;
use quicseal::proto::seal::{self, ChannelSealer, KeyLimits, OpenConfig, Opener, Role, SealingKey};
use quicseal::proto::wire::MessageKind;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

const NOW: u64 = 1_700_000_000_000;
const SIZES: [usize; 4] = [64, 1024, 4096, 64 * 1024];

fn material() -> [u8; 64] {
    std::array::from_fn(|i| i as u8)
}

/// A dialler's sealing key without usage limits: a benchmark seals more messages than one key
/// may in a session (`KeyLimits`), and would otherwise stop with `KeyExhausted`.
fn unlimited_sealing_key() -> SealingKey {
    let (mut key, _) = seal::derive_keys(&material(), Role::Dialler);
    key.set_limits(KeyLimits { messages: u64::MAX, bytes: u64::MAX });
    key
}

fn config() -> OpenConfig {
    OpenConfig {
        max_payload: 1 << 20,
        window_width: 2048,
        freshness_ms: 120_000,
        max_future_ms: 30_000,
        max_windows: 64,
    }
}

fn bench(c: &mut Criterion) {
    for size in SIZES {
        let payload = vec![0xa5u8; size];
        let mut g = c.benchmark_group(format!("{size}B"));
        g.throughput(Throughput::Bytes(size as u64));

        // Floor: ring AES-256-GCM sealing a copy of the payload (buffers reused on both sides,
        // so both measure copy + seal, not the allocator).
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7; 32]).unwrap());
        let mut counter = 0u64;
        // The payload sits after a 32-byte header, as in a frame (ring's GCM speed depends on
        // the buffer's alignment; this keeps the comparison like for like).
        let mut frame = vec![0u8; 32 + size];
        g.bench_function("ring_aead_seal", |b| {
            b.iter(|| {
                counter += 1;
                let mut nonce = [0u8; 12];
                nonce[4..].copy_from_slice(&counter.to_be_bytes());
                frame[32..].copy_from_slice(&payload);
                let tag = key
                    .seal_in_place_separate_tag(
                        Nonce::assume_unique_for_key(nonce),
                        Aad::from([0u8; 32]),
                        &mut frame[32..],
                    )
                    .unwrap();
                black_box(&frame);
                black_box(tag.as_ref());
            })
        });

        // quicseal: frame + seal.
        let mut sealer = ChannelSealer::new(Arc::new(unlimited_sealing_key()), 1, MessageKind::Stream, 0);
        let mut seq = 0u64;
        let mut out = Vec::with_capacity(size + 48);
        g.bench_function("quicseal_seal", |b| {
            b.iter(|| {
                seq += 1;
                out.clear();
                sealer.seal(seq, NOW, &payload, &mut out).unwrap();
                black_box(&out);
            })
        });

        // quicseal: decode + epoch + freshness + replay check + tag verification + commit.
        let mut sealer = ChannelSealer::new(Arc::new(unlimited_sealing_key()), 1, MessageKind::Stream, 0);
        let (_, opening) = seal::derive_keys(&material(), Role::Acceptor);
        let mut opener = Opener::new(opening, 1, config());
        let mut seq = 0u64;
        g.bench_function("quicseal_open", |b| {
            b.iter_batched(
                || {
                    seq += 1;
                    let mut out = Vec::with_capacity(size + 48);
                    sealer.seal(seq, NOW, &payload, &mut out).unwrap();
                    bytes::Bytes::from(out)
                },
                |frame| black_box(opener.open_bytes(&frame, NOW).unwrap()),
                BatchSize::SmallInput,
            )
        });
        g.finish();
    }

    let mut window = ReplayWindow::new(2048);
    let mut seq = 0u64;
    c.bench_function("replay_window_check_commit", |b| {
        b.iter(|| {
            seq += 1;
            window.check(black_box(seq)).unwrap();
            window.commit(seq).unwrap();
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = bench
}
criterion_main!(benches);
