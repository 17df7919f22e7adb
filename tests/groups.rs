//! A sharing group's integrity boundary: members distrust each other. A member that writes
//! its view of the pool, sends the broker garbage, drops references it does not hold,
//! floods the index, stops reading its answers, or is killed mid-merge must leave every
//! other member's pages intact and its requests served.
//!
//! The members here are the real member code (`GroupMember`, the pool a VM's scanner
//! uses) and raw sockets playing a compromised VM process, against the real broker; the
//! end-to-end group test with VMs is in `tests/host.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ebb::mm::sharing::broker::{group_hash, Broker, MemberFds};
use ebb::mm::sharing::member::GroupMember;
use ebb::mm::sharing::pool::{Found, SharePool};
use ebb::mm::sharing::wire::{Packets, Request};

const PAGE: usize = 4096;

fn page(seed: u64) -> Box<[u8; PAGE]> {
    let mut p = Box::new([0u8; PAGE]);
    for (i, c) in p.chunks_exact_mut(8).enumerate() {
        c.copy_from_slice(&(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64).to_le_bytes());
    }
    p
}

fn join(broker: &Broker) -> GroupMember {
    let fds = broker.add_member().unwrap();
    GroupMember::attach(fds.data, fds.link).unwrap()
}

/// Member `m` stores `n` pages and maps each on one of its guest pages; returns the slots.
fn store(m: &GroupMember, first: u64, n: u64) -> Vec<(u64, u64)> {
    (first..first + n)
        .map(|s| {
            let p = page(s);
            let slot = m.create(group_hash(m.seed(), &p[..]), &p).unwrap();
            m.attach(s, slot);
            (s, slot)
        })
        .collect()
}

fn check(m: &GroupMember, held: &[(u64, u64)]) {
    let mut out = Box::new([0u8; PAGE]);
    for &(s, slot) in held {
        assert!(m.read(slot, &mut out), "slot {slot} readable");
        assert!(out[..] == page(s)[..], "slot {slot} holds page {s}'s bytes");
    }
}

/// Waits until `n` members have left the group, all told.
fn wait_left(broker: &Broker, n: u64) {
    let t = Instant::now();
    while broker.stats().left.load(Ordering::Acquire) < n {
        assert!(t.elapsed() < Duration::from_secs(20), "the broker never saw {n} members go");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_member_can_write_no_byte_of_the_pool_by_any_descriptor() {
    let broker = Broker::start("t", 256).unwrap();
    let honest = join(&broker);
    let held = store(&honest, 0, 16);
    let evil = broker.add_member().unwrap();
    let path = format!("/proc/self/fd/{}", evil.data.as_raw_fd());
    // Reopened for writing through /proc (the file's mode allows it): still refused.
    let mut rw = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    assert!(rw.write_all(&[0xff; PAGE]).is_err(), "write(2)");
    assert!(rw.set_len(0).is_err(), "ftruncate(2) down");
    assert!(rw.set_len(1 << 40).is_err(), "ftruncate(2) up");
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on a descriptor we own.
    assert_ne!(unsafe { libc::fallocate(rw.as_raw_fd(), mode, 0, 1 << 20) }, 0, "a hole");
    for fd in [evil.data.as_raw_fd(), rw.as_raw_fd()] {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a fresh mapping the kernel places; unmapped below if it is made.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, libc::MAP_SHARED, fd, 0) };
        assert_eq!(p, libc::MAP_FAILED, "a shared writable mapping");
        // A private mapping may be written: the writer gets its own copy.
        let flags = libc::MAP_PRIVATE;
        // SAFETY: as above; written, checked and unmapped here.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE, prot, flags, fd, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: a page-sized private mapping of ours.
        unsafe {
            std::ptr::write_bytes(p.cast::<u8>(), 0xee, PAGE);
            libc::munmap(p, PAGE);
        }
    }
    // The seals cannot be taken off.
    // SAFETY: F_ADD_SEALS on a descriptor we own.
    assert_ne!(unsafe { libc::fcntl(rw.as_raw_fd(), libc::F_ADD_SEALS, 0) }, 0, "F_SEAL_SEAL");
    check(&honest, &held);
}

#[test]
fn a_member_that_breaks_the_protocol_is_cut_off_and_takes_nothing_of_the_others() {
    let broker = Broker::start("t", 256).unwrap();
    let honest = join(&broker);
    let held = store(&honest, 0, 8);
    let slots: Vec<u64> = held.iter().map(|h| h.1).collect();
    let evil_messages: Vec<Vec<u8>> = vec![
        // Drops references it does not hold: the honest member's slots.
        Request::Unpin { slot: slots[0] }.encode(),
        Request::Pin { slot: slots[1] }.encode(),
        // A hash that is not the page's.
        Request::Create { seq: 1, hash: 5, page: Box::new([0xab; PAGE]) }.encode(),
        vec![0xff; 3],
        vec![],
        vec![6; 9000],
    ];
    for (round, msg) in (1..).zip(evil_messages) {
        let MemberFds { link, .. } = broker.add_member().unwrap();
        let evil = Packets::from_owned(link);
        let _ = evil.send(&msg, false);
        drop(evil);
        wait_left(&broker, round);
        // Every slot is still held, and the honest member is still served.
        check(&honest, &held);
        let p = page(0);
        let hash = group_hash(honest.seed(), &p[..]);
        assert_eq!(honest.find(hash), Found::Canonical(slots[0]));
        honest.unpin(slots[0]);
    }
    // The two foreign references, the short message and the long one (a wrong hash is
    // only refused; an empty message reads as the end).
    assert_eq!(broker.stats().cut_off.load(Ordering::Relaxed), 4, "violations are counted");
    assert_eq!(broker.stats().live.load(Ordering::Relaxed), 8);
}

