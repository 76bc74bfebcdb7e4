//! Every integration test in one binary, one module per file. libtest runs them as many at a
//! time as there are cores (two on the 2-core CI machine) across all files, so a long test
//! (the multi-host one takes three minutes) overlaps the others instead of running alone; one
//! binary also links once.
//! `cargo test --test integration dsn::` runs one file's tests.

mod harness;

mod abuse;
mod controller_scheduling;
mod deploy_files;
mod dsn;
mod end_to_end;
mod inbound_reports;
mod ingress_smtp;
mod multi_host;
mod observability;
mod queue_cluster;
mod security;
mod suppression;
mod worker_delivery;
