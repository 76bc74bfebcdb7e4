//! SMTP commands (RFC 5321 section 4.1): parsed as the ingress and the sink read them, and
//! encoded as the worker and the traffic generator send them.

use std::fmt;

/// ESMTP parameters: `KEY=VALUE` or a bare `KEY`.
pub type Params = Vec<(String, Option<String>)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Ehlo(String),
    Helo(String),
    Mail {
        from: String,
        params: Vec<(String, Option<String>)>,
    },
    Rcpt {
        to: String,
        params: Vec<(String, Option<String>)>,
    },
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    StartTls,
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
    Unknown(String),
    /// Recognised verb with bad arguments: the reply text.
    Invalid(&'static str, String),
}

fn write_params(f: &mut fmt::Formatter<'_>, params: &Params) -> fmt::Result {
    for (k, v) in params {
        match v {
            Some(v) => write!(f, " {k}={v}")?,
            None => write!(f, " {k}")?,
        }
    }
    Ok(())
}

/// The command line as a client sends it, without the CRLF. `Unknown` gives its verb and
/// `Invalid` its reply text: they only come from parsing.
impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cmd::Ehlo(d) => write!(f, "EHLO {d}"),
            Cmd::Helo(d) => write!(f, "HELO {d}"),
            Cmd::Mail { from, params } => {
                write!(f, "MAIL FROM:<{from}>")?;
                write_params(f, params)
            }
            Cmd::Rcpt { to, params } => {
                write!(f, "RCPT TO:<{to}>")?;
                write_params(f, params)
            }
            Cmd::Data => f.write_str("DATA"),
            Cmd::Bdat { size, last: true } => write!(f, "BDAT {size} LAST"),
            Cmd::Bdat { size, last: false } => write!(f, "BDAT {size}"),
            Cmd::Rset => f.write_str("RSET"),
            Cmd::Noop => f.write_str("NOOP"),
            Cmd::Quit => f.write_str("QUIT"),
            Cmd::Vrfy => f.write_str("VRFY"),
            Cmd::Help => f.write_str("HELP"),
            Cmd::StartTls => f.write_str("STARTTLS"),
            Cmd::Auth {
                mechanism,
                initial: Some(i),
            } => write!(f, "AUTH {mechanism} {i}"),
            Cmd::Auth {
                mechanism,
                initial: None,
            } => write!(f, "AUTH {mechanism}"),
            Cmd::Unknown(verb) => f.write_str(verb),
            Cmd::Invalid(code, text) => write!(f, "{code} {text}"),
        }
    }
}

impl Cmd {
    /// The command as sent on the wire, CRLF included.
    pub fn line(&self) -> String {
        format!("{self}\r\n")
    }
}

/// Splits `<path> PARAM=VALUE ...`; the path may be empty (`<>`).
fn path_and_params(rest: &str) -> Result<(String, Params), String> {
    let rest = rest.trim_start();
    let Some(after) = rest.strip_prefix('<') else {
        return Err("the address must be in angle brackets, as in <user@example.com>".into());
    };
    let Some(end) = after.find('>') else {
        return Err("the address has no closing `>`".into());
    };
    let mut addr = after[..end].trim().to_string();
    // Source routes (`@a,@b:user@c`) are accepted and ignored (RFC 5321 section 4.1.2).
    while addr.starts_with('@')
        && let Some((_, a)) = addr.split_once(':')
    {
        addr = a.trim().to_string();
    }
    let mut params = Vec::new();
    for p in after[end + 1..].split_whitespace() {
        match p.split_once('=') {
            Some((k, v)) => params.push((k.to_ascii_uppercase(), Some(v.to_string()))),
            None => params.push((p.to_ascii_uppercase(), None)),
        }
    }
    Ok((addr, params))
}

