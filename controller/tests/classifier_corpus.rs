//! Measures the asynchronous bounce parser (`sluice_controller::inbound`) on sisimai's set of
//! 629 real bounces, and the feedback-report parser on the ARF samples (read from ../shared,
//! never copied here). For each recipient the failure is taken from the bounce as a receiver
//! would see it (DSN Status and Diagnostic-Code, or the first SMTP reply line in the text), then
//! classified with Sluice's default rules. Hard means bad-mailbox or bad-domain, which is what
//! sisimai's hardbounce flag marks (userunknown, hostunknown, hasmoved, notaccept).

use std::path::{Path, PathBuf};

use sluice_controller::inbound::{parse_bounce, parse_complaint};

fn corpus(rel: &str) -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/corpus")
        .join(rel);
    if root.is_dir() {
        Some(root)
    } else {
        eprintln!(
            "SKIPPED: the shared corpus is not at {} (a public clone has none)",
            root.display()
        );
        None
    }
}

/// Looks like one address: something@domain.tld.
fn is_address(a: &str) -> bool {
    a.split_once('@')
        .is_some_and(|(l, d)| !l.is_empty() && d.contains('.') && !d.contains('@'))
}

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

#[test]
fn classifier_agreement_on_sisimai_bounces() {
    let Some(root) = corpus("bounces/sisimai-set-of-emails") else {
        return;
    };
    let labels = root.join("expected.json");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&labels).unwrap_or_else(|e| panic!("{}: {e}", labels.display())),
    )
    .unwrap();
    let mut missing = Vec::new();
    let (mut total, mut hard_ok, mut cat_ok, mut recovered) = (0u32, 0u32, 0u32, 0u32);
    // Per file: every labelled recipient in it agrees.
    let (mut files, mut files_hard_ok, mut files_cat_ok) = (0u32, 0u32, 0u32);
    let (mut read_as_bounce, mut read_files) = (0u32, 0u32);
    let (mut auto_replies, mut auto_replies_read) = (0u32, 0u32);
    for (file, recipients) in expected.as_object().unwrap() {
        if file.starts_with('_') {
            continue;
        }
        let Ok(bytes) = std::fs::read(root.join("maildir/bsd").join(file)) else {
            missing.push(file.clone());
            continue;
        };
        let bounce = parse_bounce(&bytes, None);
        // A report whose blocks all say `delayed` is a remote status (an `rs` row), not a
        // failure; sisimai labels those too. They count here as soft, with no category.
        let statuses: Vec<_> = bounce
            .statuses
            .iter()
            .map(|s| sluice_controller::inbound::BouncedRecipient {
                address: s.address.clone(),
                code: 0,
                enhanced: s.status.clone(),
                diagnostic: s.diagnostic.clone(),
                category: String::new(),
            })
            .collect();
        let each = if bounce.recipients.is_empty() {
            &statuses
        } else {
            &bounce.recipients
        };
        let (mut labelled, mut file_hard, mut file_cat) = (false, true, true);
        // What a <bounce-processor> takes as a bounce (else deliver-unmatched-email decides).
        let named =
            bounce.recipients.iter().any(|r| is_address(&r.address)) || !bounce.statuses.is_empty();
        let read = bounce.evidence && named;
        for (i, r) in recipients.as_array().unwrap().iter().enumerate() {
            // A report with fewer recipient blocks than labels: the whole report's failure.
            let Some(got) = each.get(i).or(each.first()) else {
                continue;
            };
            let (category, diag) = (got.category.clone(), got.diagnostic.clone());
            let (code, enhanced) = (got.code, got.enhanced.clone());
            let hard = got.hard();
            let reason = r[2].as_str().unwrap_or("");
            let Some(want) = category_of(reason) else {
                continue;
            };
            total += 1;
            labelled = true;
            // Recovered: the report names this recipient (its own block, or the one recipient).
            let named = each.get(i).is_some_and(|g| is_address(&g.address));
            recovered += named as u32;
            if !named && std::env::var("SLUICE_CLASSIFIER_DEBUG").is_ok() {
                println!(
                    "NO RECIPIENT {i} in {file}: {:?}",
                    each.iter().map(|g| &g.address).collect::<Vec<_>>()
                );
            }
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
        // Auto-replies (RFC 3834) are labelled too; they are no bounces.
        let auto_reply = recipients
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r[2] == "vacation");
        if auto_reply {
            auto_replies += 1;
            auto_replies_read += read as u32;
        } else if labelled {
            read_files += 1;
            read_as_bounce += read as u32;
            if !read && std::env::var("SLUICE_CLASSIFIER_DEBUG").is_ok() {
                println!("NOT READ AS A BOUNCE {file}");
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
    let recovered_share = 100.0 * recovered as f64 / total as f64;
    let read_share = 100.0 * read_as_bounce as f64 / read_files as f64;
    println!(
        "| sisimai bounces | recipients | read as a bounce | recipient recovered | hard/soft agrees | category agrees |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {files} files | {total} | {read_share:.1}% | {recovered_share:.1}% | {hard_share:.1}% | {cat_share:.1}% |"
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
    println!("auto-replies (RFC 3834): {auto_replies}, read as a bounce: {auto_replies_read}");
    assert_eq!(auto_replies_read, 0, "an auto-reply was read as a bounce");
    assert!(
        read_share >= FLOOR_READ,
        "only {read_share:.1}% of the bounces read as bounces"
    );
    // Floors at the measured figures, so that a rule change that makes things worse fails.
    assert!(
        hard_share >= FLOOR_HARD,
        "hard/soft agreement fell to {hard_share:.1}%"
    );
    assert!(
        cat_share >= FLOOR_CATEGORY,
        "category agreement fell to {cat_share:.1}%"
    );
    assert!(
        recovered_share >= FLOOR_RECOVERED,
        "recipient recovery fell to {recovered_share:.1}%"
    );
}

/// The report names no recipient: no recipient field, and the returned message's To is
/// redacted.
fn redacted(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    ![
        "original-rcpt-to:",
        "removal-recipient:",
        "x-hmxmroriginalrecipient:",
    ]
    .iter()
    .any(|f| lower.contains(f))
        && lower
            .lines()
            .filter(|l| l.starts_with("to:"))
            .skip(1)
            .all(|l| l.contains("undisclosed"))
}

/// Every ARF sample parses, with its feedback type, and the complaining recipient recovered.
#[test]
fn every_feedback_report_parses_with_its_recipient() {
    let Some(arf) = corpus("arf") else {
        return;
    };
    let sisimai: serde_json::Value = corpus("bounces/sisimai-set-of-emails")
        .and_then(|r| std::fs::read_to_string(r.join("expected.json")).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in ["kumomta-rfc5965", "mail-auth/resources/arf", "sisimai"] {
        let mut v: Vec<PathBuf> = std::fs::read_dir(arf.join(dir))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "eml"));
        v.sort();
        files.extend(v);
    }
    assert!(files.len() >= 20, "only {} ARF samples", files.len());
    let (mut parsed, mut with_rcpt, mut type_ok, mut typed) = (0, 0, 0, 0);
    // Reports that name no recipient anywhere (the RFC 5965 examples write
    // `To: <Undisclosed Recipients>` and no Original-Rcpt-To).
    let mut redacted_reports: Vec<String> = Vec::new();
    let mut failures = Vec::new();
    println!("| ARF sample | feedback type | recipient | reporting MTA | source IP |");
    println!("|---|---|---|---|---|");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let Some(c) = parse_complaint(&std::fs::read(f).unwrap()) else {
            failures.push(format!("{name}: not parsed"));
            continue;
        };
        parsed += 1;
        println!(
            "| {name} | {} | {} | {} | {} |",
            c.feedback_type, c.recipient, c.reporting_mta, c.source_ip
        );
        if is_address(&c.recipient) {
            with_rcpt += 1;
        } else if redacted(&std::fs::read_to_string(f).unwrap_or_default()) {
            redacted_reports.push(name.clone());
        } else {
            failures.push(format!("{name}: no recipient"));
        }
        // The expected feedback type: sisimai's labels, or mail-auth's JSON beside the sample.
        let want = sisimai[name.as_str()][0][4]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                std::fs::read_to_string(f.with_extension("json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["feedback_type"].as_str().map(str::to_string))
            });
        if let Some(w) = want {
            typed += 1;
            if w.replace(['-', '_'], "")
                .eq_ignore_ascii_case(&c.feedback_type.replace(['-', '_'], ""))
            {
                type_ok += 1;
            } else {
                failures.push(format!("{name}: type {} (want {w})", c.feedback_type));
            }
        }
    }
    println!(
        "ARF: {} samples, {parsed} parsed, {with_rcpt} with the recipient, {} that name none \
         ({redacted_reports:?}), feedback type right in {type_ok} of {typed} labelled",
        files.len(),
        redacted_reports.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

const FLOOR_HARD: f64 = 90.0;
const FLOOR_READ: f64 = 95.0;
const FLOOR_CATEGORY: f64 = 59.0;
const FLOOR_RECOVERED: f64 = 95.0;
