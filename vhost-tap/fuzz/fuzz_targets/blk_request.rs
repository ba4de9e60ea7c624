//! Fuzzes the virtio-blk request parser: the input becomes a descriptor
//! table and guest memory (see `vhost_tap::blk::request::fuzz_parse`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vhost_tap::blk::request::fuzz_parse(data);
});
