//! Emulated devices and the buses that route vCPU port and MMIO exits to them.

pub mod bus;
pub mod debug_exit;
pub mod guest_errors;
pub mod i8042;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, ExitRequest};
