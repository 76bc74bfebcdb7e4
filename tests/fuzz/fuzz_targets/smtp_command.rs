//! Any line a client may send: the command parser and the mailbox check never panic, and a
//! refusal always carries a 5xx reply.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::command::{Cmd, check_mailbox, parse};

fuzz_target!(|data: &[u8]| {
    // The ingress hands the parser the line as lossy UTF-8, as here.
    let line = String::from_utf8_lossy(data);
    match parse(&line) {
        Cmd::Mail { from, params } => {
            let _ = check_mailbox(&from, true);
            let _ = check_mailbox(&from, false);
            assert!(
                params
                    .iter()
                    .all(|(k, _)| !k.is_empty() || line.contains("="))
            );
        }
        Cmd::Rcpt { to, .. } => {
            assert!(!to.is_empty(), "an empty recipient must be refused");
            let _ = check_mailbox(&to, true);
        }
        Cmd::Invalid(code, text) => {
            assert!(code.starts_with('5'), "{code}");
            assert!(
                !text.contains(['\r', '\n']),
                "a reply text with a line break"
            );
        }
        _ => {}
    }
});
