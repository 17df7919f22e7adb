//! A sharing group's broker: the one process (the host) that writes the group's canonical
//! pages and keeps their tables, serving the group's VM processes over a packet socket
//! each (`wire.rs`). Members distrust each other; the broker trusts none of them.
//!
//! What a member gets: the pool's memfd, read-only and sealed (`READ_ONLY_SEALS`: no
//! descriptor of it, not even one reopened through `/proc`, can write, punch, shrink or
//! grow it), which it maps read-only to compare pages and privately over its guest pages;
//! and its end of the socket. Everything else (the slots' reference counts, the hash
//! index, the hints) lives in this process alone, on the broker's thread.
//!
//! Invariants, all on the broker's thread:
//! - a slot's count is the sum of its members' references, and each member's references
//!   are counted per member, so a member can drop only what it holds, and a member that
//!   goes (its socket reads end-of-file: exit, `kill -9`, a closed descriptor) gives back
//!   exactly what it held;
//! - a live slot's bytes never change: the broker writes a slot only while it is free, and
//!   stores a page only after checking that the hash sent is the page's (so the index
//!   never files a page under a hash that is not its own);
//! - the index is a hash map keyed by the member-sent hash with the map's own random key,
//!   so no choice of hashes piles entries into one bucket; each member has at most
//!   [`HINT_QUOTA`] hints, and clearing them costs its own hints, not the index;
//! - a member stores new content only while it holds fewer slots than its fair share of
//!   the pool (capacity / members), so no member fills the pool against the others;
//! - every request costs O(1) (a `Create` copies one page) and the loop takes at most
//!   [`BATCH`] messages from one member before it turns to the next, so one member's flood
//!   delays another's request by at most a batch;
//! - the broker never waits on a member: it reads and answers without blocking, and a
//!   member that sends anything malformed, or does not read its answers, is cut off.
//!
//! The cost is one round trip per lookup and per store (about 10-20 µs), paid by the
//! scanner only; the guest's reads hit the pool page directly and its copy-on-write breaks
//! never wait for the broker (the release that follows is a message with no answer).
//! A sealed memfd cannot give a page back, so a freed slot keeps its memory until it is
//! reused (freed slots are reused first): the group's pool costs the most slots it ever
//! held, which is what it reports.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::sys::{reopen_read_only, seal_read_only, sealable_memfd, View};
use super::wire::{FoundKind, Packets, Refusal, Reply, Request, MAX_MESSAGE};
use crate::mm::zcache::Page;
use crate::units::PAGE_SIZE;

/// Default capacity of a group's pool: 65536 pages (256 MiB of canonical content).
pub const DEFAULT_GROUP_SLOTS: u64 = 1 << 16;
/// Hints one member may hold at once.
pub const HINT_QUOTA: usize = 1 << 16;
/// Messages taken from one member before the others get their turn.
pub const BATCH: usize = 32;

/// The group's hash of a page, keyed with the group's secret.
pub fn group_hash(seed: u64, page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(page, seed)
}

/// What a member gets to join the group: both close-on-exec in this process.
#[derive(Debug)]
pub struct MemberFds {
    /// The pool, read-only and sealed.
    pub data: File,
    /// The member's end of its socket.
    pub link: OwnedFd,
}

/// The group's figures, for the host's report.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Slots holding content.
    pub live: AtomicU64,
    /// Slots ever written (the pool's memory).
    pub touched: AtomicU64,
    /// Members connected.
    pub members: AtomicU64,
    /// Members that have left (ended, or were cut off), all told.
    pub left: AtomicU64,
    /// Members cut off for breaking the protocol.
    pub cut_off: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    wake: EventFd,
    stop: AtomicBool,
    joining: Mutex<Vec<Packets>>,
    stats: BrokerStats,
}

