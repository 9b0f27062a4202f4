//! The anti-replay window against a set-based model (differential): for any sequence of
//! check/commit operations, the window accepts exactly what the documented rule says.
#![no_main]

use libfuzzer_sys::fuzz_target;
use quicseal::proto::replay::{ReferenceWindow, ReplayWindow};

fuzz_target!(|data: &[u8]| {
    let Some((&w, ops)) = data.split_first() else { return };
    let width = 64 * (1 + u64::from(w % 8));
    let mut window = ReplayWindow::new(width);
    let mut model = ReferenceWindow::new(width);
    for op in ops.chunks_exact(9) {
        let raw = u64::from_be_bytes(op[1..9].try_into().unwrap());
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
});
