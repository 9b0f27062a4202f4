//! Frame and stream-header decoding on arbitrary bytes: never panics, and whatever decodes
//! re-encodes to the same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quicseal::proto::wire::{self, Frame};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.get(..wire::STREAM_HEADER_LEN) {
        let head: [u8; wire::STREAM_HEADER_LEN] = head.try_into().unwrap();
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
        offset += used;
    }
});
