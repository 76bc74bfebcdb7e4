//! The PowerMTA-compatible policy language: lexing, a typed model, validation and resolution.

pub mod diag;
pub mod explain;
pub mod lexer;
pub mod lint;
pub mod model;
mod parse;
pub mod resolve;
pub mod secrets;
pub mod value;

use std::path::Path;

pub use diag::{Diagnostic, PolicyError, Severity};
pub use model::*;
pub use parse::{LoadOptions, known_directives};
pub use resolve::Target;

/// A policy that loaded, with the warnings an operator should see.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub policy: Policy,
    pub warnings: Vec<Diagnostic>,
}

/// Reads and validates a policy file and its includes.
pub fn load(path: &Path, opts: LoadOptions) -> Result<Loaded, PolicyError> {
    let mut diags = diag::Diagnostics::default();
    let items = lexer::read_tree(path, &mut diags);
    finish(items, path, diags, opts)
}

/// The lint's warnings for a policy file (see [`lint`]); problems that stop the file from
/// loading are [`load`]'s to report, not repeated here.
pub fn lint_file(path: &Path, opts: &lint::LintOptions) -> Vec<Diagnostic> {
    let mut read = diag::Diagnostics::default();
    let items = lexer::read_tree(path, &mut read);
    let mut opts = opts.clone();
    opts.partial |= read
        .items
        .iter()
        .any(|d| d.message.starts_with("cannot include"));
    let mut diags = diag::Diagnostics::default();
    lint::lint(&items, &opts, &mut diags);
    diags
        .items
        .sort_by(|a, b| (&a.loc.file, a.loc.line).cmp(&(&b.loc.file, b.loc.line)));
    diags.items
}

/// Validates policy text as if it had been read from `path` (includes resolve relative to it).
pub fn load_str(path: &Path, text: &str, opts: LoadOptions) -> Result<Loaded, PolicyError> {
    let mut diags = diag::Diagnostics::default();
    let items = lexer::lex_text(path, text, &mut diags);
    finish(items, path, diags, opts)
}

fn finish(
    items: Vec<lexer::Item>,
    path: &Path,
    mut diags: diag::Diagnostics,
    opts: LoadOptions,
) -> Result<Loaded, PolicyError> {
    let base = path.parent().unwrap_or(Path::new("."));
    let mut policy = parse::build(&items, base, &mut diags, opts);
    if diags.has_errors() {
        return Err(PolicyError {
            diagnostics: diags.errors().cloned().collect(),
            warnings: diags.warnings().cloned().collect(),
        });
    }
    policy.finish();
    Ok(Loaded {
        policy,
        warnings: diags.warnings().cloned().collect(),
    })
}

impl Policy {
    /// A policy as the controller serves it (JSON), with its lookup tables rebuilt.
    pub fn from_served_json(json: &str) -> Result<Policy, String> {
        let mut p: Policy = serde_json::from_str(json)
            .map_err(|e| format!("bad policy from the controller: {e}"))?;
        p.finish();
        Ok(p)
    }

    /// One line per kind of thing defined, for `sluice config check`.
    pub fn summary(&self) -> String {
        format!(
            "{} listeners, {} sources, {} smtp-users, {} virtual-mtas, {} pools, {} domain rules, {} smtp-pattern-lists, {} bounce-category patterns, {} acct-files",
            self.listeners.len(),
            self.sources.len(),
            self.smtp_users.len(),
            self.vmtas.len(),
            self.pools.len(),
            self.domains.len() + self.vmtas.values().map(|v| v.domains.len()).sum::<usize>(),
            self.smtp_pattern_lists.len(),
            self.bounce_patterns.len(),
            self.acct_files.len(),
        )
    }
}

#[cfg(test)]
mod tests;
