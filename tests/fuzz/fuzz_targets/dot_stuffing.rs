//! Any message: what the worker puts on the wire, read back line by line as the ingress reads
//! it, is the message with its line endings made CRLF. No line can end the data early.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::data::{dot_stuff, unstuff};

fuzz_target!(|data: &[u8]| {
    // Split in two, as the worker sends a DKIM signature and the body.
    let cut = data
        .first()
        .map(|&b| b as usize % (data.len() + 1))
        .unwrap_or(0);
    let wire = dot_stuff(&[&data[..cut], &data[cut..]]);
    let mut expected = Vec::with_capacity(data.len() + 2);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                expected.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => expected.extend_from_slice(b"\r\n"),
            b => expected.push(b),
        }
        i += 1;
    }
    if !expected.ends_with(b"\r\n") {
        expected.extend_from_slice(b"\r\n");
    }
    let mut back = Vec::with_capacity(expected.len());
    let mut rest = &wire[..];
    loop {
        let end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("every line ends in CRLF");
        let line = &rest[..end];
        assert!(
            !line.contains(&b'\r') && !line.contains(&b'\n'),
            "a bare CR or LF on the wire"
        );
        rest = &rest[end + 2..];
        match unstuff(line) {
            Some(l) => {
                back.extend_from_slice(l);
                back.extend_from_slice(b"\r\n");
            }
            None => break,
        }
    }
    assert!(rest.is_empty(), "data after the end-of-data line");
    assert_eq!(back, expected);
});
