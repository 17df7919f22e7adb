//! A VM process's membership of a sharing group: the [`SharePool`] its scanner, merger and
//! unsharer use, served by the group's broker (`broker.rs`) in the host.
//!
//! The member holds the pool's memfd read-only and checks its seals before mapping it:
//! it maps it read-only to compare pages and privately over guest pages, and can change
//! none of it. It keeps only its own table (which of its guest pages maps which slot);
//! counts, index and hints are the broker's. Lookups and stores ask and wait (with a
//! timeout, and a sequence number so that a late answer is never taken for another's);
//! hints, pins and releases are told and not answered, so a copy-on-write break never
//! waits for the broker.
//!
//! If the broker stops answering, this member shares nothing more (lookups find nothing,
//! stores fail) and says so once; pages already shared stay correct, as their slots stay
//! held until this process ends.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::pool::{Found, PoolError, SharePool};
use super::sys::{is_sealed_read_only, View};
use super::wire::{FoundKind, Packets, Refusal, Reply, Request, MAX_MESSAGE};
use crate::mm::zcache::Page;
use crate::units::PAGE_SIZE;

/// How long a member waits for the broker's answer (or for room to send).
pub const BROKER_PATIENCE: Duration = Duration::from_secs(10);

/// The state of asking: one question at a time, so that answers pair with questions.
#[derive(Debug)]
struct Asking {
    seq: u64,
    buf: Vec<u8>,
}

/// This process's membership of its group.
#[derive(Debug)]
pub struct GroupMember {
    data: File,
    view: View,
    capacity: u64,
    seed: u64,
    /// Messages are whole on a packet socket, so one-way messages go out without the
    /// asking lock: a release never waits behind a question.
    link: Packets,
    asking: Mutex<Asking>,
    of_page: Mutex<HashMap<u64, u64>>,
    broken: AtomicBool,
}

fn invalid(why: &str) -> PoolError {
    PoolError::Io(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("not a sharing group's pool: {why}"),
    ))
}

impl GroupMember {
    /// Joins the group whose pool is `data` and whose broker is at the other end of `link`.
    ///
    /// # Errors
    /// `data` is not sealed read-only or is open for writing, the broker does not answer,
    /// or the pool's view cannot be mapped.
    pub fn attach(data: File, link: OwnedFd) -> Result<Self, PoolError> {
        if !is_sealed_read_only(&data)? {
            return Err(invalid("its memfd is not sealed against writes"));
        }
        let link = Packets::from_owned(link);
        link.set_timeouts(BROKER_PATIENCE)?;
        let mut asking = Asking { seq: 0, buf: vec![0; MAX_MESSAGE] };
        let hello = ask(&link, &mut asking, |seq| Request::Hello { seq });
        let Some(Reply::Hello { seed, capacity, .. }) = hello else {
            return Err(invalid("its broker did not say hello"));
        };
        if capacity == 0 || capacity > 1 << 30 || data.metadata()?.len() < capacity * PAGE_SIZE {
            return Err(invalid("its memfd is smaller than its capacity"));
        }
        let view = View::read_only(&data, capacity * PAGE_SIZE)?;
        Ok(Self {
            data,
            view,
            capacity,
            seed,
            link,
            asking: Mutex::new(asking),
            of_page: Mutex::default(),
            broken: AtomicBool::new(false),
        })
    }

    fn asking(&self) -> MutexGuard<'_, Asking> {
        self.asking.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn of_page(&self) -> MutexGuard<'_, HashMap<u64, u64>> {
        self.of_page.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn failed(&self, what: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            log::error!("sharing group: {what}; this VM shares no more pages with its group");
        }
    }

    fn ask(&self, req: impl FnOnce(u64) -> Request) -> Option<Reply> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let reply = ask(&self.link, &mut self.asking(), req);
        if reply.is_none() {
            self.failed("the broker did not answer");
        }
        reply
    }

    fn tell(&self, req: &Request) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.link.send(&req.encode(), false) {
            self.failed(&format!("telling the broker: {e}"));
        }
    }
}

/// Sends the request made from the next sequence number and waits for its answer,
/// skipping answers to earlier requests whose wait timed out.
fn ask(link: &Packets, asking: &mut Asking, req: impl FnOnce(u64) -> Request) -> Option<Reply> {
    asking.seq += 1;
    let seq = asking.seq;
    link.send(&req(seq).encode(), false).ok()?;
    loop {
        let n = link.recv(&mut asking.buf, false).ok()?;
        if n == 0 {
            return None;
        }
        let reply = Reply::decode(&asking.buf[..n])?;
        if reply.seq() == seq {
            return Some(reply);
        }
    }
}

impl SharePool for GroupMember {
    fn file(&self) -> &File {
        &self.data
    }

    fn seed(&self) -> u64 {
        self.seed
    }

    fn read(&self, slot: u64, out: &mut Page) -> bool {
        slot < self.capacity && self.view.read(slot, out)
    }

    fn find(&self, hash: u64) -> Found {
        match self.ask(|seq| Request::Find { seq, hash }) {
            Some(Reply::Found { kind: FoundKind::Canonical, value, .. })
                if value < self.capacity =>
            {
                Found::Canonical(value)
            }
            Some(Reply::Found { kind: FoundKind::Hint, value, .. }) => Found::Hint(value),
            Some(Reply::Found { kind: FoundKind::Foreign, .. }) => Found::Foreign,
            _ => Found::Nothing,
        }
    }

    fn hint(&self, hash: u64, idx: u64) {
        self.tell(&Request::Hint { hash, idx });
    }

    fn forget_hint(&self, hash: u64, idx: u64) {
        self.tell(&Request::ForgetHint { hash, idx });
    }

