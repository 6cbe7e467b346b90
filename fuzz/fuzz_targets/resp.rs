//! Fuzz the publisher's reply reader (`sinks::redis::resp`): no input panics; a reply the
//! delimiter accepts is a prefix of the input; whatever parses as a flat hash holds what
//! redis-rs' parser and map conversion make of the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skusync::sinks::redis::resp::{FlatHash, int_of, reply_len};
use std::collections::HashMap;

fuzz_target!(|data: &[u8]| {
    let Ok(Some(n)) = reply_len(data) else {
        return;
    };
    assert!(n <= data.len());
    let reply = &data[..n];
    let _ = int_of(reply);
    if let Ok(h) = FlatHash::parse(reply) {
        let theirs: HashMap<String, String> =
            redis::from_redis_value(redis::parse_redis_value(reply).expect("redis-rs parses it"))
                .expect("redis-rs maps it");
        assert_eq!(h, FlatHash::from(&theirs));
    }
});
