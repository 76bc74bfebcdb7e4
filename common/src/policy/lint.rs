//! `sluice config check`'s lint: the classic PowerMTA configuration mistakes, each reported at
//! its `file:line` with a fix. It reads the lexed tree, not the model, so it also runs on a file
//! that does not load (most real configurations have both errors and mistakes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use super::diag::{Diagnostics, Loc};
use super::lexer::Item;
use super::value::{parse_cidr, parse_duration, unquote};

/// Above this (ten times PowerMTA's default of 20), `max-smtp-out` asks for more connections
/// to one destination than receivers accept from one sender; a worker holds 5000 at most.
pub const MAX_SMTP_OUT_SANE: u64 = 200;
/// Longer than this, a message waits past what senders and receivers find useful.
pub const BOUNCE_AFTER_SANE: Duration = Duration::from_secs(7 * 86400);

/// What the lint knows besides the file.
#[derive(Debug, Default, Clone)]
pub struct LintOptions {
    /// Source IPs the cluster's workers own (from their settings files); `None` skips the
    /// check that every VMTA's source IP has a worker.
    pub worker_source_ips: Option<BTreeSet<IpAddr>>,
    /// Some includes could not be read: checks that need the whole policy are skipped.
    pub partial: bool,
}

/// The settings of one `<domain>` block that the lint compares.
#[derive(Default, Clone)]
struct DomainFacts {
    retry_after: Option<(Duration, Loc)>,
    bounce_after: Option<(Duration, Loc)>,
    pattern_list: Option<String>,
    backoff: Option<Loc>,
}

impl DomainFacts {
    fn read(items: &[Item]) -> DomainFacts {
        let mut f = DomainFacts::default();
        for it in items {
            let Item::Directive { name, value, loc } = it else {
                continue;
            };
            match name.as_str() {
                "retry-after" => {
                    let first = value.split(',').next().unwrap_or("").trim();
                    if let Ok(d) = parse_duration(first) {
                        f.retry_after = Some((d, loc.clone()));
                    }
                }
                "bounce-after" => {
                    if let Ok(d) = parse_duration(value.trim()) {
                        f.bounce_after = Some((d, loc.clone()));
                    }
                }
                "smtp-pattern-list" => f.pattern_list = Some(unquote(value.trim()).to_string()),
                n if n.starts_with("backoff-") && f.backoff.is_none() => {
                    f.backoff = Some(loc.clone())
                }
                _ => {}
            }
        }
        f
    }

    /// This block's facts, with what it does not say taken from `<domain *>`.
    fn over(&self, default: &DomainFacts) -> DomainFacts {
        DomainFacts {
            retry_after: self.retry_after.clone().or(default.retry_after.clone()),
            bounce_after: self.bounce_after.clone().or(default.bounce_after.clone()),
            pattern_list: self.pattern_list.clone().or(default.pattern_list.clone()),
            backoff: self.backoff.clone(),
        }
    }
}

