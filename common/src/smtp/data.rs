//! Message data on the wire (RFC 5321 section 4.5.2): dot-stuffing on the way out, and its
//! inverse on the way in.

/// Dot-stuffs and normalises line endings to CRLF over consecutive pieces of one message
/// (a DKIM signature and the body), and appends the end-of-data marker.
pub fn dot_stuff(pieces: &[&[u8]]) -> Vec<u8> {
    let len: usize = pieces.iter().map(|p| p.len()).sum();
    let mut out = Vec::with_capacity(len + len / 64 + 5);
    let mut at_line_start = true;
    let mut pending_cr = false;
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

/// One line of received data without its stuffing dot; `None` for the end-of-data line.
pub fn unstuff(line: &[u8]) -> Option<&[u8]> {
    if line == b"." {
        return None;
    }
    Some(line.strip_prefix(b".").unwrap_or(line))
}

#[cfg(test)]
mod tests {
    use super::*;

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
