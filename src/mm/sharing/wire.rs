//! What a sharing group's members and its broker say to each other, and the socket they
//! say it over: one `SOCK_SEQPACKET` pair per member, so that every message arrives whole
//! or not at all and a member that dies is seen at once (the broker reads end-of-file).
//!
//! Messages are typed ([`Request`], [`Reply`]) and encoded here alone, little-endian, each
//! with an exact length per kind: anything else decodes to `None`, and the broker then
//! ends that member's membership. Requests that want an answer carry a sequence number
//! that the reply repeats, so that a member whose wait timed out never takes a late reply
//! for the answer to a later question.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::mm::zcache::{Page, PAGE_BYTES};

/// The largest message either side sends: a `Create` (tag, sequence, hash, page).
pub const MAX_MESSAGE: usize = 1 + 8 + 8 + PAGE_BYTES;

/// A member's request. Those with a `seq` are answered; the rest are not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Which group is this: answered with [`Reply::Hello`].
    Hello {
        /// Repeated in the reply.
        seq: u64,
    },
    /// Look a content hash up (a canonical slot comes back pinned for this member).
    Find {
        /// Repeated in the reply.
        seq: u64,
        /// The keyed hash of a page.
        hash: u64,
    },
    /// Remember this member's page `idx` as having `hash` (if the hash is not known).
    Hint {
        /// The hash.
        hash: u64,
        /// The member's page.
        idx: u64,
    },
    /// Forget the hint for `hash` if it is this member's page `idx`.
    ForgetHint {
        /// The hash.
        hash: u64,
        /// The member's page.
        idx: u64,
    },
    /// Forget every hint of this member (its scanner starts a pass).
    ClearHints,
    /// Store `page` as canonical content (or pin the equal content already stored).
    Create {
        /// Repeated in the reply.
        seq: u64,
        /// The page's keyed hash, which the broker checks.
        hash: u64,
        /// The content.
        page: Box<Page>,
    },
    /// One more reference of this member to a slot it already holds.
    Pin {
        /// The slot.
        slot: u64,
    },
    /// One reference fewer of this member to a slot.
    Unpin {
        /// The slot.
        slot: u64,
    },
    /// The group's figures: answered with [`Reply::Stats`].
    Stats {
        /// Repeated in the reply.
        seq: u64,
    },
}

/// What a lookup found (see [`super::pool::Found`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundKind {
    /// Nothing.
    Nothing,
    /// A canonical slot, pinned for the asker.
    Canonical,
    /// A hint of the asker's own: the value is its page.
    Hint,
    /// Another member's hint.
    Foreign,
}

/// Why the broker did not store a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is in use.
    Full,
    /// The hash sent is not the page's.
    BadHash,
}

/// The broker's answer to a request with a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// The group's hash key and capacity.
    Hello {
        /// The request's.
        seq: u64,
        /// The key of the group's page hash.
        seed: u64,
        /// Slots in the pool.
        capacity: u64,
    },
    /// A lookup's result.
    Found {
        /// The request's.
        seq: u64,
        /// What was found.
        kind: FoundKind,
        /// The slot or page it names (0 for nothing).
        value: u64,
    },
    /// The slot that holds the page now, pinned once for the asker.
    Created {
        /// The request's.
        seq: u64,
        /// The slot.
        slot: u64,
    },
    /// Not stored.
    Refused {
        /// The request's.
        seq: u64,
        /// Why.
        why: Refusal,
    },
    /// The group's figures.
    Stats {
        /// The request's.
        seq: u64,
        /// Slots holding content.
        live: u64,
        /// Slots ever written: the pool's memory (a sealed pool cannot give a page back;
        /// freed slots are reused first).
        touched: u64,
        /// References this member holds.
        mine: u64,
        /// References all members hold.
        all: u64,
    },
}

impl Reply {
    /// The sequence number of the request this answers.
    pub fn seq(&self) -> u64 {
        match *self {
            Self::Hello { seq, .. }
            | Self::Found { seq, .. }
            | Self::Created { seq, .. }
            | Self::Refused { seq, .. }
            | Self::Stats { seq, .. } => seq,
        }
    }
}

struct Writer(Vec<u8>);

impl Writer {
    fn new(tag: u8) -> Self {
        let mut v = Vec::with_capacity(48);
        v.push(tag);
        Self(v)
    }

    fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
}

