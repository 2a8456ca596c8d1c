//! Fuzzes `proxy_protocol::parse`: no panic on any input, and the answer for a prefix of
//! the input is `Incomplete` or the answer for the whole input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::edge::proxy_protocol::{Parsed, parse};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the cap, so small caps (cut inside a header) are fuzzed too.
    let Some((&cap, input)) = data.split_first() else {
        return;
    };
    let max_len = if cap < 128 {
        4096
    } else {
        usize::from(cap - 128) * 2
    };
    let whole = parse(input, max_len);
    if let Ok(Parsed::Done { consumed, .. }) = &whole {
        assert!(*consumed <= input.len().min(max_len));
        assert_eq!(parse(&input[..*consumed], max_len), whole);
    }
    // Split points: the ends of both signatures and of v2's fixed part, the header's last
    // byte, and a few derived from the input (one of them inside the first 128 bytes).
    let len = input.len();
    let hash = input
        .iter()
        .fold(0usize, |h, &b| h.wrapping_mul(31) ^ usize::from(b));
    let last = match whole {
        Ok(Parsed::Done { consumed, .. }) => consumed.saturating_sub(1),
        _ => len.saturating_sub(1),
    };
    let splits = [
        6,
        12,
        16,
        last,
        len / 2,
        hash % (len + 1),
        hash % (len.min(128) + 1),
    ];
    for k in splits.into_iter().filter(|&k| k <= len) {
        let part = parse(&input[..k], max_len);
        assert!(
            part == Ok(Parsed::Incomplete) || part == whole,
            "split {k}: {part:?} vs {whole:?}"
        );
        if let Ok(Parsed::Done { consumed, .. }) = part {
            assert!(consumed <= k);
        }
    }
});
