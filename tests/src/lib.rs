//! The privileged test sandbox: test pods and simulated external hosts in network namespaces
//! and cgroups created (and removed) by the test, plus `egret-probe` to make connection
//! attempts from inside a pod. The end-to-end tests in `tests/` and the xtask demo use it.

pub mod agent;
pub mod manifests;
pub mod pressure;
pub mod probe;
pub mod sandbox;
