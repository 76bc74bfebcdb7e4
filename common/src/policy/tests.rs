use std::net::IpAddr;
use std::path::Path;

use super::*;

fn parse(text: &str) -> Result<Loaded, PolicyError> {
    load_str(
        Path::new("test.conf"),
        text,
        LoadOptions { read_files: false },
    )
}

fn errors(text: &str) -> Vec<String> {
    match parse(text) {
        Ok(_) => Vec::new(),
        Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
    }
}

const BASE: &str = r#"
smtp-listener 0/0:25
domain-macro big a.test,b.test,
   c.test
<virtual-mta v1>
    smtp-source-host 127.0.0.11 v1.example.com
    <domain gmail.test>
        max-smtp-out 2
    </domain>
</virtual-mta>
<virtual-mta v2>
    smtp-source-host 127.0.0.12 v2.example.com
</virtual-mta>
<virtual-mta-pool p>
    virtual-mta v1
    virtual-mta v2
</virtual-mta-pool>
<source 0/0>
    smtp-service yes
</source>
<source 10.0.0.0/8>
    always-allow-relaying yes
</source>
<source 10.1.0.0/16>
    always-allow-relaying no
    default-virtual-mta p
</source>
<domain *>
    max-smtp-out 20
    retry-after 10m,20m
</domain>
<domain *.example.test>
    max-smtp-out 7
</domain>
<domain *.test>
    max-smtp-out 5
</domain>
<domain gmail.test>
    max-smtp-out 10
    max-msg-rate 100/h
    queue-to gmail.rollup
</domain>
<domain $big>
    max-smtp-out 3
</domain>
"#;

#[test]
fn source_is_the_most_specific_cidr() {
    let p = parse(BASE).unwrap().policy;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        p.source_for_ip(ip("10.1.2.3")).always_allow_relaying,
        Some(false)
    );
    assert_eq!(
        p.source_for_ip(ip("10.1.2.3"))
            .default_virtual_mta
            .as_deref(),
        Some("p")
    );
    assert_eq!(
        p.source_for_ip(ip("10.2.2.3")).always_allow_relaying,
        Some(true)
    );
    assert_eq!(p.source_for_ip(ip("192.0.2.1")).smtp_service, Some(true));
    assert_eq!(
        p.source_for_ip(ip("::ffff:10.2.0.1")).always_allow_relaying,
        Some(true)
    );
}

#[test]
fn domain_rule_order() {
    let p = parse(BASE).unwrap().policy;
    // exact beats wildcard
    assert_eq!(p.domain_settings("gmail.test", None).max_smtp_out, Some(10));
    // longest wildcard wins
    assert_eq!(
        p.domain_settings("a.example.test", None).max_smtp_out,
        Some(7)
    );
    assert_eq!(p.domain_settings("other.test", None).max_smtp_out, Some(5));
    // wildcard beats macro; a macro domain outside any wildcard uses the macro
    assert_eq!(p.domain_settings("a.test", None).max_smtp_out, Some(5));
    // `*` for the rest, and unset values fall back to `*` then built-in defaults
    let s = p.domain_settings("example.com", None);
    assert_eq!(s.max_smtp_out, Some(20));
    assert_eq!(
        p.domain_settings("gmail.test", None)
            .retry_after
            .unwrap()
            .0
            .len(),
        2
    );
    assert!(s.bounce_after.is_some());
    // per-VMTA override on top
    assert_eq!(
        p.domain_settings("gmail.test", Some("v1")).max_smtp_out,
        Some(2)
    );
    assert_eq!(
        p.domain_settings("gmail.test", Some("v1"))
            .max_msg_rate
            .unwrap()
            .count,
        100
    );
    assert_eq!(
        p.domain_settings("gmail.test", Some("v2")).max_smtp_out,
        Some(10)
    );
}

