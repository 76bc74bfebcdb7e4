//! One SMTP session (RFC 5321) from greeting to QUIT. A message is answered 250 only after the
//! controller committed it; if that fails the answer is 451 4.3.0 and nothing is kept.
//!
//! Line endings: commands may end in CRLF or a bare LF. In message data only CRLF ends a line;
//! a bare LF or bare CR makes the message rejected (554 5.6.0) after its end, so that no
//! end-of-data marker can be smuggled. Dot-stuffing is removed (RFC 5321 section 4.5.2).

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use base64::Engine;
use sluice_common::policy::{Policy, SourceSettings, SuppressAction};
use sluice_common::smtp::data::{self, BadOctet};
use sluice_proto::queue::{NewMessage, Recipient};
use tokio::time::Instant;

use super::auth_limit::DEFAULT_RATE;
use super::command::{Cmd, check_mailbox, parse};
use super::conn::{Conn, ReadError};
use crate::Shared;
use crate::memory::Reservation;

/// RFC 5321 4.5.3.1.4: 512 octets for a command line; ESMTP parameters may extend it.
const COMMAND_LIMIT: usize = 2048;
/// RFC 5321 4.5.3.1.6: 1000 octets for a text line, CRLF included.
const TEXT_LIMIT: usize = 998;
const MAX_BAD_COMMANDS: u32 = 10;
/// RFC 5321 4.5.3.2: server timeouts.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// The wait for a command when most session slots are taken (as Postfix does under stress).
const STRESSED_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Message data may start slowly; after this the minimum data rate applies.
const DATA_GRACE: Duration = Duration::from_secs(30);
/// Replies kept unsent while the client pipelines; beyond this they are written out.
const OUTPUT_LIMIT: usize = 16 << 10;
/// The longest pause after a failed AUTH (one second more for each failure in the session).
const MAX_AUTH_DELAY: Duration = Duration::from_secs(3);
/// Used when the policy sets no max-message-size, so that memory stays bounded.
const DEFAULT_MAX_SIZE: u64 = 50 << 20;
const MAX_RECIPIENTS: usize = 1000;

struct Transaction {
    /// The SIZE the client declared, if any.
    size: Option<u64>,
    from: String,
    ret: String,
    envid: String,
    smtputf8: bool,
    /// One return path per recipient (`XVERP`, or the source's `verp-default`).
    verp: bool,
    rcpts: Vec<Recipient>,
    /// For each recipient, the processor whose address it is (`bounce`, `feedback`), and
    /// whether the client may relay to it.
    reports: Vec<Option<(&'static str, bool)>>,
}

pub struct Session {
    shared: Arc<Shared>,
    conn: Conn,
    peer: SocketAddr,
    local: SocketAddr,
    policy: Arc<Policy>,
    source: SourceSettings,
    helo: Option<String>,
    esmtp: bool,
    user: Option<String>,
    tx: Option<Transaction>,
    bdat: Option<Vec<u8>>,
    bdat_error: Option<String>,
    /// The share of `max_bytes_in_flight` the open BDAT message holds.
    bdat_share: Option<Reservation>,
    /// When the session began, for `smtp_session_lifetime_secs`.
    began: Instant,
    bad: u32,
    auth_failures: u32,
    /// The size of the session's last DATA message: a sender's next is likely alike.
    last_data: u64,
}

enum Flow {
    Continue,
    Close,
}

impl Session {
    pub fn new(shared: Arc<Shared>, conn: Conn, peer: SocketAddr, local: SocketAddr) -> Session {
        let policy = shared.policy();
        let source = policy.source_for_ip(peer.ip());
        Session {
            shared,
            conn,
            peer,
            local,
            policy,
            source,
            helo: None,
            esmtp: false,
            user: None,
            tx: None,
            bdat: None,
            bdat_error: None,
            bdat_share: None,
            began: Instant::now(),
            bad: 0,
            auth_failures: 0,
            last_data: 0,
        }
    }

    fn max_size(&self) -> u64 {
        match self.source.max_message_size {
            Some(s) => s.0.unwrap_or(u64::MAX).min(1 << 30),
            None => DEFAULT_MAX_SIZE,
        }
    }

