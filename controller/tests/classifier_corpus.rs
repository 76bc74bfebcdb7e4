//! Measures the bounce classifier on sisimai's set of 629 real bounces (read from ../shared,
//! never copied here). For each recipient the failure is taken from the bounce as a receiver
//! would see it (DSN Status and Diagnostic-Code, or the first SMTP reply line in the text), then
//! classified with Sluice's default rules. Hard means bad-mailbox or bad-domain, which is what
//! sisimai's hardbounce flag marks (userunknown, hostunknown, hasmoved, notaccept).

use std::path::Path;

use regex::Regex;
use sluice_controller::bounce::classify;

/// sisimai reason -> Sluice category.
fn category_of(reason: &str) -> Option<&'static str> {
    Some(match reason {
        "userunknown" | "hasmoved" => "bad-mailbox",
        "hostunknown" | "notaccept" => "bad-domain",
        "mailboxfull" | "exceedlimit" | "systemfull" => "quota-issues",
        "suspend" => "inactive-mailbox",
        "blocked" | "spamdetected" | "badreputation" => "spam-related",
        "virusdetected" => "virus-related",
        "contenterror" | "mesgtoobig" | "notcompliantrfc" => "content-related",
        "filtered" | "policyviolation" | "securityerror" | "requireptr" | "speeding"
        | "toomanyconn" => "policy-related",
        "rejected" | "authfailure" => "invalid-sender",
        "norelaying" => "relaying-issues",
        "networkerror" => "routing-errors",
        "syntaxerror" => "protocol-errors",
        "expired" => "message-expired",
        "systemerror" | "mailererror" | "undefined" | "onhold" | "vacation" => "other",
        _ => return None,
    })
}

/// Header-style lines with continuations joined (not across blank lines).
fn unfolded(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        if (l.starts_with(' ') || l.starts_with('\t'))
            && lines.last().is_some_and(|p| !p.trim().is_empty())
        {
            let last = lines.last_mut().unwrap();
            last.push(' ');
            last.push_str(l.trim());
        } else {
            lines.push(l.to_string());
        }
    }
    lines
}

/// One (code, enhanced status, text) per recipient when a bounce reports several: the
/// per-recipient blocks of a DSN (RFC 3464), or the `<address>:` paragraphs that qmail and
/// others write. Empty when there is at most one.
fn per_recipient(text: &str) -> Vec<(u16, String, String)> {
    let lines = unfolded(text);
    let status_re = Regex::new(r"(?i)^status:\s*([245]\.\d{1,3}\.\d{1,3})").unwrap();
    let diag_re = Regex::new(r"(?i)^diagnostic-code:\s*[^;]*;\s*(.*)$").unwrap();
    let reply_re = Regex::new(r"\b([245]\d\d)[ -]+(?:#?([245]\.\d{1,3}\.\d{1,3})\b)?").unwrap();
    let addr_re = Regex::new(r"^\s*<?[^\s<>@]+@[^\s<>]+>?:").unwrap();
    let mut blocks: Vec<(String, String)> = Vec::new();
    for l in &lines {
        if l.to_ascii_lowercase().starts_with("final-recipient:") {
            blocks.push((String::new(), String::new()));
        } else if let Some(b) = blocks.last_mut() {
            if let Some(c) = status_re.captures(l) {
                b.0 = c[1].to_string();
            } else if let Some(c) = diag_re.captures(l) {
                b.1 = c[1].trim().to_string();
            }
        }
    }
    if blocks.len() < 2 {
        // Paragraphs that start with the address they are about, each with a reply.
        blocks.clear();
        for l in &lines {
            let lower = l.to_ascii_lowercase();
            if lower.contains("original message follows")
                || lower
                    .trim_start_matches(['-', ' '])
                    .starts_with("original message")
                || lower.contains("below this line is a copy")
                || lower.contains("unsent message")
            {
                break;
            }
            if addr_re.is_match(l) {
                blocks.push((String::new(), l.clone()));
            } else if let Some(b) = blocks.last_mut()
                && !l.trim().is_empty()
            {
                b.1.push(' ');
                b.1.push_str(l.trim());
            }
        }
        blocks.retain(|b| reply_re.is_match(&b.1));
    }
    if blocks.len() < 2 {
        return Vec::new();
    }
    blocks
        .into_iter()
        .map(|(status, diag)| {
            let caps = reply_re.captures(&diag);
            let code = caps
                .as_ref()
                .and_then(|c| c[1].parse().ok())
                .unwrap_or(if status.starts_with('4') { 450 } else { 550 });
            // The remote's own reply outranks the Status the reporting MTA wrote.
            let enhanced = caps
                .and_then(|c| c.get(2))
                .map(|m| m.as_str().to_string())
                .unwrap_or(status);
            (code, enhanced, diag)
        })
        .collect()
}

