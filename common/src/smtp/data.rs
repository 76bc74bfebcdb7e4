//! Message data on the wire (RFC 5321 section 4.5.2): dot-stuffing on the way out, and its
//! inverse on the way in.

/// Dot-stuffs and normalises line endings to CRLF over consecutive pieces of one message
/// (a DKIM signature and the body), and appends the end-of-data marker.
pub fn dot_stuff(pieces: &[&[u8]]) -> Vec<u8> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + len / 64 + 5);
    let mut at_line_start = true;
    let mut pending_cr = false;
    // Runs between line ends are copied whole; only line ends and line starts are looked at.
    for p in pieces {
        let mut i = 0;
        while i < p.len() {
            if pending_cr {
                pending_cr = false;
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                if p[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            if at_line_start && p[i] == b'.' {
                out.push(b'.');
            }
            let run = memchr::memchr2(b'\r', b'\n', &p[i..]).unwrap_or(p.len() - i);
            if run > 0 {
                out.extend_from_slice(&p[i..i + run]);
                at_line_start = false;
            }
            i += run;
            match p.get(i) {
                Some(b'\r') => pending_cr = true,
                Some(_) => {
                    out.extend_from_slice(b"\r\n");
                    at_line_start = true;
                }
                None => break,
            }
            i += 1;
        }
    }
    if pending_cr {
        out.extend_from_slice(b"\r\n");
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// One line of received data without its stuffing dot; `None` for the end-of-data line.
pub fn unstuff(line: &[u8]) -> Option<&[u8]> {
    if line == b"." {
        return None;
    }
    Some(line.strip_prefix(b".").unwrap_or(line))
}

/// An octet that text and 8BITMIME message data may not hold (RFC 5321 section 2.3.8,
/// RFC 6152): a receiver that converts a bare CR or LF into a line break would read other
/// headers than the ones checked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadOctet {
    Nul,
    BareCr,
    BareLf,
}

impl BadOctet {
    /// The reply refusing such a message.
    pub fn reply(self) -> &'static str {
        match self {
            BadOctet::Nul => {
                "554 5.6.0 NUL in message data is not allowed (RFC 5321 2.3.8, RFC 6152)"
            }
            BadOctet::BareCr => "554 5.6.0 bare CR in message data is not allowed (RFC 5321 2.3.8)",
            BadOctet::BareLf => {
                "554 5.6.0 bare LF in message data is not allowed (RFC 5321 2.3.8); use CRLF"
            }
        }
    }
}

/// The first forbidden octet of a whole message as received with BDAT (where, unlike DATA,
/// no line reader has looked at it): CR only before LF, LF only after CR, no NUL.
pub fn check_octets(message: &[u8]) -> Result<(), BadOctet> {
    let mut i = 0;
    while let Some(at) = message[i..]
        .iter()
        .position(|&b| matches!(b, b'\r' | b'\n' | 0))
    {
        let at = i + at;
        match message[at] {
            0 => return Err(BadOctet::Nul),
            b'\n' => return Err(BadOctet::BareLf),
            _ if message.get(at + 1) != Some(&b'\n') => return Err(BadOctet::BareCr),
            _ => i = at + 2,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_octets() {
        assert_eq!(check_octets(b"Subject: a\r\n\r\nbody\r\n"), Ok(()));
        assert_eq!(check_octets(b"no line end at all"), Ok(()));
        assert_eq!(
            check_octets(b"Subject: a\rBcc: b\r\n"),
            Err(BadOctet::BareCr)
        );
        assert_eq!(check_octets(b"a\r\nb\r"), Err(BadOctet::BareCr));
        assert_eq!(check_octets(b"a\r\nb\nc"), Err(BadOctet::BareLf));
        assert_eq!(check_octets(b"a\r\n\nc"), Err(BadOctet::BareLf));
        assert_eq!(check_octets(b"a\0"), Err(BadOctet::Nul));
    }

    #[test]
    fn stuffing_and_line_endings() {
        assert_eq!(dot_stuff(&[b"a\r\n.b\r\n"]), b"a\r\n..b\r\n.\r\n");
        assert_eq!(dot_stuff(&[b".x\nline\ry"]), b"..x\r\nline\r\ny\r\n.\r\n");
        // A CRLF split across pieces is one line end.
        assert_eq!(
            dot_stuff(&[b"Sig: 1\r", b"\n.body"]),
            b"Sig: 1\r\n..body\r\n.\r\n"
        );
        assert_eq!(dot_stuff(&[b""]), b"\r\n.\r\n");
    }

    /// The byte-at-a-time form the run-copying one replaced.
    fn dot_stuff_bytewise(pieces: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut at_line_start, mut pending_cr) = (true, false);
        for b in pieces.iter().flat_map(|p| p.iter().copied()) {
            if pending_cr {
                pending_cr = false;
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            match b {
                b'\r' => pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    at_line_start = true;
                }
                _ => {
                    out.push(b);
                    at_line_start = false;
                }
            }
        }
        if pending_cr {
            out.extend_from_slice(b"\r\n");
        }
        if !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn run_copying_matches_the_bytewise_form() {
        let alphabet = b"ab.\r\n";
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let n = rng.usize(0..24);
            let data: Vec<u8> = (0..n)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            let cut = rng.usize(0..=n);
            let pieces: [&[u8]; 2] = [&data[..cut], &data[cut..]];
            assert_eq!(
                dot_stuff(&pieces),
                dot_stuff_bytewise(&pieces),
                "{:?}",
                String::from_utf8_lossy(&data)
            );
        }
    }

    #[test]
    fn unstuffing_undoes_stuffing() {
        let wire = dot_stuff(&[b".a\r\n..b\r\nc"]);
        let lines: Vec<&[u8]> = wire
            .split(|&b| b == b'\n')
            .map(|l| &l[..l.len().saturating_sub(1)])
            .collect();
        let back: Vec<&[u8]> = lines.iter().map_while(|l| unstuff(l)).collect();
        assert_eq!(back, [&b".a"[..], b"..b", b"c"]);
    }
}
