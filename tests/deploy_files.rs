//! The deployment files an operator installs: systemd units (`systemd-analyze verify` and their
//! hardening), the example settings (only documented keys), and the Kubernetes manifests
//! (rendered with kustomize, validated strictly against a fixed Kubernetes version's schemas).
//! `deploy/verify.sh` does the checking; this runs it with the binary under test.

use std::path::Path;
use std::process::Command;

#[test]
fn units_settings_and_manifests_verify() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("deploy/verify.sh"))
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .output()
        .expect("bash runs deploy/verify.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "deploy/verify.sh failed:\n{text}");
    assert!(text.contains(" passed, 0 failed"), "{text}");
}
