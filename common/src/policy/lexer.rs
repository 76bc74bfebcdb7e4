//! Turns a policy file and its includes into a tree of blocks and directives. Comments,
//! includes, quoting and continued lists are handled here; meaning is not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::diag::{Diagnostics, Loc};

#[derive(Debug, Clone)]
pub enum Item {
    Directive {
        name: String,
        value: String,
        loc: Loc,
    },
    Block {
        name: String,
        arg: String,
        loc: Loc,
        items: Vec<Item>,
    },
}

const MAX_INCLUDE_DEPTH: usize = 16;

/// A block whose header held a template placeholder: already reported, skipped by the parser.
pub const TEMPLATE_BLOCK: &str = "(template)";

/// Reads `path` and everything it includes.
pub fn read_tree(path: &Path, diags: &mut Diagnostics) -> Vec<Item> {
    let mut stack = Vec::new();
    match std::fs::read(path) {
        Ok(bytes) => lex_file(path, &String::from_utf8_lossy(&bytes), diags, &mut stack),
        Err(e) => {
            let loc = Loc {
                file: Arc::new(path.to_path_buf()),
                line: 0,
            };
            diags.error(&loc, format!("cannot read the policy file: {e}"));
            Vec::new()
        }
    }
}

/// Lexes text that came from `path` (used directly by tests and benchmarks).
pub fn lex_text(path: &Path, text: &str, diags: &mut Diagnostics) -> Vec<Item> {
    lex_file(path, text, diags, &mut Vec::new())
}

/// Strips a `#` comment, except inside double quotes.
fn strip_comment(line: &str) -> &str {
    let mut in_quote = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_quote = !in_quote,
            '#' if !in_quote => return &line[..i],
            _ => {}
        }
    }
    line
}