    pub async fn run(mut self) {
        if self.source.smtp_service == Some(false) {
            self.shared
                .reject(self.peer, 'c', "smtp-service is off for this source");
            self.conn
                .reply("554 5.7.1 no SMTP service for your address");
            let _ = self.conn.flush().await;
            return;
        }
        let greeting = format!("220 {} ESMTP Sluice", self.shared.hostname);
        self.conn.reply(&greeting);
        if self.conn.flush().await.is_err() {
            return;
        }
        loop {
            // Replies to pipelined commands are sent together (RFC 2920), but never more than
            // OUTPUT_LIMIT of them: a client that sends without reading meets the write timeout.
            if (!self.conn.has_buffered() || self.conn.pending_output() >= OUTPUT_LIMIT)
                && self.conn.flush().await.is_err()
            {
                break;
            }
            if self.tx.is_none()
                && self.bdat.is_none()
                && self.began.elapsed() >= self.shared.limits.session_lifetime
            {
                self.conn
                    .reply("421 4.4.2 session lifetime reached; please reconnect");
                break;
            }
            let wait = if self.shared.stressed() {
                STRESSED_COMMAND_TIMEOUT
            } else {
                COMMAND_TIMEOUT
            };
            let line = match self
                .conn
                .read_line(COMMAND_LIMIT, Instant::now() + wait)
                .await
            {
                Ok(l) => l,
                Err(ReadError::TooLong) => {
                    self.conn.reply("500 5.5.2 line too long");
                    if self.bad_command("line too long").await {
                        break;
                    }
                    continue;
                }
                Err(ReadError::Timeout) => {
                    self.conn
                        .reply("421 4.4.2 timeout waiting for a command; closing");
                    let _ = self.conn.flush().await;
                    break;
                }
                Err(ReadError::Evicted) => {
                    self.evicted();
                    break;
                }
                Err(_) => break,
            };
            if line.bytes.contains(&0) {
                self.conn.reply("500 5.5.2 NUL characters are not allowed");
                if self.bad_command("NUL in command").await {
                    break;
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line.bytes).to_string();
            match self.command(&text).await {
                Flow::Continue => {}
                Flow::Close => break,
            }
        }
        let _ = self.conn.flush().await;
    }

    /// The node was full and this session had stalled longest.
    fn evicted(&mut self) {
        self.shared
            .reject(self.peer, 'c', "evicted: stalled while the node was full");
        self.tx = None;
        self.conn
            .reply("421 4.4.2 the server is busy and this session had stalled; closing");
    }

    /// Counts a bad command; true when the session should end.
    async fn bad_command(&mut self, why: &str) -> bool {
        self.bad += 1;
        self.shared.reject(self.peer, 'c', why);
        if self.bad >= MAX_BAD_COMMANDS {
            self.conn.reply("421 4.7.0 too many bad commands; closing");
            let _ = self.conn.flush().await;
            return true;
        }
        false
    }

    async fn command(&mut self, text: &str) -> Flow {
        match parse(text) {
            Cmd::Ehlo(d) => {
                self.helo = Some(d);
                self.esmtp = true;
                self.tx = None;
                let mut lines = vec![self.shared.hostname.clone(), "PIPELINING".into(), format!("SIZE {}", self.max_size())];
                lines.extend(["8BITMIME".into(), "SMTPUTF8".into(), "ENHANCEDSTATUSCODES".into(), "CHUNKING".into(), "DSN".into(), "XVERP".into()]);
                if self.shared.tls.is_some() && !self.conn.is_tls() && self.source.allow_starttls != Some(false) {
                    lines.push("STARTTLS".into());
                }
                if self.auth_allowed() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                let n = lines.len();
                for (i, l) in lines.into_iter().enumerate() {
                    let sep = if i + 1 == n { ' ' } else { '-' };
                    self.conn.reply(&format!("250{sep}{l}"));
                }
            }
            Cmd::Helo(d) => {
                self.helo = Some(d);
                self.esmtp = false;
                self.tx = None;
                let r = format!("250 {}", self.shared.hostname);
                self.conn.reply(&r);
            }
            Cmd::Mail { from, params } => self.mail(from, params),
            Cmd::Rcpt { to, params } => self.rcpt(to, params),
            Cmd::Data => return self.data().await,
            Cmd::Bdat { size, last } => return self.bdat(size, last).await,
            Cmd::Rset => {
                self.tx = None;
                self.bdat = None;
                self.bdat_error = None;
                self.bdat_share = None;
                self.conn.reply("250 2.0.0 reset");
            }
            Cmd::Noop => self.conn.reply("250 2.0.0 OK"),
            Cmd::Vrfy => self.conn.reply("252 2.5.2 cannot verify the user, but will accept the message and attempt delivery"),
            Cmd::Help => self.conn.reply("214 2.0.0 see RFC 5321"),
            Cmd::Quit => {
                self.conn.reply("221 2.0.0 bye");
                return Flow::Close;
            }
            Cmd::StartTls => return self.starttls().await,
            Cmd::Auth { mechanism, initial } => return self.auth(mechanism, initial).await,
            Cmd::Invalid(code, text) => {
                self.conn.reply(&format!("{code} {text}"));
                if self.bad_command(&text).await {
                    return Flow::Close;
                }
            }
            Cmd::Unknown(v) => {
                self.conn.reply("500 5.5.1 command not recognized");
                if self.bad_command(&format!("unknown command {v}")).await {
                    return Flow::Close;
                }
            }
        }
        Flow::Continue
    }

    fn auth_allowed(&self) -> bool {
        !self.policy.smtp_users.is_empty()
            && self.user.is_none()
            && (self.conn.is_tls()
                || (self.source.allow_unencrypted_plain_auth == Some(true)
                    && self.source.require_starttls_before_auth != Some(true)))
    }

    fn mail(&mut self, from: String, params: Vec<(String, Option<String>)>) {
        if self.helo.is_none() {
            return self.conn.reply("503 5.5.1 send EHLO or HELO first");
        }
        if self.tx.is_some() {
            return self.conn.reply("503 5.5.1 nested MAIL command");
        }
        if self.source.require_starttls == Some(true) && !self.conn.is_tls() {
            return self
                .conn
                .reply("530 5.7.0 must issue a STARTTLS command first");
        }
        if self.source.require_auth == Some(true) && self.user.is_none() {
            self.shared
                .reject(self.peer, 'c', "MAIL without required authentication");
            return self.conn.reply("530 5.7.0 authentication required");
        }
        let mut tx = Transaction {
            size: None,
            from,
            ret: String::new(),
            envid: String::new(),
            smtputf8: false,
            verp: self.source.verp_default == Some(true),
            rcpts: Vec::new(),
            reports: Vec::new(),
        };
        for (k, v) in params {
            match (k.as_str(), v) {
                ("SIZE", Some(v)) => match v.parse::<u64>() {
                    Ok(n) if n > self.max_size() => {
                        return self.conn.reply(&format!(
                            "552 5.3.4 message size {n} exceeds the limit of {}",
                            self.max_size()
                        ));
                    }
                    Ok(n) => tx.size = Some(n),
                    Err(_) => return self.conn.reply("501 5.5.4 bad SIZE value"),
                },
                ("BODY", Some(v))
                    if v.eq_ignore_ascii_case("8BITMIME") || v.eq_ignore_ascii_case("7BIT") => {}
                ("SMTPUTF8", None) => tx.smtputf8 = true,
                ("RET", Some(v))
                    if v.eq_ignore_ascii_case("FULL") || v.eq_ignore_ascii_case("HDRS") =>
                {
                    tx.ret = v.to_ascii_uppercase()
                }
                ("ENVID", Some(v)) if v.len() <= 100 => tx.envid = v,
                // Postfix's form, with its default delimiters only.
                ("XVERP", None) => tx.verp = true,
                ("XVERP", Some(d)) if d == "+=" => tx.verp = true,
                ("XVERP", Some(_)) => {
                    return self
                        .conn
                        .reply("555 5.5.4 XVERP takes only the delimiters +=");
                }
                ("AUTH", Some(_)) => {}
                (k, _) => {
                    return self
                        .conn
                        .reply(&format!("555 5.5.4 unsupported MAIL parameter {k}"));
                }
            }
        }
        if !tx.from.is_empty()
            && let Err(why) = check_mailbox(&tx.from, tx.smtputf8)
        {
            return self
                .conn
                .reply(&format!("553 5.1.7 bad sender address: {why}"));
        }
        self.tx = Some(tx);
        self.conn.reply("250 2.1.0 sender OK");
    }

    fn rcpt(&mut self, to: String, params: Vec<(String, Option<String>)>) {
        let Some(tx) = self.tx.as_ref() else {
            return self.conn.reply("503 5.5.1 send MAIL first");
        };
        if tx.rcpts.len() >= MAX_RECIPIENTS {
            return self.conn.reply("452 4.5.3 too many recipients");
        }
        if let Err(why) = check_mailbox(&to, tx.smtputf8) {
            return self
                .conn
                .reply(&format!("553 5.1.3 bad recipient address: {why}"));
        }
        let (local, domain) = to.rsplit_once('@').unwrap_or((&to, ""));
        let trusted = self.source.always_allow_relaying == Some(true) || self.user.is_some();
        // A processor's address is read here, not relayed: any client may send to it.
        let report = self.policy.report_processor(&to).map(|(kind, _)| kind);
        let relay_ok = trusted || self.policy.is_relay_domain(domain);
        // From an untrusted client, an address it may send to must not carry a route in its
        // local part (`a%b@relay`, `b!a@relay`, `"a@b"@relay`): the next hop might follow it.
        if !trusted && (relay_ok || report.is_some()) && local.contains(['%', '!', '@']) {
            self.shared
                .reject(self.peer, 'r', &format!("sender-specified routing in {to}"));
            return self
                .conn
                .reply("550 5.7.1 sender-specified routing is not allowed");
        }
        if !relay_ok && report.is_none() {
            self.shared
                .reject(self.peer, 'r', &format!("relaying denied for {to}"));
            return self.conn.reply("550 5.7.1 relaying denied");
        }
        if report.is_none()
            && self.policy.global.suppressed_recipients != Some(SuppressAction::Bounce)
            && let Some(why) = self
                .shared
                .suppressions
                .check(&to, crate::suppress::now_ms())
        {
            self.shared
                .reject(self.peer, 'r', &format!("{to} is suppressed ({why})"));
            return self.conn.reply(&format!(
                "550 5.7.1 <{to}>: the recipient is on the suppression list ({why})"
            ));
        }
        let mut r = Recipient {
            address: to,
            orcpt: String::new(),
            notify: 0,
        };
        for (k, v) in params {
            match (k.as_str(), v) {
                ("NOTIFY", Some(v)) => {
                    let mut bits = 0;
                    for n in v.split(',') {
                        bits |= match n.to_ascii_uppercase().as_str() {
                            "SUCCESS" => 1,
                            "FAILURE" => 2,
                            "DELAY" => 4,
                            "NEVER" => 8,
                            _ => return self.conn.reply("501 5.5.4 bad NOTIFY value"),
                        };
                    }
                    if bits & 8 != 0 && bits != 8 {
                        return self.conn.reply("501 5.5.4 NOTIFY=NEVER cannot be combined");
                    }
                    r.notify = bits;
                }
                ("ORCPT", Some(v)) if v.contains(';') => r.orcpt = v,
                (k, _) => {
                    return self
                        .conn
                        .reply(&format!("555 5.5.4 unsupported RCPT parameter {k}"));
                }
            }
        }
        let tx = self.tx.as_mut().unwrap();
        tx.rcpts.push(r);
        // A processor's mail goes on (deliver-*-email) only where this client may relay.
        tx.reports.push(report.map(|kind| (kind, relay_ok)));
        self.conn.reply("250 2.1.5 recipient OK");
    }

    async fn data(&mut self) -> Flow {
        match &self.tx {
            None => {
                self.conn.reply("503 5.5.1 send MAIL first");
                return Flow::Continue;
            }
            Some(t) if t.rcpts.is_empty() => {
                self.conn.reply("554 5.5.1 no valid recipients");
                return Flow::Continue;
            }
            _ => {}
        }
        if self.bdat.is_some() {
            self.conn.reply("503 5.5.1 DATA cannot follow BDAT");
            return Flow::Continue;
        }
        let declared = self.tx.as_ref().and_then(|t| t.size).unwrap_or(0);
        let mut share = Reservation::new(&self.shared.bytes_in_flight);
        if !share.cover(declared) {
            self.shared
                .reject(self.peer, 'c', "max_bytes_in_flight reached at DATA");
            self.conn
                .reply("452 4.3.1 insufficient system resources; try again later");
            return Flow::Continue;
        }
        self.conn.reply("354 end data with <CR><LF>.<CR><LF>");
        if self.conn.flush().await.is_err() {
            return Flow::Close;
        }
        let max = self.max_size();
        // Sized for the declared SIZE or the last message (up to 1 MB: that guess is not
        // reserved), so that growing seldom copies the body, with room for the trace fields
        // put in front (`message::prepare`).
        let expected = declared.max(self.last_data.min(1 << 20)).min(max) as usize;
        let mut body: Vec<u8> = Vec::with_capacity(expected.max(8192) + 1024);
        let mut error: Option<String> = None;
        let began = Instant::now();
        // Read by the deadline and counted by the line handler (a Cell would not be Sync).
        let seen = AtomicU64::new(0);
        let min_rate = self.shared.limits.min_data_rate;
        let by_rate = |seen: u64| rate_deadline(began, seen + TEXT_LIMIT as u64, min_rate);
        // Each line is checked and appended straight from the read buffer; after an error the
        // rest is read and dropped up to the end of data.
        let read = self.conn.read_data_lines(
            TEXT_LIMIT,
            || by_rate(seen.load(Relaxed)).min(Instant::now() + DATA_TIMEOUT),
            |line| {
                let Ok((bytes, crlf)) = line else {
                    error.get_or_insert_with(|| "500 5.6.0 a line in the message is longer than 998 octets (RFC 5321 4.5.3.1.6)".into());
                    return ControlFlow::Continue(());
                };
                seen.store(seen.load(Relaxed) + bytes.len() as u64 + 2, Relaxed);
                // One pass for both forbidden octets.
                let bad = match memchr::memchr2(b'\r', 0, bytes).map(|i| bytes[i]) {
                    _ if !crlf => Some(BadOctet::BareLf),
                    Some(b'\r') => Some(BadOctet::BareCr),
                    Some(_) => Some(BadOctet::Nul),
                    None => None,
                };
                if let Some(bad) = bad {
                    error.get_or_insert_with(|| bad.reply().into());
                    return ControlFlow::Continue(());
                }
                let Some(content) = data::unstuff(bytes) else {
                    return ControlFlow::Break(());
                };
                if error.is_some() {
                    return ControlFlow::Continue(());
                }
                let len = body.len() as u64 + content.len() as u64 + 2;
                if len > max {
                    error = Some(format!(
                        "552 5.3.4 message exceeds the size limit of {max} octets"
                    ));
                } else if !share.cover(len) {
                    body = Vec::new();
                    error = Some("452 4.3.1 insufficient system resources; try again later".into());
                } else {
                    body.extend_from_slice(content);
                    body.extend_from_slice(b"\r\n");
                }
                ControlFlow::Continue(())
            },
        );
        match read.await {
            Ok(()) => {}
            Err(ReadError::Timeout) => {
                self.tx = None;
                // The rate limit fired if its deadline has passed; else a read took too long.
                let reply = if by_rate(seen.load(Relaxed)) <= Instant::now() {
                    format!(
                        "421 4.4.2 message data arrived slower than {min_rate} octets per second; nothing was queued"
                    )
                } else {
                    "421 4.4.2 timeout in DATA; nothing was queued".into()
                };
                self.shared.reject(self.peer, 'c', &reply);
                self.conn.reply(&reply);
                return Flow::Close;
            }
            Err(ReadError::Evicted) => {
                self.evicted();
                return Flow::Close;
            }
            // The client went away mid-message: nothing was queued.
            Err(_) => return Flow::Close,
        }
        if let Some(e) = error {
            self.tx = None;
            self.shared.reject(self.peer, 'c', &e);
            self.conn.reply(&e);
            return Flow::Continue;
        }
        self.last_data = body.len() as u64;
        self.finish_message(body).await;
        drop(share);
        Flow::Continue
    }

    async fn bdat(&mut self, size: u64, last: bool) -> Flow {
        let max = self.max_size();
        let ok_state = matches!(&self.tx, Some(t) if !t.rcpts.is_empty());
        let current = self.bdat.as_ref().map(|b| b.len() as u64).unwrap_or(0);
        // A client names the size: `current + size` must not wrap.
        let over = current.checked_add(size).is_none_or(|total| total > max);
        let share = self
            .bdat_share
            .get_or_insert_with(|| Reservation::new(&self.shared.bytes_in_flight));
        let room = over || share.cover(current.saturating_add(size));
        if !room && self.bdat_error.is_none() {
            self.shared
                .reject(self.peer, 'c', "max_bytes_in_flight reached in BDAT");
            self.bdat_error =
                Some("452 4.3.1 insufficient system resources; try again later".into());
            self.bdat = Some(Vec::new());
        }
        // The chunk must be read whatever happens, or its bytes would be taken as commands.
        let mut keep = ok_state && !over && self.bdat_error.is_none();
        let buf = self.bdat.get_or_insert_with(Vec::new);
        let deadline = rate_deadline(Instant::now(), size, self.shared.limits.min_data_rate);
        let res = self
            .conn
            .read_chunk(size, DATA_TIMEOUT, deadline, |b| {
                if keep {
                    buf.extend_from_slice(b);
                }
            })
            .await;
        if let Err(e) = res {
            self.tx = None;
            self.bdat = None;
            self.bdat_share = None;
            match e {
                ReadError::Evicted => self.evicted(),
                ReadError::Timeout => self
                    .conn
                    .reply("421 4.4.2 timeout or too slow in BDAT; nothing was queued"),
                _ => {}
            }
            return Flow::Close;
        }
        if !ok_state {
            self.bdat = None;
            self.bdat_share = None;
            self.conn.reply("503 5.5.1 send MAIL and RCPT before BDAT");
            return Flow::Continue;
        }
        if over && self.bdat_error.is_none() {
            self.bdat_error = Some(format!(
                "552 5.3.4 message exceeds the size limit of {max} octets"
            ));
            keep = false;
        }
        let _ = keep;
        if !last {
            match &self.bdat_error {
                Some(e) => {
                    let e = e.clone();
                    self.conn.reply(&e);
                }
                None => self
                    .conn
                    .reply(&format!("250 2.0.0 {size} octets received")),
            }
            return Flow::Continue;
        }
        let body = self.bdat.take().unwrap_or_default();
        let share = self.bdat_share.take();
        // Without BINARYMIME (not offered) the message is text or 8BITMIME (RFC 3030
        // section 3): line ends are CRLF, and there is no NUL.
        if self.bdat_error.is_none()
            && let Err(bad) = data::check_octets(&body)
        {
            self.bdat_error = Some(bad.reply().into());
        }
        if let Some(e) = self.bdat_error.take() {
            self.tx = None;
            self.conn.reply(&e);
            return Flow::Continue;
        }
        self.finish_message(body).await;
        drop(share);
        Flow::Continue
    }

    /// Reports to processor addresses go to the leader; the rest is enqueued after header
    /// processing. Replies 250 only after the commit.
    async fn finish_message(&mut self, body: Vec<u8>) {
        let mut tx = self.tx.take().expect("a transaction is open");
        if tx.reports.iter().any(Option::is_some) {
            let (shared, policy) = (self.shared.clone(), self.policy.clone());
            match consume_reports(&shared, &policy, self.peer, &mut tx, &body).await {
                Ok(()) if tx.rcpts.is_empty() => {
                    return self.conn.reply("250 2.0.0 OK report processed");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(peer = %self.peer, error = %e, "report not committed");
                    return self.conn.reply(e.smtp_reply());
                }
            }
        }
        let prepared = match crate::message::prepare(
            body,
            &crate::message::Context {
                policy: &self.policy,
                source: &self.source,
                helo: self.helo.as_deref().unwrap_or(""),
                peer: self.peer,
                local: self.local,
                hostname: &self.shared.hostname,
                protocol: self.protocol(),
                mail_from: &tx.from,
                first_rcpt: &tx.rcpts[0].address,
                envid: &tx.envid,
            },
        ) {
            Ok(p) => p,
            Err(reply) => {
                self.shared.reject(self.peer, 'c', &reply);
                self.conn.reply(&reply);
                return;
            }
        };
        let msg = NewMessage {
            verp: tx.verp && !tx.from.is_empty(),
            mail_from: tx.from,
            recipients: tx.rcpts,
            envid: prepared.envid,
            ret: tx.ret,
            vmta: prepared.vmta,
            job_id: prepared.job_id,
            received_by: self.shared.node_name.clone(),
            client_ip: self.peer.ip().to_string(),
            priority: 0,
            body: prepared.body.into(),
            token: Default::default(),
        };
        match self.shared.enqueuer.enqueue(msg).await {
            Ok(id) => self
                .conn
                .reply(&format!("250 2.0.0 OK queued as {id:016x}")),
            Err(e) => {
                tracing::warn!(peer = %self.peer, error = %e, "message not committed");
                self.conn.reply(e.smtp_reply());
            }
        }
    }

    fn protocol(&self) -> &'static str {
        match (self.esmtp, self.conn.is_tls(), self.user.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        }
    }

