//! The bounded line reader both ends of SMTP use: a read buffer that yields command, reply and
//! data lines of at most a given length, and raw chunks (BDAT). It does no I/O of its own, so
//! the ingress can wrap its reads in deadlines and eviction while the worker, the sink and the
//! traffic generator use [`LineBuffer::read_line`] on any stream.

use tokio::io::{AsyncRead, AsyncReadExt};

/// How much the buffer asks for per read.
const READ_SIZE: usize = 16 << 10;
/// Consumed bytes beyond this are dropped even while the buffer still holds unread ones.
const COMPACT_AFTER: usize = 64 << 10;

/// A complete line in the buffer: where its content lies (without the line ending) and how it
/// ended. Valid until the buffer is next changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    start: usize,
    end: usize,
    /// Ended with CRLF (false: a bare LF).
    pub crlf: bool,
}

impl Line {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The line was longer than allowed; it has been discarded up to and including its LF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLong;

#[derive(Debug)]
pub enum ReadLineError {
    TooLong,
    /// The peer closed the connection before a line ended.
    Closed,
    Io(std::io::Error),
}

impl std::fmt::Display for ReadLineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadLineError::TooLong => f.write_str("line too long"),
            ReadLineError::Closed => f.write_str("the connection was closed"),
            ReadLineError::Io(e) => write!(f, "{e}"),
        }
    }
}

#[derive(Default)]
pub struct LineBuffer {
    buf: Vec<u8>,
    /// The first unconsumed byte.
    start: usize,
    /// Bytes from `start` up to here hold no LF.
    scanned: usize,
    /// An over-long line is being dropped until its LF.
    discarding: bool,
}

impl LineBuffer {
    pub fn new() -> Self {
        LineBuffer {
            buf: Vec::with_capacity(8192),
            ..Default::default()
        }
    }

    /// Whether the peer has sent more than has been consumed (pipelining).
    pub fn has_buffered(&self) -> bool {
        self.start < self.buf.len()
    }

    /// Forgets everything unread (after STARTTLS, RFC 3207 section 4.2).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scanned = 0;
        self.discarding = false;
    }

    /// The content of a line `next_line` returned.
    pub fn bytes(&self, line: Line) -> &[u8] {
        &self.buf[line.start..line.end]
    }

    fn compact(&mut self) {
        if self.start == self.buf.len() {
            self.buf.clear();
        } else if self.start > COMPACT_AFTER {
            self.buf.drain(..self.start);
        } else {
            return;
        }
        self.scanned -= self.start;
        self.start = 0;
    }

    /// The next complete line of at most `limit` octets (without its ending), `None` when more
    /// input is needed. An over-long line is an error once its end arrives; what has come of it
    /// is not kept meanwhile.
    pub fn next_line(&mut self, limit: usize) -> Option<Result<Line, TooLong>> {
        self.compact();
        if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]) {
            let end = self.scanned + pos;
            let start = self.start;
            self.start = end + 1;
            self.scanned = self.start;
            if std::mem::take(&mut self.discarding) {
                return Some(Err(TooLong));
            }
            let crlf = end > start && self.buf[end - 1] == b'\r';
            let end = if crlf { end - 1 } else { end };
            if end - start > limit {
                return Some(Err(TooLong));
            }
            return Some(Ok(Line { start, end, crlf }));
        }
        self.scanned = self.buf.len();
        if self.buf.len() - self.start > limit.saturating_add(2) {
            self.discarding = true;
            self.buf.truncate(self.start);
            self.scanned = self.start;
        }
        None
    }

    /// Takes up to `max` buffered octets as they are (a BDAT chunk).
    pub fn take(&mut self, max: usize) -> &[u8] {
        let n = (self.buf.len() - self.start).min(max);
        let at = self.start;
        self.start += n;
        self.scanned = self.scanned.max(self.start);
        &self.buf[at..at + n]
    }

    /// Reads once from `stream` into the buffer; 0 means the peer closed.
    pub async fn fill<S: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut S,
    ) -> std::io::Result<usize> {
        self.compact();
        // Straight into the spare room: a stack array would make every read future large.
        self.buf.reserve(READ_SIZE);
        stream.read_buf(&mut self.buf).await
    }

    /// Reads from `stream` until a whole line is buffered.
    pub async fn read_line<S: AsyncRead + Unpin + ?Sized>(
        &mut self,
        stream: &mut S,
        limit: usize,
    ) -> Result<Line, ReadLineError> {
        loop {
            match self.next_line(limit) {
                Some(Ok(line)) => return Ok(line),
                Some(Err(TooLong)) => return Err(ReadLineError::TooLong),
                None => {}
            }
            match self.fill(stream).await {
                Ok(0) => return Err(ReadLineError::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadLineError::Io(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[&[u8]], limit: usize) -> Vec<Result<(Vec<u8>, bool), TooLong>> {
        let mut b = LineBuffer::new();
        let mut out = Vec::new();
        for piece in input {
            b.buf.extend_from_slice(piece);
            while let Some(r) = b.next_line(limit) {
                out.push(r.map(|l| (b.bytes(l).to_vec(), l.crlf)));
            }
        }
        out
    }

    #[test]
    fn lines_end_in_crlf_or_bare_lf_and_may_arrive_in_pieces() {
        let got = lines(&[b"EHLO a\r", b"\nNOOP\nQU", b"IT\r\n"], 100);
        assert_eq!(
            got,
            vec![
                Ok((b"EHLO a".to_vec(), true)),
                Ok((b"NOOP".to_vec(), false)),
                Ok((b"QUIT".to_vec(), true)),
            ]
        );
    }

    #[test]
    fn an_overlong_line_is_refused_once_and_not_kept() {
        let mut b = LineBuffer::new();
        b.buf.extend_from_slice(&[b'x'; 100]);
        assert!(b.next_line(10).is_none());
        assert!(b.buf.len() <= 10, "the long line was kept");
        b.buf.extend_from_slice(b"xxxx\r\nNOOP\r\n");
        assert_eq!(b.next_line(10), Some(Err(TooLong)));
        let l = b.next_line(10).unwrap().unwrap();
        assert_eq!(b.bytes(l), b"NOOP");
        // Exactly at the limit is fine; one more is not.
        assert_eq!(
            lines(&[b"0123456789\r\n"], 10)[0],
            Ok((b"0123456789".to_vec(), true))
        );
        assert_eq!(lines(&[b"0123456789A\r\n"], 10)[0], Err(TooLong));
    }

    #[test]
    fn chunks_and_lines_interleave() {
        let mut b = LineBuffer::new();
        b.buf.extend_from_slice(b"BDAT 5\r\nhel\nlNOOP\r\n");
        let l = b.next_line(100).unwrap().unwrap();
        assert_eq!(b.bytes(l), b"BDAT 5");
        assert_eq!(b.take(5), b"hel\nl");
        let l = b.next_line(100).unwrap().unwrap();
        assert_eq!(b.bytes(l), b"NOOP");
        assert!(!b.has_buffered());
    }

    #[tokio::test]
    async fn reads_from_a_stream_until_it_closes() {
        let mut input: &[u8] = b"250-first\r\n250 last\r\npartial";
        let mut b = LineBuffer::new();
        let l = b.read_line(&mut input, 512).await.unwrap();
        assert_eq!(b.bytes(l), b"250-first");
        let l = b.read_line(&mut input, 512).await.unwrap();
        assert_eq!(b.bytes(l), b"250 last");
        assert!(matches!(
            b.read_line(&mut input, 512).await,
            Err(ReadLineError::Closed)
        ));
    }
}
