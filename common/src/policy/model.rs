//! The typed policy model. Settings blocks are declared once with the directive that sets each
//! field, whether Sluice acts on it yet, and the value type it parses into.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::diag::Loc;
use super::value::*;

/// Why a directive could not be stored in a settings block.
pub enum SetError {
    Duplicate,
    Bad(String),
}

macro_rules! settings {
    ($(#[$m:meta])* $name:ident {
        $( $field:ident : $ty:ty = [$($dir:literal),+], acted = $acted:expr; )*
    }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
        pub struct $name {
            $( #[serde(skip_serializing_if = "Option::is_none", default)] pub $field: Option<$ty>, )*
        }

        impl $name {
            /// Every directive name of this block and whether Sluice acts on it yet.
            pub const DIRECTIVES: &'static [(&'static str, bool)] = &[ $( $( ($dir, $acted), )+ )* ];

            /// Stores a directive; `None` when the name does not belong to this block.
            pub fn set(&mut self, name: &str, raw: &str) -> Option<Result<(), SetError>> {
                match name {
                    $( $($dir)|+ => Some(if self.$field.is_some() {
                        Err(SetError::Duplicate)
                    } else {
                        match <$ty as PolicyValue>::parse_value(raw) {
                            Ok(v) => { self.$field = Some(v); Ok(()) }
                            Err(e) => Err(SetError::Bad(e)),
                        }
                    }), )*
                    _ => None,
                }
            }

            /// The field a directive name sets (`max_smtp_out` for `max-smtp-out`), so that
            /// aliases of one setting count as one.
            pub fn field_of(name: &str) -> Option<&'static str> {
                match name {
                    $( $($dir)|+ => Some(stringify!($field)), )*
                    _ => None,
                }
            }

            /// Takes every value that `self` leaves unset from `other`.
            pub fn fill_from(&mut self, other: &Self) {
                $( if self.$field.is_none() { self.$field = other.$field.clone(); } )*
            }
        }
    };
}

