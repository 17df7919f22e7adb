//! ebb: a small, fast KVM hypervisor that overcommits guest memory the way ESXi does.
//!
//! The library holds everything; `main.rs` only parses the command line and calls
//! [`vmm::run`]. The tree follows the architecture: [`vstate`] wraps KVM, [`boot`] places
//! kernels and firmware payloads in guest memory, [`devices`] emulates what the guest talks
//! to, and [`vmm`] ties one VM together.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod accel;
pub mod api;
pub mod boot;
pub mod config;
pub mod devices;
pub mod metrics;
pub mod mm;
pub mod vmm;
pub mod vstate;

pub use config::VmConfig;
pub use vmm::{run, RunOutcome, VmmError};
