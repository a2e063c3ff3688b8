//! Compile at scale: 10,000 pods, 1,000 NetworkPolicies and 100 EgressPolicies, for a node with
//! 110 endpoints. Targets: a full compile under 1 s; the update after one pod's labels change
//! under 50 ms. Prints the number of datapath entries.

use criterion::{Criterion, criterion_group, criterion_main};
use egret::policy::{
    compile::{CompileOptions, Compiler, compile},
    model::World,
    synthetic::{NODE, Shape, cluster},
};

const SHAPE: Shape = Shape {
    namespaces: 100,
    pods_per_namespace: 100,
    network_policies_per_namespace: 10,
    egress_policies: 100,
    nodes: 91,
};

fn bench(c: &mut Criterion) {
    let cluster = cluster(&SHAPE);
    let options = CompileOptions {
        node: Some(NODE.into()),
        ..Default::default()
    };
    let world = World::new(&cluster);
    let compiled = compile(&world, &options);
    println!(
        "cluster: {} pods, {} NetworkPolicies, {} EgressPolicies; node {NODE}: {} endpoints; datapath entries: {} \
         (addr4 {}, addr6 {}, policy {})",
        world.pods.len(),
        world.network_policies.len(),
        world.egress_policies.len(),
        compiled.endpoints.len(),
        compiled.desired.len(),
        compiled.desired.addr4.len(),
        compiled.desired.addr6.len(),
        compiled.desired.policy.len(),
    );
    let mut group = c.benchmark_group("compile");
    group.sample_size(10);
    group.bench_function("full (validate + compile)", |b| {
        b.iter(|| compile(&World::new(&cluster), &options));
    });
    // One pod on the node and one elsewhere change their app label, alternately, as a
    // relabelling would; each iteration is that update plus a compile.
    let mut compiler = Compiler::new(world.clone(), options.clone());
    let _ = compiler.compile();
    let local = world
        .pods
        .iter()
        .find(|p| p.node.as_deref() == Some(NODE))
        .map(|p| (**p).clone());
    let remote = world
        .pods
        .iter()
        .find(|p| p.node.as_deref() != Some(NODE))
        .map(|p| (**p).clone());
    let mut flip = 0usize;
    for (name, pod) in [
        ("incremental (label change, pod on this node)", local),
        ("incremental (label change, pod elsewhere)", remote),
    ] {
        let Some(pod) = pod else { continue };
        group.bench_function(name, |b| {
            b.iter(|| {
                flip += 1;
                let mut changed = pod.clone();
                changed
                    .labels
                    .insert("app".into(), format!("app-{}", flip % 10));
                compiler.update_pod(changed);
                compiler.compile()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
