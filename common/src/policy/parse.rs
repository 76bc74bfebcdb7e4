//! Builds the typed `Policy` from the lexed tree, checking every directive against the block it
//! is in and every reference against what is defined. All problems are collected in one pass.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::Path;

use super::diag::{Diagnostics, Loc, closest};
use super::lexer::Item;
use super::model::*;
use super::value::*;

/// Options for loading: whether files named by the policy (DKIM keys, certificates) are read.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub read_files: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { read_files: true }
    }
}

const GLOBAL_REPEATED: &[&str] = &[
    "smtp-listener",
    "http-access",
    "relay-domain",
    "domain-macro",
    "domain-key",
    "pickup",
    "include",
];

const BLOCKS: &[&str] = &[
    "source",
    "smtp-user",
    "virtual-mta",
    "virtual-mta-pool",
    "domain",
    "smtp-pattern-list",
    "bounce-category-patterns",
    "acct-file",
    "rejectlog-file",
    "spool",
    "pattern-list",
    "mx-rollup-list",
    "feedback-loop-processor",
    "bounce-processor",
    "signals",
    "rewrite-list",
    "source-group",
    "address-list",
];

struct Ctx<'a> {
    diags: &'a mut Diagnostics,
    warned: HashSet<String>,
    opts: LoadOptions,
    /// References to check once everything is defined: (kind, name, where).
    vmta_refs: Vec<(String, Loc)>,
    pattern_list_refs: Vec<(String, Loc)>,
    routing_list_refs: Vec<(String, Loc)>,
    source_name_refs: Vec<(String, Loc)>,
    macro_refs: Vec<(String, Loc)>,
    queue_refs: Vec<(String, Loc)>,
}

/// Why a directive that Sluice parses has no effect, where there is more to say than "not
/// yet". The rest get the generic warning.
fn not_acted_reason(name: &str) -> Option<&'static str> {
    Some(match name {
        "sync" => "Sluice always fsyncs accounting files; `sync` has no effect",
        "spool" | "<spool>" | "sync-msg-create" | "sync-msg-update" => {
            "the queue is Sluice's replicated store (Raft over RocksDB, fsynced); spool settings have no effect"
        }
        "log-file" => {
            "Sluice logs to standard error (see `--log-format`); `log-file` has no effect"
        }
        _ => return None,
    })
}

impl Ctx<'_> {
    fn not_acted(&mut self, name: &str, loc: &Loc) {
        if self.warned.insert(name.to_string()) {
            let msg = match not_acted_reason(name) {
                Some(r) => format!("`{name}`: {r}"),
                None => format!("`{name}` is parsed but Sluice does not act on it yet"),
            };
            self.diags.warning(loc, msg);
        }
    }

    fn unknown(&mut self, name: &str, block: &str, known: &[&str], loc: &Loc) {
        let hint = closest(name, known.iter().copied())
            .map(|k| format!(" (did you mean `{k}`?)"))
            .unwrap_or_default();
        let elsewhere = scopes_of(name);
        let msg = if !elsewhere.is_empty() && hint.is_empty() {
            format!(
                "`{name}` is not allowed {block}; it belongs in {}",
                elsewhere.join(" or ")
            )
        } else {
            format!("unknown directive `{name}` {block}{hint}")
        };
        self.diags.error(loc, msg);
    }
}

fn scopes_of(name: &str) -> Vec<&'static str> {
    let mut out = Vec::new();
    if DomainSettings::DIRECTIVES.iter().any(|(n, _)| *n == name) {
        out.push("<domain>");
    }
    if SourceSettings::DIRECTIVES.iter().any(|(n, _)| *n == name) {
        out.push("<source>");
    }
    if GlobalSettings::DIRECTIVES.iter().any(|(n, _)| *n == name) || GLOBAL_REPEATED.contains(&name)
    {
        out.push("the top level");
    }
    if AcctSettings::DIRECTIVES.iter().any(|(n, _)| *n == name) || name == "record-fields" {
        out.push("<acct-file>");
    }
    if SmtpUserSettings::DIRECTIVES.iter().any(|(n, _)| *n == name) {
        out.push("<smtp-user>");
    }
    if name == "smtp-source-host" {
        out.push("<virtual-mta>");
    }
    if name == "virtual-mta" {
        out.push("<virtual-mta-pool>");
    }
    out
}

