//! `sluice config check`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sluice_common::policy::{self, LoadOptions, lint::LintOptions};
use sluice_common::settings::Settings;

pub fn run(file: &Path, json: bool, skip_files: bool, worker_settings: &[PathBuf]) -> ExitCode {
    let mut opts = LintOptions::default();
    if !worker_settings.is_empty() {
        let mut owned = BTreeSet::new();
        for f in worker_settings {
            match Settings::load(Some(f), std::collections::BTreeMap::<String, String>::new()) {
                Ok(s) => owned.extend(s.worker.source_ips),
                Err(e) => {
                    eprintln!("error: {}: {e}", f.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        opts.worker_source_ips = Some(owned);
    }
    let lint = policy::lint_file(file, &opts);
    for w in &lint {
        eprintln!("{w}");
    }
    if !lint.is_empty() {
        eprintln!("{}: {} lint warning(s)", file.display(), lint.len());
    }
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
                match serde_json::to_string_pretty(&loaded.policy.redacted()) {
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

/// `sluice config hash-password`: reads a password from standard input (one line) and prints
/// its argon2 hash for `password-hash` in `<smtp-user>`.
pub fn hash_password() -> ExitCode {
    let mut line = String::new();
    if std::io::stdin().read_line(&mut line).is_err() {
        eprintln!("error: cannot read the password from standard input");
        return ExitCode::FAILURE;
    }
    let pw = line.trim_end_matches(['\r', '\n']);
    if pw.is_empty() {
        eprintln!("error: the password is empty");
        return ExitCode::FAILURE;
    }
    println!("{}", policy::secrets::hash_password(pw));
    ExitCode::SUCCESS
}
