//! Any reply a receiving server may send: the lines make a reply without a panic, keeping the
//! code, and with an enhanced code only when it is one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::reply::{Reply, is_enhanced};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Some(first) = text.lines().next() else {
        return;
    };
    let code = first
        .get(..3)
        .and_then(|c| c.parse::<u16>().ok())
        .unwrap_or(0);
    let texts: Vec<String> = text
        .lines()
        .map(|l| l.get(4..).unwrap_or("").to_string())
        .collect();
    for keep in [false, true] {
        let r = Reply::from_lines(code, &texts, keep);
        assert_eq!(r.code, code);
        assert!(r.enhanced.is_empty() || is_enhanced(&r.enhanced));
        let _ = (r.line(), r.is_positive(), r.is_permanent());
    }
});