settings! {
    /// How to deliver to one destination (`<domain>`), also used for per-VMTA overrides.
    DomainSettings {
        max_smtp_out: u32 = ["max-smtp-out"], acted = true;
        max_msg_rate: Rate = ["max-msg-rate"], acted = true;
        max_msg_per_connection: u32 = ["max-msg-per-connection"], acted = true;
        max_errors_per_connection: u32 = ["max-errors-per-connection"], acted = true;
        max_connect_rate: Rate = ["max-connect-rate"], acted = true;
        source_ip_max_smtp_out: u32 = ["source-ip-max-smtp-out"], acted = true;
        source_ip_max_msg_rate: Rate = ["source-ip-max-msg-rate"], acted = true;
        source_ip_max_connect_rate: Rate = ["source-ip-max-connect-rate"], acted = true;
        max_rcpt_per_message: u32 = ["max-rcpt-per-message"], acted = true;
        retry_after: List<PDuration> = ["retry-after"], acted = true;
        bounce_after: PDuration = ["bounce-after"], acted = true;
        bounce_upon_no_mx: bool = ["bounce-upon-no-mx"], acted = true;
        use_starttls: bool = ["use-starttls"], acted = true;
        require_starttls: bool = ["require-starttls"], acted = true;
        dkim_sign: bool = ["dkim-sign"], acted = true;
        dkim_identity: String = ["dkim-identity"], acted = true;
        dk_sign: bool = ["dk-sign"], acted = false;
        second_dkim_sign: bool = ["second-dkim-sign"], acted = false;
        second_dkim_identity: String = ["second-dkim-identity"], acted = false;
        smtp_pattern_list: String = ["smtp-pattern-list"], acted = true;
        backoff_max_msg_rate: Rate = ["backoff-max-msg-rate"], acted = true;
        backoff_retry_after: List<PDuration> = ["backoff-retry-after"], acted = true;
        backoff_max_smtp_out: u32 = ["backoff-max-smtp-out"], acted = true;
        backoff_to_normal_after: PDuration = ["backoff-to-normal-after"], acted = true;
        backoff_to_normal_after_delivery: bool = ["backoff-to-normal-after-delivery"], acted = true;
        backoff_notify: String = ["backoff-notify"], acted = false;
        backoff_reroute_to_virtual_mta: String = ["backoff-reroute-to-virtual-mta"], acted = false;
        reroute_to_virtual_mta: String = ["reroute-to-virtual-mta"], acted = false;
        smtp_greeting_timeout: PDuration = ["smtp-greeting-timeout"], acted = true;
        connect_timeout: PDuration = ["connect-timeout"], acted = true;
        data_send_timeout: PDuration = ["data-send-timeout"], acted = true;
        smtp_command_timeout: PDuration = ["smtp-command-timeout"], acted = true;
        smtp_data_termination_timeout: PDuration = ["smtp-data-termination-timeout"], acted = true;
        assume_delivery_upon_data_termination_timeout: bool = ["assume-delivery-upon-data-termination-timeout"], acted = true;
        smtp_421_means_mx_unavailable: bool = ["smtp-421-means-mx-unavailable", "421-means-mx-unavailable"], acted = true;
        smtp_553_means_invalid_mailbox: bool = ["smtp-553-means-invalid-mailbox"], acted = false;
        bounce_upon_5xx_greeting: bool = ["bounce-upon-5xx-greeting"], acted = true;
        queue_to: String = ["queue-to"], acted = true;
        route: HostPort = ["route"], acted = true;
        smtp_hosts: SmtpHosts = ["smtp-hosts"], acted = true;
        max_cold_virtual_mta_msg: Rate = ["max-cold-virtual-mta-msg"], acted = true;
        queue_priority: QueuePriority = ["queue-priority"], acted = true;
        delivery_type: DeliveryType = ["type"], acted = false;
        ignore_8bitmime: bool = ["ignore-8bitmime"], acted = true;
        ignore_chunking: bool = ["ignore-chunking"], acted = false;
        reuse_ssl_session: bool = ["reuse-ssl-session"], acted = false;
        mx_connection_attempts: u32 = ["mx-connection-attempts"], acted = true;
        deliver_local_dsn: bool = ["deliver-local-dsn"], acted = true;
        delay_dsn_after: PDuration = ["delay-dsn-after"], acted = true;
        log_data: bool = ["log-data"], acted = false;
        log_messages: bool = ["log-messages"], acted = false;
        max_events_recorded: u32 = ["max-events-recorded"], acted = false;
        file_destination: String = ["file-destination"], acted = false;
        file_format: String = ["file-format"], acted = false;
    }
}

settings! {
    /// Who may inject, and how (`<source>`).
    SourceSettings {
        always_allow_relaying: bool = ["always-allow-relaying"], acted = true;
        smtp_service: bool = ["smtp-service"], acted = true;
        process_x_virtual_mta: bool = ["process-x-virtual-mta"], acted = true;
        default_virtual_mta: String = ["default-virtual-mta"], acted = true;
        allow_unencrypted_plain_auth: bool = ["allow-unencrypted-plain-auth"], acted = true;
        hide_message_source: bool = ["hide-message-source"], acted = true;
        max_smtp_in: u32 = ["max-smtp-in"], acted = true;
        log_connections: bool = ["log-connections"], acted = false;
        log_commands: bool = ["log-commands"], acted = false;
        log_data: bool = ["log-data"], acted = false;
        require_auth: bool = ["require-auth"], acted = true;
        add_received_header: bool = ["add-received-header"], acted = true;
        remove_received_headers: bool = ["remove-received-headers"], acted = true;
        always_allow_api_submission: bool = ["always-allow-api-submission"], acted = true;
        process_x_job: bool = ["process-x-job"], acted = true;
        jobid_header: String = ["jobid-header"], acted = true;
        retain_x_job: bool = ["retain-x-job"], acted = true;
        add_message_id_header: bool = ["add-message-id-header"], acted = true;
        add_date_header: bool = ["add-date-header"], acted = false;
        max_message_size: Size = ["max-message-size"], acted = true;
        allow_starttls: bool = ["allow-starttls"], acted = true;
        require_starttls: bool = ["require-starttls"], acted = true;
        require_starttls_before_auth: bool = ["require-starttls-before-auth"], acted = true;
        pattern_list: String = ["pattern-list"], acted = true;
        process_x_envid: bool = ["process-x-envid"], acted = true;
        retain_x_virtual_mta: bool = ["retain-x-virtual-mta"], acted = true;
        verp_default: bool = ["verp-default"], acted = true;
        remove_header: List<String> = ["remove-header"], acted = false;
        source_group: String = ["source-group"], acted = false;
        smtp_max_auth_failure_rate: Rate = ["smtp-max-auth-failure-rate"], acted = true;
        check_dkim_inbound: bool = ["check-dkim-inbound"], acted = false;
        check_mfrom_inbound: bool = ["check-mfrom-inbound"], acted = false;
        rewrite_list: String = ["rewrite-list"], acted = false;
        deliver_local_dsn: bool = ["deliver-local-dsn"], acted = true;
    }
}

