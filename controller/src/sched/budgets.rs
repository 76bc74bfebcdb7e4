//! Budgets: whether a queue may open one more connection through a VMTA, and how many
//! messages it may be given now. Figures come from the replicated ledger (what the cluster
//! has open, out, and sent by time) plus the grants this leader proposed and has not applied
//! yet, so a new leader starts from the true figures and two picks cannot spend one budget.

use std::net::IpAddr;

use sluice_common::policy::value::Rate;
use sluice_common::policy::{DomainSettings, Policy};

use crate::queue::ledger::BudgetKey;
use crate::queue::state::QueueState;

/// Where the limits are checked: one queue sent through one VMTA from one source IP.
pub struct Sender<'a> {
    pub dest: &'a str,
    pub member: &'a str,
    pub ip: Option<IpAddr>,
}

impl Sender<'_> {
    pub fn keys(&self) -> Vec<BudgetKey> {
        let mut k = vec![
            BudgetKey::Queue(self.dest.to_string(), self.member.to_string()),
            BudgetKey::Vmta(self.member.to_string()),
        ];
        if let Some(ip) = self.ip {
            k.push(BudgetKey::SourceIp(self.dest.to_string(), ip));
        }
        k
    }
}

/// `max-smtp-out` when the policy says nothing.
pub const DEFAULT_MAX_SMTP_OUT: u32 = 20;

fn open(st: &QueueState, k: &BudgetKey) -> u32 {
    st.ledger.usage(k).map_or(0, |u| u.conns) + st.proposed.get(k).0
}

/// Messages a rate window holds now: arrived within it, or granted and not reported yet.
fn msgs_in(st: &QueueState, k: &BudgetKey, r: &Rate, now: u64) -> u64 {
    let from = now.saturating_sub(r.per_secs * 1000);
    st.ledger
        .usage(k)
        .map_or(0, |u| u.msgs.count_since(from) + u.msgs_out)
        + st.proposed.get(k).1
}

fn connects_in(st: &QueueState, k: &BudgetKey, r: &Rate, now: u64) -> u64 {
    let from = now.saturating_sub(r.per_secs * 1000);
    st.ledger
        .usage(k)
        .map_or(0, |u| u.connects.count_since(from) + u.conns_out as u64)
        + st.proposed.get(k).0 as u64
}

fn limited(r: Option<Rate>) -> Option<Rate> {
    r.filter(|r| !r.is_unlimited())
}

/// The budget that kept a queue from a new connection (counted for `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    TotalMaxSmtpOut,
    MaxSmtpOut,
    VmtaMaxSmtpOut,
    MaxConnectRate,
    SourceIpMaxSmtpOut,
    SourceIpMaxConnectRate,
    MsgRate,
}

impl Wait {
    pub const ALL: [Wait; 7] = [
        Wait::TotalMaxSmtpOut,
        Wait::MaxSmtpOut,
        Wait::VmtaMaxSmtpOut,
        Wait::MaxConnectRate,
        Wait::SourceIpMaxSmtpOut,
        Wait::SourceIpMaxConnectRate,
        Wait::MsgRate,
    ];

    /// The directive that set the limit.
    pub fn name(self) -> &'static str {
        match self {
            Wait::TotalMaxSmtpOut => "total-max-smtp-out",
            Wait::MaxSmtpOut => "max-smtp-out",
            Wait::VmtaMaxSmtpOut => "virtual-mta-max-smtp-out",
            Wait::MaxConnectRate => "max-connect-rate",
            Wait::SourceIpMaxSmtpOut => "source-ip-max-smtp-out",
            Wait::SourceIpMaxConnectRate => "source-ip-max-connect-rate",
            Wait::MsgRate => "max-msg-rate",
        }
    }
}

/// How often each [`Wait`] kept a queue waiting, indexed as `Wait::ALL`.
pub type Waits = [u64; 7];

/// Free connection slots for one more connection (`max-smtp-out` minus those open), or the
/// budget that says no.
pub fn may_connect(
    st: &QueueState,
    policy: &Policy,
    rule: &DomainSettings,
    s: &Sender,
    now: u64,
) -> Result<u32, Wait> {
    let total = st.leases.len() as u32 + st.proposed.connections();
    if total >= policy.global.total_max_smtp_out.unwrap_or(u32::MAX) {
        return Err(Wait::TotalMaxSmtpOut);
    }
    let queue = BudgetKey::Queue(s.dest.to_string(), s.member.to_string());
    let vmta = BudgetKey::Vmta(s.member.to_string());
    let max = rule.max_smtp_out.unwrap_or(DEFAULT_MAX_SMTP_OUT);
    let conns = open(st, &queue);
    if conns >= max {
        return Err(Wait::MaxSmtpOut);
    }
    if let Some(vmax) = policy
        .vmtas
        .get(s.member)
        .and_then(|v| v.settings.max_smtp_out)
        && open(st, &vmta) >= vmax
    {
        return Err(Wait::VmtaMaxSmtpOut);
    }
    if let Some(r) = limited(rule.max_connect_rate)
        && connects_in(st, &queue, &r, now) >= r.count
    {
        return Err(Wait::MaxConnectRate);
    }
    if let Some(ip) = s.ip {
        let k = BudgetKey::SourceIp(s.dest.to_string(), ip);
        if rule
            .source_ip_max_smtp_out
            .is_some_and(|m| open(st, &k) >= m)
        {
            return Err(Wait::SourceIpMaxSmtpOut);
        }
        if let Some(r) = limited(rule.source_ip_max_connect_rate)
            && connects_in(st, &k, &r, now) >= r.count
        {
            return Err(Wait::SourceIpMaxConnectRate);
        }
    }
    // A connection is only worth opening if at least one message may go.
    if message_allowance(st, rule, s, now, 1) == 0 {
        return Err(Wait::MsgRate);
    }
    Ok(max - conns)
}

/// How many messages may be granted now, at most `cap`.
pub fn message_allowance(
    st: &QueueState,
    rule: &DomainSettings,
    s: &Sender,
    now: u64,
    cap: u64,
) -> u64 {
    let mut n = cap;
    let left = |k: &BudgetKey, r: Rate| r.count.saturating_sub(msgs_in(st, k, &r, now));
    if let Some(r) = limited(rule.max_msg_rate) {
        n = n.min(left(
            &BudgetKey::Queue(s.dest.to_string(), s.member.to_string()),
            r,
        ));
    }
    if let (Some(ip), Some(r)) = (s.ip, limited(rule.source_ip_max_msg_rate)) {
        n = n.min(left(&BudgetKey::SourceIp(s.dest.to_string(), ip), r));
    }
    if let Some(r) = limited(rule.max_cold_virtual_mta_msg) {
        n = n.min(left(&BudgetKey::Vmta(s.member.to_string()), r));
    }
    n
}
