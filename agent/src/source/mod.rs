//! Where cluster state comes from: local files (`crate::local`, moving here) or the Kubernetes
//! API. Each source turns its input into the same validated `World` and cgroup roles; the
//! pipeline and telemetry are shared.

pub mod kubernetes;
