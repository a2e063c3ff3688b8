//! The Kubernetes source: watches of the API ([`watch`]) and the kubelet's pod cgroups on this
//! node ([`cgroups`]), turned into the cluster state the compiler takes.

pub mod cgroups;
pub mod status;
pub mod watch;