settings! {
    /// Global directives that are plain settings (the repeated ones live in `Policy`).
    GlobalSettings {
        postmaster: String = ["postmaster"], acted = true;
        suppress_on_bounce: List<String> = ["suppress-on-bounce"], acted = true;
        suppress_on_complaint: bool = ["suppress-on-complaint"], acted = true;
        deliver_local_dsn: bool = ["deliver-local-dsn"], acted = true;
        suppressed_recipients: SuppressAction = ["suppressed-recipients"], acted = true;
        host_name: String = ["host-name"], acted = true;
        http_mgmt_port: u16 = ["http-mgmt-port"], acted = true;
        http_redirect_to_https: bool = ["http-redirect-to-https"], acted = false;
        log_file: String = ["log-file"], acted = false;
        run_as_root: bool = ["run-as-root"], acted = true;
        process_user: String = ["process-user"], acted = true;
        spool: String = ["spool"], acted = false;
        sync_msg_create: bool = ["sync-msg-create"], acted = false;
        sync_msg_update: bool = ["sync-msg-update"], acted = false;
        total_max_smtp_out: u32 = ["total-max-smtp-out"], acted = true;
        total_max_smtp_in: u32 = ["total-max-smtp-in"], acted = true;
        total_max_file: u32 = ["total-max-file"], acted = false;
        smtp_server_tls_certificate: TlsCertificate = ["smtp-server-tls-certificate"], acted = true;
        smtp_server_tls_allow_tlsv1: bool = ["smtp-server-tls-allow-tlsv1"], acted = false;
        smtp_server_tls_allow_tlsv1_1: bool = ["smtp-server-tls-allow-tlsv1.1"], acted = false;
        smtp_server_tls_allow_tlsv1_2: bool = ["smtp-server-tls-allow-tlsv1.2"], acted = false;
        smtp_server_tls_allow_tlsv1_3: bool = ["smtp-server-tls-allow-tlsv1.3"], acted = false;
        smtp_server_tls_ciphers: String = ["smtp-server-tls-ciphers"], acted = false;
        retry_after: List<PDuration> = ["retry-after"], acted = true;
        bounce_after: PDuration = ["bounce-after"], acted = true;
        dummy_smtp_port: u16 = ["dummy-smtp-port"], acted = false;
        dummy_smtp_ip: String = ["dummy-smtp-ip"], acted = false;
        dummy_smtp_blacklist: String = ["dummy-smtp-blacklist"], acted = false;
        dummy_smtp_blacklist_bounce_method: String = ["dummy-smtp-blacklist-bounce-method"], acted = false;
        dummy_smtp_blacklist_bounce_percent: u32 = ["dummy-smtp-blacklist-bounce-percent"], acted = false;
        dummy_smtp_has_chunking: bool = ["dummy-smtp-has-chunking"], acted = false;
        dummy_smtp_has_mailmerge: bool = ["dummy-smtp-has-mailmerge"], acted = false;
        dummy_smtp_has_pipelining: bool = ["dummy-smtp-has-pipelining"], acted = false;
        dummy_smtp_log_blacklist: bool = ["dummy-smtp-log-blacklist"], acted = false;
        enable_signals: bool = ["enable-signals"], acted = false;
    }
}

settings! {
    /// `<smtp-user NAME>`.
    SmtpUserSettings {
        password: String = ["password"], acted = true;
        password_hash: PasswordHash = ["password-hash"], acted = true;
        source: String = ["source"], acted = true;
        authentication_method: AuthMethod = ["authentication-method"], acted = false;
    }
}

