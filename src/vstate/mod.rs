//! KVM state: the system handle, the VM, its vCPUs and its guest memory.

pub mod cpuid;
pub mod insn;
pub mod kvm;
pub mod memory;
pub mod msr;
pub mod vcpu;
pub mod vm;