fn names(d: &[(&'static str, bool)]) -> Vec<&'static str> {
    d.iter().map(|(n, _)| *n).collect()
}

/// Stores a directive in a settings block, reporting bad values, duplicates and unacted names.
macro_rules! store {
    ($ctx:expr, $settings:expr, $ty:ty, $name:expr, $value:expr, $loc:expr) => {{
        match $settings.set($name, $value) {
            Some(Ok(())) => {
                if <$ty>::DIRECTIVES
                    .iter()
                    .any(|(n, acted)| *n == $name && !*acted)
                {
                    $ctx.not_acted($name, $loc);
                }
                true
            }
            Some(Err(SetError::Duplicate)) => {
                $ctx.diags.error(
                    $loc,
                    format!(
                        "`{}` is given twice in this block; only one is allowed",
                        $name
                    ),
                );
                true
            }
            Some(Err(SetError::Bad(e))) => {
                $ctx.diags
                    .error($loc, format!("bad value for `{}`: {e}", $name));
                true
            }
            None => false,
        }
    }};
}

pub fn build(
    items: &[Item],
    base_dir: &Path,
    diags: &mut Diagnostics,
    opts: LoadOptions,
) -> Policy {
    let mut ctx = Ctx {
        diags,
        warned: HashSet::new(),
        opts,
        vmta_refs: Vec::new(),
        pattern_list_refs: Vec::new(),
        routing_list_refs: Vec::new(),
        source_name_refs: Vec::new(),
        macro_refs: Vec::new(),
        queue_refs: Vec::new(),
    };
    let mut p = Policy::default();
    for item in items {
        match item {
            Item::Directive { name, value, loc } => {
                global_directive(&mut ctx, &mut p, name, value, loc, base_dir)
            }
            Item::Block {
                name,
                arg,
                loc,
                items,
            } => global_block(&mut ctx, &mut p, name, arg, loc, items, base_dir),
        }
    }
    check_references(&mut ctx, &p);
    p
}

fn global_directive(
    ctx: &mut Ctx,
    p: &mut Policy,
    name: &str,
    value: &str,
    loc: &Loc,
    base: &Path,
) {
    let known_here = GLOBAL_REPEATED.contains(&name)
        || GlobalSettings::DIRECTIVES.iter().any(|(n, _)| *n == name);
    if value.is_empty() && known_here {
        ctx.diags.error(loc, format!("`{name}` needs a value"));
        return;
    }
    match name {
        "smtp-listener" => match parse_listener(value) {
            Ok(l) => p.listeners.push(l),
            Err(e) => ctx
                .diags
                .error(loc, format!("bad value for `smtp-listener`: {e}")),
        },
        "http-access" => {
            let mut parts = value.split_whitespace();
            let cidr = parts.next().unwrap_or("");
            let level = parts.next().unwrap_or("");
            let level = match level.to_ascii_lowercase().as_str() {
                "none" => Some(AccessLevel::None),
                "monitor" => Some(AccessLevel::Monitor),
                "admin" => Some(AccessLevel::Admin),
                "inject" => Some(AccessLevel::Inject),
                _ => None,
            };
            match (parse_cidr(cidr), level) {
                (Ok(cidr), Some(level)) => p.http_access.push(HttpAccess { cidr, level }),
                (Err(e), _) => ctx.diags.error(loc, format!("bad value for `http-access`: {e}")),
                (_, None) => ctx.diags.error(loc, format!("bad value for `http-access`: expected `CIDR none|monitor|admin|inject`, found `{value}`")),
            }
        }
        "relay-domain" => {
            let raw = unquote(value).to_ascii_lowercase();
            let d = raw.replace("[*.]", "*.");
            if is_hostname(d.trim_start_matches("*.")) {
                if raw.starts_with("[*.]") {
                    p.relay_domains.push(d.trim_start_matches("*.").to_string());
                }
                p.relay_domains.push(d);
            } else {
                ctx.diags.error(
                    loc,
                    format!("bad value for `relay-domain`: `{value}` is not a domain"),
                );
            }
        }
        "domain-macro" => {
            let Some((mname, list)) = value.split_once(char::is_whitespace) else {
                ctx.diags.error(loc, "`domain-macro` needs a name and a list of domains: `domain-macro NAME a.com,b.com`");
                return;
            };
            let mut domains = Vec::new();
            for d in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let d = d.to_ascii_lowercase();
                if !is_hostname(d.trim_start_matches("*.")) {
                    ctx.diags.error(
                        loc,
                        format!("bad value for `domain-macro {mname}`: `{d}` is not a domain"),
                    );
                }
                domains.push(d);
            }
            let key = mname.to_ascii_lowercase();
            if p.domain_macros.insert(key.clone(), domains).is_some() {
                ctx.diags
                    .error(loc, format!("`domain-macro {key}` is defined twice"));
            }
        }
        "domain-key" => {
            if let Some(k) = parse_domain_key(ctx, value, loc, base) {
                p.domain_keys.push(k);
            }
        }
        "pickup" => {
            ctx.not_acted(name, loc);
            p.pickup.push(value.to_string());
        }
        _ => {
            if matches!(name, "retry-after" | "bounce-after") {
                p.global_written.push(Written {
                    name: name.to_string(),
                    value: value.to_string(),
                    loc: loc.clone(),
                });
            }
            if store!(ctx, p.global, GlobalSettings, name, value, loc) {
                if name == "smtp-server-tls-certificate"
                    && ctx.opts.read_files
                    && let Some(c) = &p.global.smtp_server_tls_certificate
                {
                    for f in [&c.cert, &c.key] {
                        if !resolve_path(base, f).exists() {
                            ctx.diags
                                .error(loc, format!("the TLS file `{f}` does not exist"));
                        }
                    }
                }
                return;
            }
            if BLOCKS.contains(&name) {
                ctx.diags.error(
                    loc,
                    format!("`{name}` is a block: write `<{name} ...>` ... `</{name}>`"),
                );
                return;
            }
            let mut known = names(GlobalSettings::DIRECTIVES);
            known.extend_from_slice(GLOBAL_REPEATED);
            ctx.unknown(name, "at the top level", &known, loc);
        }
    }
}

pub fn resolve_path(base: &Path, f: &str) -> std::path::PathBuf {
    let p = Path::new(f);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn parse_listener(value: &str) -> Result<Listener, String> {
    let mut parts = value.split_whitespace();
    let first = parts.next().unwrap_or("");
    let (addr_s, port_s) = match parts.clone().next() {
        Some(p) if p.parse::<u16>().is_ok() => {
            parts.next();
            (first.to_string(), p.to_string())
        }
        _ => match first.rsplit_once(':') {
            Some((a, p)) => (
                a.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.to_string(),
            ),
            None => {
                return Err(format!(
                    "expected ADDRESS:PORT such as 0/0:25 or 127.0.0.1:2525, found `{value}`"
                ));
            }
        },
    };
    let port: u16 = port_s
        .parse()
        .map_err(|_| format!("`{port_s}` is not a port number"))?;
    let addr =
        if addr_s == "0/0" || addr_s == "0.0.0.0" || addr_s == "*" {
            None
        } else {
            Some(addr_s.parse::<IpAddr>().map_err(|_| {
                format!("`{addr_s}` is not an IP address (use 0/0 for every address)")
            })?)
        };
    let mut implicit_tls = false;
    for opt in parts {
        match opt.split_once('=') {
            Some(("tls", v)) => implicit_tls = bool::parse_value(v)?,
            _ => {
                return Err(format!(
                    "unknown listener option `{opt}` (known: tls=yes|no)"
                ));
            }
        }
    }
    Ok(Listener {
        addr,
        port,
        implicit_tls,
    })
}

fn parse_domain_key(ctx: &mut Ctx, value: &str, loc: &Loc, base: &Path) -> Option<DomainKey> {
    let parts: Vec<&str> = value.split(',').map(|s| unquote(s.trim())).collect();
    let [selector, domain, file] = parts.as_slice() else {
        ctx.diags.error(
            loc,
            format!(
                "bad value for `domain-key`: expected SELECTOR,DOMAIN,KEY-FILE, found `{value}`"
            ),
        );
        return None;
    };
    if selector.is_empty() || !(*domain == "*" || is_hostname(domain)) || file.is_empty() {
        ctx.diags.error(
            loc,
            format!(
                "bad value for `domain-key`: expected SELECTOR,DOMAIN,KEY-FILE, found `{value}`"
            ),
        );
        return None;
    }
    let mut key_pem = String::new();
    if ctx.opts.read_files {
        let path = resolve_path(base, file);
        match std::fs::read_to_string(&path) {
            Ok(t) if t.contains("-----BEGIN") && t.contains("PRIVATE KEY-----") => key_pem = t,
            Ok(_) => ctx.diags.error(
                loc,
                format!("the DKIM key `{}` is not a PEM private key", path.display()),
            ),
            Err(e) => ctx.diags.error(
                loc,
                format!("cannot read the DKIM key `{}`: {e}", path.display()),
            ),
        }
    }
    Some(DomainKey {
        selector: selector.to_string(),
        domain: domain.to_ascii_lowercase(),
        key_file: file.to_string(),
        key_pem,
    })
}

fn global_block(
    ctx: &mut Ctx,
    p: &mut Policy,
    name: &str,
    arg: &str,
    loc: &Loc,
    items: &[Item],
    base: &Path,
) {
    match name {
        super::lexer::TEMPLATE_BLOCK => {}
        "source" => {
            let arg = unquote(arg);
            let matches = if let Some(n) = arg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                SourceMatch::Named(n.to_string())
            } else {
                match parse_cidr(arg) {
                    Ok(c) => SourceMatch::Cidr(c),
                    Err(e) => {
                        ctx.diags.error(
                            loc,
                            format!("bad `<source>`: {e} (or a name in braces, such as {{auth}})"),
                        );
                        return;
                    }
                }
            };
            let mut settings = SourceSettings::default();
            for it in items {
                match it {
                    Item::Directive { name, value, loc } => {
                        if !store!(ctx, settings, SourceSettings, name.as_str(), value, loc) {
                            ctx.unknown(
                                name,
                                "in <source>",
                                &names(SourceSettings::DIRECTIVES),
                                loc,
                            );
                        }
                    }
                    Item::Block { name, loc, .. } => ctx
                        .diags
                        .error(loc, format!("`<{name}>` cannot be nested in `<source>`")),
                }
            }
            if let Some(v) = settings
                .default_virtual_mta
                .as_ref()
                .filter(|v| *v != BY_SOURCE_IP)
            {
                ctx.vmta_refs.push((v.clone(), loc.clone()));
            }
            if let Some(l) = &settings.pattern_list {
                ctx.routing_list_refs.push((l.clone(), loc.clone()));
            }
            p.sources.push(Source {
                matches,
                settings,
                loc: Some(loc.clone()),
            });
        }
        "smtp-user" => {
            let uname = unquote(arg).to_string();
            if uname.is_empty() {
                ctx.diags.error(loc, "`<smtp-user>` needs a user name");
                return;
            }
            let mut s = SmtpUserSettings::default();
            for it in items {
                match it {
                    Item::Directive { name, value, loc } => {
                        if !store!(ctx, s, SmtpUserSettings, name.as_str(), value, loc) {
                            ctx.unknown(
                                name,
                                "in <smtp-user>",
                                &names(SmtpUserSettings::DIRECTIVES),
                                loc,
                            );
                        }
                        if name == "source" {
                            let n = value
                                .trim_start_matches('{')
                                .trim_end_matches('}')
                                .to_string();
                            s.source = Some(n.clone());
                            ctx.source_name_refs.push((n, loc.clone()));
                        }
                    }
                    Item::Block { name, loc, .. } => ctx
                        .diags
                        .error(loc, format!("`<{name}>` cannot be nested in `<smtp-user>`")),
                }
            }
            if s.authentication_method == Some(AuthMethod::CramMd5) {
                ctx.diags.warning(loc, format!("smtp-user `{uname}`: cram-md5 is not offered by Sluice; PLAIN and LOGIN are"));
            }
            match (&s.password, &s.password_hash) {
                (None, None) => ctx.diags.error(
                    loc,
                    format!("smtp-user `{uname}` has no `password` or `password-hash`"),
                ),
                (Some(_), Some(_)) => ctx.diags.error(
                    loc,
                    format!(
                        "smtp-user `{uname}` has both `password` and `password-hash`; keep one"
                    ),
                ),
                _ => {}
            }
            if p.smtp_users.insert(uname.clone(), s).is_some() {
                ctx.diags
                    .error(loc, format!("`<smtp-user {uname}>` is defined twice"));
            }
        }
        "virtual-mta" => {
            let vname = unquote(arg).to_string();
            if vname.is_empty() || vname.contains(char::is_whitespace) || vname.contains(['{', '}'])
            {
                ctx.diags
                    .error(loc, format!("`<virtual-mta {arg}>` needs a plain name"));
                return;
            }
            let mut v = Vmta {
                name: vname.clone(),
                source_ip: None,
                ehlo_name: None,
                settings: VmtaSettings::default(),
                domain_keys: Vec::new(),
                domains: Vec::new(),
                loc: Some(loc.clone()),
            };
            for it in items {
                match it {
                    Item::Directive { name, value, loc } => {
                        match name.as_str() {
                            "smtp-source-host" => {
                                if v.source_ip.is_some() {
                                    ctx.diags.error(loc, "`smtp-source-host` is given twice in this block; only one is allowed");
                                    continue;
                                }
                                let mut parts = value.split_whitespace();
                                let ip = parts.next().unwrap_or("");
                                let host = parts.next();
                                match ip.parse::<IpAddr>() {
                                Ok(ip) => v.source_ip = Some(ip),
                                Err(_) => ctx.diags.error(loc, format!("bad value for `smtp-source-host`: `{ip}` is not an IP address (expected `smtp-source-host IP HOSTNAME`)")),
                            }
                                match host {
                                Some(h) if is_hostname(h) => v.ehlo_name = Some(h.to_ascii_lowercase()),
                                Some(h) => ctx.diags.error(loc, format!("bad value for `smtp-source-host`: `{h}` is not a host name")),
                                None => {}
                            }
                            }
                            "domain-key" => {
                                if let Some(k) = parse_domain_key(ctx, value, loc, base) {
                                    v.domain_keys.push(k);
                                }
                            }
                            _ => {
                                if !store!(ctx, v.settings, VmtaSettings, name.as_str(), value, loc)
                                {
                                    let mut known = names(VmtaSettings::DIRECTIVES);
                                    known.extend(["smtp-source-host", "domain-key"]);
                                    ctx.unknown(name, "in <virtual-mta>", &known, loc);
                                }
                            }
                        }
                    }
                    Item::Block {
                        name,
                        arg,
                        loc,
                        items,
                    } if name == "domain" => {
                        if let Some(r) = domain_block(ctx, arg, loc, items) {
                            v.domains.push(r);
                        }
                    }
                    Item::Block { name, loc, .. } => ctx.diags.error(
                        loc,
                        format!(
                            "`<{name}>` cannot be nested in `<virtual-mta>` (only `<domain>` can)"
                        ),
                    ),
                }
            }
            if p.vmtas.contains_key(&vname) || p.pools.contains_key(&vname) {
                ctx.diags.error(loc, format!("`{vname}` is defined twice (virtual MTA and pool names share one namespace)"));
            }
            p.vmtas.insert(vname, v);
        }
        "virtual-mta-pool" => {
            let pname = unquote(arg).to_string();
            if pname.is_empty() || pname.contains(char::is_whitespace) {
                ctx.diags.error(
                    loc,
                    format!("`<virtual-mta-pool {arg}>` needs a plain name"),
                );
                return;
            }
            let mut members = Vec::new();
            let mut pool_domains = Vec::new();
            for it in items {
                match it {
                    Item::Directive { name, value, loc } if name == "virtual-mta" => {
                        ctx.vmta_refs.push((value.clone(), loc.clone()));
                        members.push(value.clone());
                    }
                    Item::Directive { name, loc, .. } => ctx.unknown(name, "in <virtual-mta-pool>", &["virtual-mta"], loc),
                    Item::Block { name, arg, loc, items } if name == "domain" => {
                        ctx.not_acted("<domain> inside <virtual-mta-pool>", loc);
                        if let Some(r) = domain_block(ctx, arg, loc, items) {
                            pool_domains.push(r);
                        }
                    }
                    Item::Block { name, loc, .. } => ctx.diags.error(loc, format!("`<{name}>` cannot be nested in `<virtual-mta-pool>` (only `<domain>` can)")),
                }
            }
            if members.is_empty() {
                ctx.diags
                    .error(loc, format!("pool `{pname}` has no `virtual-mta` members"));
            }
            if p.vmtas.contains_key(&pname) || p.pools.contains_key(&pname) {
                ctx.diags.error(loc, format!("`{pname}` is defined twice (virtual MTA and pool names share one namespace)"));
            }
            p.pools.insert(
                pname.clone(),
                Pool {
                    name: pname,
                    members,
                    domains: pool_domains,
                    loc: Some(loc.clone()),
                },
            );
        }
        "domain" => {
            if let Some(r) = domain_block(ctx, arg, loc, items) {
                p.domains.push(r);
            }
        }
        "smtp-pattern-list" => {
            let lname = unquote(arg).to_string();
            let mut rules = Vec::new();
            pattern_lines(ctx, items, "smtp-pattern-list", |ctx, name, value, loc| {
                if name != "reply" {
                    ctx.unknown(name, "in <smtp-pattern-list>", &["reply"], loc);
                    return;
                }
                let (re, rest) = match split_slashed(value) {
                    Ok(x) => x,
                    Err(e) => return ctx.diags.error(loc, e),
                };
                let regex = PRegex::compile(&re);
                let actions = PatternActions::parse(&rest);
                match (regex, actions) {
                    (Ok(regex), Ok(actions)) => rules.push(SmtpPattern { regex, actions }),
                    (Err(e), _) | (_, Err(e)) => ctx.diags.error(loc, e),
                }
            });
            if p.smtp_pattern_lists
                .insert(
                    lname.clone(),
                    SmtpPatternList {
                        name: lname.clone(),
                        rules,
                    },
                )
                .is_some()
            {
                ctx.diags.error(
                    loc,
                    format!("`<smtp-pattern-list {lname}>` is defined twice"),
                );
            }
        }
        "bounce-category-patterns" => {
            let mut out = Vec::new();
            pattern_lines(
                ctx,
                items,
                "bounce-category-patterns",
                |ctx, name, value, loc| {
                    let line = if value.is_empty() {
                        name.to_string()
                    } else {
                        format!("{name} {value}")
                    };
                    let (re, rest) = match split_slashed(&line) {
                        Ok(x) => x,
                        Err(e) => return ctx.diags.error(loc, e),
                    };
                    let cat = rest.trim().to_ascii_lowercase();
                    if !BOUNCE_CATEGORIES.contains(&cat.as_str()) {
                        let hint = closest(&cat, BOUNCE_CATEGORIES.iter().copied())
                            .map(|k| format!(" (did you mean `{k}`?)"))
                            .unwrap_or_default();
                        return ctx
                            .diags
                            .error(loc, format!("unknown bounce category `{cat}`{hint}"));
                    }
                    match PRegex::compile(&re) {
                        Ok(regex) => out.push(BouncePattern {
                            regex,
                            category: cat,
                        }),
                        Err(e) => ctx.diags.error(loc, e),
                    }
                },
            );
            p.bounce_patterns.extend(out);
        }
        "pattern-list" => {
            let lname = unquote(arg).to_string();
            let mut rules = Vec::new();
            pattern_lines(ctx, items, "pattern-list", |ctx, name, value, loc| {
                if name != "mail-from" && name != "rcpt-to" {
                    ctx.unknown(name, "in <pattern-list>", &["mail-from", "rcpt-to"], loc);
                    return;
                }
                let (re, rest) = match split_slashed(value) {
                    Ok(x) => x,
                    Err(e) => return ctx.diags.error(loc, e),
                };
                let Some(vmta) = rest.strip_prefix("virtual-mta=").map(str::trim) else {
                    return ctx.diags.error(
                        loc,
                        format!(
                            "expected the action `virtual-mta=NAME` after the regex, found `{rest}`"
                        ),
                    );
                };
                ctx.vmta_refs.push((vmta.to_string(), loc.clone()));
                match PRegex::compile(&re) {
                    Ok(regex) => rules.push(RoutingRule {
                        field: name.to_string(),
                        regex,
                        virtual_mta: vmta.to_string(),
                    }),
                    Err(e) => ctx.diags.error(loc, e),
                }
            });
            p.routing_lists
                .insert(lname.clone(), RoutingList { name: lname, rules });
        }
        "acct-file" => {
            let target = unquote(arg).to_string();
            if target.is_empty() {
                ctx.diags
                    .error(loc, "`<acct-file>` needs a path or `|program`");
                return;
            }
            let mut a = AcctFile {
                target,
                settings: AcctSettings::default(),
                record_fields: Vec::new(),
                header_columns: Vec::new(),
            };
            for it in items {
                match it {
                    Item::Directive { name, value, loc } => {
                        match name.as_str() {
                            "record-fields" => {
                                let Some((rt, fields)) = value.split_once(char::is_whitespace)
                                else {
                                    ctx.diags.error(loc, "bad value for `record-fields`: expected `TYPE field,field,...`");
                                    continue;
                                };
                                match RecordType::parse_value(rt) {
                                    Ok(record) => {
                                        let fields: Vec<String> = fields
                                            .split(',')
                                            .map(|f| f.trim().to_string())
                                            .filter(|f| !f.is_empty())
                                            .collect();
                                        for f in &fields {
                                            let bare = f.trim_start_matches('!');
                                            if bare != "*"
                                                && !bare.starts_with("header_")
                                                && !crate::acct::is_known_field(bare)
                                            {
                                                let hint = closest(bare, crate::acct::all_fields())
                                                    .map(|k| format!(" (did you mean `{k}`?)"))
                                                    .unwrap_or_default();
                                                ctx.diags.error(
                                                    loc,
                                                    format!(
                                                        "unknown accounting field `{bare}`{hint}"
                                                    ),
                                                );
                                            }
                                            if !f.starts_with('!')
                                                && let Some(e) = crate::acct::EMPTY_FIELDS
                                                    .iter()
                                                    .find(|e| e.eq_ignore_ascii_case(bare))
                                            {
                                                ctx.diags.warning(
                                                    loc,
                                                    format!("accounting column `{e}` is always empty: Sluice has no value for it yet"),
                                                );
                                            }
                                        }
                                        a.record_fields.push(RecordFields { record, fields });
                                    }
                                    Err(e) => ctx
                                        .diags
                                        .error(loc, format!("bad value for `record-fields`: {e}")),
                                }
                            }
                            "map-header-to-column" | "map-header-to-field" => {
                                let parts: Vec<&str> = value.split_whitespace().collect();
                                match parts.as_slice() {
                                [_, h, c] | [h, c] => a.header_columns.push((h.to_string(), c.to_string())),
                                _ => ctx.diags.error(loc, format!("bad value for `{name}`: expected `[TYPE] HEADER COLUMN`")),
                            }
                            }
                            _ => {
                                if !store!(ctx, a.settings, AcctSettings, name.as_str(), value, loc)
                                {
                                    let mut known = names(AcctSettings::DIRECTIVES);
                                    known.extend([
                                        "record-fields",
                                        "map-header-to-column",
                                        "map-header-to-field",
                                    ]);
                                    ctx.unknown(name, "in <acct-file>", &known, loc);
                                }
                            }
                        }
                    }
                    Item::Block { name, loc, .. } => ctx
                        .diags
                        .error(loc, format!("`<{name}>` cannot be nested in `<acct-file>`")),
                }
            }
            p.acct_files.push(a);
        }
        "rejectlog-file" => {
            let mut s = RejectLogSettings::default();
            simple_block(ctx, items, "rejectlog-file", |ctx, name, value, loc| {
                if !store!(ctx, s, RejectLogSettings, name, value, loc) {
                    ctx.unknown(
                        name,
                        "in <rejectlog-file>",
                        &names(RejectLogSettings::DIRECTIVES),
                        loc,
                    );
                }
            });
            if p.reject_log.is_some() {
                ctx.diags.error(
                    loc,
                    "`<rejectlog-file>` is given twice; only one is allowed",
                );
            }
            p.reject_log = Some(RejectLog {
                path: unquote(arg).to_string(),
                settings: s,
            });
        }
        "spool" => {
            ctx.not_acted("<spool>", loc);
            let mut s = SpoolSettings::default();
            simple_block(ctx, items, "spool", |ctx, name, value, loc| {
                if !store!(ctx, s, SpoolSettings, name, value, loc) {
                    ctx.unknown(name, "in <spool>", &names(SpoolSettings::DIRECTIVES), loc);
                }
            });
            p.spool = Some(s);
        }
        "signals" => {
            let mut s = SignalsSettings::default();
            simple_block(ctx, items, "signals", |ctx, name, value, loc| {
                if !store!(ctx, s, SignalsSettings, name, value, loc) {
                    ctx.unknown(
                        name,
                        "in <signals>",
                        &names(SignalsSettings::DIRECTIVES),
                        loc,
                    );
                }
            });
            p.signals = Some(s);
        }
        "source-group" => {
            let mut s = SourceGroupSettings::default();
            simple_block(ctx, items, "source-group", |ctx, name, value, loc| {
                if !store!(ctx, s, SourceGroupSettings, name, value, loc) {
                    ctx.unknown(
                        name,
                        "in <source-group>",
                        &names(SourceGroupSettings::DIRECTIVES),
                        loc,
                    );
                }
            });
            p.source_groups.insert(unquote(arg).to_string(), s);
        }
        "mx-rollup-list" => {
            ctx.not_acted("<mx-rollup-list>", loc);
            simple_block(ctx, items, "mx-rollup-list", |ctx, name, value, loc| {
                let parts: Vec<&str> = value.split_whitespace().collect();
                match (name, parts.as_slice()) {
                    ("mx", [mx, queue]) => p.mx_rollups.push(MxRollup { mx_pattern: mx.to_ascii_lowercase(), queue: queue.to_string() }),
                    ("mx", _) => ctx.diags.error(loc, format!("bad value for `mx`: expected `mx HOST-PATTERN QUEUE-NAME`, found `{value}`")),
                    _ => ctx.unknown(name, "in <mx-rollup-list>", &["mx"], loc),
                }
            });
        }
        "rewrite-list" => {
            ctx.not_acted("<rewrite-list>", loc);
            simple_block(ctx, items, "rewrite-list", |ctx, name, value, loc| {
                if !["mail-from", "rcpt-to", "header-from", "header-to"].contains(&name) {
                    ctx.unknown(
                        name,
                        "in <rewrite-list>",
                        &["mail-from", "rcpt-to", "header-from", "header-to"],
                        loc,
                    );
                } else if value.split_whitespace().count() != 2 {
                    ctx.diags.error(
                        loc,
                        format!("bad value for `{name}`: expected `PATTERN REPLACEMENT`"),
                    );
                }
            });
        }
        "feedback-loop-processor" | "bounce-processor" => {
            let mut proc = Processor::default();
            for it in items {
                match it {
                    Item::Directive {
                        name: dn,
                        value,
                        loc,
                    } => {
                        if !store!(
                            ctx,
                            proc.settings,
                            ProcessorSettings,
                            dn.as_str(),
                            value,
                            loc
                        ) {
                            ctx.unknown(
                                dn,
                                &format!("in <{name}>"),
                                &names(ProcessorSettings::DIRECTIVES),
                                loc,
                            );
                        }
                    }
                    Item::Block {
                        name: bn,
                        items: inner,
                        ..
                    } if bn == "address-list" => {
                        simple_block(ctx, inner, "address-list", |ctx, dn, value, loc| match dn {
                            "domain" => proc.domains.push(value.to_ascii_lowercase()),
                            "address" => match value
                                .strip_prefix('/')
                                .and_then(|v| v.strip_suffix('/'))
                            {
                                // The whole address must match, so that a pattern never
                                // takes a look-alike in another domain.
                                Some(re) => match PRegex::compile(&format!("^(?:{re})$")) {
                                    Ok(r) => proc.address_patterns.push(r),
                                    Err(e) => ctx.diags.error(loc, e),
                                },
                                None if value.contains('@') => {
                                    proc.addresses.push(value.to_ascii_lowercase())
                                }
                                None => ctx.diags.error(
                                    loc,
                                    format!("`address {value}`: expected user@domain or /REGEX/"),
                                ),
                            },
                            _ => ctx.unknown(dn, "in <address-list>", &["domain", "address"], loc),
                        });
                    }
                    Item::Block { name: bn, loc, .. } => ctx
                        .diags
                        .error(loc, format!("`<{bn}>` cannot be nested in `<{name}>`")),
                }
            }
            if name == "feedback-loop-processor" {
                p.feedback_processor = Some(proc);
            } else {
                p.bounce_processor = Some(proc);
            }
        }
        "address-list" => ctx.diags.error(
            loc,
            "`<address-list>` belongs inside `<feedback-loop-processor>` or `<bounce-processor>`",
        ),
        _ => {
            let hint = closest(name, BLOCKS.iter().copied())
                .map(|k| format!(" (did you mean `<{k}>`?)"))
                .unwrap_or_default();
            ctx.diags
                .error(loc, format!("unknown block `<{name}>`{hint}"));
        }
    }
}

/// Calls `f` for each directive of a block that holds no nested blocks.
fn simple_block<F: FnMut(&mut Ctx, &str, &str, &Loc)>(
    ctx: &mut Ctx,
    items: &[Item],
    block: &str,
    mut f: F,
) {
    for it in items {
        match it {
            Item::Directive { name, value, loc } => f(ctx, name, value, loc),
            Item::Block { name, loc, .. } => ctx
                .diags
                .error(loc, format!("`<{name}>` cannot be nested in `<{block}>`")),
        }
    }
}

/// Like `simple_block`, but a line that does not start a rule right after a regex with no
/// closing slash is reported as the rest of that regex, which must stay on one line.
fn pattern_lines<F: FnMut(&mut Ctx, &str, &str, &Loc)>(
    ctx: &mut Ctx,
    items: &[Item],
    block: &str,
    mut f: F,
) {
    let mut open_regex_line: Option<usize> = None;
    for it in items {
        match it {
            Item::Directive { name, value, loc } => {
                let starts_rule = (name.starts_with('/') && name != "/")
                    || name == "reply"
                    || name == "mail-from"
                    || name == "rcpt-to";
                if !starts_rule && let Some(l) = open_regex_line {
                    ctx.diags.error(loc, format!("this line continues the regex begun on line {l}; a regex must stay on one line"));
                    continue;
                }
                let before = ctx.diags.items.len();
                f(ctx, name, value, loc);
                let unterminated = ctx.diags.items[before..]
                    .iter()
                    .any(|d| d.message.contains("has no closing `/`"));
                open_regex_line = if unterminated { Some(loc.line) } else { None };
            }
            Item::Block { name, loc, .. } => ctx
                .diags
                .error(loc, format!("`<{name}>` cannot be nested in `<{block}>`")),
        }
    }
}

fn domain_block(ctx: &mut Ctx, arg: &str, loc: &Loc, items: &[Item]) -> Option<DomainRule> {
    let pattern = match DomainPattern::parse(arg) {
        Ok(p) => p,
        Err(e) => {
            ctx.diags.error(loc, format!("bad `<domain>`: {e}"));
            None?
        }
    };
    if let DomainPattern::Macro(m) = &pattern {
        ctx.macro_refs.push((m.clone(), loc.clone()));
    }
    let mut settings = DomainSettings::default();
    let mut written = Vec::new();
    for it in items {
        match it {
            Item::Directive { name, value, loc } => {
                written.push(Written {
                    name: name.clone(),
                    value: value.clone(),
                    loc: loc.clone(),
                });
                if value.is_empty() && DomainSettings::DIRECTIVES.iter().any(|(n, _)| n == name) {
                    ctx.diags.error(loc, format!("`{name}` needs a value"));
                    continue;
                }
                if !store!(ctx, settings, DomainSettings, name.as_str(), value, loc) {
                    ctx.unknown(name, "in <domain>", &names(DomainSettings::DIRECTIVES), loc);
                }
                if name == "max-msg-per-connection" && value.trim() == "0" {
                    ctx.diags.warning(
                        loc,
                        "`max-msg-per-connection 0` never closes a connection: receivers \
                         throttle long sessions; set 50-200 (Sluice's default is 100)",
                    );
                }
            }
            Item::Block { name, loc, .. } => ctx
                .diags
                .error(loc, format!("`<{name}>` cannot be nested in `<domain>`")),
        }
    }
    if let Some(l) = &settings.smtp_pattern_list {
        ctx.pattern_list_refs.push((l.clone(), loc.clone()));
    }
    for v in [
        &settings.backoff_reroute_to_virtual_mta,
        &settings.reroute_to_virtual_mta,
    ]
    .into_iter()
    .flatten()
    {
        ctx.vmta_refs.push((v.clone(), loc.clone()));
    }
    if let Some(q) = &settings.queue_to {
        ctx.queue_refs.push((q.clone(), loc.clone()));
    }
    if settings.route.is_some() && settings.smtp_hosts.is_some() {
        ctx.diags.error(
            loc,
            "`route` and `smtp-hosts` both say where to deliver; use one of them",
        );
    }
    Some(DomainRule {
        pattern,
        settings,
        loc: Some(loc.clone()),
        written,
    })
}

fn check_references(ctx: &mut Ctx, p: &Policy) {
    let vmta_names: BTreeSet<&str> = p
        .vmtas
        .keys()
        .chain(p.pools.keys())
        .map(String::as_str)
        .collect();
    for (name, loc) in std::mem::take(&mut ctx.vmta_refs) {
        if !vmta_names.contains(name.as_str()) {
            let hint = closest(&name, vmta_names.iter().copied())
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            ctx.diags.error(
                &loc,
                format!("`{name}` is not a defined virtual-mta or virtual-mta-pool{hint}"),
            );
        }
    }
    for (name, loc) in std::mem::take(&mut ctx.pattern_list_refs) {
        if !p.smtp_pattern_lists.contains_key(&name) {
            let hint = closest(&name, p.smtp_pattern_lists.keys().map(String::as_str))
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            ctx.diags.error(
                &loc,
                format!("`smtp-pattern-list {name}` is not defined{hint}"),
            );
        }
    }
    for (name, loc) in std::mem::take(&mut ctx.routing_list_refs) {
        if !p.routing_lists.contains_key(&name) {
            ctx.diags
                .error(&loc, format!("`pattern-list {name}` is not defined"));
        }
    }
    let named_sources: BTreeSet<&str> = p
        .sources
        .iter()
        .filter_map(|s| match &s.matches {
            SourceMatch::Named(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    for (name, loc) in std::mem::take(&mut ctx.source_name_refs) {
        if !named_sources.contains(name.as_str()) {
            ctx.diags.error(
                &loc,
                format!("`source {{{name}}}` refers to no `<source {{{name}}}>` block"),
            );
        }
    }
    for (name, loc) in std::mem::take(&mut ctx.macro_refs) {
        if !p.domain_macros.contains_key(&name) {
            let hint = closest(&name, p.domain_macros.keys().map(String::as_str))
                .map(|k| format!(" (did you mean `${k}`?)"))
                .unwrap_or_default();
            ctx.diags.error(
                &loc,
                format!("`${name}` is not a defined domain-macro{hint}"),
            );
        }
    }
    let _ = std::mem::take(&mut ctx.queue_refs);
    let mut seen = HashSet::new();
    for s in &p.sources {
        let key = match &s.matches {
            SourceMatch::Cidr(c) => c.to_string(),
            SourceMatch::Named(n) => format!("{{{n}}}"),
        };
        if !seen.insert(key.clone()) {
            let loc = Loc {
                file: std::sync::Arc::new("(policy)".into()),
                line: 0,
            };
            ctx.diags.warning(
                &loc,
                format!("`<source {key}>` is defined more than once; the first one applies"),
            );
        }
    }
}

/// Every (block, directive) pair the parser accepts; `global` is the top level.
pub fn known_directives() -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    let mut add = |scope: &'static str, d: &[(&'static str, bool)]| {
        out.extend(d.iter().map(|(n, _)| (scope, *n)))
    };
    add("global", GlobalSettings::DIRECTIVES);
    add("domain", DomainSettings::DIRECTIVES);
    add("source", SourceSettings::DIRECTIVES);
    add("smtp-user", SmtpUserSettings::DIRECTIVES);
    add("acct-file", AcctSettings::DIRECTIVES);
    add("rejectlog-file", RejectLogSettings::DIRECTIVES);
    add("spool", SpoolSettings::DIRECTIVES);
    add("bounce-processor", ProcessorSettings::DIRECTIVES);
    add("feedback-loop-processor", ProcessorSettings::DIRECTIVES);
    add("signals", SignalsSettings::DIRECTIVES);
    add("source-group", SourceGroupSettings::DIRECTIVES);
    add("virtual-mta", VmtaSettings::DIRECTIVES);
    out.extend(GLOBAL_REPEATED.iter().map(|n| ("global", *n)));
    out.extend([
        ("virtual-mta", "smtp-source-host"),
        ("virtual-mta", "domain-key"),
        ("virtual-mta", "include"),
        ("virtual-mta-pool", "virtual-mta"),
        ("smtp-pattern-list", "reply"),
        ("pattern-list", "mail-from"),
        ("pattern-list", "rcpt-to"),
        ("rewrite-list", "mail-from"),
        ("rewrite-list", "rcpt-to"),
        ("mx-rollup-list", "mx"),
        ("address-list", "domain"),
        ("address-list", "address"),
        ("acct-file", "record-fields"),
        ("acct-file", "map-header-to-column"),
        ("acct-file", "map-header-to-field"),
    ]);
    out
}
