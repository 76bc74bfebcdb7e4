//! Any reply a receiving server may send, read as the worker reads it: the reader never
//! panics, and what it returns keeps the code of the first line, with an enhanced code only
//! when it is one and a length within the bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::line::LineBuffer;
use sluice_common::smtp::reply::{Reply, is_enhanced, parse_line, read_reply};

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for keep in [false, true] {
            let mut input = data;
            let mut lines = LineBuffer::new();
            while let Ok(r) = read_reply(&mut lines, &mut input, keep).await {
                check(&r, keep);
            }
        }
    });
    // The line parser alone, on each line as it comes.
    for line in data.split(|&b| b == b'\n') {
        if let Ok((code, _, text)) = parse_line(line) {
            assert!((200..600).contains(&code));
            let r = Reply::from_lines(code, &[text], false);
            check(&r, false);
        }
    }
});

fn check(r: &Reply, keep: bool) {
    assert!((200..600).contains(&r.code));
    assert!(r.enhanced.is_empty() || is_enhanced(&r.enhanced));
    assert!(!keep || r.enhanced.is_empty());
    assert!(r.text.len() <= 80 << 10, "a reply past the bound");
    let _ = (r.line(), r.is_positive(), r.is_permanent());
}
