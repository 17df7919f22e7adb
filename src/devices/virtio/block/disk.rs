//! The disk image: a raw file opened once at setup, read and written at byte offsets the
//! device has already checked against its capacity.
//!
//! Direct I/O (`O_DIRECT`) where the file system takes it, the host page cache otherwise (one
//! log line says so). The guest keeps its own page cache of the disk; caching the same blocks
//! again in the host's would count them twice against a host whose memory is overcommitted,
//! and the host's copy is memory no balloon or reclaimer of ebb's can take back
//! (docs/design.md, "The disk").
//!
//! `O_DIRECT` wants the buffer, the offset and the length aligned to the file system's
//! logical block size: every transfer goes through an aligned bounce buffer covering the
//! [`DIRECT_ALIGN`]-aligned window around the request (a write whose ends are not aligned
//! reads the window first). The image's size is then a multiple of `DIRECT_ALIGN` too, or
//! the window could run past the end of the file (and a write would grow it): an image of
//! another size uses the page cache.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::{BlockError, ID_BYTES, SECTOR_BYTES};

/// Alignment of direct I/O: the largest logical block size of common file systems and
/// devices (4 KiB-sector disks); a multiple of the 512 bytes of smaller ones.
pub const DIRECT_ALIGN: u64 = 4096;

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    bytes: u64,
    read_only: bool,
    direct: bool,
    id: [u8; ID_BYTES],
    /// The aligned windows of direct I/O (at most a request's window plus the alignment).
    bounce: Vec<u8>,
}

impl Disk {
    /// Opens the image at `path`, with `O_DIRECT` if its file system takes it.
    ///
    /// # Errors
    /// [`BlockError::Open`] if it cannot be opened, [`BlockError::Size`] if its size is not
    /// a non-zero multiple of 512.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open { path: path.to_owned(), source };
        let (file, direct) = match open_file(path, read_only, true) {
            Ok(f) => (f, true),
            // EINVAL: the file system has no direct I/O (tmpfs on older kernels, for one).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open_file(path, read_only, false).map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        };
        let meta = file.metadata().map_err(open_err)?;
        let bytes = meta.len();
        if bytes == 0 || bytes % SECTOR_BYTES != 0 {
            return Err(BlockError::Size { path: path.to_owned(), bytes });
        }
        let mut disk = Self {
            file,
            path: path.to_owned(),
            bytes,
            read_only,
            direct,
            id: disk_id(meta.dev(), meta.ino()),
            bounce: Vec::new(),
        };
        if direct && !disk.direct_works() {
            disk.file = open_file(path, read_only, false).map_err(open_err)?;
            disk.direct = false;
        }
        if !disk.direct {
            log::info!(
                "disk {}: no direct I/O (file system or size not a multiple of {DIRECT_ALIGN}): \
                 through the host page cache",
                path.display()
            );
        }
        Ok(disk)
    }

    /// Direct I/O is usable: the size is aligned and an aligned read goes through (some file
    /// systems accept `O_DIRECT` at open and refuse the transfer).
    fn direct_works(&mut self) -> bool {
        if self.bytes % DIRECT_ALIGN != 0 {
            return false;
        }
        self.direct_read_window(0, 1).is_ok()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.bytes / SECTOR_BYTES
    }

    /// True for a read-only disk.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// True when transfers bypass the host page cache.
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// The serial number the guest reads with `GET_ID`: the image's device and inode
    /// numbers, stable across runs (no host path leaks into the guest).
    pub fn id(&self) -> [u8; ID_BYTES] {
        self.id
    }

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// The range is beyond the image (`InvalidInput`), or the read failed or came up short.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(()); // not even the window at the end of the image is read
        }
        if !self.direct {
            return self.file.read_exact_at(buf, offset);
        }
        let (window_len, head) = self.direct_read_window(offset, buf.len())?;
        let src = aligned(&mut self.bounce, window_len)?;
        buf.copy_from_slice(&src[head..head + buf.len()]);
        Ok(())
    }

    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// The disk is read-only (`PermissionDenied`), the range is beyond the image
    /// (`InvalidInput`), or the write failed.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        if !self.direct {
            return self.file.write_all_at(data, offset);
        }
        let (start, end) = window(offset, data.len())?;
        let head = usize::try_from(offset - start).map_err(|_| invalid())?;
        if start != offset || end != offset + len_u64(data.len())? {
            // Partial blocks at the ends: the bytes around the request stay as they were.
            self.direct_read_window(offset, data.len())?;
        } else {
            self.size_bounce(end - start)?;
        }
        let file = &self.file;
        let bounce = aligned(&mut self.bounce, end - start)?;
        bounce[head..head + data.len()].copy_from_slice(data);
        file.write_all_at(bounce, start)
    }

    /// Makes what was written durable (`fdatasync`); nothing to do on a read-only disk.
    ///
    /// # Errors
    /// `fdatasync` failed.
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<()> {
        match offset.checked_add(len_u64(len)?) {
            Some(end) if end <= self.bytes => Ok(()),
            _ => Err(invalid()),
        }
    }

    /// Reads the aligned window around `[offset, offset + len)` into the bounce buffer;
    /// returns the window's length and the request's offset in it.
    fn direct_read_window(&mut self, offset: u64, len: usize) -> io::Result<(u64, usize)> {
        let (start, end) = window(offset, len)?;
        self.size_bounce(end - start)?;
        let file = &self.file;
        file.read_exact_at(aligned(&mut self.bounce, end - start)?, start)?;
        Ok((end - start, usize::try_from(offset - start).map_err(|_| invalid())?))
    }

    /// Makes the bounce buffer hold an aligned slice of `len` bytes.
    fn size_bounce(&mut self, len: u64) -> io::Result<()> {
        let want = usize::try_from(len + DIRECT_ALIGN).map_err(|_| invalid())?;
        self.bounce.clear();
        self.bounce.resize(want, 0);
        Ok(())
    }
}