/// Adds a warning for each mistake found in `items` (a whole policy tree, includes expanded).
pub fn lint(items: &[Item], opts: &LintOptions, diags: &mut Diagnostics) {
    lint_directives(items, diags);
    let first_loc = items.iter().map(item_loc).next();
    // Pattern lists that can put a queue in backoff.
    let mut backoff_lists = BTreeSet::new();
    let mut lists = BTreeSet::new();
    for it in items {
        if let Item::Block {
            name, arg, items, ..
        } = it
            && name == "smtp-pattern-list"
        {
            lists.insert(arg.to_ascii_lowercase());
            let triggers = items.iter().any(|i| {
                matches!(i, Item::Directive { name, value, .. }
                    if name == "reply" && value.to_ascii_lowercase().contains("mode=backoff"))
            });
            if triggers {
                backoff_lists.insert(arg.to_ascii_lowercase());
            }
        }
    }

    let top_domains: Vec<(&str, &Loc, &[Item])> = domain_blocks(items);
    // What a block inherits, as `Policy::domain_settings` resolves it: a VMTA's own block,
    // its `<domain *>`, the top-level block for the domain, the top-level `<domain *>`, then
    // top-level `retry-after` and `bounce-after`.
    let mut top_level = DomainFacts::read(items);
    top_level.pattern_list = None;
    top_level.backoff = None;
    // The block for a name: the same name, else the longest `*.suffix` that covers it, as
    // the resolver picks (domain macros are not followed here).
    let facts_of = |blocks: &[(&str, &Loc, &[Item])], arg: &str| {
        let arg = arg.to_ascii_lowercase();
        let exact = blocks.iter().find(|(a, _, _)| a.eq_ignore_ascii_case(&arg));
        let wildcard = || {
            blocks
                .iter()
                .filter_map(|b| {
                    let suffix = b.0.strip_prefix("*.")?.to_ascii_lowercase();
                    arg.ends_with(&format!(".{suffix}"))
                        .then_some((suffix.len(), b))
                })
                .max_by_key(|(n, _)| *n)
                .map(|(_, b)| b)
        };
        exact
            .or_else(wildcard)
            .map(|(_, _, items)| DomainFacts::read(items))
            .unwrap_or_default()
    };
    if let (Some((r, rloc)), Some((b, _))) = (&top_level.retry_after, &top_level.bounce_after)
        && r > b
    {
        diags.warning(
            rloc,
            format!(
                "`retry-after {}` is longer than `bounce-after {}`: a deferred message bounces \
                 before its first retry; fix: make retry-after shorter than bounce-after",
                human(*r),
                human(*b)
            ),
        );
    }
    let global_star = facts_of(&top_domains, "*").over(&top_level);
    let inherit_top = |arg: &str| {
        if arg == "*" {
            top_level.clone()
        } else {
            global_star.clone()
        }
    };
    // Only a main file (one with a listener) needs it; a conf.d fragment gets it elsewhere.
    let main_file = items
        .iter()
        .any(|i| matches!(i, Item::Directive { name, .. } if name == "smtp-listener"));
    if main_file
        && !opts.partial
        && !top_domains.iter().any(|(arg, _, _)| *arg == "*")
        && let Some(loc) = &first_loc
    {
        diags.warning(
            loc,
            "no `<domain *>` block: destinations without a rule of their own get Sluice's \
             built-in defaults; fix: add `<domain *>` with your max-smtp-out, max-msg-rate, \
             retry-after and bounce-after",
        );
    }
    check_domains(&top_domains, &inherit_top, &backoff_lists, &lists, diags);

    for it in items {
        let Item::Block {
            name,
            arg,
            loc,
            items,
        } = it
        else {
            if let Item::Directive { name, value, loc } = it
                && name == "run-as-root"
                && is_yes(value)
            {
                diags.warning(
                    loc,
                    "`run-as-root yes` keeps every node running as root, so a flaw in SMTP \
                     parsing hands over the host; fix: remove it and set `process-user` \
                     (the node binds its ports first, then drops to that user)",
                );
            }
            continue;
        };
        match name.as_str() {
            "virtual-mta" => {
                let own = domain_blocks(items);
                let vmta_star = facts_of(&own, "*");
                let inherit = |a: &str| {
                    if a == "*" {
                        global_star.clone()
                    } else {
                        vmta_star
                            .over(&facts_of(&top_domains, a))
                            .over(&global_star)
                    }
                };
                check_domains(&own, &inherit, &backoff_lists, &lists, diags);
                check_source_owner(arg, loc, items, opts, diags);
            }
            "virtual-mta-pool" => {
                let members: Vec<&Loc> = items
                    .iter()
                    .filter_map(|i| match i {
                        Item::Directive { name, loc, .. } if name == "virtual-mta" => Some(loc),
                        _ => None,
                    })
                    .collect();
                if members.len() == 1 {
                    diags.warning(
                        loc,
                        format!(
                            "pool `{arg}` has one member, so it spreads nothing and fails over \
                             to nothing; fix: add a second `virtual-mta`, or send to the VMTA \
                             by name"
                        ),
                    );
                }
                let own = domain_blocks(items);
                check_domains(&own, &inherit_top, &backoff_lists, &lists, diags);
            }
            "source" => {
                let open = parse_cidr(arg).is_ok_and(|c| c.prefix_len() == 0);
                let relays = items.iter().find_map(|i| match i {
                    Item::Directive { name, value, loc }
                        if name == "always-allow-relaying" && is_yes(value) =>
                    {
                        Some(loc)
                    }
                    _ => None,
                });
                if open && let Some(at) = relays {
                    diags.warning(
                        at,
                        format!(
                            "`<source {arg}>` with `always-allow-relaying yes` is an open relay: \
                             anyone who reaches the listener sends mail through your IPs; fix: \
                             allow relaying only for your injectors' addresses, or require \
                             `smtp-user` authentication"
                        ),
                    );
                }
            }
            _ => {}
        }
    }
}