settings! {
    /// `<acct-file>` settings.
    AcctSettings {
        records: List<RecordType> = ["records"], acted = true;
        move_interval: PDuration = ["move-interval"], acted = true;
        max_size: Size = ["max-size"], acted = true;
        delete_after: MaybeNever = ["delete-after"], acted = true;
        sync: bool = ["sync"], acted = false;
        move_to: String = ["move-to"], acted = false;
    }
}

settings! {
    /// `<rejectlog-file PATH>` settings.
    RejectLogSettings {
        records: List<String> = ["records"], acted = true;
        max_size: Size = ["max-size"], acted = true;
        move_interval: PDuration = ["move-interval"], acted = false;
        delete_after: MaybeNever = ["delete-after"], acted = false;
    }
}

settings! {
    /// `<spool PATH>`: PowerMTA's disk spool. Sluice's queue is the replicated store instead.
    SpoolSettings {
        delete_file_holders: bool = ["delete-file-holders"], acted = false;
        deliver_only: bool = ["deliver-only"], acted = false;
    }
}

settings! {
    /// `<feedback-loop-processor>` and `<bounce-processor>`.
    ProcessorSettings {
        deliver_matched_email: bool = ["deliver-matched-email"], acted = true;
        deliver_unmatched_email: bool = ["deliver-unmatched-email"], acted = true;
    }
}

settings! {
    /// `<signals>`: SparkPost Signals upload; parsed, not acted on.
    SignalsSettings {
        api_key: String = ["api-key"], acted = false;
        upload_url: String = ["upload-url"], acted = false;
        log_verbose: bool = ["log-verbose"], acted = false;
        custom_message_id_header: String = ["custom-message-id-header"], acted = false;
        engagement_tracking: String = ["engagement-tracking"], acted = false;
        min_free_space: Size = ["min-free-space"], acted = false;
        privacy_policy: String = ["privacy-policy"], acted = false;
        process_x_sp_subaccount_id: bool = ["process-x-sp-subaccount-id"], acted = false;
        retain_x_sp_subaccount_id: bool = ["retain-x-sp-subaccount-id"], acted = false;
    }
}

settings! {
    /// `<source-group NAME>`.
    SourceGroupSettings {
        max_smtp_in: u32 = ["max-smtp-in"], acted = false;
        reserved_smtp_in: u32 = ["reserved-smtp-in"], acted = false;
    }
}

settings! {
    /// Plain settings of `<virtual-mta>`.
    VmtaSettings {
        max_smtp_out: u32 = ["max-smtp-out"], acted = true;
        host_name: String = ["host-name"], acted = true;
    }
}

/// `queue-priority 0..100`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueuePriority(pub u8);

impl PolicyValue for QueuePriority {
    fn parse_value(raw: &str) -> Result<Self, String> {
        match raw.parse::<u8>() {
            Ok(n) if n <= 100 => Ok(QueuePriority(n)),
            _ => Err(format!("expected a priority from 0 to 100, found `{raw}`")),
        }
    }
}