/// (code, enhanced status, diagnostic text, whether the reply came after DATA) as found in a
/// bounce.
fn failure_of(text: &str) -> (u16, String, String, bool) {
    let lines = unfolded(text);
    let status_re = Regex::new(r"(?i)^status:\s*([245]\.\d{1,3}\.\d{1,3})").unwrap();
    let diag_re = Regex::new(r"(?i)^diagnostic-code:\s*[^;]*;\s*(.*)$").unwrap();
    let reply_re = Regex::new(r"\b([245]\d\d)[ -]+(?:#?([245]\.\d{1,3}\.\d{1,3})\b)?").unwrap();
    let status = lines
        .iter()
        .find_map(|l| status_re.captures(l).map(|c| c[1].to_string()))
        .unwrap_or_default();
    let diag = lines
        .iter()
        .find_map(|l| diag_re.captures(l).map(|c| c[1].trim().to_string()));
    let (diag, code_from_text) = match diag {
        Some(d) => {
            let code = reply_re.captures(&d).and_then(|c| c[1].parse().ok());
            (d, code)
        }
        None => {
            // No DSN part: the human-readable text of the bounce, without its header and
            // without the returned original message.
            let body_start = lines.iter().position(|l| l.trim().is_empty()).unwrap_or(0);
            let mut human = Vec::new();
            for l in &lines[body_start..] {
                let t = l.trim();
                let lower = t.to_ascii_lowercase();
                if lower.contains("original message follows")
                    || lower
                        .trim_start_matches(['-', ' '])
                        .starts_with("original message")
                    || lower.contains("below this line is a copy")
                    || lower.contains("unsent message follows")
                    || lower.contains("message header follows")
                    || lower.starts_with("content-type: message/rfc822")
                    || lower.contains("this is a copy of")
                    || lower.starts_with("------ this is a copy")
                {
                    break;
                }
                if lower.starts_with("received:")
                    || lower.starts_with("x-received:")
                    || lower.starts_with("content-")
                    || t.starts_with("--")
                {
                    continue;
                }
                human.push(t.to_string());
            }
            // The bounce's own Subject often names the failure ("Host unknown").
            let subject = lines[..body_start]
                .iter()
                .find_map(|l| l.strip_prefix("Subject:"))
                .unwrap_or("");
            human.push(subject.trim().to_string());
            let text = human.join(" ");
            let code = human
                .iter()
                .find_map(|l| reply_re.captures(l).and_then(|c| c[1].parse().ok()));
            (text, code)
        }
    };
    let code = code_from_text.unwrap_or(match status.chars().next() {
        Some('4') => 450,
        Some('2') => 250,
        _ => 550,
    });
    // The remote's own reply outranks the Status the reporting MTA wrote: it is what a
    // worker sees.
    let qmail_re = Regex::new(r"\(#([245]\.\d{1,3}\.\d{1,3})\)").unwrap();
    let enhanced = reply_re
        .captures(&diag)
        .and_then(|c| c.get(2))
        .or_else(|| qmail_re.captures(&diag).and_then(|c| c.get(1)))
        .map(|m| m.as_str().to_string())
        .unwrap_or(status);
    (code, enhanced, diag, after_data(text))
}

