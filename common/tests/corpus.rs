//! The policy parser against 22 real PowerMTA files (read from ../shared, never copied here).
//! Clean files must load; broken ones must fail with an error that names the real problem.

use std::path::{Path, PathBuf};

use sluice_common::policy::{self, LoadOptions};

/// The corpus folder, or None (with a note) in a clone that does not have `../shared`.
fn corpus() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/pmta-configs");
    if !p.is_dir() {
        eprintln!(
            "SKIPPED: the shared corpus is not at {} (a public clone has none)",
            p.display()
        );
        return None;
    }
    Some(p)
}

/// (file, None = loads cleanly, Some(text that one error must contain)).
const EXPECTED: &[(&str, Option<&str>)] = &[
    ("SparkPost__bouncy-sink__etc_pmta_config.conf", None),
    (
        "macrob__pmta-clibuild__pmta_conf.d_mx-rollup-list.conf",
        None,
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_smtp-pattern-list-blocking-errors.conf",
        None,
    ),
    (
        "Baby5664__PMTA4.5__conf_config.conf",
        Some(":451: bad value for `smtp-source-host`: `yourip` is not an IP address"),
    ),
    (
        "EvanHenrs__PowerMTA__config.conf",
        Some(":110: the regex in `/(user|mailbox"),
    ),
    (
        "EvanHenrs__PowerMTA__config.conf",
        Some(":111: this line continues the regex begun on line 110"),
    ),
    (
        "EvanHenrs__PowerMTA__config.conf",
        Some(":223: bad value for `smtp-source-host`: `YourIP` is not an IP address"),
    ),
    ("Kira41__pmta__config.conf", Some(":742: the regex in")),
    (
        "awab-hassan__06-powerMTA-DEVOPS__config-file.txt.conf",
        Some(":73: `http-access` has no value once the comment is removed"),
    ),
    (
        "joedavid1688__pmta-zhanqun__conf_config.conf",
        Some(":4: template placeholder `__HTTP_PORT__` is not filled in"),
    ),
    (
        "joedavid1688__pmta-zhanqun__conf_config.conf",
        Some(":73: template placeholder `__POOL_ENTRIES__`"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_bounce-category-patterns.conf",
        Some(":45: the regex in"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_domains.conf",
        Some(":10: `smtp-pattern-list blocking-errors` is not defined"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_mailer-backoff-vmtas.conf",
        Some(":4: template placeholder `{{#each ips}}`"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_mailer-main-vmtas.conf",
        Some(":22: cannot include `/etc/pmta/dkimlist.txt`"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_smtp-users.conf",
        Some(":10: `masspool` is not a defined virtual-mta or virtual-mta-pool"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_source.conf",
        Some(":1: template placeholder `{{sourceIp}}`"),
    ),
    (
        "macrob__pmta-clibuild__pmta_conf.d_virtual-mta.conf",
        Some(":12: template placeholder `{{ips.0.ip}}`"),
    ),
    (
        "macrob__pmta-clibuild__pmta_config.conf",
        Some(":9: cannot include `/etc/pmta/conf.d/mailer-main-vmtas.conf`"),
    ),
    (
        "macrob__pmta-clibuild__powerMTA_patch_etc_pmta_config.conf",
        Some(":53: cannot include `/etc/pmta/virtualhost.txt`"),
    ),
    (
        "macrob__pmta-clibuild__powerMTA_patch_etc_pmta_config.conf",
        Some(":848: `records` is given twice"),
    ),
    (
        "tuck1s__sparkypmtatracking__etc_pmta_config.example.conf",
        Some(":57: `password` has no value once the comment is removed"),
    ),
    (
        "tuck1s__sparkypmtatracking__etc_pmta_config.example.conf",
        Some(":100: `api-key` has no value"),
    ),
    (
        "viniciusklaos__Vesta-Version-Control__pmta.conf",
        Some(":12: `bounce-upon-no-mx` is given twice"),
    ),
    (
        "will383842__cold_email-engine__backup-source_pmta-config-20260216.conf",
        Some(":244: unknown bounce category `invalid-mailbox` (did you mean `bad-mailbox`?)"),
    ),
    (
        "will383842__cold_email-engine__backup-source_pmta-config-20260216.conf",
        Some(":65: `pmta-vmta0` is not a defined virtual-mta"),
    ),
    (
        "will383842__cold_email-engine__powermta_config.conf",
        Some(":32: unknown directive `bounce-classification-file` at the top level"),
    ),
    (
        "will383842__cold_email-engine__powermta_config.conf",
        Some(":35: unknown directive `routing-file` at the top level"),
    ),
    (
        "will383842__cold_email-engine__powermta_config.conf",
        Some("unknown directive `domain-selection` in <virtual-mta-pool>"),
    ),
    (
        "will383842__email_sos-expat_transactionnel__pmta_config.conf",
        Some(":257: unknown bounce category `invalid-mailbox`"),
    ),
];

#[test]
fn every_corpus_file_has_its_expected_outcome() {
    let Some(dir) = corpus() else {
        return;
    };
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".conf"))
        .collect();
    files.sort();
    assert_eq!(
        files.len(),
        22,
        "the corpus should hold 22 configuration files"
    );
    let mut failures = Vec::new();
    for f in &files {
        let expectations: Vec<_> = EXPECTED.iter().filter(|(n, _)| n == f).collect();
        assert!(
            !expectations.is_empty(),
            "no expected outcome recorded for {f}"
        );
        let result = policy::load(&dir.join(f), LoadOptions { read_files: false });
        for (_, want) in expectations {
            match (&result, want) {
                (Ok(_), None) => {}
                (Err(e), None) => failures.push(format!("{f} should load but failed:\n{e}")),
                (Ok(_), Some(w)) => failures.push(format!("{f} should fail with `{w}` but loaded")),
                (Err(e), Some(w)) => {
                    let text = e.to_string();
                    if !text.lines().any(|l| l.contains(w)) {
                        failures.push(format!(
                            "{f}: no error contains `{w}`; errors were:\n{text}"
                        ));
                    }
                    // Every error names the file and a line.
                    for d in &e.diagnostics {
                        assert!(
                            d.loc.line > 0 || d.message.contains("defined more than once"),
                            "{d} has no line"
                        );
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn every_directive_seen_in_two_configs_is_known() {
    let Some(dir) = corpus() else {
        return;
    };
    let freq = dir.join("DIRECTIVE_FREQUENCY.txt");
    let text = std::fs::read_to_string(&freq).unwrap_or_else(|e| panic!("{}: {e}", freq.display()));
    let known = policy::known_directives();
    let mut missing = Vec::new();
    let mut in_directives = false;
    for line in text.lines() {
        if line.starts_with("## Directives") {
            in_directives = true;
            continue;
        }
        if !in_directives || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        let Some(configs) = cols
            .first()
            .and_then(|c| c.split('/').next())
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if configs < 2 || cols[2].starts_with('(') {
            continue;
        }
        let name = cols[2];
        let scopes = cols.last().unwrap();
        for scope in scopes.split(',') {
            let scope = scope.split(':').next().unwrap();
            if !known.iter().any(|(s, n)| *s == scope && *n == name) {
                missing.push(format!("{name} in {scope}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "directives not known to the parser: {missing:?}"
    );
}

#[test]
fn the_reference_page_directives_are_known() {
    let known = policy::known_directives();
    let names: Vec<&str> = known.iter().map(|(_, n)| *n).collect();
    for d in [
        "smtp-listener",
        "postmaster",
        "host-name",
        "http-mgmt-port",
        "http-access",
        "log-file",
        "run-as-root",
        "process-user",
        "spool",
        "sync-msg-create",
        "sync-msg-update",
        "domain-macro",
        "domain-key",
        "relay-domain",
        "total-max-smtp-out",
        "total-max-smtp-in",
        "smtp-server-tls-certificate",
        "bounce-after",
        "retry-after",
        "always-allow-relaying",
        "smtp-service",
        "process-x-virtual-mta",
        "default-virtual-mta",
        "allow-unencrypted-plain-auth",
        "hide-message-source",
        "log-connections",
        "log-commands",
        "log-data",
        "require-auth",
        "add-received-header",
        "remove-received-headers",
        "max-message-size",
        "allow-starttls",
        "require-starttls",
        "add-message-id-header",
        "process-x-job",
        "jobid-header",
        "retain-x-job",
        "process-x-envid",
        "verp-default",
        "retain-x-virtual-mta",
        "pattern-list",
        "source-group",
        "smtp-max-auth-failure-rate",
        "require-starttls-before-auth",
        "remove-header",
        "password",
        "source",
        "authentication-method",
        "smtp-source-host",
        "max-smtp-out",
        "virtual-mta",
        "max-msg-rate",
        "max-msg-per-connection",
        "max-errors-per-connection",
        "max-connect-rate",
        "max-rcpt-per-message",
        "bounce-upon-no-mx",
        "use-starttls",
        "dkim-sign",
        "dkim-identity",
        "dk-sign",
        "smtp-pattern-list",
        "backoff-max-msg-rate",
        "backoff-retry-after",
        "backoff-max-smtp-out",
        "backoff-to-normal-after",
        "backoff-to-normal-after-delivery",
        "backoff-notify",
        "backoff-reroute-to-virtual-mta",
        "smtp-greeting-timeout",
        "connect-timeout",
        "data-send-timeout",
        "assume-delivery-upon-data-termination-timeout",
        "smtp-421-means-mx-unavailable",
        "smtp-553-means-invalid-mailbox",
        "bounce-upon-5xx-greeting",
        "queue-to",
        "route",
        "smtp-hosts",
        "max-cold-virtual-mta-msg",
        "queue-priority",
        "type",
        "ignore-8bitmime",
        "ignore-chunking",
        "reuse-ssl-session",
        "mx-connection-attempts",
        "records",
        "record-fields",
        "map-header-to-field",
        "move-interval",
        "max-size",
        "delete-after",
        "sync",
        "deliver-matched-email",
        "deliver-unmatched-email",
        "reply",
        "include",
    ] {
        assert!(
            names.contains(&d),
            "`{d}` from the reference page is not known"
        );
    }
}

/// `sluice config check`'s lint over every real configuration: a table of which warnings fire
/// where, and the ones an operator reading these files would expect.
#[test]
fn the_lint_names_the_classic_mistakes_in_real_configs() {
    let Some(dir) = corpus() else {
        return;
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .collect();
    files.sort();
    let mut all = Vec::new();
    for f in &files {
        let ws = policy::lint_file(f, &policy::lint::LintOptions::default());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        println!("{name}: {} warning(s)", ws.len());
        for w in &ws {
            assert!(w.loc.line > 0, "{w} has no line");
            let short = w.message.split(':').next().unwrap_or("");
            println!("  :{} {short}", w.loc.line);
            all.push(format!("{name}:{}: {}", w.loc.line, w.message));
        }
    }
    for want in EXPECTED_LINT {
        assert!(
            all.iter().any(|w| w.contains(want)),
            "no lint warning contains `{want}`"
        );
    }
}

/// Warnings that must fire on the corpus (read by hand from the files).
const EXPECTED_LINT: &[&str] = &[
    "Baby5664__PMTA4.5__conf_config.conf:278: `<domain comcast.net>` is written twice",
    "Baby5664__PMTA4.5__conf_config.conf:456: pool `pmta-pool` has one member",
    "joedavid1688__pmta-zhanqun__conf_config.conf:12: `max-smtp-out 500` is far above",
    "macrob__pmta-clibuild__pmta_conf.d_mx-rollup-list.conf:119: backoff settings here never apply: this domain has no `smtp-pattern-list`",
    "viniciusklaos__Vesta-Version-Control__pmta.conf:315: `<domain *>` is written twice",
    "will383842__cold_email-engine__powermta_config.conf:387: pool `pool-trans` has one member",
];