#[test]
fn macro_matches_when_no_wildcard_does() {
    let text = "domain-macro m x.example,y.example\n<domain $m>\nmax-smtp-out 3\n</domain>\n";
    let p = parse(text).unwrap().policy;
    assert_eq!(p.domain_settings("y.example", None).max_smtp_out, Some(3));
    assert_eq!(p.domain_settings("z.example", None).max_smtp_out, Some(20));
}

#[test]
fn queue_names_follow_rollups() {
    let p = parse(BASE).unwrap().policy;
    assert_eq!(p.queue_name("GMAIL.test"), "gmail.rollup");
    assert_eq!(p.queue_name("other.test"), "other.test");
}

#[test]
fn targets_and_pattern_routing() {
    let text = format!(
        "{BASE}\n<pattern-list r>\n mail-from /@news\\.example$/ virtual-mta=v2\n rcpt-to /^abuse@/ virtual-mta=p\n</pattern-list>\n"
    );
    let p = parse(&text).unwrap().policy;
    assert!(matches!(p.target("p"), Some(Target::Pool(_))));
    assert!(matches!(p.target("v1"), Some(Target::Vmta(_))));
    assert_eq!(
        p.route_by_pattern_list("r", "a@news.example", "x@y.test"),
        Some("v2")
    );
    assert_eq!(
        p.route_by_pattern_list("r", "a@b.example", "abuse@y.test"),
        Some("p")
    );
    assert_eq!(
        p.route_by_pattern_list("r", "a@b.example", "x@y.test"),
        None
    );
}

#[test]
fn unknown_directive_suggests_the_closest_name() {
    let e = errors("<domain *>\nmax-smtp-outt 3\n</domain>\n");
    assert_eq!(
        e,
        vec![
            "test.conf:2: unknown directive `max-smtp-outt` in <domain> (did you mean `max-smtp-out`?)"
        ]
    );
}

#[test]
fn directive_in_the_wrong_block() {
    let e = errors("<source 0/0>\nmax-msg-rate 10/h\n</source>\n");
    assert_eq!(
        e,
        vec!["test.conf:2: `max-msg-rate` is not allowed in <source>; it belongs in <domain>"]
    );
}

#[test]
fn bad_values_name_what_was_expected() {
    let e = errors("<domain *>\nmax-msg-rate lots\nbounce-after soon\n</domain>\n");
    assert_eq!(e.len(), 2);
    assert!(
        e[0].starts_with("test.conf:2: bad value for `max-msg-rate`: expected a rate"),
        "{e:?}"
    );
    assert!(
        e[1].starts_with("test.conf:3: bad value for `bounce-after`"),
        "{e:?}"
    );
}

#[test]
fn duplicates_are_errors() {
    let e = errors("<domain *>\nmax-smtp-out 1\nmax-smtp-out 2\n</domain>\n");
    assert_eq!(
        e,
        vec!["test.conf:3: `max-smtp-out` is given twice in this block; only one is allowed"]
    );
}

#[test]
fn undefined_references() {
    let e = errors(
        "<source 0/0>\ndefault-virtual-mta nope\n</source>\n<domain $m>\nsmtp-pattern-list pl\n</domain>\n<smtp-user u>\npassword x\nsource {s}\n</smtp-user>\n",
    );
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(
        e.iter()
            .any(|m| m.contains("`nope` is not a defined virtual-mta"))
    );
    assert!(
        e.iter()
            .any(|m| m.contains("`$m` is not a defined domain-macro"))
    );
    assert!(
        e.iter()
            .any(|m| m.contains("`smtp-pattern-list pl` is not defined"))
    );
    assert!(e.iter().any(|m| m.contains("`source {s}` refers to no")));
}

#[test]
fn pattern_actions_are_checked() {
    let e = errors(
        "<smtp-pattern-list l>\nreply /x/ mode=backoff,mode=normal\nreply /y/ reenable-after=1h\nreply /z/ skip-mx,skip-mx\nreply /w/ mode=bakoff\nreply /(unclosed/ mode=backoff\n</smtp-pattern-list>\n",
    );
    assert_eq!(e.len(), 5, "{e:?}");
    assert!(e[0].contains("cannot be combined"));
    assert!(e[1].contains("needs `disable-source-ip`"));
    assert!(e[2].contains("given twice"));
    assert!(e[3].contains("did you mean `mode=backoff`"));
    assert!(e[4].contains("does not compile"));
}

