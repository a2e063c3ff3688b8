//! egret: eBPF egress enforcement for Kubernetes pods and local cgroups.
//!
//! Data flows one way: a source (Kubernetes or local files) gives cluster state, the policy
//! compiler turns it into rules per endpoint, [`datapath::lower`] turns those into map entries,
//! and [`datapath::Datapath`] writes them and reads the kernel's counters back.

pub mod datapath;
pub mod inotify;
pub mod local;
pub mod netlink;
pub mod pipeline;
pub mod policy;
pub mod preflight;
pub mod rules_file;
pub mod runtime;
#[cfg(feature = "kubernetes")]
pub mod source;
pub mod sys;
pub mod telemetry;

/// egret's version: the crate's, which the image tag and the DaemonSet's image carry.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