    fn clear_hints(&self) {
        self.tell(&Request::ClearHints);
    }

    /// The broker stores the page, or pins the equal page another member stored since this
    /// member looked the hash up, so that the group keeps one copy.
    fn create(&self, hash: u64, content: &Page) -> Result<u64, PoolError> {
        let page = Box::new(*content);
        match self.ask(|seq| Request::Create { seq, hash, page }) {
            Some(Reply::Created { slot, .. }) if slot < self.capacity => Ok(slot),
            Some(Reply::Refused { why: Refusal::Full, .. }) => Err(PoolError::Full(self.capacity)),
            Some(Reply::Refused { why: Refusal::BadHash, .. }) => Err(PoolError::Io(
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "hash is not the page's"),
            )),
            _ => Err(PoolError::Io(std::io::Error::other("the group's broker did not answer"))),
        }
    }

    fn pin(&self, slot: u64) {
        self.tell(&Request::Pin { slot });
    }

    fn unpin(&self, slot: u64) {
        self.tell(&Request::Unpin { slot });
    }

    fn attach(&self, idx: u64, slot: u64) {
        self.of_page().insert(idx, slot);
    }

    fn detach(&self, idx: u64) -> Option<u64> {
        let slot = self.of_page().remove(&idx)?;
        self.tell(&Request::Unpin { slot });
        Some(slot)
    }

    fn slot_of(&self, idx: u64) -> Option<u64> {
        self.of_page().get(&idx).copied()
    }

    /// This member's part of the group's pool: the pool's memory in proportion to the
    /// references it holds, so that the members' parts add up to the pool.
    fn live_pages(&self) -> u64 {
        match self.ask(|seq| Request::Stats { seq }) {
            Some(Reply::Stats { touched, mine, all, .. }) if all > 0 => {
                let part = u128::from(touched) * u128::from(mine.min(all)) / u128::from(all);
                u64::try_from(part).unwrap_or(touched)
            }
            _ => 0,
        }
    }

    fn group_live_pages(&self) -> Option<u64> {
        match self.ask(|seq| Request::Stats { seq }) {
            Some(Reply::Stats { touched, .. }) => Some(touched),
            _ => Some(0),
        }
    }

    fn metadata_bytes(&self) -> u64 {
        (self.of_page().capacity() * 17) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::super::broker::{group_hash, Broker};
    use super::*;
    use crate::mm::zcache::PAGE_BYTES;

    fn page_of(byte: u8) -> Box<Page> {
        Box::new([byte; PAGE_BYTES])
    }

    fn join(broker: &Broker) -> GroupMember {
        let fds = broker.add_member().unwrap();
        GroupMember::attach(fds.data, fds.link).unwrap()
    }

    #[test]
    fn a_canonical_page_of_one_member_is_found_and_read_by_another() {
        let broker = Broker::start("t", 64).unwrap();
        let (a, b) = (join(&broker), join(&broker));
        assert_eq!(a.seed(), b.seed(), "one key for the group");
        let p = page_of(3);
        let hash = group_hash(a.seed(), &p[..]);
        assert_eq!(b.find(hash), Found::Nothing);
        a.hint(hash, 7);
        assert_eq!(a.find(hash), Found::Hint(7));
        assert_eq!(b.find(hash), Found::Foreign);
        let slot = b.create(hash, &p).unwrap();
        assert_eq!(a.find(hash), Found::Canonical(slot));
        let mut out = page_of(0);
        assert!(a.read(slot, &mut out));
        assert_eq!(out, p);
        assert_eq!(b.group_live_pages(), Some(1));
    }

    #[test]
    fn a_member_cannot_write_its_pool_by_any_descriptor() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        let broker = Broker::start("t", 4).unwrap();
        let fds = broker.add_member().unwrap();
        let path = format!("/proc/self/fd/{}", fds.data.as_raw_fd());
        let mut rw = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        assert!(rw.write_all(b"x").is_err(), "a write through a reopened descriptor");
        assert!(rw.set_len(0).is_err(), "truncation");
        assert!(View::new(&rw, PAGE_SIZE).is_err(), "a shared writable mapping");
        assert!(super::super::sys::punch_hole(&rw, 0, PAGE_SIZE).is_err(), "a hole");
    }

    #[test]
    fn an_unsealed_memfd_is_refused() {
        let broker = Broker::start("t", 4).unwrap();
        let fds = broker.add_member().unwrap();
        let plain = super::super::sys::memfd(c"plain").unwrap();
        let e = GroupMember::attach(plain, fds.link).unwrap_err();
        assert!(e.to_string().contains("not sealed"), "{e}");
    }

    #[test]
    fn a_member_that_ends_gives_back_what_it_held() {
        let broker = Broker::start("t", 64).unwrap();
        let a = join(&broker);
        let b = join(&broker);
        let p = page_of(9);
        let hash = group_hash(a.seed(), &p[..]);
        let slot = a.create(hash, &p).unwrap();
        a.attach(1, slot);
        assert_eq!(b.find(hash), Found::Canonical(slot));
        drop(a);
        // Two sockets have no order between them: wait until the broker has seen a go.
        let t = std::time::Instant::now();
        while broker.stats().members.load(Ordering::Relaxed) != 1 {
            assert!(t.elapsed() < Duration::from_secs(10), "the broker never saw a go");
            std::thread::sleep(Duration::from_millis(1));
        }
        b.unpin(slot);
        // The broker has freed the slot: new content lands in it.
        let q = page_of(10);
        assert_eq!(b.create(group_hash(b.seed(), &q[..]), &q).unwrap(), slot);
    }
}
