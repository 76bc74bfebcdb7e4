//! Diagnostics: every problem in a policy file, with the file and line it comes from.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

/// Where a directive or block was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Loc {
    #[serde(serialize_with = "ser_path")]
    pub file: Arc<PathBuf>,
    pub line: usize,
}

fn ser_path<S: serde::Serializer>(p: &Arc<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.display().to_string())
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub loc: Loc,
    pub severity: Severity,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.severity {
            Severity::Error => write!(f, "{}: {}", self.loc, self.message),
            Severity::Warning => write!(f, "{}: warning: {}", self.loc, self.message),
        }
    }
}

/// Collects every diagnostic of one pass, so that an operator sees all problems at once.
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn error(&mut self, loc: &Loc, message: impl Into<String>) {
        self.items.push(Diagnostic {
            loc: loc.clone(),
            severity: Severity::Error,
            message: message.into(),
        });
    }

    pub fn warning(&mut self, loc: &Loc, message: impl Into<String>) {
        self.items.push(Diagnostic {
            loc: loc.clone(),
            severity: Severity::Warning,
            message: message.into(),
        });
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter().filter(|d| d.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Warning)
    }
}

/// The error returned when a policy does not load: all of its error diagnostics.
#[derive(Debug, Clone)]
pub struct PolicyError {
    pub diagnostics: Vec<Diagnostic>,
    /// Warnings found beside the errors.
    pub warnings: Vec<Diagnostic>,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyError {}

/// The closest known name to a misspelt one, when it is close enough to be a likely typo.
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(&str, usize)> = None;
    for k in known {
        let d = edit_distance(name, k);
        if best.is_none_or(|(_, bd)| d < bd) {
            best = Some((k, d));
        }
    }
    let (k, d) = best?;
    let limit = (name.len().max(k.len()) / 3).max(2);
    (d <= limit).then_some(k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let known = ["max-smtp-out", "max-msg-rate", "retry-after"];
        assert_eq!(closest("max-smtp-outt", known), Some("max-smtp-out"));
        assert_eq!(closest("retry-afte", known), Some("retry-after"));
        assert_eq!(closest("routing-file", known), None);
    }
}