    async fn starttls(&mut self) -> Flow {
        let Some(acceptor) = self.shared.tls.clone() else {
            self.conn.reply("502 5.5.1 STARTTLS is not offered");
            return Flow::Continue;
        };
        if self.conn.is_tls() {
            self.conn.reply("503 5.5.1 TLS is already active");
            return Flow::Continue;
        }
        self.conn.reply("220 2.0.0 ready to start TLS");
        if self.conn.flush().await.is_err() {
            return Flow::Close;
        }
        if let Err(e) = self
            .conn
            .start_tls(&acceptor, Duration::from_secs(30))
            .await
        {
            self.shared
                .reject(self.peer, 'c', &format!("TLS handshake failed: {e}"));
            return Flow::Close;
        }
        // RFC 3207: forget everything learned before TLS.
        self.helo = None;
        self.tx = None;
        self.user = None;
        self.source = self.policy.source_for_ip(self.peer.ip());
        Flow::Continue
    }

    async fn auth(&mut self, mechanism: String, initial: Option<String>) -> Flow {
        if self.helo.is_none() || !self.esmtp {
            self.conn.reply("503 5.5.1 send EHLO first");
            return Flow::Continue;
        }
        if self.user.is_some() {
            self.conn.reply("503 5.5.1 already authenticated");
            return Flow::Continue;
        }
        if self.tx.is_some() {
            self.conn
                .reply("503 5.5.1 AUTH is not allowed during a transaction");
            return Flow::Continue;
        }
        if !self.conn.is_tls() && self.source.require_starttls_before_auth == Some(true) {
            self.conn
                .reply("530 5.7.0 must issue a STARTTLS command before AUTH");
            return Flow::Continue;
        }
        if !self.conn.is_tls() && self.source.allow_unencrypted_plain_auth != Some(true) {
            self.conn
                .reply("538 5.7.11 encryption required for authentication; use STARTTLS first");
            return Flow::Continue;
        }
        let rate = self
            .source
            .smtp_max_auth_failure_rate
            .unwrap_or(DEFAULT_RATE);
        let ip = self.peer.ip();
        if let Some(why) = self.shared.auth_failures.blocked(ip, None, rate) {
            return self.auth_refused(why).await;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let creds = match mechanism.as_str() {
            "PLAIN" => {
                let resp = match initial {
                    Some(i) if i != "=" => i,
                    _ => match self.challenge("").await {
                        Some(r) => r,
                        None => return Flow::Close,
                    },
                };
                match b64.decode(resp.trim()) {
                    Ok(raw) => {
                        let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
                        if parts.len() == 3 {
                            Some((
                                String::from_utf8_lossy(parts[1]).to_string(),
                                String::from_utf8_lossy(parts[2]).to_string(),
                            ))
                        } else {
                            None
                        }
                    }
                    Err(_) => None,
                }
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => Some(i),
                    None => self.challenge("VXNlcm5hbWU6").await,
                };
                let Some(user) = user else { return Flow::Close };
                let Some(pass) = self.challenge("UGFzc3dvcmQ6").await else {
                    return Flow::Close;
                };
                match (b64.decode(user.trim()), b64.decode(pass.trim())) {
                    (Ok(u), Ok(p)) => Some((
                        String::from_utf8_lossy(&u).to_string(),
                        String::from_utf8_lossy(&p).to_string(),
                    )),
                    _ => None,
                }
            }
            _ => {
                self.conn
                    .reply("504 5.5.4 unrecognized authentication mechanism");
                return Flow::Continue;
            }
        };
        let Some((user, pass)) = creds else {
            self.conn.reply("501 5.5.2 cannot decode the credentials");
            return Flow::Continue;
        };
        let known = self.policy.smtp_users.contains_key(&user);
        if let Some(why) =
            self.shared
                .auth_failures
                .blocked(ip, known.then_some(user.as_str()), rate)
        {
            return self.auth_refused(why).await;
        }
        // An argon2 check costs tens of milliseconds: off the async threads.
        let (policy, name) = (self.policy.clone(), user.clone());
        let ok = tokio::task::spawn_blocking(move || policy.check_user(&name, &pass).is_some())
            .await
            .unwrap_or(false);
        match ok.then(|| self.policy.smtp_users.get(&user)).flatten() {
            Some(u) => {
                if let Some(named) = u
                    .source
                    .as_deref()
                    .and_then(|s| self.policy.named_source(s))
                {
                    let mut s = named.clone();
                    s.fill_from(&self.source);
                    self.source = s;
                }
                self.user = Some(user);
                self.conn.reply("235 2.7.0 authentication succeeded");
            }
            None => {
                self.shared
                    .reject(self.peer, 'c', &format!("authentication failed for {user}"));
                self.shared
                    .auth_failures
                    .record(ip, known.then_some(user.as_str()), rate);
                // A pause before the answer slows guessing within the session.
                self.auth_failures += 1;
                let pause = Duration::from_secs(self.auth_failures as u64).min(MAX_AUTH_DELAY);
                if self.conn.flush().await.is_err() {
                    return Flow::Close;
                }
                tokio::time::sleep(pause).await;
                crate::metrics::METRICS.auth_failures.inc();
                self.conn
                    .reply("535 5.7.8 authentication credentials invalid");
                if self.bad_command("authentication failed").await {
                    return Flow::Close;
                }
            }
        }
        Flow::Continue
    }