#[test]
fn regex_split_across_lines_names_both_lines() {
    let e = errors(
        "<bounce-category-patterns>\n/(user|mailbox) (is \n+)?disabled/ inactive-mailbox\n/quota/ quota-issues\n</bounce-category-patterns>\n",
    );
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("test.conf:2:") && e[0].contains("no closing `/`"));
    assert!(
        e[1].starts_with("test.conf:3:") && e[1].contains("continues the regex begun on line 2")
    );
}

#[test]
fn all_errors_in_one_pass() {
    let e =
        errors("bogus-directive 1\n<domain *>\nmax-smtp-out x\n</domain>\n<widget>\n</widget>\n");
    assert_eq!(e.len(), 3, "{e:?}");
}

#[test]
fn unacted_directives_warn_once() {
    let l = parse("log-file /var/log/pmta/log\n<source 0/0>\nlog-commands yes\n</source>\n<source 10.0.0.0/8>\nlog-commands yes\n</source>\n").unwrap();
    let w: Vec<String> = l.warnings.iter().map(|d| d.to_string()).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("`log-file`: Sluice logs to standard error"),
        "{w:?}"
    );
    assert!(w[1].contains("`log-commands` is parsed but Sluice does not act on it yet"));
}

#[test]
fn processor_address_lists() {
    let l = parse(
        "<bounce-processor>\ndeliver-unmatched-email yes\n<address-list>\ndomain bounces.example.com\n\
         address fbl@example.com\naddress /^rb-[0-9]+@example\\.net$/\n</address-list>\n</bounce-processor>\n",
    )
    .unwrap();
    assert!(l.warnings.is_empty(), "{:?}", l.warnings);
    let p = &l.policy;
    let kind = |a: &str| p.report_processor(a).map(|(k, _)| k);
    assert_eq!(kind("anything@Bounces.Example.com"), Some("bounce"));
    assert_eq!(kind("fbl@example.com"), Some("bounce"));
    // A literal address also takes its VERP forms.
    assert_eq!(kind("fbl+joe=d.test@example.com"), Some("bounce"));
    assert_eq!(kind("rb-42@example.net"), Some("bounce"));
    assert_eq!(kind("rb-x@example.net"), None);
    // Patterns are anchored: a look-alike in another domain is not the processor's.
    assert_eq!(kind("rb-42@example.net.evil.test"), None);
    assert_eq!(kind("xrb-42@example.net"), None);
    assert_eq!(kind("fblx@example.com"), None);
    assert_eq!(kind("other@example.com"), None);
    let e = parse("<bounce-processor>\n<address-list>\naddress /a(/\naddress nobody\n</address-list>\n</bounce-processor>\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("test.conf:3:") && e.contains("does not compile"),
        "{e}"
    );
    assert!(
        e.contains("test.conf:4:") && e.contains("user@domain or /REGEX/"),
        "{e}"
    );
}

#[test]
fn what_sluice_cannot_honour_is_warned_with_its_line() {
    let l = parse(
        "<domain a.test>\nmax-msg-per-connection 0\n</domain>\n\
         <acct-file acct.csv>\nrecords d,f,rb\nrecord-fields d rcpt,srcUser,dlvTlsCipher\nsync no\n\
         map-header-to-field d X-Campaign jobId\n</acct-file>\n",
    )
    .unwrap();
    let w: Vec<String> = l.warnings.iter().map(|d| d.to_string()).collect();
    let has = |line: u32, text: &str| {
        w.iter()
            .any(|x| x.starts_with(&format!("test.conf:{line}:")) && x.contains(text))
    };
    assert!(has(2, "never closes a connection"), "{w:?}");
    // `f` and `rb` rows are written now: no warning.
    assert!(!w.iter().any(|x| x.contains("records `")), "{w:?}");
    assert!(has(6, "`srcUser` is always empty"), "{w:?}");
    assert!(!w.iter().any(|x| x.contains("dlvTlsCipher")), "{w:?}");
    assert!(has(7, "always fsyncs"), "{w:?}");
    // Acted on: no warning.
    assert!(!w.iter().any(|x| x.contains("map-header")), "{w:?}");
}

