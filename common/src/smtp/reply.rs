//! SMTP replies (RFC 5321 section 4.2) with enhanced status codes (RFC 3463), as a client
//! reads them from a receiving server: input from strangers.

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
}
