//! Every directive the model marks as acted on names the behavioural test that proves it: a
//! test whose policy sets the directive and whose assertions would fail if it were ignored.
//! This check fails when an acted directive has no entry, when an entry names a directive that
//! is not acted on, or when a named test does not exist.

use std::path::Path;

use sluice_common::policy::*;

/// (block, directive, tests as `path::function`).
const COVERAGE: &[(&str, &str, &[&str])] = &[
    (
        "source",
        "verp-default",
        &["tests/inbound_reports.rs::bounces_and_complaints_become_records_and_suppressions"],
    ),
    (
        "global",
        "suppress-on-complaint",
        // The end-to-end test has it on (the default); the unit test turns it off.
        &[
            "tests/inbound_reports.rs::bounces_and_complaints_become_records_and_suppressions",
            "controller/src/reports.rs::complaints_suppress_unless_not_spam_or_switched_off",
        ],
    ),
    (
        "processor",
        "deliver-matched-email",
        &["tests/inbound_reports.rs::bounces_and_complaints_become_records_and_suppressions"],
    ),
    (
        "processor",
        "deliver-unmatched-email",
        &["tests/inbound_reports.rs::bounces_and_complaints_become_records_and_suppressions"],
    ),
    (
        "domain",
        "deliver-local-dsn",
        &["tests/dsn.rs::notices_reach_senders_through_the_queue"],
    ),
    (
        "domain",
        "delay-dsn-after",
        &["tests/dsn.rs::notices_reach_senders_through_the_queue"],
    ),
    (
        "global",
        "suppress-on-bounce",
        &["tests/suppression.rs::suppressed_addresses_are_refused_and_the_list_is_replicated"],
    ),
    (
        "global",
        "suppressed-recipients",
        &["tests/suppression.rs::suppressed_addresses_are_refused_and_the_list_is_replicated"],
    ),
    (
        "global",
        "deliver-local-dsn",
        // Without it the notices of the bounces this test makes would reach its sink.
        &["tests/controller_scheduling.rs::pause_resume_and_delete"],
    ),
    (
        "global",
        "postmaster",
        &["tests/dsn.rs::notices_reach_senders_through_the_queue"],
    ),
    (
        "source",
        "deliver-local-dsn",
        &["tests/dsn.rs::notices_reach_senders_through_the_queue"],
    ),
    // <domain>
    (
        "domain",
        "max-smtp-out",
        &[
            "tests/controller_scheduling.rs::connection_and_rate_budgets_hold_at_the_sink_with_two_workers",
            "tests/controller_scheduling.rs::rate_and_connection_limits_hold_at_the_receiver_across_a_leader_kill",
        ],
    ),
    (
        "domain",
        "max-msg-rate",
        &[
            "tests/controller_scheduling.rs::connection_and_rate_budgets_hold_at_the_sink_with_two_workers",
            "tests/controller_scheduling.rs::rate_and_connection_limits_hold_at_the_receiver_across_a_leader_kill",
        ],
    ),
    (
        "domain",
        "max-msg-per-connection",
        &["tests/worker_delivery.rs::replies_patterns_and_connection_reuse"],
    ),
    (
        "domain",
        "max-errors-per-connection",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain",
        "max-connect-rate",
        &[
            "tests/controller_scheduling.rs::connect_rates_warmup_and_vmta_connection_caps_hold_at_the_sink",
        ],
    ),
    (
        "domain",
        "source-ip-max-smtp-out",
        &["tests/controller_scheduling.rs::source_ip_budgets_hold_across_vmtas_that_share_an_ip"],
    ),
    (
        "domain",
        "source-ip-max-msg-rate",
        &["tests/controller_scheduling.rs::source_ip_budgets_hold_across_vmtas_that_share_an_ip"],
    ),
    (
        "domain",
        "source-ip-max-connect-rate",
        &[
            "tests/controller_scheduling.rs::connect_rates_warmup_and_vmta_connection_caps_hold_at_the_sink",
        ],
    ),
    (
        "domain",
        "max-rcpt-per-message",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain",
        "retry-after",
        &["tests/controller_scheduling.rs::a_retry_schedule_of_hours_is_followed_on_the_log_clock"],
    ),
    (
        "domain",
        "bounce-after",
        &[
            "tests/controller_scheduling.rs::a_retry_schedule_of_hours_is_followed_on_the_log_clock",
            "tests/controller_scheduling.rs::mail_past_bounce_after_bounces_in_a_paused_queue_and_where_no_worker_owns_the_ip",
        ],
    ),
    (
        "domain",
        "bounce-upon-no-mx",
        &["tests/worker_delivery.rs::mx_order_fallback_implicit_null_and_nxdomain"],
    ),
    (
        "domain",
        "use-starttls",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain",
        "require-starttls",
        &[
            "tests/worker_delivery.rs::require_starttls_verifies_the_certificate_against_trusted_roots_and_the_mx_name",
            "tests/worker_delivery.rs::source_ips_tls_and_dkim",
        ],
    ),
    (
        "domain",
        "dkim-sign",
        &[
            "tests/worker_delivery.rs::source_ips_tls_and_dkim",
            "tests/end_to_end.rs::swaks_to_sluice_up_reaches_the_sink_signed_and_accounted",
        ],
    ),
    (
        "domain",
        "dkim-identity",
        &["tests/worker_delivery.rs::source_ips_tls_and_dkim"],
    ),
    (
        "domain",
        "smtp-pattern-list",
        &[
            "tests/worker_delivery.rs::reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip",
            "tests/worker_delivery.rs::bounce_queue_and_defer_queue_patterns_act_on_the_whole_queue",
        ],
    ),
    (
        "domain",
        "backoff-max-msg-rate",
        &["tests/controller_scheduling.rs::backoff_mode_uses_its_own_limits_and_ends_on_time"],
    ),
    (
        "domain",
        "backoff-retry-after",
        &["tests/controller_scheduling.rs::backoff_mode_uses_its_own_limits_and_ends_on_time"],
    ),
    (
        "domain",
        "backoff-max-smtp-out",
        &["tests/controller_scheduling.rs::backoff_mode_uses_its_own_limits_and_ends_on_time"],
    ),
    (
        "domain",
        "backoff-to-normal-after",
        &["tests/controller_scheduling.rs::backoff_mode_uses_its_own_limits_and_ends_on_time"],
    ),
    (
        "domain",
        "backoff-to-normal-after-delivery",
        &["tests/controller_scheduling.rs::a_delivery_ends_backoff_when_the_policy_says_so"],
    ),
    (
        "domain",
        "smtp-greeting-timeout",
        &["tests/worker_delivery.rs::greeting_and_connect_timeouts_end_a_stuck_attempt"],
    ),
    (
        "domain",
        "connect-timeout",
        &["tests/worker_delivery.rs::greeting_and_connect_timeouts_end_a_stuck_attempt"],
    ),
    (
        "domain",
        "data-send-timeout",
        &[
            "tests/worker_delivery.rs::each_time_limit_ends_its_own_step_and_only_the_final_dot_may_assume_delivery",
        ],
    ),
    (
        "domain",
        "smtp-command-timeout",
        &[
            "tests/worker_delivery.rs::each_time_limit_ends_its_own_step_and_only_the_final_dot_may_assume_delivery",
        ],
    ),
    (
        "domain",
        "smtp-data-termination-timeout",
        &[
            "tests/worker_delivery.rs::each_time_limit_ends_its_own_step_and_only_the_final_dot_may_assume_delivery",
        ],
    ),
    (
        "domain",
        "assume-delivery-upon-data-termination-timeout",
        &[
            "tests/worker_delivery.rs::each_time_limit_ends_its_own_step_and_only_the_final_dot_may_assume_delivery",
            "controller/src/sched/disposition.rs::only_a_timeout_after_the_final_dot_may_count_as_delivered",
        ],
    ),
    (
        "domain",
        "smtp-421-means-mx-unavailable",
        &["tests/worker_delivery.rs::a_421_greeting_moves_to_the_next_mx_when_configured"],
    ),
    (
        "domain",
        "421-means-mx-unavailable",
        &["tests/worker_delivery.rs::a_421_greeting_moves_to_the_next_mx_when_configured"],
    ),
    (
        "domain",
        "bounce-upon-5xx-greeting",
        &[
            "tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees",
            "controller/src/sched/disposition.rs::a_5xx_greeting_is_retried_unless_the_policy_says_bounce",
        ],
    ),
    (
        "domain",
        "queue-to",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "domain",
        "route",
        &["tests/worker_delivery.rs::replies_patterns_and_connection_reuse"],
    ),
    (
        "domain",
        "smtp-hosts",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain",
        "max-cold-virtual-mta-msg",
        &[
            "tests/controller_scheduling.rs::connect_rates_warmup_and_vmta_connection_caps_hold_at_the_sink",
        ],
    ),
    (
        "domain",
        "queue-priority",
        &["tests/controller_scheduling.rs::total_max_smtp_out_and_queue_priority"],
    ),
    (
        "domain",
        "ignore-8bitmime",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain",
        "mx-connection-attempts",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    // <source>
    (
        "source",
        "max-smtp-in",
        &["tests/ingress_smtp.rs::max_smtp_in_caps_sessions_per_client_address"],
    ),
    (
        "source",
        "smtp-max-auth-failure-rate",
        &["tests/abuse.rs::auth_failures_are_slowed_limited_per_address_and_user_and_logged"],
    ),
    (
        "source",
        "always-allow-relaying",
        &[
            "tests/ingress_smtp.rs::malformed_input_gets_the_right_replies_and_queues_nothing",
            "tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session",
        ],
    ),
    (
        "source",
        "smtp-service",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "source",
        "process-x-virtual-mta",
        &[
            "tests/worker_delivery.rs::source_ips_tls_and_dkim",
            "ingress/src/message.rs::job_envid_and_vmta_headers",
        ],
    ),
    (
        "source",
        "default-virtual-mta",
        &[
            "ingress/src/message.rs::unknown_vmta_is_refused_and_default_applies",
            "ingress/src/message.rs::routing_by_pattern_list_and_by_source_ip",
        ],
    ),
    (
        "source",
        "allow-unencrypted-plain-auth",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "source",
        "hide-message-source",
        &["ingress/src/message.rs::received_header_directives"],
    ),
    (
        "source",
        "require-auth",
        &["tests/ingress_smtp.rs::swaks_starttls_auth_and_relaying"],
    ),
    (
        "source",
        "add-received-header",
        &["ingress/src/message.rs::received_header_directives"],
    ),
    (
        "source",
        "remove-received-headers",
        &["ingress/src/message.rs::received_header_directives"],
    ),
    (
        "source",
        "always-allow-api-submission",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "source",
        "process-x-job",
        &[
            "ingress/src/message.rs::job_envid_and_vmta_headers",
            "tests/end_to_end.rs::swaks_to_sluice_up_reaches_the_sink_signed_and_accounted",
        ],
    ),
    (
        "source",
        "jobid-header",
        &["ingress/src/message.rs::job_envid_and_vmta_headers"],
    ),
    (
        "source",
        "retain-x-job",
        &["ingress/src/message.rs::job_envid_and_vmta_headers"],
    ),
    (
        "source",
        "add-message-id-header",
        &["ingress/src/message.rs::headers_route_and_are_removed"],
    ),
    (
        "source",
        "max-message-size",
        &["tests/ingress_smtp.rs::malformed_input_gets_the_right_replies_and_queues_nothing"],
    ),
    (
        "source",
        "allow-starttls",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "source",
        "require-starttls",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "source",
        "require-starttls-before-auth",
        &["tests/ingress_smtp.rs::implicit_tls_listener_and_starttls_before_auth"],
    ),
    (
        "source",
        "pattern-list",
        &["ingress/src/message.rs::routing_by_pattern_list_and_by_source_ip"],
    ),
    (
        "source",
        "process-x-envid",
        &["ingress/src/message.rs::job_envid_and_vmta_headers"],
    ),
    (
        "source",
        "retain-x-virtual-mta",
        &["ingress/src/message.rs::job_envid_and_vmta_headers"],
    ),
    // top level
    (
        "global",
        "host-name",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "global",
        "http-mgmt-port",
        &["tests/ingress_smtp.rs::listeners_and_the_http_port_come_from_the_policy"],
    ),
    (
        "global",
        "total-max-smtp-out",
        &["tests/controller_scheduling.rs::total_max_smtp_out_and_queue_priority"],
    ),
    (
        "global",
        "total-max-smtp-in",
        &["tests/ingress_smtp.rs::total_max_smtp_in_caps_concurrent_sessions"],
    ),
    (
        "global",
        "smtp-server-tls-certificate",
        &["tests/ingress_smtp.rs::swaks_starttls_auth_and_relaying"],
    ),
    (
        "global",
        "retry-after",
        &["tests/controller_scheduling.rs::top_level_retry_and_bounce_after_are_the_defaults"],
    ),
    (
        "global",
        "bounce-after",
        &["tests/controller_scheduling.rs::top_level_retry_and_bounce_after_are_the_defaults"],
    ),
    (
        "global",
        "process-user",
        &["tests/security.rs::every_node_drops_to_process_user_after_binding"],
    ),
    (
        "global",
        "run-as-root",
        &["tests/security.rs::root_without_process_user_and_plaintext_beyond_loopback_are_refused"],
    ),
    // <smtp-user>
    (
        "smtp-user",
        "password-hash",
        &["tests/security.rs::smtp_auth_checks_a_password_hash_from_the_policy"],
    ),
    (
        "smtp-user",
        "password",
        &["tests/ingress_smtp.rs::swaks_starttls_auth_and_relaying"],
    ),
    (
        "smtp-user",
        "source",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    // <acct-file>
    (
        "acct-file",
        "records",
        &["tests/controller_scheduling.rs::pause_resume_and_delete"],
    ),
    (
        "acct-file",
        "move-interval",
        &["controller/src/acct.rs::move_interval_rotates_and_delete_after_removes_old_files"],
    ),
    (
        "acct-file",
        "max-size",
        &["controller/src/acct.rs::max_size_moves_the_file_aside"],
    ),
    (
        "acct-file",
        "delete-after",
        &["controller/src/acct.rs::move_interval_rotates_and_delete_after_removes_old_files"],
    ),
    // <rejectlog-file>
    (
        "rejectlog-file",
        "records",
        &["ingress/src/rejectlog.rs::records_choose_what_is_written_and_max_size_rotates"],
    ),
    (
        "rejectlog-file",
        "max-size",
        &["ingress/src/rejectlog.rs::records_choose_what_is_written_and_max_size_rotates"],
    ),
    // <virtual-mta>
    (
        "virtual-mta",
        "max-smtp-out",
        &[
            "tests/controller_scheduling.rs::connect_rates_warmup_and_vmta_connection_caps_hold_at_the_sink",
        ],
    ),
    (
        "virtual-mta",
        "host-name",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
];

/// Directives and block forms outside the settings tables that Sluice acts on, and the
/// reply-pattern actions.
const OTHER_COVERAGE: &[(&str, &[&str])] = &[
    (
        "smtp-listener",
        &["tests/ingress_smtp.rs::listeners_and_the_http_port_come_from_the_policy"],
    ),
    (
        "smtp-listener tls=yes",
        &[
            "tests/ingress_smtp.rs::listeners_and_the_http_port_come_from_the_policy",
            "tests/ingress_smtp.rs::implicit_tls_listener_and_starttls_before_auth",
        ],
    ),
    (
        "http-access",
        &["tests/ingress_smtp.rs::http_injection_answers_after_the_commit"],
    ),
    (
        "relay-domain",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "domain-macro",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "domain-key",
        &["tests/worker_delivery.rs::source_ips_tls_and_dkim"],
    ),
    (
        "smtp-source-host",
        &[
            "tests/worker_delivery.rs::source_ips_tls_and_dkim",
            "tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees",
        ],
    ),
    (
        "<domain> in <virtual-mta>",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "<virtual-mta-pool>",
        &[
            "tests/controller_scheduling.rs::connection_and_rate_budgets_hold_at_the_sink_with_two_workers",
        ],
    ),
    (
        "<source {name}>",
        &["tests/ingress_smtp.rs::source_directives_act_at_the_smtp_session"],
    ),
    (
        "<bounce-category-patterns>",
        &["tests/worker_delivery.rs::delivery_directives_shape_what_the_receiver_sees"],
    ),
    (
        "<pattern-list>",
        &["ingress/src/message.rs::routing_by_pattern_list_and_by_source_ip"],
    ),
    (
        "record-fields",
        &["tests/controller_scheduling.rs::a_retry_schedule_of_hours_is_followed_on_the_log_clock"],
    ),
    (
        "map-header-to-field",
        &["controller/src/acct.rs::header_columns_and_mapped_headers"],
    ),
    (
        "<acct-file |program>",
        &["controller/src/acct.rs::a_pipe_gets_every_row_even_when_its_program_exits"],
    ),
    (
        "<rejectlog-file>",
        &["tests/ingress_smtp.rs::swaks_starttls_auth_and_relaying"],
    ),
    (
        "records tq",
        &["tests/worker_delivery.rs::a_queue_that_cannot_connect_gets_a_tq_row"],
    ),
    (
        "mode=backoff",
        &["tests/worker_delivery.rs::replies_patterns_and_connection_reuse"],
    ),
    (
        "mode=normal",
        &[
            "tests/worker_delivery.rs::reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip",
        ],
    ),
    (
        "skip-mx",
        &[
            "tests/worker_delivery.rs::reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip",
        ],
    ),
    (
        "bounce-rcpt",
        &[
            "tests/worker_delivery.rs::reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip",
        ],
    ),
    (
        "disable-source-ip, reenable-after=",
        &[
            "tests/worker_delivery.rs::reply_pattern_actions_skip_mx_bounce_rcpt_normal_and_disable_source_ip",
        ],
    ),
    (
        "bounce-queue",
        &["tests/worker_delivery.rs::bounce_queue_and_defer_queue_patterns_act_on_the_whole_queue"],
    ),
    (
        "defer-queue",
        &["tests/worker_delivery.rs::bounce_queue_and_defer_queue_patterns_act_on_the_whole_queue"],
    ),
];

fn acted(block: &str) -> Vec<&'static str> {
    let table: &[(&str, bool)] = match block {
        "domain" => DomainSettings::DIRECTIVES,
        "source" => SourceSettings::DIRECTIVES,
        "global" => GlobalSettings::DIRECTIVES,
        "smtp-user" => SmtpUserSettings::DIRECTIVES,
        "acct-file" => AcctSettings::DIRECTIVES,
        "rejectlog-file" => RejectLogSettings::DIRECTIVES,
        "virtual-mta" => VmtaSettings::DIRECTIVES,
        "spool" => SpoolSettings::DIRECTIVES,
        "processor" => ProcessorSettings::DIRECTIVES,
        "signals" => SignalsSettings::DIRECTIVES,
        "source-group" => SourceGroupSettings::DIRECTIVES,
        _ => panic!("unknown block {block}"),
    };
    table.iter().filter(|(_, a)| *a).map(|(n, _)| *n).collect()
}

const BLOCKS: &[&str] = &[
    "domain",
    "source",
    "global",
    "smtp-user",
    "acct-file",
    "rejectlog-file",
    "virtual-mta",
    "spool",
    "processor",
    "signals",
    "source-group",
];

/// Whether `path` (from the workspace root) defines `fn name(`.
fn test_exists(root: &Path, test: &str) -> bool {
    let Some((path, name)) = test.split_once("::") else {
        return false;
    };
    std::fs::read_to_string(root.join(path))
        .map(|text| text.contains(&format!("fn {name}(")))
        .unwrap_or(false)
}

#[test]
fn every_acted_directive_names_a_behavioural_test_that_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    for block in BLOCKS {
        for d in acted(block) {
            if !COVERAGE.iter().any(|(b, n, _)| b == block && *n == d) {
                problems.push(format!("<{block}> {d} is acted on but names no test"));
            }
        }
    }
    for (block, d, tests) in COVERAGE {
        if !acted(block).contains(d) {
            problems.push(format!("<{block}> {d} is listed but not marked acted"));
        }
        if tests.is_empty() {
            problems.push(format!("<{block}> {d} lists no test"));
        }
        for t in *tests {
            if !test_exists(&root, t) {
                problems.push(format!("<{block}> {d}: no test {t}"));
            }
        }
    }
    for (what, tests) in OTHER_COVERAGE {
        for t in *tests {
            if !test_exists(&root, t) {
                problems.push(format!("{what}: no test {t}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