/// A running broker: its thread serves the members until the broker is dropped.
#[derive(Debug)]
pub struct Broker {
    data: File,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Broker {
    /// A broker for a new group of at most `capacity` canonical pages, serving on a thread
    /// named `ebb-group-NAME`.
    ///
    /// # Errors
    /// The memfd, its seals, its view, the random key or the thread could not be made.
    pub fn start(name: &str, capacity: u64) -> io::Result<Self> {
        let capacity = capacity.clamp(1, 1 << 30);
        let data = sealable_memfd(c"ebb-sharing-group")?;
        data.set_len(capacity * PAGE_SIZE)?;
        // Mapped writable before the seal: the one mapping that can ever write the pool.
        let view = View::new(&data, capacity * PAGE_SIZE)?;
        seal_read_only(&data)?;
        let tables = Tables::new(view, capacity, crate::mm::rng::secret_u64()?);
        let shared = Arc::new(Shared {
            wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            stop: AtomicBool::new(false),
            joining: Mutex::default(),
            stats: BrokerStats::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ebb-group-{name}"))
            .spawn(move || serve(&s, tables))?;
        Ok(Self { data, shared, thread: Some(thread) })
    }

    /// A new member's descriptors.
    ///
    /// # Errors
    /// The socket pair or the read-only descriptor could not be made, or the broker's
    /// thread could not be woken.
    pub fn add_member(&self) -> io::Result<MemberFds> {
        let (ours, theirs) = Packets::pair()?;
        let data = reopen_read_only(&self.data)?;
        self.shared.joining.lock().unwrap_or_else(PoisonError::into_inner).push(ours);
        self.shared.wake.write(1)?;
        let link = theirs.into_owned();
        Ok(MemberFds { data, link })
    }

    /// The group's figures.
    pub fn stats(&self) -> &BrokerStats {
        &self.shared.stats
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if self.shared.wake.write(1).is_ok() {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// What an index entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Canonical(u64),
    Hint { member: u64, idx: u64 },
}

#[derive(Debug)]
struct Member {
    link: Packets,
    /// References held, per slot.
    refs: HashMap<u64, u64>,
    /// Hashes this member's hints are filed under.
    hints: HashSet<u64>,
    held: u64,
}

/// Why a member is cut off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Violation {
    Malformed,
    NotHeld(u64),
    TooMany,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Malformed => write!(f, "sent a malformed message"),
            Self::NotHeld(slot) => {
                write!(f, "dropped or pinned slot {slot}, which it does not hold")
            }
            Self::TooMany => write!(f, "holds more references than a count can hold"),
        }
    }
}

/// The group's tables, owned by the broker's thread.
#[derive(Debug)]
struct Tables {
    view: View,
    capacity: u64,
    seed: u64,
    refs: Vec<u64>,
    hashes: Vec<u64>,
    free: Vec<u64>,
    live: u64,
    all: u64,
    index: HashMap<u64, Entry>,
    members: HashMap<u64, Member>,
    next_member: u64,
}

impl Tables {
    fn new(view: View, capacity: u64, seed: u64) -> Self {
        Self {
            view,
            capacity,
            seed,
            refs: Vec::new(),
            hashes: Vec::new(),
            free: Vec::new(),
            live: 0,
            all: 0,
            index: HashMap::new(),
            members: HashMap::new(),
            next_member: 0,
        }
    }

    fn join(&mut self, link: Packets) -> u64 {
        let id = self.next_member;
        self.next_member += 1;
        let m = Member { link, refs: HashMap::new(), hints: HashSet::new(), held: 0 };
        self.members.insert(id, m);
        id
    }

    /// Member `id` is gone: every reference and hint it held goes with it.
    fn leave(&mut self, id: u64) {
        let Some(m) = self.members.remove(&id) else { return };
        for h in m.hints {
            if matches!(self.index.get(&h), Some(Entry::Hint { member, .. }) if *member == id) {
                self.index.remove(&h);
            }
        }
        for (slot, n) in m.refs {
            self.drop_refs(slot, n);
        }
    }

    fn touched(&self) -> u64 {
        self.refs.len() as u64
    }

    /// Drops `n` references of slot `slot`, freeing it at zero.
    fn drop_refs(&mut self, slot: u64, n: u64) {
        let i = to_index(slot);
        let Some(r) = self.refs.get_mut(i) else { return };
        *r = r.saturating_sub(n);
        self.all = self.all.saturating_sub(n);
        if *r > 0 {
            return;
        }
        let hash = self.hashes[i];
        if self.index.get(&hash) == Some(&Entry::Canonical(slot)) {
            self.index.remove(&hash);
        }
        self.free.push(slot);
        self.live -= 1;
    }

    /// One more reference of member `id` to `slot`.
    fn add_ref(&mut self, id: u64, slot: u64) -> Result<(), Violation> {
        let m = self.members.get_mut(&id).ok_or(Violation::Malformed)?;
        let r = self.refs.get_mut(to_index(slot)).ok_or(Violation::NotHeld(slot))?;
        let mine = m.refs.entry(slot).or_insert(0);
        *mine = mine.checked_add(1).ok_or(Violation::TooMany)?;
        m.held = m.held.checked_add(1).ok_or(Violation::TooMany)?;
        *r += 1;
        self.all += 1;
        Ok(())
    }

    fn new_slot(&mut self) -> Option<u64> {
        if let Some(slot) = self.free.pop() {
            return Some(slot);
        }
        let slot = self.touched();
        (slot < self.capacity).then(|| {
            self.refs.push(0);
            self.hashes.push(0);
            slot
        })
    }

    fn find(&mut self, id: u64, hash: u64) -> Result<(FoundKind, u64), Violation> {
        Ok(match self.index.get(&hash).copied() {
            Some(Entry::Canonical(slot)) => {
                self.add_ref(id, slot)?;
                (FoundKind::Canonical, slot)
            }
            Some(Entry::Hint { member, idx }) if member == id => (FoundKind::Hint, idx),
            Some(Entry::Hint { .. }) => (FoundKind::Foreign, 0),
            None => (FoundKind::Nothing, 0),
        })
    }

    fn create(
        &mut self,
        id: u64,
        hash: u64,
        page: &Page,
    ) -> Result<Result<u64, Refusal>, Violation> {
        if group_hash(self.seed, page) != hash {
            return Ok(Err(Refusal::BadHash));
        }
        if let Some(Entry::Canonical(slot)) = self.index.get(&hash).copied() {
            let mut stored = Box::new([0u8; crate::mm::zcache::PAGE_BYTES]);
            if self.view.read(slot, &mut stored) && *stored == *page {
                self.add_ref(id, slot)?;
                return Ok(Ok(slot));
            }
        }
        // A fair share of new slots: no member fills the pool so that the others can store
        // nothing (pinning what others stored is not limited: that is sharing).
        let share = self.capacity / (self.members.len() as u64).max(1);
        if self.members.get(&id).is_some_and(|m| m.refs.len() as u64 >= share.max(1)) {
            return Ok(Err(Refusal::Full));
        }
        let Some(slot) = self.new_slot() else { return Ok(Err(Refusal::Full)) };
        self.view.write(slot, page);
        let i = to_index(slot);
        self.hashes[i] = hash;
        self.live += 1;
        if let Err(v) = self.add_ref(id, slot) {
            self.free.push(slot);
            self.live -= 1;
            return Err(v);
        }
        if let Some(Entry::Hint { member, .. }) = self.index.insert(hash, Entry::Canonical(slot)) {
            if let Some(m) = self.members.get_mut(&member) {
                m.hints.remove(&hash);
            }
        }
        Ok(Ok(slot))
    }

    fn unpin(&mut self, id: u64, slot: u64) -> Result<(), Violation> {
        let m = self.members.get_mut(&id).ok_or(Violation::Malformed)?;
        let Some(mine) = m.refs.get_mut(&slot) else { return Err(Violation::NotHeld(slot)) };
        *mine -= 1;
        if *mine == 0 {
            m.refs.remove(&slot);
        }
        m.held -= 1;
        self.drop_refs(slot, 1);
        Ok(())
    }

    /// Serves one request of member `id`; its answer, if it wants one.
    fn handle(&mut self, id: u64, req: Request) -> Result<Option<Reply>, Violation> {
        Ok(match req {
            Request::Hello { seq } => {
                Some(Reply::Hello { seq, seed: self.seed, capacity: self.capacity })
            }
            Request::Find { seq, hash } => {
                let (kind, value) = self.find(id, hash)?;
                Some(Reply::Found { seq, kind, value })
            }
            Request::Hint { hash, idx } => {
                let m = self.members.get_mut(&id).ok_or(Violation::Malformed)?;
                if m.hints.len() < HINT_QUOTA && !self.index.contains_key(&hash) {
                    self.index.insert(hash, Entry::Hint { member: id, idx });
                    m.hints.insert(hash);
                }
                None
            }
            Request::ForgetHint { hash, idx } => {
                if self.index.get(&hash) == Some(&Entry::Hint { member: id, idx }) {
                    self.index.remove(&hash);
                    if let Some(m) = self.members.get_mut(&id) {
                        m.hints.remove(&hash);
                    }
                }
                None
            }
            Request::ClearHints => {
                let m = self.members.get_mut(&id).ok_or(Violation::Malformed)?;
                for h in m.hints.drain() {
                    if matches!(self.index.get(&h), Some(Entry::Hint { member, .. }) if *member == id)
                    {
                        self.index.remove(&h);
                    }
                }
                None
            }
            Request::Create { seq, hash, page } => Some(match self.create(id, hash, &page)? {
                Ok(slot) => Reply::Created { seq, slot },
                Err(why) => Reply::Refused { seq, why },
            }),
            Request::Pin { slot } => {
                if !self.members.get(&id).is_some_and(|m| m.refs.contains_key(&slot)) {
                    return Err(Violation::NotHeld(slot));
                }
                self.add_ref(id, slot)?;
                None
            }
            Request::Unpin { slot } => {
                self.unpin(id, slot)?;
                None
            }
            Request::Stats { seq } => {
                let mine = self.members.get(&id).map_or(0, |m| m.held);
                let (live, touched, all) = (self.live, self.touched(), self.all);
                Some(Reply::Stats { seq, live, touched, mine, all })
            }
        })
    }

    fn publish(&self, stats: &BrokerStats) {
        stats.live.store(self.live, Ordering::Relaxed);
        stats.touched.store(self.touched(), Ordering::Relaxed);
        stats.members.store(self.members.len() as u64, Ordering::Relaxed);
    }
}

fn to_index(slot: u64) -> usize {
    usize::try_from(slot).unwrap_or(usize::MAX)
}

/// The broker's loop: waits for any member's message (or a new member, or the stop).
fn serve(shared: &Shared, mut tables: Tables) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let ids: Vec<u64> = tables.members.keys().copied().collect();
        let mut fds: Vec<libc::pollfd> = std::iter::once(shared.wake.as_raw_fd())
            .chain(
                ids.iter().filter_map(|id| tables.members.get(id)).map(|m| m.link.fd().as_raw_fd()),
            )
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        let n = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
        // SAFETY: poll writes only the `revents` of the array we own, `n` entries long.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), n, -1) };
        if ret < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            log::error!("sharing group broker: poll: {}", io::Error::last_os_error());
            return;
        }
        if fds[0].revents != 0 {
            let _ = shared.wake.read();
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let joining =
                std::mem::take(&mut *shared.joining.lock().unwrap_or_else(PoisonError::into_inner));
            for link in joining {
                tables.join(link);
            }
        }
        for (id, pfd) in ids.iter().zip(&fds[1..]) {
            if pfd.revents != 0 {
                if let Err(why) = serve_member(&mut tables, *id, &mut buf) {
                    if let Some(v) = why {
                        shared.stats.cut_off.fetch_add(1, Ordering::Relaxed);
                        log::warn!("sharing group: member {id} {v}; its membership ends");
                    }
                    tables.leave(*id);
                    tables.publish(&shared.stats);
                    shared.stats.left.fetch_add(1, Ordering::Release);
                }
            }
        }
        tables.publish(&shared.stats);
    }
}