fn check_domains(
    blocks: &[(&str, &Loc, &[Item])],
    inherit: &dyn Fn(&str) -> DomainFacts,
    backoff_lists: &BTreeSet<String>,
    lists: &BTreeSet<String>,
    diags: &mut Diagnostics,
) {
    let mut seen: BTreeMap<String, &Loc> = BTreeMap::new();
    for (arg, loc, items) in blocks {
        let key = arg.to_ascii_lowercase();
        if let Some(first) = seen.get(&key) {
            diags.warning(
                loc,
                format!(
                    "`<domain {arg}>` is written twice in this scope (first at {first}); the \
                     first block wins, so this one's settings are silently ignored; fix: merge \
                     the two blocks"
                ),
            );
        } else {
            seen.insert(key, loc);
        }
        let own = DomainFacts::read(items);
        let f = own.over(&inherit(arg));
        if let Some((b, bloc)) = &own.bounce_after
            && *b > BOUNCE_AFTER_SANE
        {
            diags.warning(
                bloc,
                format!(
                    "`bounce-after {}` keeps mail for more than 7 days: the sender learns of the \
                     failure too late to act, and receivers treat week-old mail as spam; fix: \
                     4d to 5d is usual",
                    human(*b)
                ),
            );
        }
        // Reported where the retry-after is written. A block that only shortens bounce-after
        // below an inherited retry-after means "do not retry" (fast-failing typo domains).
        if let (Some((r, rloc)), Some((b, _))) = (&f.retry_after, &f.bounce_after)
            && r > b
            && (own.retry_after.is_some() || (*arg == "*" && own.bounce_after.is_some()))
        {
            diags.warning(
                rloc,
                format!(
                    "`retry-after {}` is longer than `bounce-after {}`: a deferred message \
                     bounces before its first retry; fix: make retry-after shorter than \
                     bounce-after",
                    human(*r),
                    human(*b)
                ),
            );
        }
        if let Some(bloc) = &own.backoff {
            let triggered = f
                .pattern_list
                .as_ref()
                .is_some_and(|l| backoff_lists.contains(&l.to_ascii_lowercase()));
            if !triggered {
                let why = match &f.pattern_list {
                    None => Some("this domain has no `smtp-pattern-list`".to_string()),
                    // Defined in another file (a conf.d fragment), or an error `load` reports.
                    Some(l) if !lists.contains(&l.to_ascii_lowercase()) => None,
                    Some(l) => Some(format!(
                        "its smtp-pattern-list `{l}` has no `mode=backoff` reply"
                    )),
                };
                if let Some(why) = why {
                    diags.warning(
                        bloc,
                        format!(
                            "backoff settings here never apply: {why}, so only an operator's \
                         `sluice set queue --mode backoff` enters backoff; fix: add a pattern \
                         list with `reply /.../ mode=backoff` rules for this receiver's \
                         throttling replies"
                        ),
                    );
                }
            }
        }
    }
}

fn check_source_owner(
    vmta: &str,
    loc: &Loc,
    items: &[Item],
    opts: &LintOptions,
    diags: &mut Diagnostics,
) {
    let Some(owned) = &opts.worker_source_ips else {
        return;
    };
    for it in items {
        if let Item::Directive {
            name,
            value,
            loc: at,
        } = it
            && name == "smtp-source-host"
            && let Some(Ok(ip)) = value.split_whitespace().next().map(str::parse::<IpAddr>)
            && !owned.contains(&ip)
        {
            diags.warning(
                at,
                format!(
                    "virtual-mta `{vmta}` (at {loc}) sends from {ip}, which no worker's \
                     `source_ips` lists: its mail will wait in the queue for ever; fix: add \
                     {ip} to a worker's settings, or remove the VMTA"
                ),
            );
        }
    }
}

/// The `<domain>` blocks directly inside `items`.
fn domain_blocks(items: &[Item]) -> Vec<(&str, &Loc, &[Item])> {
    items
        .iter()
        .filter_map(|i| match i {
            Item::Block {
                name,
                arg,
                loc,
                items,
            } if name == "domain" => Some((arg.trim(), loc, items.as_slice())),
            _ => None,
        })
        .collect()
}

/// Checks of single directives, wherever they stand.
fn lint_directive(name: &str, value: &str, loc: &Loc, diags: &mut Diagnostics) {
    if name == "max-smtp-out"
        && let Ok(n) = value.trim().parse::<u64>()
        && n > MAX_SMTP_OUT_SANE
    {
        diags.warning(
            loc,
            format!(
                "`max-smtp-out {n}` is far above what one host can serve: a worker holds at \
                 most 5000 connections in all, shared by every destination, and receivers \
                 refuse more than a few dozen from one sender; fix: 10-50 per destination, \
                 more only where the receiver agreed to it"
            ),
        );
    }
}

