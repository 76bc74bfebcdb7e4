//! SMTP replies (RFC 5321 section 4.2) with enhanced status codes (RFC 3463), as a client
//! reads them from a receiving server: input from strangers.

use tokio::io::AsyncRead;

use super::line::{LineBuffer, ReadLineError};

/// The longest reply line taken (RFC 5321 allows 512 octets; real servers send more).
pub const LINE_LIMIT: usize = 8192;
/// The most text one multi-line reply may hold, so that a server cannot grow it forever.
const TEXT_LIMIT: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: String,
    pub text: String,
}

impl Reply {
    pub fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: enhanced.into(),
            text: text.into(),
        }
    }
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// "CODE ENHANCED TEXT", what pattern lists and bounce categories match against.
    pub fn line(&self) -> String {
        if self.enhanced.is_empty() {
            format!("{} {}", self.code, self.text)
        } else {
            format!("{} {} {}", self.code, self.enhanced, self.text)
        }
    }
}

impl Reply {
    /// The reply made of the texts of its lines (each without `CODE-` or `CODE `). For an EHLO
    /// reply (`keep_lines`), the lines stay apart for extension parsing and no enhanced code is
    /// taken.
    pub fn from_lines(code: u16, texts: &[String], keep_lines: bool) -> Reply {
        if keep_lines {
            return Reply {
                code,
                enhanced: String::new(),
                text: texts.join("\n"),
            };
        }
        let first = texts.join(" ");
        let (enhanced, rest) = match first.split_once(' ') {
            Some((e, r)) if is_enhanced(e) => (e.to_string(), r.to_string()),
            _ if is_enhanced(&first) => (first.clone(), String::new()),
            _ => (String::new(), first.clone()),
        };
        Reply {
            code,
            enhanced,
            text: rest,
        }
    }
}

/// One line of a reply: its code, whether more lines follow (`CODE-`), and its text.
pub fn parse_line(line: &[u8]) -> Result<(u16, bool, String), String> {
    let code = line
        .get(..3)
        .filter(|c| c.iter().all(u8::is_ascii_digit))
        .and_then(|c| std::str::from_utf8(c).ok()?.parse::<u16>().ok())
        .filter(|c| (200..600).contains(c));
    let sep = line.get(3).copied();
    match (code, sep) {
        (Some(code), None | Some(b' ' | b'-')) => Ok((
            code,
            sep == Some(b'-'),
            String::from_utf8_lossy(line.get(4..).unwrap_or_default()).into_owned(),
        )),
        _ => Err(format!(
            "bad reply line `{}`",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        )),
    }
}

#[derive(Debug)]
pub enum ReadReplyError {
    Malformed(String),
    Closed,
    Io(std::io::Error),
}

impl std::fmt::Display for ReadReplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadReplyError::Malformed(e) => f.write_str(e),
            ReadReplyError::Closed => f.write_str("the server closed the connection"),
            ReadReplyError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads one whole reply, all its lines (`keep_lines` as in [`Reply::from_lines`]).
pub async fn read_reply<S: AsyncRead + Unpin + ?Sized>(
    lines: &mut LineBuffer,
    stream: &mut S,
    keep_lines: bool,
) -> Result<Reply, ReadReplyError> {
    let mut texts = Vec::new();
    let mut size = 0;
    loop {
        let line = lines
            .read_line(stream, LINE_LIMIT)
            .await
            .map_err(|e| match e {
                ReadLineError::TooLong => ReadReplyError::Malformed("reply line too long".into()),
                ReadLineError::Closed => ReadReplyError::Closed,
                ReadLineError::Io(e) => ReadReplyError::Io(e),
            })?;
        let (code, more, text) =
            parse_line(lines.bytes(line)).map_err(ReadReplyError::Malformed)?;
        // Each line counts one more, so that a stream of empty lines is bounded too.
        size += text.len() + 1;
        if size > TEXT_LIMIT {
            return Err(ReadReplyError::Malformed("reply too long".into()));
        }
        texts.push(text);
        if !more {
            return Ok(Reply::from_lines(code, &texts, keep_lines));
        }
    }
}

/// `class.subject.detail` with class 2, 4 or 5 (RFC 3463).
pub fn is_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enhanced_codes() {
        assert!(is_enhanced("5.1.1"));
        assert!(is_enhanced("4.7.100"));
        assert!(!is_enhanced("hello"));
        assert!(!is_enhanced("3.1.1"));
    }

    #[test]
    fn replies_from_lines() {
        let r = Reply::from_lines(550, &["5.1.1 no such user".into(), "here".into()], false);
        assert_eq!(
            (r.enhanced.as_str(), r.text.as_str()),
            ("5.1.1", "no such user here")
        );
        assert_eq!(r.line(), "550 5.1.1 no such user here");
        let r = Reply::from_lines(250, &["mx.example.com".into(), "PIPELINING".into()], true);
        assert_eq!(r.text, "mx.example.com\nPIPELINING");
        assert_eq!(Reply::from_lines(451, &[String::new()], false).text, "");
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_line(b"250-PIPELINING"),
            Ok((250, true, "PIPELINING".into()))
        );
        assert_eq!(parse_line(b"221"), Ok((221, false, String::new())));
        for bad in [
            &b"25"[..],
            b"2500 x",
            b"abc def",
            b"199 too low",
            b"600 too high",
            b"",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn multi_line_replies_are_read_whole_and_bounded() {
        let mut lines = LineBuffer::new();
        let mut input: &[u8] =
            b"250-mx.example.com\r\n250-SIZE 100\r\n250 8BITMIME\r\n550 5.1.1 no\r\n";
        let r = read_reply(&mut lines, &mut input, true).await.unwrap();
        assert_eq!(r.text, "mx.example.com\nSIZE 100\n8BITMIME");
        let r = read_reply(&mut lines, &mut input, false).await.unwrap();
        assert_eq!((r.code, r.enhanced.as_str()), (550, "5.1.1"));
        assert!(matches!(
            read_reply(&mut lines, &mut input, false).await,
            Err(ReadReplyError::Closed)
        ));
        for line in [
            &b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n"[..],
            b"250-\r\n",
        ] {
            let endless = line.repeat(70_000);
            let mut input: &[u8] = &endless;
            assert!(matches!(
                read_reply(&mut LineBuffer::new(), &mut input, true).await,
                Err(ReadReplyError::Malformed(_))
            ));
        }
    }
}
