//! `sluice config check`.

use std::path::Path;
use std::process::ExitCode;

use sluice_common::policy::{self, LoadOptions};

pub fn run(file: &Path, json: bool, skip_files: bool) -> ExitCode {
    match policy::load(
        file,
        LoadOptions {
            read_files: !skip_files,
        },
    ) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            if json {
                let mut shown = loaded.policy.clone();
                for k in shown.domain_keys.iter_mut().chain(
                    shown
                        .vmtas
                        .values_mut()
                        .flat_map(|v| v.domain_keys.iter_mut()),
                ) {
                    k.key_pem.clear();
                }
                match serde_json::to_string_pretty(&shown) {
                    Ok(j) => println!("{j}"),
                    Err(e) => {
                        eprintln!("error: cannot print the model: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{}: OK", file.display());
                println!("{}", loaded.policy.summary());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for d in e.diagnostics.iter().chain(&e.warnings) {
                eprintln!("{d}");
            }
            eprintln!("{}: {} error(s)", file.display(), e.diagnostics.len());
            ExitCode::FAILURE
        }
    }
}

/// Loads a policy for `sluice up`, turning errors into one readable message.
pub fn load_or_report(file: &Path) -> anyhow::Result<()> {
    policy::load(file, LoadOptions::default())
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("the policy does not load:\n{e}"))
}
