//! Every payload decoder a node or a client runs on bytes from the network: no
//! input may panic, and what decodes must encode back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    harness_client::protocol::decode_everything(data);
});
