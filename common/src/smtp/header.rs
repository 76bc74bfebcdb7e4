//! The header of a message as it arrives (RFC 5322 section 2.2): where it ends, its fields
//! with their continuation lines, and their names and unfolded values. Nothing is lost: the
//! fields put back together are the header.

/// The length of the header, its last CRLF included and the empty line not: the body starts
/// after the first empty line. A message may have no header (0) or no body (all of it).
pub fn header_len(message: &[u8]) -> usize {
    if message.starts_with(b"\r\n") {
        return 0;
    }
    message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 2)
        .unwrap_or(message.len())
}

/// Splits the header block into fields (each with its continuation lines).
pub fn fields(header: &[u8]) -> Vec<&[u8]> {
    let mut fields = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        if header[i] == b'\n' {
            let next = header.get(i + 1).copied();
            if next != Some(b' ') && next != Some(b'\t') {
                fields.push(&header[start..=i]);
                start = i + 1;
            }
        }
        i += 1;
    }
    if start < header.len() {
        fields.push(&header[start..]);
    }
    fields
}

pub fn field_name(f: &[u8]) -> Option<String> {
    let colon = f.iter().position(|&b| b == b':')?;
    let name = &f[..colon];
    if name.is_empty() || name.iter().any(|b| b.is_ascii_whitespace()) {
        return None;
    }
    Some(String::from_utf8_lossy(name).to_ascii_lowercase())
}

pub fn field_value(f: &[u8]) -> String {
    let colon = f.iter().position(|&b| b == b':').unwrap_or(0);
    let v = String::from_utf8_lossy(&f[colon + 1..]);
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_keep_every_byte_and_unfold_values() {
        let m = b"Subject: a\r\n b\r\nX-Job:  7 \r\n\r\nbody";
        let h = &m[..header_len(m)];
        assert_eq!(h, b"Subject: a\r\n b\r\nX-Job:  7 \r\n");
        let f = fields(h);
        assert_eq!(f.concat(), h);
        assert_eq!(f.len(), 2);
        assert_eq!(field_name(f[0]).as_deref(), Some("subject"));
        assert_eq!(field_value(f[0]), "a b");
        assert_eq!(field_value(f[1]), "7");
        assert_eq!(header_len(b"\r\nbody"), 0);
        assert_eq!(header_len(b"no body"), 7);
    }
}
