//! Times one validate + compile of the benchmark's cluster (a quick look; the numbers that count
//! come from `cargo bench --bench compile`).
use std::time::Instant;

use egret::policy::{
    compile::{CompileOptions, compile},
    model::World,
    synthetic::{NODE, Shape, cluster},
};

fn main() {
    let shape = Shape {
        namespaces: 100,
        pods_per_namespace: 100,
        network_policies_per_namespace: 10,
        egress_policies: 100,
        nodes: 91,
    };
    let t = Instant::now();
    let cluster = cluster(&shape);
    println!("generate: {:?}", t.elapsed());
    let t = Instant::now();
    let world = World::new(&cluster);
    println!("validate: {:?}", t.elapsed());
    let t = Instant::now();
    let compiled = compile(
        &world,
        &CompileOptions {
            node: Some(NODE.into()),
            ..Default::default()
        },
    );
    println!(
        "compile: {:?}; endpoints {}, entries {}",
        t.elapsed(),
        compiled.endpoints.len(),
        compiled.desired.len()
    );
}