impl PolicyValue for u16 {
    fn parse_value(raw: &str) -> Result<Self, String> {
        raw.parse()
            .map_err(|_| format!("expected a port number (1-65535), found `{raw}`"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryType {
    Smtp,
    Discard,
    File,
    Pipe,
}

impl PolicyValue for DeliveryType {
    fn parse_value(raw: &str) -> Result<Self, String> {
        match raw.to_ascii_lowercase().as_str() {
            "smtp" => Ok(DeliveryType::Smtp),
            "discard" => Ok(DeliveryType::Discard),
            "file" => Ok(DeliveryType::File),
            "pipe" => Ok(DeliveryType::Pipe),
            _ => Err(format!(
                "expected smtp, discard, file or pipe, found `{raw}`"
            )),
        }
    }
}

/// What ingress does with a recipient on the suppression list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SuppressAction {
    /// `550 5.7.1` at RCPT.
    Reject,
    /// Accepted, then bounced with a `b` row of category `suppressed`.
    Bounce,
}

impl PolicyValue for SuppressAction {
    fn parse_value(raw: &str) -> Result<Self, String> {
        match raw.to_ascii_lowercase().as_str() {
            "reject" => Ok(SuppressAction::Reject),
            "bounce" => Ok(SuppressAction::Bounce),
            _ => Err(format!("expected reject or bounce, found `{raw}`")),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMethod {
    Password,
    CramMd5,
}

impl PolicyValue for AuthMethod {
    fn parse_value(raw: &str) -> Result<Self, String> {
        match raw.to_ascii_lowercase().as_str() {
            "password" => Ok(AuthMethod::Password),
            "cram-md5" => Ok(AuthMethod::CramMd5),
            _ => Err(format!("expected password or cram-md5, found `{raw}`")),
        }
    }
}

/// Accounting record types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordType {
    #[serde(rename = "d")]
    Delivery,
    #[serde(rename = "b")]
    Bounce,
    #[serde(rename = "t")]
    Transient,
    #[serde(rename = "tq")]
    TransientQueue,
    #[serde(rename = "r")]
    Received,
    #[serde(rename = "f")]
    Feedback,
    #[serde(rename = "rb")]
    RemoteBounce,
    #[serde(rename = "rs")]
    RemoteStatus,
}

impl RecordType {
    pub const ALL: [RecordType; 8] = [
        RecordType::Delivery,
        RecordType::Bounce,
        RecordType::Transient,
        RecordType::TransientQueue,
        RecordType::Received,
        RecordType::Feedback,
        RecordType::RemoteBounce,
        RecordType::RemoteStatus,
    ];

    pub fn code(self) -> &'static str {
        match self {
            RecordType::Delivery => "d",
            RecordType::Bounce => "b",
            RecordType::Transient => "t",
            RecordType::TransientQueue => "tq",
            RecordType::Received => "r",
            RecordType::Feedback => "f",
            RecordType::RemoteBounce => "rb",
            RecordType::RemoteStatus => "rs",
        }
    }
}

impl PolicyValue for RecordType {
    fn parse_value(raw: &str) -> Result<Self, String> {
        Ok(match raw.to_ascii_lowercase().as_str() {
            "d" | "delivery" => RecordType::Delivery,
            "b" | "bounce" => RecordType::Bounce,
            "t" => RecordType::Transient,
            "tq" => RecordType::TransientQueue,
            "r" | "receipt" => RecordType::Received,
            "f" | "feedback-loop" => RecordType::Feedback,
            "rb" | "remote-bounce" => RecordType::RemoteBounce,
            "rs" | "remote-status" => RecordType::RemoteStatus,
            _ => {
                return Err(format!(
                    "expected record types such as d,b,t,tq,r,f,rb,rs, found `{raw}`"
                ));
            }
        })
    }
}

/// `smtp-server-tls-certificate CERT,KEY[,PASSWORD]` (a single file holding both also works).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCertificate {
    pub cert: String,
    pub key: String,
    #[serde(skip_serializing)]
    pub password: Option<String>,
}

impl PolicyValue for TlsCertificate {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let parts: Vec<&str> = raw.split(',').map(|s| unquote(s.trim())).collect();
        match parts.as_slice() {
            [c] if !c.is_empty() => Ok(TlsCertificate {
                cert: c.to_string(),
                key: c.to_string(),
                password: None,
            }),
            [c, k] => Ok(TlsCertificate {
                cert: c.to_string(),
                key: k.to_string(),
                password: None,
            }),
            [c, k, p] => Ok(TlsCertificate {
                cert: c.to_string(),
                key: k.to_string(),
                password: Some(p.to_string()),
            }),
            _ => Err(format!(
                "expected CERT-FILE,KEY-FILE[,PASSWORD], found `{raw}`"
            )),
        }
    }
}

/// `password-hash`: a PHC string from argon2 (what `sluice config hash-password` prints), so the
/// policy file need not hold the password itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordHash(pub String);

impl PolicyValue for PasswordHash {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let t = unquote(raw.trim());
        super::secrets::check_hash(t)?;
        Ok(PasswordHash(t.to_string()))
    }
}

/// `smtp-hosts`: fixed next hops, or `lookup-mx DOMAIN` (deliver via another domain's MX).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SmtpHosts {
    Hosts(Vec<HostPort>),
    LookupMx(String),
}

