//! The fuzz target's body (`fuzz/fuzz_targets/protocol_decode.rs`) under property
//! tests, so every `make test` runs it on stable: random bytes, and valid payloads
//! truncated or with bytes flipped.

use harness_client::protocol::decode_everything;
use harness_client::{DType, Payload, RunRequest, WireTensor, PROTOCOL_VERSION};
use proptest::prelude::*;
use ractor::BytesConvertable;

fn cases() -> u32 {
    if std::env::var("HARNESS_CHAOS").as_deref() == Ok("long") {
        20_000
    } else {
        512
    }
}

fn a_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(-3i64..9, 0..4),
        prop::collection::vec(any::<u8>(), 0..96),
        0u64..10_000,
    )
        .prop_map(|(shape, data, timeout_ms)| {
            Payload::new(RunRequest {
                version: PROTOCOL_VERSION,
                inputs: vec![WireTensor {
                    dtype: DType::F32,
                    shape,
                    data,
                }],
                timeout_ms,
            })
            .into_bytes()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_everything(&bytes);
    }

    #[test]
    fn truncated_and_flipped_requests_never_panic(
        bytes in a_request(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
        with in any::<u8>(),
    ) {
        decode_everything(&bytes);
        let mut flipped = bytes.clone();
        let at = flip.index(flipped.len());
        flipped[at] ^= with;
        decode_everything(&flipped);
        decode_everything(&bytes[..cut.index(bytes.len())]);
    }
}

/// The fuzzer's first find (a NaN in an answer's vector, which equals nothing):
/// the round-trip check compares bytes.
#[test]
fn a_nan_in_a_vector_round_trips() {
    let crash = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fuzz-regressions/nan-vector.bin"
    ))
    .unwrap();
    decode_everything(&crash);
}
