//! Value types of the policy language. Each parses from the raw text of a directive and says
//! what it expected when it cannot.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Parses a directive's raw value into a typed value.
pub trait PolicyValue: Sized {
    fn parse_value(raw: &str) -> Result<Self, String>;
}

impl PolicyValue for bool {
    fn parse_value(raw: &str) -> Result<Self, String> {
        match raw.to_ascii_lowercase().as_str() {
            "yes" | "true" | "on" | "1" => Ok(true),
            "no" | "false" | "off" | "0" => Ok(false),
            _ => Err(format!("expected yes/no/true/false, found `{raw}`")),
        }
    }
}

impl PolicyValue for u32 {
    fn parse_value(raw: &str) -> Result<Self, String> {
        raw.parse()
            .map_err(|_| format!("expected a whole number, found `{raw}`"))
    }
}

impl PolicyValue for u64 {
    fn parse_value(raw: &str) -> Result<Self, String> {
        raw.parse()
            .map_err(|_| format!("expected a whole number, found `{raw}`"))
    }
}

impl PolicyValue for String {
    fn parse_value(raw: &str) -> Result<Self, String> {
        Ok(unquote(raw).to_string())
    }
}

/// Removes one pair of surrounding double quotes, as in `password "secret"`.
pub fn unquote(raw: &str) -> &str {
    let t = raw.trim();
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        &t[1..t.len() - 1]
    } else {
        t
    }
}

/// A duration written as `30s`, `10m`, `4d12h`, `1h30m`; a bare number means seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PDuration(#[serde(with = "secs")] pub Duration);

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl PDuration {
    pub fn secs(&self) -> u64 {
        self.0.as_secs()
    }
}

impl PolicyValue for PDuration {
    fn parse_value(raw: &str) -> Result<Self, String> {
        parse_duration(raw).map(PDuration)
    }
}

fn unit_seconds(unit: &str) -> Option<u64> {
    Some(match unit {
        "s" | "sec" | "secs" | "second" | "seconds" => 1,
        "m" | "min" | "mins" | "minute" | "minutes" => 60,
        "h" | "hr" | "hour" | "hours" => 3600,
        "d" | "day" | "days" => 86_400,
        "w" | "week" | "weeks" => 604_800,
        _ => return None,
    })
}

pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    let s = unquote(raw).to_ascii_lowercase();
    let bad = || format!("expected a duration such as 30s, 10m, 4d12h, found `{raw}`");
    if s.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut rest = s.as_str();
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let mult = unit_seconds(unit).ok_or_else(bad)?;
        total = total
            .checked_add(n.checked_mul(mult).ok_or_else(bad)?)
            .ok_or_else(bad)?;
    }
    Ok(Duration::from_secs(total))
}

/// `never` or a duration (as in `delete-after never`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaybeNever {
    Never,
    After(PDuration),
}

impl PolicyValue for MaybeNever {
    fn parse_value(raw: &str) -> Result<Self, String> {
        if raw.eq_ignore_ascii_case("never") {
            Ok(MaybeNever::Never)
        } else {
            PDuration::parse_value(raw)
                .map(MaybeNever::After)
                .map_err(|e| format!("{e} or `never`"))
        }
    }
}

/// A size in bytes: `100M`, `10000K`, `2g`, `0`, or `unlimited` (None).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Size(pub Option<u64>);

impl PolicyValue for Size {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let s = unquote(raw).to_ascii_lowercase();
        if s == "unlimited" {
            return Ok(Size(None));
        }
        let bad =
            || format!("expected a size such as 100M, 10000K, 2G or unlimited, found `{raw}`");
        let (num, mult) = match s.chars().last() {
            Some('k') => (&s[..s.len() - 1], 1024u64),
            Some('m') => (&s[..s.len() - 1], 1024 * 1024),
            Some('g') => (&s[..s.len() - 1], 1024 * 1024 * 1024),
            Some('b') => (&s[..s.len() - 1], 1),
            _ => (s.as_str(), 1),
        };
        let n: u64 = num.trim().parse().map_err(|_| bad())?;
        n.checked_mul(mult).map(|v| Size(Some(v))).ok_or_else(bad)
    }
}