/// `[start, end)`: `[offset, offset + len)` widened to `DIRECT_ALIGN` boundaries.
fn window(offset: u64, len: usize) -> io::Result<(u64, u64)> {
    let end = offset.checked_add(len_u64(len)?).ok_or_else(invalid)?;
    let start = offset - offset % DIRECT_ALIGN;
    let end = end.checked_next_multiple_of(DIRECT_ALIGN).ok_or_else(invalid)?;
    Ok((start, end.max(start + DIRECT_ALIGN)))
}

/// The `DIRECT_ALIGN`-aligned slice of `len` bytes inside `buf` (sized by `size_bounce`).
fn aligned(buf: &mut [u8], len: u64) -> io::Result<&mut [u8]> {
    let skip = buf.as_ptr().align_offset(usize::try_from(DIRECT_ALIGN).map_err(|_| invalid())?);
    let len = usize::try_from(len).map_err(|_| invalid())?;
    buf.get_mut(skip..).and_then(|b| b.get_mut(..len)).ok_or_else(invalid)
}

fn len_u64(len: usize) -> io::Result<u64> {
    u64::try_from(len).map_err(|_| invalid())
}

fn invalid() -> io::Error {
    io::Error::from(io::ErrorKind::InvalidInput)
}

fn open_file(path: &Path, read_only: bool, direct: bool) -> io::Result<File> {
    let flags = if direct { libc::O_DIRECT } else { 0 };
    OpenOptions::new().read(true).write(!read_only).custom_flags(flags | libc::O_CLOEXEC).open(path)
}

/// `ebb-DEV-INO` in hex, cut to `ID_BYTES` (the guest reads it without a terminating NUL
/// when it fills all 20).
fn disk_id(dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let text = format!("ebb-{dev:x}-{ino:x}");
    let mut id = [0u8; ID_BYTES];
    let n = text.len().min(ID_BYTES);
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::testutil::TempFile;

    /// 16 KiB whose every byte tells its offset (mod 251, so no two nearby sectors match).
    fn image(name: &str, bytes: usize) -> TempFile {
        let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
        TempFile::with_bytes(name, &data)
    }

    fn expected(range: std::ops::Range<usize>) -> Vec<u8> {
        range.map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn an_aligned_image_reads_any_sector_with_or_without_direct_io() {
        let f = image("disk-direct", 16 << 10);
        let mut disk = Disk::open(&f.0, false).unwrap();
        assert_eq!(disk.capacity_sectors(), 32);
        // The test's temporary directory may be on tmpfs (no O_DIRECT): both must read right.
        eprintln!("direct I/O: {}", disk.direct());
        let mut buf = vec![0u8; 1024];
        disk.read_at(4096 + 512, &mut buf).unwrap();
        assert_eq!(buf, expected(4608..5632));
    }

    #[test]
    fn a_write_of_part_of_a_block_keeps_the_bytes_around_it() {
        let f = image("disk-rmw", 16 << 10);
        let mut disk = Disk::open(&f.0, false).unwrap();
        disk.write_at(512, &[0xee; 512]).unwrap();
        disk.flush().unwrap();
        let on_disk = std::fs::read(&f.0).unwrap();
        assert_eq!(on_disk[..512], expected(0..512)[..]);
        assert!(on_disk[512..1024].iter().all(|&b| b == 0xee));
        assert_eq!(on_disk[1024..], expected(1024..16 << 10)[..]);
        assert_eq!(on_disk.len(), 16 << 10, "the image did not grow");
    }

    #[test]
    fn an_image_not_a_multiple_of_4_kib_goes_through_the_page_cache() {
        let f = image("disk-odd", 1536);
        let mut disk = Disk::open(&f.0, false).unwrap();
        assert!(!disk.direct());
        assert_eq!(disk.capacity_sectors(), 3);
        disk.write_at(1024, &[7; 512]).unwrap();
        let mut buf = [0u8; 512];
        disk.read_at(1024, &mut buf).unwrap();
        assert_eq!(buf, [7; 512]);
        assert_eq!(std::fs::metadata(&f.0).unwrap().len(), 1536);
    }

    #[test]
    fn images_of_no_whole_sectors_are_refused() {
        for (name, bytes) in [("disk-empty", 0), ("disk-ragged", 1000)] {
            let f = image(name, bytes);
            assert!(matches!(Disk::open(&f.0, false), Err(BlockError::Size { .. })), "{bytes}");
        }
        let missing = std::env::temp_dir().join("ebb-test-no-such-image");
        assert!(matches!(Disk::open(&missing, true), Err(BlockError::Open { .. })));
    }

    #[test]
    fn transfers_past_the_end_or_writes_to_a_read_only_disk_fail() {
        let f = image("disk-ro", 8192);
        let mut disk = Disk::open(&f.0, true).unwrap();
        let mut buf = [0u8; 512];
        assert!(disk.read_at(8192 - 256, &mut buf).is_err());
        assert!(disk.read_at(u64::MAX - 10, &mut buf).is_err());
        let e = disk.write_at(0, &buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert_eq!(std::fs::read(&f.0).unwrap(), expected(0..8192));
    }

    #[test]
    fn the_id_names_device_and_inode_in_at_most_20_bytes() {
        let id = disk_id(0x803, 0x1234_5678_9abc);
        assert_eq!(&id, b"ebb-803-123456789abc");
        assert_eq!(&disk_id(1, 2)[..9], b"ebb-1-2\0\0");
    }
}