pub fn parse(line: &str) -> Cmd {
    // A bare CR or LF, a NUL or any other control character inside a command would reach
    // the Received header and the commands sent onward (RFC 5321 section 2.3.8).
    if line.chars().any(|c| c.is_control()) {
        return Cmd::Invalid(
            "501 5.5.2",
            "control characters (bare CR or LF, NUL) are not allowed in a command".into(),
        );
    }
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    let upper = verb.to_ascii_uppercase();
    match upper.as_str() {
        "EHLO" | "HELO" => {
            let d = rest.trim();
            if d.is_empty() {
                return Cmd::Invalid(
                    "501 5.5.4",
                    format!("{upper} needs a domain or address literal"),
                );
            }
            if upper == "EHLO" {
                Cmd::Ehlo(d.to_string())
            } else {
                Cmd::Helo(d.to_string())
            }
        }
        "MAIL" => {
            let Some(r) = strip_ci(rest, "FROM:") else {
                return Cmd::Invalid("501 5.5.4", "syntax: MAIL FROM:<address>".into());
            };
            match path_and_params(r) {
                Ok((from, params)) => Cmd::Mail { from, params },
                Err(e) => Cmd::Invalid("501 5.1.7", e),
            }
        }
        "RCPT" => {
            let Some(r) = strip_ci(rest, "TO:") else {
                return Cmd::Invalid("501 5.5.4", "syntax: RCPT TO:<address>".into());
            };
            match path_and_params(r) {
                Ok((to, _)) if to.is_empty() => {
                    Cmd::Invalid("501 5.1.3", "an empty recipient is not allowed".into())
                }
                Ok((to, params)) => Cmd::Rcpt { to, params },
                Err(e) => Cmd::Invalid("501 5.1.3", e),
            }
        }
        "DATA" if rest.trim().is_empty() => Cmd::Data,
        "BDAT" => {
            let mut parts = rest.split_whitespace();
            let size = parts.next().and_then(|s| s.parse::<u64>().ok());
            let last = match parts.next() {
                None => false,
                Some(l) if l.eq_ignore_ascii_case("LAST") => true,
                Some(_) => return Cmd::Invalid("501 5.5.4", "syntax: BDAT <size> [LAST]".into()),
            };
            match size {
                Some(size) => Cmd::Bdat { size, last },
                None => Cmd::Invalid("501 5.5.4", "syntax: BDAT <size> [LAST]".into()),
            }
        }
        "RSET" => Cmd::Rset,
        "NOOP" => Cmd::Noop,
        "QUIT" => Cmd::Quit,
        "VRFY" | "EXPN" => Cmd::Vrfy,
        "HELP" => Cmd::Help,
        "STARTTLS" if rest.trim().is_empty() => Cmd::StartTls,
        "AUTH" => {
            let mut parts = rest.split_whitespace();
            match parts.next() {
                Some(m) => Cmd::Auth {
                    mechanism: m.to_ascii_uppercase(),
                    initial: parts.next().map(str::to_string),
                },
                None => Cmd::Invalid(
                    "501 5.5.4",
                    "syntax: AUTH mechanism [initial-response]".into(),
                ),
            }
        }
        _ => Cmd::Unknown(verb.to_string()),
    }
}

fn strip_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let t = s.trim_start();
    // `get`, not indexing: the prefix length may fall inside a multi-byte character.
    match t.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => Some(&t[prefix.len()..]),
        _ => None,
    }
}