/// A rate `N/T`: `100/20m`, `1000/h`, `400/day`, `5/10s`, or `unlimited`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub count: u64,
    /// Window length in seconds; 0 means unlimited.
    pub per_secs: u64,
}

impl Rate {
    pub fn is_unlimited(&self) -> bool {
        self.per_secs == 0
    }
}

impl PolicyValue for Rate {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let s = unquote(raw).to_ascii_lowercase();
        if s == "unlimited" {
            return Ok(Rate {
                count: 0,
                per_secs: 0,
            });
        }
        let bad = || format!("expected a rate such as 100/h, 10/5m or 400/day, found `{raw}`");
        let (n, t) = s.split_once('/').ok_or_else(bad)?;
        let count: u64 = n.trim().parse().map_err(|_| bad())?;
        let t = t.trim();
        // `1000/h` has no number before the unit: it means one of that unit.
        let t = if t.starts_with(|c: char| c.is_ascii_digit()) {
            t.to_string()
        } else {
            format!("1{t}")
        };
        let per = parse_duration(&t).map_err(|_| bad())?;
        if per.as_secs() == 0 {
            return Err(bad());
        }
        Ok(Rate {
            count,
            per_secs: per.as_secs(),
        })
    }
}

/// A comma-separated list (`retry-after 10m,20m,1h`; spaces after commas allowed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct List<T>(pub Vec<T>);

impl<T: PolicyValue> PolicyValue for List<T> {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in raw.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(format!("empty item in the list `{raw}`"));
            }
            out.push(T::parse_value(part)?);
        }
        Ok(List(out))
    }
}

/// A CIDR; `0/0` is every address, and a bare address is a host route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr(pub IpNet);

impl PolicyValue for Cidr {
    fn parse_value(raw: &str) -> Result<Self, String> {
        parse_cidr(raw).map(Cidr)
    }
}

pub fn parse_cidr(raw: &str) -> Result<IpNet, String> {
    let s = raw.trim();
    if s == "0/0" {
        return Ok("0.0.0.0/0".parse().unwrap());
    }
    if s == "::/0" {
        return Ok("::/0".parse().unwrap());
    }
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "expected an IP address or CIDR such as 10.0.0.0/8 or 0/0, found `{raw}`"
    ))
}

/// A host and port: `[127.0.0.1]:2525`, `127.0.0.1:25`, `mx.example.com:25`, `[::1]:25`,
/// or `[IP] PORT` with a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    pub host: String,
    pub port: Option<u16>,
    /// Written in brackets or as a literal address: no MX lookup.
    pub literal: bool,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => write!(f, "{host}:{p}"),
            None => write!(f, "{host}"),
        }
    }
}

impl PolicyValue for HostPort {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let s = raw.trim();
        let bad = |why: &str| {
            format!("expected host[:port] such as [192.0.2.1]:25, found `{raw}` ({why})")
        };
        let (host, port_str, bracketed) = if let Some(rest) = s.strip_prefix('[') {
            let end = rest.find(']').ok_or_else(|| bad("no closing `]`"))?;
            let after = rest[end + 1..].trim();
            let port = after.strip_prefix(':').unwrap_or(after).trim();
            (
                &rest[..end],
                if port.is_empty() { None } else { Some(port) },
                true,
            )
        } else if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(HostPort {
                host: sa.ip().to_string(),
                port: Some(sa.port()),
                literal: true,
            });
        } else if s.parse::<IpAddr>().is_ok() {
            (s, None, true)
        } else if let Some((h, p)) = s.rsplit_once(':') {
            (h, Some(p), false)
        } else if let Some((h, p)) = s.split_once(char::is_whitespace) {
            (h, Some(p.trim()), false)
        } else {
            (s, None, false)
        };
        let port = match port_str {
            Some(p) => Some(p.parse::<u16>().map_err(|_| bad("bad port"))?),
            None => None,
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let literal = bracketed || host.parse::<IpAddr>().is_ok();
        if bracketed && host.parse::<IpAddr>().is_err() && !is_hostname(host) {
            return Err(bad("not an address"));
        }
        if !bracketed && !literal && !is_hostname(host) {
            return Err(bad("not a host name"));
        }
        Ok(HostPort {
            host: host.to_string(),
            port,
            literal,
        })
    }
}

