//! RPC frame decoding from arbitrary bytes: never panics, and what decodes re-encodes to the
//! same bytes.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use quicseal::proto::rpc::RpcFrame;

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(frame) = RpcFrame::decode(&bytes) {
        let mut again = Vec::new();
        frame.encode(&mut again).expect("a decoded frame encodes");
        assert_eq!(&again[..], data);
    }
});
