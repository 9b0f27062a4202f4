//! The server's at-most-once call cache under any sequence of begin/finish/abandon operations
//! and clock steps: it stays within its bounds, never forgets a running call, and never answers
//! a call with a response that is not its own.
#![no_main]

use std::collections::HashMap;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quicseal::proto::rpc::{Begin, CacheConfig, ResponseCache, Status};

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, ops)) = data.split_first() else { return };
    let config = CacheConfig {
        max_entries: 1 + usize::from(cfg & 0x0f),
        max_bytes: 16 * usize::from(cfg >> 4),
        horizon_ms: 100,
    };
    let mut cache = ResponseCache::new(config);
    // What the model knows: running keys, and the response each finished key got.
    let mut running: HashMap<u8, ()> = HashMap::new();
    let mut finished: HashMap<u8, Bytes> = HashMap::new();
    let mut now = 0u64;
    for op in ops.chunks_exact(3) {
        let key = op[1] % 32;
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
                    let body = Bytes::from(vec![key; usize::from(op[2] % 24)]);
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
});