/// Whether the failing reply answered DATA or the end of data: Postfix's "in reply to end of
/// DATA command", Exim's "after end of data", or a sendmail transcript where the first
/// failing `<<<` line follows `>>> DATA`.
fn after_data(text: &str) -> bool {
    if Regex::new(r"(?i)in reply to (end of )?data|after (end of )?data\b")
        .unwrap()
        .is_match(text)
    {
        return true;
    }
    // Sendmail pipelines RCPT and DATA: replies after `>>> DATA` that end with "503 Need
    // RCPT" answer the RCPTs. Only a lone failing reply answers DATA itself.
    let lines: Vec<&str> = text.lines().map(str::trim_start).collect();
    if let Some(at) = lines
        .iter()
        .rposition(|l| l.eq_ignore_ascii_case(">>> DATA"))
    {
        let replies: Vec<&&str> = lines[at + 1..]
            .iter()
            .take_while(|l| !l.starts_with(">>> "))
            .filter(|l| l.starts_with("<<< "))
            .collect();
        return replies.len() == 1
            && (replies[0].starts_with("<<< 5") || replies[0].starts_with("<<< 4"));
    }
    false
}

#[test]
fn classifier_agreement_on_sisimai_bounces() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/bounces/sisimai-set-of-emails");
    if !root.is_dir() {
        eprintln!(
            "SKIPPED: the shared corpus is not at {} (a public clone has none)",
            root.display()
        );
        return;
    }
    let labels = root.join("expected.json");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&labels).unwrap_or_else(|e| panic!("{}: {e}", labels.display())),
    )
    .unwrap();
    let mut missing = Vec::new();
    let (mut total, mut hard_ok, mut cat_ok) = (0u32, 0u32, 0u32);
    // Per file: every labelled recipient in it agrees.
    let (mut files, mut files_hard_ok, mut files_cat_ok) = (0u32, 0u32, 0u32);
    for (file, recipients) in expected.as_object().unwrap() {
        if file.starts_with('_') {
            continue;
        }
        let Ok(bytes) = std::fs::read(root.join("maildir/bsd").join(file)) else {
            missing.push(file.clone());
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let (code, enhanced, diag, after_data) = failure_of(&text);
        let whole = classify(None, code, &enhanced, &diag, after_data);
        let each = per_recipient(&text);
        let (mut labelled, mut file_hard, mut file_cat) = (false, true, true);
        for (i, r) in recipients.as_array().unwrap().iter().enumerate() {
            let (category, diag) = match each.get(i) {
                Some((c, e, d)) => (classify(None, *c, e, d, after_data), d.clone()),
                None => (whole.clone(), diag.clone()),
            };
            let hard = matches!(category.as_str(), "bad-mailbox" | "bad-domain");
            let reason = r[2].as_str().unwrap_or("");
            let Some(want) = category_of(reason) else {
                continue;
            };
            total += 1;
            labelled = true;
            if hard == (r[3].as_i64() == Some(1)) {
                hard_ok += 1;
            } else {
                file_hard = false;
            }
            if category == want {
                cat_ok += 1;
            } else {
                file_cat = false;
            }
            if category != want && std::env::var("SLUICE_CLASSIFIER_DEBUG").is_ok() {
                println!(
                    "MISS {reason} -> {category} (want {want}) | {code} {enhanced} | {} | {file}",
                    diag.chars().take(140).collect::<String>()
                );
            }
        }
        if labelled {
            files += 1;
            files_hard_ok += file_hard as u32;
            files_cat_ok += file_cat as u32;
        }
    }
    let hard_share = 100.0 * hard_ok as f64 / total as f64;
    let cat_share = 100.0 * cat_ok as f64 / total as f64;
    println!(
        "sisimai set: {total} recipients; hard/soft agrees on {hard_share:.1}%, category on {cat_share:.1}%"
    );
    println!(
        "sisimai set: {files} files; hard/soft agrees on {:.1}%, category on {:.1}%",
        100.0 * files_hard_ok as f64 / files as f64,
        100.0 * files_cat_ok as f64 / files as f64
    );
    assert!(
        missing.is_empty(),
        "{} labelled files are missing from {}: {:?}",
        missing.len(),
        root.display(),
        &missing[..missing.len().min(10)]
    );
    assert!(total > 500, "only {total} labelled recipients were found");
    // Floors at the measured figures, so that a rule change that makes things worse fails.
    assert!(
        hard_share >= FLOOR_HARD,
        "hard/soft agreement fell to {hard_share:.1}%"
    );
    assert!(
        cat_share >= FLOOR_CATEGORY,
        "category agreement fell to {cat_share:.1}%"
    );
}

const FLOOR_HARD: f64 = 90.0;
const FLOOR_CATEGORY: f64 = 60.0;