pub fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                && !l.starts_with('-')
        })
}

/// An IP address.
impl PolicyValue for IpAddr {
    fn parse_value(raw: &str) -> Result<Self, String> {
        raw.trim()
            .parse()
            .map_err(|_| format!("expected an IP address, found `{raw}`"))
    }
}

/// A regex as written between slashes: `/.../` (case-insensitive unless `(?-i)`).
#[derive(Debug, Clone)]
pub struct PRegex {
    pub source: String,
    pub regex: regex::Regex,
}

impl PartialEq for PRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for PRegex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for PRegex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        PRegex::compile(&source).map_err(serde::de::Error::custom)
    }
}

impl PRegex {
    pub fn compile(source: &str) -> Result<Self, String> {
        let regex = regex::RegexBuilder::new(source)
            .case_insensitive(true)
            .size_limit(1 << 22)
            .build()
            .map_err(|e| {
                let msg = e.to_string();
                let last = msg.lines().last().unwrap_or("").trim().to_string();
                match pcre_hint(source) {
                    Some(hint) => format!("the regex /{source}/ does not compile: {last}; {hint}"),
                    None => format!("the regex /{source}/ does not compile: {last}"),
                }
            })?;
        Ok(PRegex {
            source: source.to_string(),
            regex,
        })
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.regex.is_match(text)
    }
}

/// The closest equivalent for PCRE syntax that Rust's `regex` leaves out (it has no
/// backtracking, which is what keeps a hostile reply from stalling a worker).
pub fn pcre_hint(source: &str) -> Option<&'static str> {
    const HINTS: &[(&str, &str)] = &[
        (
            "(?<=",
            "look-behind is PCRE only: match the preceding text as part of the pattern \
             (`/(?<=5\\.7\\.1 )blocked/` becomes `/5\\.7\\.1 blocked/`)",
        ),
        (
            "(?<!",
            "negative look-behind is PCRE only: put a rule for the exception first (the first \
             matching rule wins), then the general pattern without `(?<!...)`",
        ),
        (
            "(?=",
            "look-ahead is PCRE only: a reply matches anywhere in its text, so write the \
             looked-ahead text as plain pattern (`/user(?= unknown)/` becomes `/user unknown/`)",
        ),
        (
            "(?!",
            "negative look-ahead is PCRE only: put a rule for the exception first (the first \
             matching rule wins), then the general pattern without `(?!...)`",
        ),
        (
            "(?>",
            "atomic groups are PCRE only: write `(?:...)`; the two differ only where the \
             group would have to give characters back for the rest to match",
        ),
    ];
    if let Some((_, h)) = HINTS.iter().find(|(p, _)| source.contains(p)) {
        return Some(h);
    }
    let b = source.as_bytes();
    let backref = b
        .windows(2)
        .any(|w| w[0] == b'\\' && w[1].is_ascii_digit() && w[1] != b'0');
    if backref {
        return Some(
            "back-references (`\\1`) are PCRE only: spell the repeated text out, one rule per \
             alternative",
        );
    }
    None
}