#[test]
fn listeners_and_http_access() {
    let p = parse("smtp-listener 0/0:25\nsmtp-listener 127.0.0.1 2525\nsmtp-listener [::1]:587\nsmtp-listener 0/0 465 tls=yes\nhttp-access 10.0.0.0/8 admin\n").unwrap().policy;
    assert_eq!(p.listeners.len(), 4);
    assert_eq!(p.listeners[0].addr, None);
    assert_eq!(p.listeners[2].addr, Some("::1".parse().unwrap()));
    assert!(p.listeners[3].implicit_tls);
    assert_eq!(p.http_access[0].level, AccessLevel::Admin);
    let e = errors("smtp-listener IP1_ADDRESS 25\nhttp-access 1 monitor\n");
    assert_eq!(e.len(), 2, "{e:?}");
}

#[test]
fn dkim_keys_by_from_domain() {
    let p = parse("domain-key s1,*,/k/any.pem\n<virtual-mta v>\nsmtp-source-host 127.0.0.1 a.example\ndomain-key s2,example.com,/k/ex.pem\n</virtual-mta>\n").unwrap().policy;
    assert_eq!(p.dkim_key(Some("v"), "example.com").unwrap().selector, "s2");
    assert_eq!(p.dkim_key(Some("v"), "other.com").unwrap().selector, "s1");
    assert_eq!(p.dkim_key(None, "example.com").unwrap().selector, "s1");
}

#[test]
fn missing_key_file_is_an_error_when_files_are_read() {
    let e = load_str(
        Path::new("/nonexistent/t.conf"),
        "domain-key s,example.com,k.pem\n",
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot read the DKIM key `/nonexistent/k.pem`"),
        "{e}"
    );
}

#[test]
fn includes_resolve_relative_to_the_including_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("conf.d")).unwrap();
    std::fs::write(
        dir.path().join("conf.d/a.conf"),
        "<domain a.test>\nmax-smtp-out 4\n</domain>\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("conf.d/b.conf"),
        "<domain b.test>\nmax-smtp-outx 4\n</domain>\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("main.conf"), "include conf.d/*.conf\n").unwrap();
    let e = load(&dir.path().join("main.conf"), LoadOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("conf.d/b.conf:2: unknown directive `max-smtp-outx`"),
        "{msg}"
    );
}

#[test]
fn example_policy_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/sluice.conf");
    // Its DKIM key is made by `sluice up` on first run, so it is not read here.
    let l = load(&path, LoadOptions { read_files: false }).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(l.policy.queue_name("gmail.test"), "gmail.test");
    assert!(l.policy.dkim_key(Some("vmta-a"), "example.com").is_some());
}

#[test]
fn policy_round_trips_through_json() {
    let p = parse(BASE).unwrap().policy;
    let j = serde_json::to_string(&p).unwrap();
    let mut back: Policy = serde_json::from_str(&j).unwrap();
    back.finish();
    assert_eq!(
        back.domain_settings("gmail.test", Some("v1")).max_smtp_out,
        Some(2)
    );
}

#[test]
fn route_and_smtp_hosts_are_one_choice_made_by_the_most_specific_rule() {
    let p = parse(
        "<domain *>\nroute [127.0.0.1]:2525\n</domain>\n<domain h.test>\nsmtp-hosts [127.0.0.2]:25\n</domain>\n",
    )
    .unwrap()
    .policy;
    let h = p.domain_settings("h.test", None);
    assert!(h.route.is_none() && h.smtp_hosts.is_some(), "{h:?}");
    let other = p.domain_settings("x.test", None);
    assert!(other.route.is_some() && other.smtp_hosts.is_none());
}
