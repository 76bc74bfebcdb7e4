//! Parse and validate a generated policy with 1,000 VMTAs, 50 pools and 5,000 domain blocks.

use std::fmt::Write;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice_common::policy::{LoadOptions, load_str};

fn generated_policy() -> String {
    let mut s = String::from(
        "smtp-listener 0/0:25\nhttp-access 127.0.0.1 admin\n<source 0/0>\nsmtp-service yes\n</source>\n",
    );
    s.push_str("<smtp-pattern-list pl>\nreply /rate limit/ mode=backoff\nreply /blocked/ mode=backoff,backoff-to-normal-after=1h\n</smtp-pattern-list>\n");
    for v in 0..1000 {
        let _ = write!(
            s,
            "<virtual-mta v{v}>\n  smtp-source-host 10.{}.{}.{} v{v}.example.com\n  max-smtp-out 10\n  <domain big{}.test>\n    max-msg-rate 100/h\n  </domain>\n</virtual-mta>\n",
            v / 65536,
            (v / 256) % 256,
            v % 256,
            v % 50
        );
    }
    for p in 0..50 {
        let _ = writeln!(s, "<virtual-mta-pool pool{p}>");
        for m in 0..20 {
            let _ = writeln!(s, "  virtual-mta v{}", p * 20 + m);
        }
        s.push_str("</virtual-mta-pool>\n");
    }
    s.push_str("<domain *>\n  max-smtp-out 20\n  retry-after 10m,20m,1h\n  bounce-after 4d12h\n</domain>\n");
    for d in 0..5000 {
        let _ = write!(
            s,
            "<domain d{d}.example.com>\n  max-smtp-out {}\n  max-msg-rate {}/h\n  retry-after 5m,15m\n  smtp-pattern-list pl\n  use-starttls yes\n</domain>\n",
            d % 50 + 1,
            d + 100
        );
    }
    s
}

fn bench(c: &mut Criterion) {
    let text = generated_policy();
    let policy = load_str(
        Path::new("generated.conf"),
        &text,
        LoadOptions { read_files: false },
    )
    .expect("generated policy is valid");
    assert_eq!(policy.policy.vmtas.len(), 1000);
    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    g.bench_function("parse_validate_1000_vmtas_50_pools_5000_domains", |b| {
        b.iter(|| {
            load_str(
                Path::new("generated.conf"),
                &text,
                LoadOptions { read_files: false },
            )
            .unwrap()
        })
    });
    g.bench_function("resolve_domain_settings", |b| {
        let mut i = 0u32;
        b.iter(|| {
            i = i.wrapping_add(7919);
            policy
                .policy
                .domain_settings(&format!("d{}.example.com", i % 6000), Some("v7"))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
