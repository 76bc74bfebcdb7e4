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

/// (code, enhanced status, diagnostic text) as found in a bounce.
fn failure_of(text: &str) -> (u16, String, String) {
    let mut lines: Vec<String> = Vec::new();
    for l in text.lines() {
        if (l.starts_with(' ') || l.starts_with('\t')) && !lines.is_empty() {
            let last = lines.last_mut().unwrap();
            last.push(' ');
            last.push_str(l.trim());
        } else {
            lines.push(l.to_string());
        }
    }
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
                if lower.contains("original message")
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
    let enhanced = if status.is_empty() {
        reply_re
            .captures(&diag)
            .and_then(|c| c.get(2))
            .map(|m| m.as_str().to_string())
            .unwrap_or_default()
    } else {
        status
    };
    (code, enhanced, diag)
}

#[test]
fn classifier_agreement_on_sisimai_bounces() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus/bounces/sisimai-set-of-emails");
    assert!(
        root.is_dir(),
        "the shared corpus is expected at {}",
        root.display()
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("expected.json")).unwrap())
            .unwrap();
    let (mut total, mut hard_ok, mut cat_ok) = (0u32, 0u32, 0u32);
    for (file, recipients) in expected.as_object().unwrap() {
        if file.starts_with('_') {
            continue;
        }
        let Ok(bytes) = std::fs::read(root.join("maildir/bsd").join(file)) else {
            continue;
        };
        let text = String::from_utf8_lossy(&bytes);
        let (code, enhanced, diag) = failure_of(&text);
        let category = classify(None, code, &enhanced, &diag);
        let hard = matches!(category.as_str(), "bad-mailbox" | "bad-domain");
        for r in recipients.as_array().unwrap() {
            let reason = r[2].as_str().unwrap_or("");
            let Some(want) = category_of(reason) else {
                continue;
            };
            total += 1;
            if hard == (r[3].as_i64() == Some(1)) {
                hard_ok += 1;
            }
            if category == want {
                cat_ok += 1;
            } else if std::env::var("SLUICE_CLASSIFIER_DEBUG").is_ok() {
                println!(
                    "MISS {reason} -> {category} (want {want}) | {code} {enhanced} | {}",
                    diag.chars().take(140).collect::<String>()
                );
            }
        }
    }
    let hard_share = 100.0 * hard_ok as f64 / total as f64;
    let cat_share = 100.0 * cat_ok as f64 / total as f64;
    println!(
        "sisimai set: {total} recipients; hard/soft agrees on {hard_share:.1}%, category on {cat_share:.1}%"
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

const FLOOR_HARD: f64 = 78.0;
const FLOOR_CATEGORY: f64 = 48.0;
