//! TEST-ONLY fault injection, compiled into debug builds only: makes the fault handler
//! panic or fail part way through a run, so that the integration tests can check how a VM
//! ends when its handler dies (`tests/handler_failure.rs`).
//!
//! `EBB_TEST_HANDLER_FAULT=panic:N` or `error:N` acts at the handler's N-th read of
//! userfaultfd events (counted from 1, once per process: one `ebb run` has one handler).
//! Only the environment of the `ebb` process sets it: nothing a guest does reaches it, and
//! release builds do not contain this code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::FaultError;
use crate::mm::uffd::UffdError;

/// The environment variable that asks for a failure.
pub const ENV: &str = "EBB_TEST_HANDLER_FAULT";

/// What the handler is made to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Panic, as a bug in the handler would.
    Panic,
    /// Stop with an error, as a failed ioctl or read would.
    Error,
}

/// The failure asked for and the read it happens at.
static PLAN: OnceLock<Option<(Failure, u64)>> = OnceLock::new();
/// Reads of events so far in this process.
static READS: AtomicU64 = AtomicU64::new(0);

/// `panic:N` or `error:N` with N at least 1.
fn parse(value: &str) -> Option<(Failure, u64)> {
    let (kind, at) = value.split_once(':')?;
    let failure = match kind {
        "panic" => Failure::Panic,
        "error" => Failure::Error,
        _ => return None,
    };
    let at = at.parse::<u64>().ok().filter(|&n| n > 0)?;
    Some((failure, at))
}

/// Called before each read of events: panics or fails at the read the environment names.
///
/// # Errors
/// A made-up read error, when `error:N` names this read.
pub(super) fn before_read() -> Result<(), FaultError> {
    let plan = PLAN.get_or_init(|| {
        let plan = std::env::var(ENV).ok().and_then(|v| parse(&v));
        if let Some((failure, at)) = plan {
            log::warn!("{ENV}: the fault handler will {failure:?} at its read {at} (test only)");
        }
        plan
    });
    let Some((failure, at)) = *plan else { return Ok(()) };
    if READS.fetch_add(1, Ordering::Relaxed).saturating_add(1) != at {
        return Ok(());
    }
    match failure {
        Failure::Panic => panic!("injected by {ENV}"),
        Failure::Error => {
            Err(UffdError::Read(std::io::Error::other(format!("injected by {ENV}"))).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_names_the_failure_and_a_read_from_one() {
        assert_eq!(parse("panic:3"), Some((Failure::Panic, 3)));
        assert_eq!(parse("error:1"), Some((Failure::Error, 1)));
    }

    #[test]
    fn anything_else_asks_for_nothing() {
        for v in ["", "panic", "panic:0", "panic:x", "abort:2", "error:-1"] {
            assert_eq!(parse(v), None, "{v}");
        }
    }
}