/// Reads fixed fields off a message; `done` checks nothing is left over.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_le_bytes(*head))
    }

    fn done(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

impl Request {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Hello { seq } => Writer::new(1).u64(*seq).0,
            Self::Find { seq, hash } => Writer::new(2).u64(*seq).u64(*hash).0,
            Self::Hint { hash, idx } => Writer::new(3).u64(*hash).u64(*idx).0,
            Self::ForgetHint { hash, idx } => Writer::new(4).u64(*hash).u64(*idx).0,
            Self::ClearHints => Writer::new(5).0,
            Self::Create { seq, hash, page } => {
                let mut w = Writer::new(6).u64(*seq).u64(*hash);
                w.0.extend_from_slice(&page[..]);
                w.0
            }
            Self::Pin { slot } => Writer::new(7).u64(*slot).0,
            Self::Unpin { slot } => Writer::new(8).u64(*slot).0,
            Self::Stats { seq } => Writer::new(9).u64(*seq).0,
        }
    }

    /// The request in `msg`; None if it is not exactly one well-formed request.
    pub fn decode(msg: &[u8]) -> Option<Self> {
        let (&tag, rest) = msg.split_first()?;
        let mut r = Reader(rest);
        let req = match tag {
            1 => Self::Hello { seq: r.u64()? },
            2 => Self::Find { seq: r.u64()?, hash: r.u64()? },
            3 => Self::Hint { hash: r.u64()?, idx: r.u64()? },
            4 => Self::ForgetHint { hash: r.u64()?, idx: r.u64()? },
            5 => Self::ClearHints,
            6 => {
                let (seq, hash) = (r.u64()?, r.u64()?);
                let page: &Page = r.0.try_into().ok()?;
                r.0 = &[];
                Self::Create { seq, hash, page: Box::new(*page) }
            }
            7 => Self::Pin { slot: r.u64()? },
            8 => Self::Unpin { slot: r.u64()? },
            9 => Self::Stats { seq: r.u64()? },
            _ => return None,
        };
        r.done()?;
        Some(req)
    }
}

impl Reply {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Self::Hello { seq, seed, capacity } => {
                Writer::new(1).u64(seq).u64(seed).u64(capacity).0
            }
            Self::Found { seq, kind, value } => {
                let k = match kind {
                    FoundKind::Nothing => 0,
                    FoundKind::Canonical => 1,
                    FoundKind::Hint => 2,
                    FoundKind::Foreign => 3,
                };
                Writer::new(2).u64(seq).u64(k).u64(value).0
            }
            Self::Created { seq, slot } => Writer::new(3).u64(seq).u64(slot).0,
            Self::Refused { seq, why } => {
                let w = match why {
                    Refusal::Full => 1,
                    Refusal::BadHash => 2,
                };
                Writer::new(4).u64(seq).u64(w).0
            }
            Self::Stats { seq, live, touched, mine, all } => {
                Writer::new(5).u64(seq).u64(live).u64(touched).u64(mine).u64(all).0
            }
        }
    }

    /// The reply in `msg`; None if it is not exactly one well-formed reply.
    pub fn decode(msg: &[u8]) -> Option<Self> {
        let (&tag, rest) = msg.split_first()?;
        let mut r = Reader(rest);
        let reply = match tag {
            1 => Self::Hello { seq: r.u64()?, seed: r.u64()?, capacity: r.u64()? },
            2 => {
                let seq = r.u64()?;
                let kind = match r.u64()? {
                    0 => FoundKind::Nothing,
                    1 => FoundKind::Canonical,
                    2 => FoundKind::Hint,
                    3 => FoundKind::Foreign,
                    _ => return None,
                };
                Self::Found { seq, kind, value: r.u64()? }
            }
            3 => Self::Created { seq: r.u64()?, slot: r.u64()? },
            4 => {
                let seq = r.u64()?;
                let why = match r.u64()? {
                    1 => Refusal::Full,
                    2 => Refusal::BadHash,
                    _ => return None,
                };
                Self::Refused { seq, why }
            }
            5 => Self::Stats {
                seq: r.u64()?,
                live: r.u64()?,
                touched: r.u64()?,
                mine: r.u64()?,
                all: r.u64()?,
            },
            _ => return None,
        };
        r.done()?;
        Some(reply)
    }
}

/// One end of a member's packet socket.
#[derive(Debug)]
pub struct Packets(OwnedFd);

impl Packets {
    /// A connected pair, both ends close-on-exec: `(broker's, member's)`.
    ///
    /// # Errors
    /// The `socketpair` error.
    pub fn pair() -> io::Result<(Self, Self)> {
        let mut fds = [0; 2];
        let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two descriptors into the array we own.
        if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: two fresh descriptors that nothing else owns.
        Ok(unsafe { (Self(OwnedFd::from_raw_fd(fds[0])), Self(OwnedFd::from_raw_fd(fds[1]))) })
    }

