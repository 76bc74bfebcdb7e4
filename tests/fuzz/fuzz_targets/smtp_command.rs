//! Any line a client may send: the command parser and the mailbox check never panic, a
//! refusal always carries a 5xx reply, and a parsed command encodes to a line that parses
//! back to the same command (what the worker sends is what the ingress reads).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::command::{Cmd, check_mailbox, parse};

fuzz_target!(|data: &[u8]| {
    // The ingress hands the parser the line as lossy UTF-8, as here.
    let line = String::from_utf8_lossy(data);
    let cmd = parse(&line);
    if !matches!(cmd, Cmd::Invalid(..) | Cmd::Unknown(_)) {
        let encoded = cmd.to_string();
        assert!(
            !encoded.contains(['\r', '\n']),
            "an encoded command with a line break"
        );
        assert_eq!(parse(&encoded), cmd, "{encoded:?} parses differently");
    }
    match cmd {
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