/// A `{{...}}` or `__NAME__` template placeholder left in a line, if any.
fn placeholder(raw: &str) -> Option<String> {
    let text = strip_comment(raw);
    if let Some(start) = raw.find("{{") {
        let end = raw[start..]
            .find("}}")
            .map(|e| start + e + 2)
            .unwrap_or(raw.len());
        return Some(raw[start..end].to_string());
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(off) = text[i..].find("__") {
        let start = i + off;
        let mut j = start + 2;
        while j < bytes.len()
            && (bytes[j].is_ascii_uppercase() || bytes[j].is_ascii_digit() || bytes[j] == b'_')
        {
            j += 1;
        }
        let word = &text[start..j];
        if word.len() > 4
            && word.ends_with("__")
            && word[2..word.len() - 2]
                .chars()
                .any(|c| c.is_ascii_uppercase())
        {
            return Some(word.to_string());
        }
        i = start + 2;
    }
    None
}

struct Open {
    name: String,
    arg: String,
    loc: Loc,
    items: Vec<Item>,
}

fn lex_file(
    path: &Path,
    text: &str,
    diags: &mut Diagnostics,
    include_stack: &mut Vec<PathBuf>,
) -> Vec<Item> {
    let file = Arc::new(path.to_path_buf());
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    include_stack.push(canon);
    let mut root: Vec<Item> = Vec::new();
    let mut open: Vec<Open> = Vec::new();
    let mut lines = text.lines().enumerate().peekable();
    while let Some((idx, raw)) = lines.next() {
        let loc = Loc {
            file: file.clone(),
            line: idx + 1,
        };
        if let Some(ph) = placeholder(raw) {
            diags.error(&loc, format!("template placeholder `{ph}` is not filled in; this file looks like a template that must be rendered before use"));
            // Keep block nesting intact so that one placeholder does not cascade into more errors.
            let t = raw.trim();
            if t.starts_with('<') && !t.starts_with("</") {
                open.push(Open {
                    name: TEMPLATE_BLOCK.into(),
                    arg: String::new(),
                    loc,
                    items: Vec::new(),
                });
            }
            continue;
        }
        let had_comment = raw.contains('#');
        let mut line = strip_comment(raw).trim().to_string();
        if line.is_empty() {
            continue;
        }
        // A list continued after a trailing comma (seen with domain-macro in real files).
        while line.ends_with(',') && !line.starts_with('<') {
            let Some((_, next)) = lines.peek() else { break };
            let next = strip_comment(next).trim();
            if next.is_empty() || next.starts_with('<') || next.contains(char::is_whitespace) {
                break;
            }
            line.push_str(next);
            lines.next();
        }
        if let Some(rest) = line.strip_prefix("</") {
            let Some(name) = rest.strip_suffix('>') else {
                diags.error(&loc, format!("`{line}` is missing its closing `>`"));
                continue;
            };
            let name = name.trim().to_ascii_lowercase();
            match open.pop() {
                Some(b) if b.name == TEMPLATE_BLOCK => {}
                Some(b) if b.name == name => {
                    let item = Item::Block {
                        name: b.name,
                        arg: b.arg,
                        loc: b.loc,
                        items: b.items,
                    };
                    push(&mut open, &mut root, item);
                }
                Some(b) => {
                    diags.error(
                        &loc,
                        format!(
                            "`</{name}>` closes a block, but the open block is `<{}>` from line {}",
                            b.name, b.loc.line
                        ),
                    );
                    // Keep the inner block open state consistent: treat it as closed.
                    let item = Item::Block {
                        name: b.name,
                        arg: b.arg,
                        loc: b.loc,
                        items: b.items,
                    };
                    push(&mut open, &mut root, item);
                    if let Some(pos) = open.iter().rposition(|o| o.name == name) {
                        while open.len() > pos + 1 {
                            let b = open.pop().unwrap();
                            push(
                                &mut open,
                                &mut root,
                                Item::Block {
                                    name: b.name,
                                    arg: b.arg,
                                    loc: b.loc,
                                    items: b.items,
                                },
                            );
                        }
                        let b = open.pop().unwrap();
                        push(
                            &mut open,
                            &mut root,
                            Item::Block {
                                name: b.name,
                                arg: b.arg,
                                loc: b.loc,
                                items: b.items,
                            },
                        );
                    }
                }
                None => diags.error(
                    &loc,
                    format!("`</{name}>` closes a block that was never opened"),
                ),
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix('<') {
            let Some(inner) = rest.strip_suffix('>') else {
                diags.error(
                    &loc,
                    format!("block header `{line}` is missing its closing `>`"),
                );
                continue;
            };
            let inner = inner.trim();
            let (name, arg) = match inner.split_once(char::is_whitespace) {
                Some((n, a)) => (n, a.trim()),
                None => (inner, ""),
            };
            open.push(Open {
                name: name.to_ascii_lowercase(),
                arg: arg.to_string(),
                loc,
                items: Vec::new(),
            });
            continue;
        }
        let (name, value) = match line.split_once(char::is_whitespace) {
            Some((n, v)) => (n.to_ascii_lowercase(), v.trim().to_string()),
            None => (line.to_ascii_lowercase(), String::new()),
        };
        if name == "include" {
            if value.is_empty() {
                diags.error(&loc, "`include` needs a path");
                continue;
            }
            let items = include(path, &value, &loc, diags, include_stack);
            for it in items {
                push(&mut open, &mut root, it);
            }
            continue;
        }
        if value.is_empty() && had_comment && !name.starts_with('/') {
            diags.error(
                &loc,
                format!("`{name}` has no value once the comment is removed (`#` starts a comment anywhere on a line)"),
            );
            continue;
        }
        push(&mut open, &mut root, Item::Directive { name, value, loc });
    }
    while let Some(b) = open.pop() {
        diags.error(
            &b.loc,
            format!(
                "`<{}>` is never closed (expected `</{}>` before the end of the file)",
                b.name, b.name
            ),
        );
        let item = Item::Block {
            name: b.name,
            arg: b.arg,
            loc: b.loc,
            items: b.items,
        };
        push(&mut open, &mut root, item);
    }
    include_stack.pop();
    root
}

fn push(open: &mut [Open], root: &mut Vec<Item>, item: Item) {
    match open.last_mut() {
        Some(b) => b.items.push(item),
        None => root.push(item),
    }
}

fn include(
    from: &Path,
    pattern: &str,
    loc: &Loc,
    diags: &mut Diagnostics,
    stack: &mut Vec<PathBuf>,
) -> Vec<Item> {
    let pattern = super::value::unquote(pattern);
    let base = from.parent().unwrap_or(Path::new("."));
    let full = if Path::new(pattern).is_absolute() {
        PathBuf::from(pattern)
    } else {
        base.join(pattern)
    };
    let full_str = full.to_string_lossy().to_string();
    let is_glob = pattern.contains(['*', '?', '[']);
    let mut paths: Vec<PathBuf> = Vec::new();
    if is_glob {
        match glob::glob(&full_str) {
            Ok(entries) => paths.extend(entries.flatten()),
            Err(e) => {
                diags.error(
                    loc,
                    format!("include pattern `{pattern}` is not a valid glob: {e}"),
                );
                return Vec::new();
            }
        }
        paths.sort();
        if paths.is_empty() {
            diags.error(
                loc,
                format!("include `{pattern}` matches no file (looked for {full_str})"),
            );
        }
    } else {
        paths.push(full.clone());
    }
    let mut out = Vec::new();
    for p in paths {
        if stack.len() >= MAX_INCLUDE_DEPTH {
            diags.error(
                loc,
                format!(
                    "includes nest deeper than {MAX_INCLUDE_DEPTH} levels at `{}`",
                    p.display()
                ),
            );
            continue;
        }
        let canon = p.canonicalize().unwrap_or_else(|_| p.clone());
        if stack.contains(&canon) {
            diags.error(
                loc,
                format!("`{}` includes itself (include loop)", p.display()),
            );
            continue;
        }
        match std::fs::read(&p) {
            Ok(bytes) => out.extend(lex_file(&p, &String::from_utf8_lossy(&bytes), diags, stack)),
            Err(e) => diags.error(loc, format!("cannot include `{}`: {e}", p.display())),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(text: &str) -> (Vec<Item>, Diagnostics) {
        let mut d = Diagnostics::default();
        let items = lex_text(Path::new("t.conf"), text, &mut d);
        (items, d)
    }

    #[test]
    fn comments_blocks_and_continuations() {
        let (items, d) = lex(
            "# top\nhost-name a.example # trailing\n<domain *>\n  max-smtp-out 5\n</domain>\ndomain-macro m a.test,\n   b.test\n",
        );
        assert!(!d.has_errors(), "{:?}", d.items);
        assert_eq!(items.len(), 3);
        match &items[2] {
            Item::Directive { name, value, .. } => assert_eq!(
                (name.as_str(), value.as_str()),
                ("domain-macro", "m a.test,b.test")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_value_after_comment_is_an_error() {
        let (_, d) = lex("http-access #YOUR_IP admin\n");
        let e: Vec<_> = d.errors().map(|e| e.to_string()).collect();
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("t.conf:1: `http-access` has no value"),
            "{e:?}"
        );
    }

    #[test]
    fn unbalanced_blocks() {
        let (_, d) = lex("<domain *>\nmax-smtp-out 1\n");
        assert!(d.errors().any(|e| {
            e.to_string()
                .contains("t.conf:1: `<domain>` is never closed")
        }));
        let (_, d) = lex("</source>\n");
        assert!(d.errors().any(|e| e.to_string().contains("never opened")));
        let (_, d) = lex("<source 0/0>\n</domain>\n");
        assert!(d.errors().any(|e| e.to_string().contains("t.conf:2:")));
    }

    #[test]
    fn missing_include_names_the_path() {
        let (_, d) = lex("include /nonexistent/sluice/x.conf\n");
        let e: Vec<_> = d.errors().map(|e| e.to_string()).collect();
        assert!(
            e[0].starts_with("t.conf:1: cannot include `/nonexistent/sluice/x.conf`"),
            "{e:?}"
        );
    }
}