    /// The end whose descriptor is `fd` (inherited from the host).
    pub fn from_owned(fd: OwnedFd) -> Self {
        Self(fd)
    }

    /// The descriptor, to hand to another process.
    pub fn into_owned(self) -> OwnedFd {
        self.0
    }

    /// The descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.0
    }

    /// Sets how long a blocking send or receive may wait (`SO_SNDTIMEO`, `SO_RCVTIMEO`).
    ///
    /// # Errors
    /// The `setsockopt` error.
    pub fn set_timeouts(&self, timeout: std::time::Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
        };
        for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
            // SAFETY: setsockopt reads `tv`, a timeval of the size passed.
            let ret = unsafe {
                libc::setsockopt(
                    self.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::from_ref(&tv).cast(),
                    libc::socklen_t::try_from(std::mem::size_of::<libc::timeval>())
                        .unwrap_or(libc::socklen_t::MAX),
                )
            };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Sends one message (`nonblocking`: `WouldBlock` rather than waiting for room).
    ///
    /// # Errors
    /// The `send` error (`BrokenPipe` once the other end is gone).
    pub fn send(&self, msg: &[u8], nonblocking: bool) -> io::Result<()> {
        let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: send reads `msg.len()` bytes of a buffer we own.
        let n = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), flags) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Receives one message into `buf`: its length, 0 at end-of-file. A message longer than
    /// `buf` is an `InvalidData` error (it was cut, and nothing well-formed is that long).
    ///
    /// # Errors
    /// The `recv` error (`WouldBlock` when `nonblocking` and nothing is queued).
    pub fn recv(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let flags = libc::MSG_TRUNC | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        // SAFETY: recv writes at most `buf.len()` bytes into a buffer we own.
        let n =
            unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), flags) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        if n > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "message too long"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_and_reply_decodes_to_itself() {
        let page = Box::new([7u8; PAGE_BYTES]);
        let requests = [
            Request::Hello { seq: 1 },
            Request::Find { seq: 2, hash: u64::MAX },
            Request::Hint { hash: 3, idx: 4 },
            Request::ForgetHint { hash: 5, idx: 6 },
            Request::ClearHints,
            Request::Create { seq: 7, hash: 8, page },
            Request::Pin { slot: 9 },
            Request::Unpin { slot: 10 },
            Request::Stats { seq: 11 },
        ];
        for r in requests {
            let bytes = r.encode();
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(Request::decode(&bytes), Some(r));
        }
        let replies = [
            Reply::Hello { seq: 1, seed: 2, capacity: 3 },
            Reply::Found { seq: 4, kind: FoundKind::Foreign, value: 5 },
            Reply::Created { seq: 6, slot: 7 },
            Reply::Refused { seq: 8, why: Refusal::BadHash },
            Reply::Stats { seq: 9, live: 10, touched: 11, mine: 12, all: 13 },
        ];
        for r in replies {
            assert_eq!(Reply::decode(&r.encode()), Some(r));
        }
    }

    #[test]
    fn short_long_and_unknown_messages_are_refused() {
        let find = Request::Find { seq: 1, hash: 2 }.encode();
        assert_eq!(Request::decode(&find[..find.len() - 1]), None, "short");
        let mut long = find.clone();
        long.push(0);
        assert_eq!(Request::decode(&long), None, "long");
        assert_eq!(Request::decode(&[0]), None, "unknown tag");
        assert_eq!(Request::decode(&[]), None, "empty");
        let create = Request::Create { seq: 1, hash: 2, page: Box::new([0; PAGE_BYTES]) };
        let create = create.encode();
        assert_eq!(Request::decode(&create[..create.len() - 1]), None, "a page cut short");
        let found = Reply::Found { seq: 1, kind: FoundKind::Hint, value: 2 }.encode();
        let mut bad = found.clone();
        bad[9] = 9;
        assert_eq!(Reply::decode(&bad), None, "unknown kind");
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_an_error_not_a_cut_message() {
        let (a, b) = Packets::pair().unwrap();
        a.send(&[1u8; 64], false).unwrap();
        let mut buf = [0u8; 16];
        let e = b.recv(&mut buf, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        drop(a);
        assert_eq!(b.recv(&mut buf, false).unwrap(), 0, "end of file once the peer is gone");
    }
}
