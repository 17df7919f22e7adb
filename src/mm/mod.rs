//! The overcommit engine: what backs each guest page, and every change to it.
//!
//! `mm` owns the page-state table ([`pages`]): only the fault handler ([`fault::handler`]),
//! the memory manager ([`manager`]), eviction ([`reclaim`]) and the sharing scanner and
//! unsharer ([`sharing`]) move pages between states, each under a claim ([`claim`]), and only
//! `mm` changes what maps guest RAM (`madvise`, moves, remaps). Devices and the control API
//! ask the [`manager::MemoryManager`] or pull a lever; the stats path only reads.
//!
//! No import runs back up inside `mm`: [`uffd`] is the kernel ABI and knows no page states;
//! [`fault`] drives it and calls into the stores ([`reclaim`]) and [`sharing`]; [`engine`]
//! starts them all.
//!
//! | module | owns |
//! |---|---|
//! | [`pages`] | page states, the transition table, the in-flight flag, per-state counts |
//! | [`claim`] | claims on pages as guards: a claim not finished is aborted when dropped |
//! | [`manager`] | releasing and deflating guest-physical ranges |
//! | [`engine`] | one VM's userfaultfd registration, handler thread, stats; [`engine::EngineError`] |
//! | [`fault`] | the fault handler, fault-around, the Active sampler; [`fault::FaultError`] |
//! | [`uffd`] | the userfaultfd ABI: the descriptor, its events and ioctls; [`uffd::UffdError`] |
//! | [`reclaim`] | eviction toward a target of resident memory, the stores of evicted pages |
//! | [`gate`] | the allocation gate: new guest memory waits while the VM is at a cap |
//! | [`layout`] | page indices of guest RAM, and their host and guest-physical addresses |
//! | [`rss`] | the host's RSS of guest RAM, read at most every 100 ms |
//! | [`sharing`] | page sharing: the scanner, the pool of canonical pages, the unsharer |
//! | [`stats`] | fault counters, the latency histogram, the statistics line |
//! | [`swap`] | the per-VM unnamed swap file, its slot allocator, a checksum per page |
//! | [`zcache`] | the compression cache: compressed guest pages in size-classed slabs |
//! | [`thread`] | a thread's CPU clock, and the wait loop of a lever-driven worker |
//! | `rng` | the generator that picks sample pages (Active memory) and random victims |
//! | `hooks` | pause points for race tests; only code in ebb's own process can arm one |
//! | `sys` | the raw calls (`madvise`, `mincore`, pagemap, `poll`, thread CPU clocks) |

pub mod claim;
pub mod engine;
pub mod fault;
pub mod gate;
#[doc(hidden)]
pub mod hooks;
pub mod layout;
pub mod manager;
pub mod pages;
pub mod reclaim;
pub(crate) mod rng;
pub mod rss;
pub mod sharing;
pub mod stats;
pub mod swap;
pub(crate) mod sys;
pub mod thread;
pub mod uffd;
pub mod zcache;

pub use manager::{MemoryManager, MmError, Release, Released};