/// Splits `/REGEX/ rest` into the regex body and the rest. The closing slash is the last
/// unescaped `/` followed by whitespace or the end of the line.
pub fn split_slashed(raw: &str) -> Result<(String, String), String> {
    let s = raw.trim_start();
    let Some(body) = s.strip_prefix('/') else {
        return Err(format!(
            "expected a regex between slashes, such as /4\\.7\\.1/, found `{raw}`"
        ));
    };
    let bytes = body.as_bytes();
    // The closing slash is the last unescaped one: actions and categories hold no slash.
    let mut close = None;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'/' => close = Some(i),
            _ => {}
        }
        i += 1;
    }
    let Some(end) = close else {
        return Err(format!(
            "the regex in `{raw}` has no closing `/` (a regex must stay on one line)"
        ));
    };
    // Operators escape slashes as `\/`; the regex crate accepts `\/` as a literal slash.
    Ok((body[..end].to_string(), body[end + 1..].trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(
            parse_duration("4d12h").unwrap().as_secs(),
            4 * 86400 + 12 * 3600
        );
        assert_eq!(parse_duration("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("{{retry}}").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(Size::parse_value("100M").unwrap(), Size(Some(100 << 20)));
        assert_eq!(
            Size::parse_value("10000K").unwrap(),
            Size(Some(10000 << 10))
        );
        assert_eq!(Size::parse_value("2g").unwrap(), Size(Some(2 << 30)));
        assert_eq!(Size::parse_value("0").unwrap(), Size(Some(0)));
        assert_eq!(Size::parse_value("unlimited").unwrap(), Size(None));
        assert!(Size::parse_value("lots").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse_value("5/10s").unwrap(),
            Rate {
                count: 5,
                per_secs: 10
            }
        );
        assert_eq!(
            Rate::parse_value("100/20m").unwrap(),
            Rate {
                count: 100,
                per_secs: 1200
            }
        );
        assert_eq!(
            Rate::parse_value("1000/h").unwrap(),
            Rate {
                count: 1000,
                per_secs: 3600
            }
        );
        assert_eq!(
            Rate::parse_value("400/day").unwrap(),
            Rate {
                count: 400,
                per_secs: 86400
            }
        );
        assert!(Rate::parse_value("unlimited").unwrap().is_unlimited());
        assert!(Rate::parse_value("100").is_err());
        assert!(Rate::parse_value("10/0s").is_err());
    }

    #[test]
    fn lists_and_bools() {
        let l = List::<PDuration>::parse_value("10m, 20m,1h").unwrap();
        assert_eq!(
            l.0.iter().map(|d| d.secs()).collect::<Vec<_>>(),
            vec![600, 1200, 3600]
        );
        assert!(List::<PDuration>::parse_value("10m,,1h").is_err());
        assert!(bool::parse_value("Yes").unwrap());
        assert!(!bool::parse_value("false").unwrap());
        assert!(bool::parse_value("maybe").is_err());
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("0/0").unwrap().prefix_len(), 0);
        assert_eq!(parse_cidr("10.1.0.0/16").unwrap().prefix_len(), 16);
        assert_eq!(parse_cidr("127.0.0.1").unwrap().prefix_len(), 32);
        assert_eq!(parse_cidr("::1").unwrap().prefix_len(), 128);
        assert!(parse_cidr("1").is_err());
        assert!(parse_cidr("#YOUR_IP").is_err());
    }

    #[test]
    fn host_ports() {
        let h = HostPort::parse_value("[127.0.0.1]:2525").unwrap();
        assert_eq!(
            (h.host.as_str(), h.port, h.literal),
            ("127.0.0.1", Some(2525), true)
        );
        let h = HostPort::parse_value("[127.0.0.1] 25025").unwrap();
        assert_eq!(h.port, Some(25025));
        let h = HostPort::parse_value("[::1]:25").unwrap();
        assert_eq!((h.host.as_str(), h.port), ("::1", Some(25)));
        let h = HostPort::parse_value("mx.example.com").unwrap();
        assert!(!h.literal);
        assert!(HostPort::parse_value("[127.0.0.1]:http").is_err());
        assert!(HostPort::parse_value("{{host}}").is_err());
    }

    #[test]
    fn regexes() {
        let (re, rest) = split_slashed(r"/^421 .* too\/many/ mode=backoff").unwrap();
        assert_eq!(re, r"^421 .* too\/many");
        assert_eq!(rest, "mode=backoff");
        let r = PRegex::compile(&re).unwrap();
        assert!(r.is_match("421 4.7.0 TOO/MANY connections"));
        assert!(split_slashed("/unterminated (user").is_err());
        assert!(PRegex::compile("(user|mailbox").is_err());
        let (re, rest) = split_slashed("// other").unwrap();
        assert_eq!((re.as_str(), rest.as_str()), ("", "other"));
    }
}
