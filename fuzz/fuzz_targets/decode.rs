//! Fuzz `Decoder::decode` in every decoder context; whatever decodes must re-encode to the
//! same bytes and decode to the same message.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use skusync::pgoutput::{Decoder, encode};

fuzz_target!(|data: &[u8]| {
    let input = Bytes::copy_from_slice(data);
    for proto in 1..=4u32 {
        for in_stream in [false, true] {
            for parallel in [false, true] {
                let fresh = || Decoder {
                    proto_version: proto,
                    parallel_streaming: parallel,
                    in_stream,
                };
                let Ok(msg) = fresh().decode(&input) else {
                    continue;
                };
                // The encoder's `in_stream` means "xid prefix present", which needs proto >= 2.
                let mut out = BytesMut::new();
                encode(&msg, in_stream && proto >= 2, parallel, &mut out);
                assert_eq!(&out[..], data, "re-encoding differs: {msg:?}");
                let again = fresh()
                    .decode(&out.freeze())
                    .expect("re-encoded message must decode");
                assert_eq!(again, msg);
            }
        }
    }
});
