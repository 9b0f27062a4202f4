//! The anti-replay window against a set-based model (differential): for any sequence of
//! check/commit operations, the window accepts exactly what the documented rule says.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use quicseal::proto::replay::{MAX_SEQ, ReplayError, ReplayWindow};

fuzz_target!(|data: &[u8]| {
    let Some((&w, ops)) = data.split_first() else { return };
    let width = 64 * (1 + u64::from(w % 8));
    let mut window = ReplayWindow::new(width);
    let mut seen = BTreeSet::new();
    let mut top = 0u64;
    for op in ops.chunks(9) {
        if op.len() < 9 {
            break;
        }
        let raw = u64::from_be_bytes(op[1..9].try_into().unwrap());
        // Mostly numbers near the top, sometimes anywhere (including 0 and past MAX_SEQ).
        let seq = match op[0] % 4 {
            0 => raw,
            _ => top.saturating_sub(raw % (2 * width)).saturating_add(raw >> 60),
        };
        let expected = if seq == 0 || seq > MAX_SEQ {
            Err(ReplayError::OutOfRange(seq))
        } else if seq > top {
            Ok(())
        } else if top - seq >= width {
            Err(ReplayError::TooOld { seq, top })
        } else if seen.contains(&seq) {
            Err(ReplayError::Replayed(seq))
        } else {
            Ok(())
        };
        assert_eq!(window.check(seq), expected);
        if op[0] & 0x80 != 0 {
            assert_eq!(window.commit(seq), expected);
            if expected.is_ok() {
                seen.insert(seq);
                top = top.max(seq);
                seen = seen.split_off(&top.saturating_sub(width));
            }
        }
        assert_eq!(window.top(), top);
    }
});
