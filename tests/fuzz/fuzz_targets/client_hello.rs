//! Fuzzes `client_hello::server_name`: no panic on any input, and the answer for a prefix of
//! the input is `Incomplete` or the answer for the whole input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::edge::client_hello::{Peek, server_name};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the limit, 64..=16384 in steps of 64, so TooLarge is fuzzed too.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let max_len = 64 + usize::from(first) * 64;
    let whole = server_name(input, max_len);
    // Split points: inside and after the first record header and the handshake header, the
    // last byte, and a few spread over the input.
    let len = input.len();
    let fixed = [1, 2, 5, 6, 9, 10, len.saturating_sub(1)];
    let spread = (1..8).map(|i| len * i / 8);
    for k in fixed.into_iter().chain(spread).filter(|&k| k < len) {
        let part = server_name(&input[..k], max_len);
        assert!(
            part == Ok(Peek::Incomplete) || part == whole,
            "split {k}: {part:?} vs {whole:?}"
        );
    }
});
