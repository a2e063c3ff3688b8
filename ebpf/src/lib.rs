//! Empty library target: it lets `agent` name this package as a build-dependency, so cargo
//! rebuilds the agent when the kernel programs (the `egret` binary target) change.
#![no_std]