impl PolicyValue for SmtpHosts {
    fn parse_value(raw: &str) -> Result<Self, String> {
        let t = raw.trim();
        if let Some(rest) = t.strip_prefix("lookup-mx") {
            let d = rest.trim_start_matches(':').trim();
            if !is_hostname(d) {
                return Err(format!("expected `lookup-mx DOMAIN`, found `{raw}`"));
            }
            return Ok(SmtpHosts::LookupMx(d.to_ascii_lowercase()));
        }
        let mut hosts = Vec::new();
        for part in t.split(',') {
            hosts.push(HostPort::parse_value(part.trim())?);
        }
        Ok(SmtpHosts::Hosts(hosts))
    }
}

/// What a `<domain ...>` block matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum DomainPattern {
    Exact(String),
    /// `*.example.com`: the suffix after `*.`.
    Wildcard(String),
    /// `[*.]example.com`: the domain and every subdomain.
    WithSubdomains(String),
    /// `$name` of a `domain-macro`.
    Macro(String),
    Any,
    /// `{name}`: a named queue that only `queue-to` (or routing) sends mail to.
    Named(String),
}

impl DomainPattern {
    pub fn parse(arg: &str) -> Result<Self, String> {
        let a = unquote(arg).trim().to_ascii_lowercase();
        if a == "*" {
            return Ok(DomainPattern::Any);
        }
        if let Some(m) = a.strip_prefix('$') {
            return if m.is_empty() {
                Err("`$` needs a macro name".into())
            } else {
                Ok(DomainPattern::Macro(m.to_string()))
            };
        }
        if let Some(n) = a.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            return Ok(DomainPattern::Named(n.to_string()));
        }
        if let Some(s) = a.strip_prefix("[*.]") {
            return if is_hostname(s) {
                Ok(DomainPattern::WithSubdomains(s.to_string()))
            } else {
                Err(format!("`{arg}` is not a valid domain"))
            };
        }
        if let Some(s) = a.strip_prefix("*.") {
            return if is_hostname(s) {
                Ok(DomainPattern::Wildcard(s.to_string()))
            } else {
                Err(format!("`{arg}` is not a valid wildcard domain"))
            };
        }
        // Rollup queue names (`gmail.rollup`) are names too.
        if is_hostname(&a) {
            return Ok(DomainPattern::Exact(a));
        }
        Err(format!(
            "`{arg}` is not a domain, `*.suffix`, `$macro`, `{{name}}` or `*`"
        ))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainRule {
    pub pattern: DomainPattern,
    pub settings: DomainSettings,
    #[serde(skip)]
    pub loc: Option<Loc>,
    /// Its directives as written, for `show settings` and `explain` (controller only).
    #[serde(skip)]
    pub written: Vec<Written>,
}

/// A directive as written in the policy file: its value's text and where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub name: String,
    pub value: String,
    pub loc: Loc,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listener {
    /// None = every address (`0/0`).
    pub addr: Option<IpAddr>,
    pub port: u16,
    /// `tls=yes`: implicit TLS (SMTPS) instead of STARTTLS.
    pub implicit_tls: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLevel {
    None,
    Monitor,
    Admin,
    Inject,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpAccess {
    pub cidr: IpNet,
    pub level: AccessLevel,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DomainKey {
    pub selector: String,
    /// `*` means any From domain.
    pub domain: String,
    pub key_file: String,
    /// PEM text, read when the policy is loaded, so that it is served to workers with the
    /// policy. `sluice config check --json` blanks it.
    #[serde(default)]
    pub key_pem: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SourceMatch {
    Cidr(IpNet),
    /// `<source {name}>`: applies after AUTH as a named smtp-user's source.
    Named(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Source {
    pub matches: SourceMatch,
    pub settings: SourceSettings,
    #[serde(skip)]
    pub loc: Option<Loc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vmta {
    pub name: String,
    pub source_ip: Option<IpAddr>,
    pub ehlo_name: Option<String>,
    pub settings: VmtaSettings,
    pub domain_keys: Vec<DomainKey>,
    pub domains: Vec<DomainRule>,
    #[serde(skip)]
    pub loc: Option<Loc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pool {
    pub name: String,
    pub members: Vec<String>,
    /// `<domain>` overrides written inside the pool (parsed; not acted on yet).
    pub domains: Vec<DomainRule>,
    #[serde(skip)]
    pub loc: Option<Loc>,
}

/// `default-virtual-mta by-smtp-source-ip`: the VMTA whose source IP received the message.
pub const BY_SOURCE_IP: &str = "by-smtp-source-ip";

/// Actions of an `<smtp-pattern-list>` rule.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatternActions {
    /// Some(true) = `mode=backoff`, Some(false) = `mode=normal`.
    pub backoff: Option<bool>,
    pub backoff_to_normal_after: Option<u64>,
    pub skip_mx: bool,
    pub bounce_queue: bool,
    pub bounce_rcpt: bool,
    pub defer_queue: bool,
    pub disable_source_ip: bool,
    pub reenable_after: Option<u64>,
}

impl PatternActions {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut a = PatternActions::default();
        let mut seen: Vec<String> = Vec::new();
        for part in raw
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
        {
            let key = part.split('=').next().unwrap_or(part).to_ascii_lowercase();
            let key_for_dup = if key == "mode" {
                part.to_ascii_lowercase()
            } else {
                key.clone()
            };
            if seen.contains(&key_for_dup) {
                return Err(format!("the action `{part}` is given twice"));
            }
            seen.push(key_for_dup);
            match part.to_ascii_lowercase().as_str() {
                "mode=backoff" | "mode=normal" => {
                    let b = part.eq_ignore_ascii_case("mode=backoff");
                    if a.backoff.is_some_and(|prev| prev != b) {
                        return Err("`mode=backoff` and `mode=normal` cannot be combined".into());
                    }
                    a.backoff = Some(b);
                }
                "skip-mx" => a.skip_mx = true,
                "bounce-queue" => a.bounce_queue = true,
                "bounce-rcpt" => a.bounce_rcpt = true,
                "defer-queue" => a.defer_queue = true,
                "disable-source-ip" => a.disable_source_ip = true,
                other => {
                    if let Some(v) = other.strip_prefix("backoff-to-normal-after=") {
                        a.backoff_to_normal_after = Some(parse_duration(v)?.as_secs());
                    } else if let Some(v) = other.strip_prefix("reenable-after=") {
                        a.reenable_after = Some(parse_duration(v)?.as_secs());
                    } else {
                        let known = [
                            "mode=backoff",
                            "mode=normal",
                            "skip-mx",
                            "bounce-queue",
                            "bounce-rcpt",
                            "defer-queue",
                            "disable-source-ip",
                            "backoff-to-normal-after=",
                            "reenable-after=",
                        ];
                        let hint = super::diag::closest(other, known)
                            .map(|k| format!(" (did you mean `{k}`?)"))
                            .unwrap_or_default();
                        return Err(format!("unknown pattern action `{part}`{hint}"));
                    }
                }
            }
        }
        if seen.is_empty() {
            return Err("a pattern needs at least one action, such as mode=backoff".into());
        }
        if a.reenable_after.is_some() && !a.disable_source_ip {
            return Err("`reenable-after` needs `disable-source-ip` in the same rule".into());
        }
        Ok(a)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmtpPattern {
    pub regex: PRegex,
    pub actions: PatternActions,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmtpPatternList {
    pub name: String,
    pub rules: Vec<SmtpPattern>,
}

impl SmtpPatternList {
    /// The first rule whose regex matches the reply text.
    pub fn first_match(&self, reply: &str) -> Option<&SmtpPattern> {
        self.rules.iter().find(|r| r.regex.is_match(reply))
    }
}

/// Bounce categories of the reference page.
pub const BOUNCE_CATEGORIES: &[&str] = &[
    "bad-mailbox",
    "bad-domain",
    "inactive-mailbox",
    "quota-issues",
    "spam-related",
    "virus-related",
    "content-related",
    "policy-related",
    "invalid-sender",
    "relaying-issues",
    "routing-errors",
    "protocol-errors",
    "no-answer-from-host",
    "bad-connection",
    "bad-configuration",
    "message-expired",
    "other",
    "success",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BouncePattern {
    pub regex: PRegex,
    pub category: String,
}

/// `<pattern-list NAME>`: routes by envelope address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingRule {
    /// `mail-from` or `rcpt-to`.
    pub field: String,
    pub regex: PRegex,
    pub virtual_mta: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingList {
    pub name: String,
    pub rules: Vec<RoutingRule>,
}

/// One selected column set in `record-fields TYPE f1,f2,*,!f3,header_X`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordFields {
    pub record: RecordType,
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AcctFile {
    /// A path, or `|program` for a pipe.
    pub target: String,
    pub settings: AcctSettings,
    pub record_fields: Vec<RecordFields>,
    pub header_columns: Vec<(String, String)>,
}

impl AcctFile {
    /// Header names whose values this file records (`header_X` columns and
    /// `map-header-to-field`), lower-cased.
    pub fn wanted_headers(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .record_fields
            .iter()
            .flat_map(|rf| rf.fields.iter())
            .filter_map(|f| f.strip_prefix("header_"))
            .chain(self.header_columns.iter().map(|(h, _)| h.as_str()))
            .map(|h| h.to_ascii_lowercase())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RejectLog {
    pub path: String,
    pub settings: RejectLogSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MxRollup {
    pub mx_pattern: String,
    pub queue: String,
}

/// `<bounce-processor>` or `<feedback-loop-processor>`: the addresses whose mail is read as
/// reports instead of relayed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Processor {
    pub settings: ProcessorSettings,
    pub domains: Vec<String>,
    /// Literal addresses (lower-cased).
    pub addresses: Vec<String>,
    /// `address /REGEX/` entries.
    pub address_patterns: Vec<PRegex>,
}

impl Processor {
    /// Whether mail to `address` is this processor's. A literal address also matches its VERP
    /// forms (`local+anything@domain`). A pattern must match the whole address.
    pub fn matches(&self, address: &str) -> bool {
        let a = address.to_ascii_lowercase();
        let (local, domain) = a.rsplit_once('@').unwrap_or((&a, ""));
        self.domains.iter().any(|d| d == domain)
            || self.addresses.iter().any(|x| {
                x.rsplit_once('@').is_some_and(|(l, d)| {
                    d == domain
                        && local
                            .strip_prefix(l)
                            .is_some_and(|rest| rest.is_empty() || rest.starts_with('+'))
                })
            })
            || self.address_patterns.iter().any(|r| r.regex.is_match(&a))
    }
}

/// The whole policy: what the controller serves to every role.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Policy {
    pub global: GlobalSettings,
    /// Top-level `retry-after` and `bounce-after` as written (they apply to every domain).
    #[serde(skip)]
    pub global_written: Vec<Written>,
    pub listeners: Vec<Listener>,
    pub http_access: Vec<HttpAccess>,
    pub relay_domains: Vec<String>,
    pub domain_macros: BTreeMap<String, Vec<String>>,
    pub domain_keys: Vec<DomainKey>,
    pub sources: Vec<Source>,
    pub smtp_users: BTreeMap<String, SmtpUserSettings>,
    pub vmtas: BTreeMap<String, Vmta>,
    pub pools: BTreeMap<String, Pool>,
    pub domains: Vec<DomainRule>,
    pub smtp_pattern_lists: BTreeMap<String, SmtpPatternList>,
    pub routing_lists: BTreeMap<String, RoutingList>,
    pub bounce_patterns: Vec<BouncePattern>,
    pub acct_files: Vec<AcctFile>,
    pub reject_log: Option<RejectLog>,
    pub mx_rollups: Vec<MxRollup>,
    pub feedback_processor: Option<Processor>,
    pub bounce_processor: Option<Processor>,
    pub spool: Option<SpoolSettings>,
    pub signals: Option<SignalsSettings>,
    pub source_groups: BTreeMap<String, SourceGroupSettings>,
    pub pickup: Vec<String>,
    #[serde(skip)]
    pub index: super::resolve::DomainIndex,
    #[serde(skip)]
    pub vmta_index: BTreeMap<String, super::resolve::DomainIndex>,
}