/// Walks every directive (also inside blocks) for [`lint_directive`].
fn lint_directives(items: &[Item], diags: &mut Diagnostics) {
    for it in items {
        match it {
            Item::Directive { name, value, loc } => lint_directive(name, value, loc, diags),
            Item::Block { items, .. } => lint_directives(items, diags),
        }
    }
}

fn item_loc(i: &Item) -> Loc {
    match i {
        Item::Directive { loc, .. } | Item::Block { loc, .. } => loc.clone(),
    }
}

fn is_yes(v: &str) -> bool {
    matches!(
        unquote(v.trim()).to_ascii_lowercase().as_str(),
        "yes" | "true" | "on" | "1"
    )
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        s if s % 86400 == 0 && s > 0 => format!("{}d", s / 86400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::{LoadOptions, lexer, load_str};

    fn warnings(text: &str, opts: &LintOptions) -> Vec<String> {
        let mut d = Diagnostics::default();
        let items = lexer::lex_text(Path::new("t.conf"), text, &mut d);
        let mut out = Diagnostics::default();
        lint(&items, opts, &mut out);
        out.items.iter().map(|d| d.to_string()).collect()
    }

    fn one(ws: &[String], at: &str, text: &str) {
        assert!(
            ws.iter().any(|w| w.starts_with(at) && w.contains(text)),
            "no warning at {at} containing `{text}` in {ws:#?}"
        );
    }

    const CLEAN: &str = "\
<smtp-pattern-list blocks>
  reply /421 .* try later/ mode=backoff
</smtp-pattern-list>
<virtual-mta v1>
  smtp-source-host 127.0.0.11 v1.example.com
</virtual-mta>
<virtual-mta v2>
  smtp-source-host 127.0.0.12 v2.example.com
</virtual-mta>
<virtual-mta-pool p>
  virtual-mta v1
  virtual-mta v2
</virtual-mta-pool>
<source 127.0.0.1>
  always-allow-relaying yes
</source>
<source 0/0>
  smtp-service yes
</source>
<domain *>
  max-smtp-out 20
  retry-after 10m
  bounce-after 4d
  smtp-pattern-list blocks
</domain>
<domain big.test>
  max-smtp-out 50
  backoff-max-msg-rate 100/h
</domain>
";

    #[test]
    fn a_sound_policy_has_no_warning() {
        let owned = ["127.0.0.11", "127.0.0.12"].map(|s| s.parse().unwrap());
        let opts = LintOptions {
            worker_source_ips: Some(owned.into_iter().collect()),
            ..LintOptions::default()
        };
        assert_eq!(warnings(CLEAN, &opts), Vec::<String>::new());
        assert!(
            load_str(
                Path::new("t.conf"),
                CLEAN,
                LoadOptions { read_files: false }
            )
            .is_ok()
        );
    }

    #[test]
    fn each_classic_mistake_is_named_at_its_line() {
        let text = "\
run-as-root yes
smtp-listener 127.0.0.1:2525
<smtp-pattern-list quiet>
  reply /550/ bounce-rcpt
</smtp-pattern-list>
<virtual-mta v1>
  smtp-source-host 127.0.0.11 v1.example.com
  <domain x.test>
    backoff-retry-after 1h
  </domain>
</virtual-mta>
<virtual-mta-pool solo>
  virtual-mta v1
</virtual-mta-pool>
<source 0/0>
  always-allow-relaying yes
</source>
<domain a.test>
  max-smtp-out 4000
  retry-after 2d
  bounce-after 1d
</domain>
<domain b.test>
  bounce-after 10d
  smtp-pattern-list quiet
  backoff-max-msg-rate 10/h
</domain>
<domain A.test>
  max-smtp-out 2
</domain>
";
        let opts = LintOptions {
            worker_source_ips: Some(BTreeSet::new()),
            ..LintOptions::default()
        };
        let ws = warnings(text, &opts);
        one(&ws, "t.conf:1:", "run-as-root yes");
        one(&ws, "t.conf:1:", "no `<domain *>` block");
        one(&ws, "t.conf:7:", "sends from 127.0.0.11, which no worker");
        one(&ws, "t.conf:9:", "this domain has no `smtp-pattern-list`");
        one(&ws, "t.conf:12:", "pool `solo` has one member");
        one(&ws, "t.conf:16:", "open relay");
        one(&ws, "t.conf:19:", "`max-smtp-out 4000` is far above");
        one(
            &ws,
            "t.conf:20:",
            "`retry-after 2d` is longer than `bounce-after 1d`",
        );
        one(
            &ws,
            "t.conf:24:",
            "`bounce-after 10d` keeps mail for more than 7 days",
        );
        one(
            &ws,
            "t.conf:26:",
            "smtp-pattern-list `quiet` has no `mode=backoff` reply",
        );
        one(
            &ws,
            "t.conf:28:",
            "`<domain A.test>` is written twice in this scope (first at t.conf:18)",
        );
        assert_eq!(ws.len(), 11, "{ws:#?}");
    }

    #[test]
    fn the_domain_star_block_supplies_what_a_domain_leaves_out() {
        // bounce-after from `<domain *>` against this block's retry-after.
        let text = "<domain *>\n bounce-after 2h\n</domain>\n<domain a.test>\n retry-after 3h\n</domain>\n";
        let ws = warnings(text, &LintOptions::default());
        one(
            &ws,
            "t.conf:5:",
            "`retry-after 3h` is longer than `bounce-after 2h`",
        );
        assert_eq!(ws.len(), 1, "{ws:#?}");
        // A block that only shortens bounce-after means "do not retry": no warning.
        let text = "<domain *>\n retry-after 3h\n</domain>\n<domain typo.test>\n bounce-after 1m\n</domain>\n";
        assert_eq!(
            warnings(text, &LintOptions::default()),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_vmta_block_inherits_as_the_resolver_resolves() {
        // The VMTA's own `<domain *>` names a backoff list: its x.test block can back off.
        // Top-level retry-after and bounce-after are checked too.
        let text = "retry-after 2d\nbounce-after 1d\n<smtp-pattern-list l>\n reply /421/ mode=backoff\n</smtp-pattern-list>\n<virtual-mta v>\n smtp-source-host 127.0.0.9 v.example.com\n <domain *>\n  smtp-pattern-list l\n </domain>\n <domain x.test>\n  backoff-max-msg-rate 1/m\n </domain>\n</virtual-mta>\n";
        let ws = warnings(text, &LintOptions::default());
        one(
            &ws,
            "t.conf:1:",
            "`retry-after 2d` is longer than `bounce-after 1d`",
        );
        assert_eq!(ws.len(), 1, "{ws:#?}");
    }

    #[test]
    fn wildcards_and_the_star_block_are_followed() {
        // A VMTA's a.x.test takes its pattern list from the top-level *.x.test.
        let text = "<smtp-pattern-list l>\n reply /421/ mode=backoff\n</smtp-pattern-list>\n<domain *.x.test>\n smtp-pattern-list l\n</domain>\n<virtual-mta v>\n smtp-source-host 127.0.0.9 v.example.com\n <domain a.x.test>\n  backoff-max-msg-rate 1/m\n </domain>\n</virtual-mta>\n";
        assert_eq!(
            warnings(text, &LintOptions::default()),
            Vec::<String>::new()
        );
        // `<domain *>` shortening bounce-after under a longer top-level retry-after: every
        // domain bounces before its first retry.
        let text = "retry-after 2d\n<domain *>\n bounce-after 1d\n</domain>\n";
        let ws = warnings(text, &LintOptions::default());
        one(
            &ws,
            "t.conf:1:",
            "`retry-after 2d` is longer than `bounce-after 1d`",
        );
        assert_eq!(ws.len(), 1, "{ws:#?}");
    }

    #[test]
    fn of_two_blocks_for_one_domain_the_first_applies() {
        let text = "<domain a.test>\n max-smtp-out 3\n</domain>\n<domain a.test>\n max-smtp-out 9\n</domain>\n";
        let p = load_str(Path::new("t.conf"), text, LoadOptions { read_files: false })
            .unwrap()
            .policy;
        assert_eq!(p.domain_settings("a.test", None).max_smtp_out, Some(3));
    }

    #[test]
    fn pcre_only_regexes_get_their_closest_equivalent() {
        use crate::policy::value::PRegex;
        for (re, hint) in [
            (
                "user(?= unknown)",
                "write the looked-ahead text as plain pattern",
            ),
            ("(?<=5\\.7\\.1 )blocked", "look-behind is PCRE only"),
            (
                "blocked(?!.*spamhaus)",
                "put a rule for the exception first",
            ),
            ("(?>abc)", "write `(?:...)`"),
            ("(a)\\1", "spell the repeated text out"),
        ] {
            let e = PRegex::compile(re).unwrap_err();
            assert!(e.contains(hint), "{re}: {e}");
        }
    }
}
