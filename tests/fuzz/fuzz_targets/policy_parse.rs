//! Any policy text: the parser answers with a policy or diagnostics, never a panic, and a
//! policy it accepts survives the JSON the controller serves to the other nodes.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sluice_common::policy::{LoadOptions, Policy, load_str};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // No file is read: includes and key files point nowhere.
    let opts = LoadOptions { read_files: false };
    if let Ok(loaded) = load_str(Path::new("/nonexistent/fuzz/policy.conf"), &text, opts) {
        let json = serde_json::to_string(&loaded.policy).expect("a policy serialises");
        Policy::from_served_json(&json).expect("served JSON reads back");
    }
});
