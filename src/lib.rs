//! ebb: a small, fast KVM hypervisor that overcommits guest memory the way ESXi does.
//!
//! The library holds everything; `main.rs` only parses the command line and calls
//! [`vmm::run`]. The tree follows the architecture:
//!
//! | module | what it is |
//! |---|---|
//! | [`vmm`] | one VM as a value: build it from a [`VmConfig`], run it to its end |
//! | [`cli`] | `ebb run`'s command line, shared by `ebb` and `ebb-vm` |
//! | [`config`] | the VM description and the parsing of option strings |
//! | [`vstate`] | KVM wrappers: the VM, vCPUs, guest RAM, CPUID, MSRs |
//! | [`boot`] | kernels and payloads placed in guest memory, the kernel command line |
//! | [`devices`] | what the guest talks to: buses, UART, i8042, virtio-mmio, the balloon, disks |
//! | [`mm`] | the overcommit engine: page states, faults, Active memory, reclaim, sharing |
//! | [`host`] | `ebb host`: many VM processes under one budget, the memory states, policies, `ebb top` |
//! | [`lab`] | `ebb lab`: scenarios run under several policies, tables and charts |
//! | [`api`] | the control socket, its typed protocol and its client |
//! | [`service`] | HTTP metrics and health, systemd notifications |
//! | [`metrics`] | the `--stats-json` writer |
//! | [`accel`] | which accelerator backs `/dev/kvm` |
//! | [`units`] | page size, sizes and their display |
//!
//! How the pieces fit, the one map of the tree, and the host facts they rest on are in
//! `docs/design.md`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accel;
pub mod api;
pub mod boot;
pub mod cli;
pub mod config;
pub mod devices;
pub mod host;
pub mod jail;
pub mod lab;
pub mod metrics;
pub mod mm;
pub mod service;
pub mod units;
pub mod vmm;
pub mod vstate;

#[cfg(test)]
mod testutil;

pub use config::VmConfig;
pub use vmm::{run, RunOutcome, VmmError};