/// Serves up to [`BATCH`] messages of member `id`. `Err(None)`: it left (end-of-file, or
/// its socket failed); `Err(Some(v))`: it broke the protocol.
fn serve_member(tables: &mut Tables, id: u64, buf: &mut [u8]) -> Result<(), Option<Violation>> {
    for _ in 0..BATCH {
        let Some(m) = tables.members.get(&id) else { return Err(None) };
        let n = match m.link.recv(buf, true) {
            Ok(0) => return Err(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(Some(Violation::Malformed))
            }
            Err(_) => return Err(None),
        };
        let req = Request::decode(&buf[..n]).ok_or(Some(Violation::Malformed))?;
        if let Some(reply) = tables.handle(id, req).map_err(Some)? {
            let Some(m) = tables.members.get(&id) else { return Err(None) };
            // Never waits: a member that does not read its answers is cut off.
            if m.link.send(&reply.encode(), true).is_err() {
                return Err(None);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::zcache::PAGE_BYTES;

    fn tables(capacity: u64) -> Tables {
        let file = sealable_memfd(c"test").unwrap();
        file.set_len(capacity * PAGE_SIZE).unwrap();
        let view = View::new(&file, capacity * PAGE_SIZE).unwrap();
        Tables::new(view, capacity, 42)
    }

    fn member(t: &mut Tables) -> u64 {
        t.join(Packets::pair().unwrap().0)
    }

    fn page(b: u8) -> Box<Page> {
        Box::new([b; PAGE_BYTES])
    }

    fn create(t: &mut Tables, id: u64, b: u8) -> Result<u64, Refusal> {
        let p = page(b);
        t.create(id, group_hash(42, &p[..]), &p).unwrap()
    }

    #[test]
    fn a_page_is_stored_once_for_every_member_that_offers_it() {
        let mut t = tables(8);
        let (a, b) = (member(&mut t), member(&mut t));
        let slot = create(&mut t, a, 1).unwrap();
        assert_eq!(create(&mut t, b, 1), Ok(slot), "equal content: the same slot, pinned");
        assert_eq!((t.live, t.refs[0], t.all), (1, 2, 2));
        let hash = group_hash(42, &page(1)[..]);
        assert_eq!(t.find(b, hash), Ok((FoundKind::Canonical, slot)));
        assert_eq!(t.refs[0], 3);
    }

    #[test]
    fn a_hash_that_is_not_the_pages_is_refused() {
        let mut t = tables(8);
        let a = member(&mut t);
        assert_eq!(t.create(a, 7, &page(1)).unwrap(), Err(Refusal::BadHash));
        assert_eq!(t.live, 0);
    }

    #[test]
    fn a_member_drops_only_what_it_holds_and_gives_back_all_of_it_when_it_leaves() {
        let mut t = tables(8);
        let (a, b) = (member(&mut t), member(&mut t));
        let slot = create(&mut t, a, 1).unwrap();
        assert_eq!(t.handle(b, Request::Unpin { slot }), Err(Violation::NotHeld(slot)));
        assert_eq!(t.handle(b, Request::Pin { slot }), Err(Violation::NotHeld(slot)));
        assert_eq!(create(&mut t, b, 1), Ok(slot));
        t.handle(a, Request::Pin { slot }).unwrap();
        t.handle(a, Request::Pin { slot }).unwrap();
        assert_eq!(t.refs[0], 4);
        t.leave(a);
        assert_eq!((t.refs[0], t.all, t.live), (1, 1, 1), "b's reference stays");
        t.handle(b, Request::Unpin { slot }).unwrap();
        assert_eq!((t.live, t.free.as_slice()), (0, &[slot][..]));
        assert_eq!(create(&mut t, b, 2), Ok(slot), "a freed slot is reused first");
        assert_eq!(t.touched(), 1);
    }

    #[test]
    fn hints_are_per_member_capped_and_cleared_without_touching_the_others() {
        let mut t = tables(8);
        let (a, b) = (member(&mut t), member(&mut t));
        t.handle(a, Request::Hint { hash: 5, idx: 50 }).unwrap();
        assert_eq!(t.find(a, 5), Ok((FoundKind::Hint, 50)));
        assert_eq!(t.find(b, 5), Ok((FoundKind::Foreign, 0)));
        t.handle(b, Request::Hint { hash: 6, idx: 60 }).unwrap();
        t.handle(a, Request::ClearHints).unwrap();
        assert_eq!(t.find(a, 5), Ok((FoundKind::Nothing, 0)));
        assert_eq!(t.find(b, 6), Ok((FoundKind::Hint, 60)), "b's hint stays");
        t.handle(b, Request::ForgetHint { hash: 6, idx: 61 }).unwrap();
        assert_eq!(t.find(b, 6), Ok((FoundKind::Hint, 60)), "another page's hint stays");
        for h in 0..HINT_QUOTA as u64 + 10 {
            t.handle(a, Request::Hint { hash: 1000 + h, idx: h }).unwrap();
        }
        assert_eq!(t.members[&a].hints.len(), HINT_QUOTA);
    }

    #[test]
    fn a_member_stores_at_most_its_fair_share_of_new_slots() {
        let mut t = tables(4);
        let (a, b) = (member(&mut t), member(&mut t));
        create(&mut t, a, 1).unwrap();
        create(&mut t, a, 2).unwrap();
        assert_eq!(create(&mut t, a, 3), Err(Refusal::Full), "a's half is used");
        assert_eq!(create(&mut t, b, 1).map(|_| ()), Ok(()), "joining a's content is sharing");
        assert!(create(&mut t, b, 4).is_ok(), "b's half is free");
    }

    #[test]
    fn a_full_pool_refuses_new_content() {
        let mut t = tables(2);
        let a = member(&mut t);
        create(&mut t, a, 1).unwrap();
        create(&mut t, a, 2).unwrap();
        assert_eq!(create(&mut t, a, 3), Err(Refusal::Full));
    }
}