    /// AUTH refused by `smtp-max-auth-failure-rate`: the password is not looked at.
    async fn auth_refused(&mut self, why: &str) -> Flow {
        tracing::warn!(peer = %self.peer, "{why}");
        self.shared.reject(self.peer, 'c', why);
        self.conn
            .reply(&format!("454 4.7.0 {why}; try again later"));
        if self.bad_command(why).await {
            return Flow::Close;
        }
        Flow::Continue
    }

    async fn challenge(&mut self, prompt: &str) -> Option<String> {
        self.conn.reply(&format!("334 {prompt}"));
        self.conn.flush().await.ok()?;
        let line = self
            .conn
            .read_line(COMMAND_LIMIT, Instant::now() + COMMAND_TIMEOUT)
            .await
            .ok()?;
        let s = String::from_utf8_lossy(&line.bytes).to_string();
        if s == "*" {
            self.conn.reply("501 5.7.0 authentication cancelled");
            return None;
        }
        Some(s)
    }
}

/// Hands the message to the leader once per processor kind among its recipients, and
/// keeps in `tx` only the recipients it is still to be delivered to: the others, and a
/// processor's when its `deliver-matched-email` (a report) or `deliver-unmatched-email`
/// (anything else) says so and the client may relay to that address.
async fn consume_reports(
    shared: &Shared,
    policy: &Policy,
    peer: SocketAddr,
    tx: &mut Transaction,
    body: &[u8],
) -> Result<(), crate::enqueuer::NotCommitted> {
    let body = tonic::codegen::Bytes::copy_from_slice(body);
    let mut keep = vec![true; tx.rcpts.len()];
    for kind in ["feedback", "bounce"] {
        let mine: Vec<usize> = (0..tx.rcpts.len())
            .filter(|&i| tx.reports[i].is_some_and(|(k, _)| k == kind))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let recipients: Vec<String> = mine.iter().map(|&i| tx.rcpts[i].address.clone()).collect();
        let req = sluice_proto::queue::ReportRequest {
            kind: kind.into(),
            mail_from: tx.from.clone(),
            recipients,
            client_ip: peer.ip().to_string(),
            received_by: shared.node_name.clone(),
            body: body.clone(),
        };
        let recognized = shared.enqueuer.report(req).await?;
        let processor = match kind {
            "feedback" => policy.feedback_processor.as_ref(),
            _ => policy.bounce_processor.as_ref(),
        };
        let settings = processor.map(|p| &p.settings);
        let deliver = settings.is_some_and(|s| {
            if recognized {
                s.deliver_matched_email == Some(true)
            } else {
                s.deliver_unmatched_email == Some(true)
            }
        });
        for i in mine {
            keep[i] = deliver && tx.reports[i].is_some_and(|(_, relay_ok)| relay_ok);
        }
    }
    let mut i = 0;
    tx.rcpts.retain(|_| {
        i += 1;
        keep[i - 1]
    });
    tx.reports.clear();
    Ok(())
}

/// When `bytes` must have arrived by, at `rate` octets per second after the grace period.
fn rate_deadline(began: Instant, bytes: u64, rate: u64) -> Instant {
    // Capped at a day, so the sum cannot overflow.
    let secs = (bytes / rate.max(1)).min(86_400);
    began + DATA_GRACE + Duration::from_secs(secs)
}