/// Whether an address is acceptable as a mailbox (local@domain), with a reason when not.
pub fn check_mailbox(addr: &str, utf8_allowed: bool) -> Result<(), &'static str> {
    if addr.chars().any(|c| c.is_control()) {
        return Err("the address holds a control character");
    }
    let Some((local, domain)) = addr.rsplit_once('@') else {
        return Err("the address has no domain");
    };
    if local.is_empty() || local.len() > 64 {
        return Err("the local part is empty or longer than 64 octets");
    }
    if domain.is_empty() || domain.len() > 255 {
        return Err("the domain is empty or too long");
    }
    if !utf8_allowed && !addr.is_ascii() {
        return Err("non-ASCII addresses need the SMTPUTF8 parameter");
    }
    let literal = domain.starts_with('[') && domain.ends_with(']');
    if !literal
        && !domain.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && l.chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
    {
        return Err("the domain is not valid");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_in_commands_and_addresses_are_refused() {
        for line in [
            "HELO a\rb.example.com",
            "EHLO a\0b",
            "MAIL FROM:<a\rRCPT TO:<x@y.test>@example.com>",
            "RCPT TO:<a\rb@example.com>",
            "RCPT TO:<ab@example.com> NOTIFY=\x7fSUCCESS",
        ] {
            assert!(
                matches!(parse(line), Cmd::Invalid("501 5.5.2", _)),
                "{line:?} was taken"
            );
        }
        assert!(check_mailbox("a\rb@example.com", true).is_err());
        assert!(check_mailbox("a\u{0}b@example.com", true).is_err());
        assert!(check_mailbox("ab@example.com", true).is_ok());
        assert!(matches!(
            parse("RCPT TO:<ab@example.com>"),
            Cmd::Rcpt { .. }
        ));
    }

    #[test]
    fn a_multibyte_character_where_the_keyword_ends_is_refused_not_a_panic() {
        assert!(matches!(parse("MAIL FROMé<a@b.test>"), Cmd::Invalid(..)));
        assert!(matches!(parse("RCPT T€"), Cmd::Invalid(..)));
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            parse("EHLO client.example.com"),
            Cmd::Ehlo("client.example.com".into())
        );
        assert!(matches!(parse("ehlo"), Cmd::Invalid("501 5.5.4", _)));
        match parse("MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME") {
            Cmd::Mail { from, params } => {
                assert_eq!(from, "a@b.test");
                assert_eq!(params[0], ("SIZE".into(), Some("100".into())));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse("MAIL FROM:<>"), Cmd::Mail { from, .. } if from.is_empty()));
        assert!(matches!(parse("mail from: <a@b.test>"), Cmd::Mail { .. }));
        assert!(matches!(parse("MAIL FROM:a@b.test"), Cmd::Invalid(..)));
        assert!(
            matches!(parse("RCPT TO:<@relay.test:u@x.test>"), Cmd::Rcpt { to, .. } if to == "u@x.test")
        );
        assert!(matches!(parse("RCPT TO:<>"), Cmd::Invalid(..)));
        assert_eq!(
            parse("BDAT 100 LAST"),
            Cmd::Bdat {
                size: 100,
                last: true
            }
        );
        assert!(matches!(parse("BDAT x"), Cmd::Invalid(..)));
        assert!(matches!(parse("FOO bar"), Cmd::Unknown(_)));
    }

    #[test]
    fn commands_encode_as_they_parse() {
        let mail = Cmd::Mail {
            from: "a@b.test".into(),
            params: vec![
                ("SIZE".into(), Some("10".into())),
                ("SMTPUTF8".into(), None),
            ],
        };
        assert_eq!(mail.to_string(), "MAIL FROM:<a@b.test> SIZE=10 SMTPUTF8");
        assert_eq!(mail.line(), "MAIL FROM:<a@b.test> SIZE=10 SMTPUTF8\r\n");
        for line in [
            "EHLO client.example.com",
            "MAIL FROM:<> BODY=8BITMIME",
            "RCPT TO:<u@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;u@x.test",
            "BDAT 100 LAST",
            "BDAT 0",
            "AUTH PLAIN AGFAYg==",
            "STARTTLS",
            "QUIT",
        ] {
            assert_eq!(parse(line).to_string(), line);
        }
        // A nested source route is removed whole, so what is sent on parses the same.
        let twice = parse("RCPT TO:<@a:@b:u@x.test>");
        assert_eq!(twice.to_string(), "RCPT TO:<u@x.test>");
        // Found by the fuzz target: a space after the route was kept, and dropped on re-parse.
        let spaced = parse("RCPT TO:<@a: u@x.test>");
        assert_eq!(spaced.to_string(), "RCPT TO:<u@x.test>");
    }

    #[test]
    fn mailboxes() {
        assert!(check_mailbox("user@example.com", false).is_ok());
        assert!(check_mailbox("user@[127.0.0.1]", false).is_ok());
        assert!(check_mailbox("user", false).is_err());
        assert!(check_mailbox("üser@example.com", false).is_err());
        assert!(check_mailbox("üser@example.com", true).is_ok());
        assert!(check_mailbox("u@bad..domain", false).is_err());
    }
}