#[test]
fn a_member_that_stops_reading_its_answers_stalls_no_one() {
    let broker = Broker::start("t", 1024).unwrap();
    let honest = join(&broker);
    let held = store(&honest, 0, 4);
    let MemberFds { link, .. } = broker.add_member().unwrap();
    let evil = Packets::from_owned(link);
    // Questions, never reading the answers, until its socket is full or it is cut off.
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < Duration::from_secs(5)
        && evil.send(&Request::Stats { seq: sent }.encode(), true).is_ok()
    {
        sent += 1;
    }
    let p = page(1000);
    let started = Instant::now();
    let slot = honest.create(group_hash(honest.seed(), &p[..]), &p).unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "served in {:?}", started.elapsed());
    honest.unpin(slot);
    check(&honest, &held);
    eprintln!("the silent member sent {sent} questions");
}

fn percentile(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

#[test]
fn a_member_flooding_the_index_delays_no_other_members_break() {
    let broker = Broker::start("t", 4096).unwrap();
    let honest = join(&broker);
    let MemberFds { link, .. } = broker.add_member().unwrap();
    let evil = Packets::from_owned(link);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    // Hints whose hashes all collide in a table indexed by (hash * golden) >> 20, the old
    // shared index's probe, then cleared, over and over.
    let flood = std::thread::spawn(move || {
        let mut rounds = 0u64;
        while !s.load(Ordering::Relaxed) {
            for i in 0..(1u64 << 16) {
                let hash = i << 44;
                if evil.send(&Request::Hint { hash, idx: i }.encode(), false).is_err() {
                    return rounds;
                }
            }
            let _ = evil.send(&Request::ClearHints.encode(), false);
            rounds += 1;
        }
        rounds
    });
    let (mut breaks, mut lookups) = (Vec::new(), Vec::new());
    let mut out = Box::new([0u8; PAGE]);
    for i in 0..400u64 {
        let p = page(i);
        let hash = group_hash(honest.seed(), &p[..]);
        let t = Instant::now();
        let slot = honest.create(hash, &p).unwrap();
        honest.attach(i, slot);
        lookups.push(t.elapsed());
        // A copy-on-write break: read the slot's bytes, release the page.
        let t = Instant::now();
        assert!(honest.read(slot, &mut out) && out[..] == p[..]);
        assert_eq!(honest.detach(i), Some(slot));
        breaks.push(t.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let rounds = flood.join().unwrap();
    let (b99, l99) = (percentile(&mut breaks, 99), percentile(&mut lookups, 99));
    eprintln!("flood rounds {rounds}; break p99 {b99:?} max {:?}; store p99 {l99:?}", breaks[399]);
    assert!(b99 < Duration::from_millis(10), "copy-on-write breaks: p99 {b99:?}");
    assert!(l99 < Duration::from_millis(100), "stores: p99 {l99:?}");
}

/// Not a test on its own: the member process that `members_killed_mid_merge_leave_the_others_correct`
/// starts and kills. It merges as fast as it can until killed.
#[test]
fn group_member_child() {
    let Ok(fds) = std::env::var("EBB_TEST_GROUP_MEMBER") else { return };
    let (d, l) = fds.split_once(',').unwrap();
    // SAFETY: descriptors this process inherited for exactly this use.
    let (data, link) = unsafe {
        (std::fs::File::from_raw_fd(d.parse().unwrap()), OwnedFd::from_raw_fd(l.parse().unwrap()))
    };
    let m = GroupMember::attach(data, link).unwrap();
    for i in 0u64.. {
        let p = page(i % 64); // half of these are the honest member's contents
        let hash = group_hash(m.seed(), &p[..]);
        let slot = match m.find(hash) {
            Found::Canonical(slot) => slot,
            _ => match m.create(hash, &p) {
                Ok(slot) => slot,
                Err(_) => continue,
            },
        };
        m.pin(slot);
        m.attach(i, slot);
        m.hint(hash ^ 1, i);
        if i % 3 == 0 {
            m.unpin(slot);
            m.detach(i);
        }
    }
}

#[test]
fn members_killed_mid_merge_leave_the_others_correct() {
    let broker = Broker::start("t", 4096).unwrap();
    let honest = join(&broker);
    let held = store(&honest, 32, 32);
    let exe = std::env::current_exe().unwrap();
    for round in 0..20u64 {
        let fds = broker.add_member().unwrap();
        let (d, l) = (fds.data.as_raw_fd(), fds.link.as_raw_fd());
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["--exact", "group_member_child", "--nocapture", "--test-threads=1"]);
        cmd.env("EBB_TEST_GROUP_MEMBER", format!("{d},{l}"));
        cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        // SAFETY: fcntl only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in [d, l] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(fds);
        // Killed at a different moment of its merging each round.
        std::thread::sleep(Duration::from_millis(30 + 17 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        wait_left(&broker, round + 1);
        check(&honest, &held);
        let live = broker.stats().live.load(Ordering::Relaxed);
        assert_eq!(live, 32, "round {round}: only the honest member's 32 slots are live");
    }
    // And the group still stores and shares.
    let more = store(&honest, 100, 4);
    check(&honest, &more);
}
