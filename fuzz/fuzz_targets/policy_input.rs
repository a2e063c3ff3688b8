//! Bytes -> documents -> objects -> validation -> compiled datapath entries: whatever the
//! input, loading reports errors and never panics, and stays within the memory limit
//! (`-rss_limit_mb`, set by `cargo xtask fuzz`).
#![no_main]

use std::path::Path;

use egret::policy::{
    cluster,
    compile::{CompileOptions, compile},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Non-UTF-8 input is refused before parsing (a file-level error); the parser sees text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (world, errors) = cluster::load_yaml(Path::new("fuzz.yaml"), text);
    for error in &errors {
        // Every message renders (names file and document).
        assert!(error.to_string().starts_with("fuzz.yaml"));
    }
    // Only validated models reach the world.
    assert!(world.invalid.is_empty(), "{:?}", world.invalid);
    let _ = compile(&world, &CompileOptions::default());
});
