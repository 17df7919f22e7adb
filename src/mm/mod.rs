//! The overcommit engine: what backs each guest page and how it is reclaimed.

pub mod active;
pub mod engine;
pub mod layout;
pub mod state;
pub mod stats;
pub mod uffd;
