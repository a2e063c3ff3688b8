//! Bytes -> documents -> objects -> validation -> compiled datapath entries: whatever the
//! input, loading reports errors and never panics, and stays within the memory limit
//! (`-rss_limit_mb`, set by `cargo xtask fuzz`).
#![no_main]

use std::path::Path;

use egret::policy::{
    cluster::Cluster,
    compile::{CompileOptions, compile},
    model::World,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Non-UTF-8 input is refused before parsing (a file-level error); the parser sees text.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut cluster = Cluster::default();
    let errors = cluster.add_yaml(Path::new("fuzz.yaml"), text);
    for error in &errors {
        // Every message renders (names file and document).
        assert!(error.to_string().starts_with("fuzz.yaml"));
    }
    let world = World::new(&cluster);
    // Objects that reached the cluster were validated on the way in.
    assert!(world.invalid.is_empty(), "{:?}", world.invalid);
    let _ = compile(&world, &CompileOptions::default());
});
