//! Any message: the header scanner finds where the header ends and splits it into fields
//! without losing or inventing a byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice_common::smtp::header;

fuzz_target!(|data: &[u8]| {
    let len = header::header_len(data);
    assert!(len <= data.len());
    let h = &data[..len];
    let fields = header::fields(h);
    assert_eq!(fields.concat(), h, "the fields put together are the header");
    for f in fields {
        if let Some(name) = header::field_name(f) {
            assert!(!name.is_empty() && !name.contains(':'));
        }
        let v = header::field_value(f);
        assert!(
            !v.contains(['\r', '\n']),
            "an unfolded value has no line break"
        );
    }
});
