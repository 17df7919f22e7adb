//! virtio-blk under the real Linux driver: the tiny guest kernel from scripts/build-guest.sh
//! boots with two disks, a writable `vda` and a read-only `vdb`, each a 1 MiB image with an
//! MBR partition table of one partition.
//!
//! The test checks what the kernel does on its own at boot (tests/guest_user.rs reads a file
//! from an ext2 disk in user space): the driver reads the capacity from config space
//! and prints it, the partition scan reads sector 0 through the queue and finds `vda1`, the
//! read-only disk's driver accepted `VIRTIO_BLK_F_RO`, and ebb's counters at exit show the
//! reads, no guest errors, and images left as they were.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// PVM needs about 100 s to boot the kernel when the machine is otherwise idle (tests/linux.rs).
const BOOT_TIMEOUT: Duration = Duration::from_secs(540);
const SECTORS: u32 = 2048;
/// The partition: from sector 64 to the end.
const PART_START: u32 = 64;
/// `VIRTIO_BLK_F_RO`.
const F_RO: u64 = 1 << 5;

/// A 1 MiB image: an MBR whose first entry is a Linux partition (type 0x83) over sectors
/// 64..2048, and a pattern in the rest so that nothing reads as an empty disk.
fn mbr_image(name: &str) -> PathBuf {
    let mut img: Vec<u8> = (0..SECTORS as usize * 512).map(|i| (i % 241) as u8).collect();
    img[..512].fill(0);
    let entry = &mut img[446..462];
    entry[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]); // CHS: use the LBA fields
    entry[4] = 0x83;
    entry[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
    entry[8..12].copy_from_slice(&PART_START.to_le_bytes());
    entry[12..16].copy_from_slice(&(SECTORS - PART_START).to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xaa;
    temp_file(name, &img)
}

/// Runs ebb to its exit (or kills it at the timeout); returns (exit code, serial, log).
fn run_to_exit(args: &[&str], dir: &Path) -> (Option<i32>, String, String) {
    let (out, err) = (dir.join("disk-test.out"), dir.join("disk-test.err"));
    let mut child = ebb()
        .args(args)
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (code, read(&out), read(&err))
}

/// The features ebb's log says the driver of the disk at `path` accepted.
fn acked_features(log: &str, path: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(&format!("virtio-blk {path}: driver ready")))?;
    let hex = line.rsplit("features 0x").next()?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// `(reads, guest errors)` from ebb's exit line for the disk at `path`.
fn counters(log: &str, path: &str) -> Option<(u64, u64)> {
    let line =
        log.lines().find(|l| l.contains(&format!("disk {path}: ")) && l.contains(" reads"))?;
    let after = line.split(&format!("disk {path}: ")).nth(1)?;
    let reads = after.split(' ').next()?.parse().ok()?;
    let errors = after.rsplit(", ").next()?.split(' ').next()?.parse().ok()?;
    Some((reads, errors))
}

#[test]
fn linux_finds_the_disks_capacity_and_partitions_and_honours_read_only() {
    let test = "linux_finds_the_disks_capacity_and_partitions_and_honours_read_only";
    if !kvm_or_skip(test) {
        return;
    }
    let Some(guest) = guest_or_skip(test) else { return };
    let (rw, ro) = (mbr_image("disk-rw.img"), mbr_image("disk-ro.img"));
    let before = std::fs::read(&rw).unwrap();
    let (rw_s, ro_s) = (rw.to_str().unwrap(), ro.to_str().unwrap());
    let ro_arg = format!("{ro_s},ro");
    let args = [
        "run",
        "--kernel",
        guest.bzimage.to_str().unwrap(),
        "--initrd",
        guest.initramfs.to_str().unwrap(),
        "--mem",
        "256M",
        "--disk",
        rw_s,
        "--disk",
        &ro_arg,
    ];
    let start = Instant::now();
    let (code, serial, log) = run_to_exit(&args, rw.parent().unwrap());
    eprintln!("{test}: ebb ended after {:.1} s", start.elapsed().as_secs_f64());
    let tail = |s: &str| {
        s.lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    };
    let context = format!("serial:\n{}\nlog:\n{}", tail(&serial), tail(&log));
    assert_eq!(code, Some(0), "{test}: ebb did not exit 0 after the guest rebooted\n{context}");
    for disk in ["vda", "vdb"] {
        let capacity = format!("[{disk}] {SECTORS} 512-byte logical blocks");
        assert!(
            serial.contains(&capacity),
            "the driver read the capacity: {capacity:?}\n{context}"
        );
        let table = format!(" {disk}: {disk}1");
        assert!(serial.contains(&table), "the partition scan found {table:?}\n{context}");
    }
    let rw_features = acked_features(&log, rw_s).unwrap_or_else(|| panic!("{context}"));
    let ro_features = acked_features(&log, ro_s).unwrap_or_else(|| panic!("{context}"));
    assert_eq!(rw_features & F_RO, 0, "a writable disk is not read-only: {rw_features:#x}");
    assert_ne!(ro_features & F_RO, 0, "the driver took VIRTIO_BLK_F_RO: {ro_features:#x}");
    for path in [rw_s, ro_s] {
        let (reads, errors) = counters(&log, path).unwrap_or_else(|| panic!("{context}"));
        assert!(reads > 0, "{path}: the partition scan went through the queue ({reads} reads)");
        assert_eq!(errors, 0, "{path}: the Linux driver made no mistake\n{context}");
    }
    assert_eq!(std::fs::read(&ro).unwrap(), before, "the read-only image is unchanged");
    assert_eq!(std::fs::read(&rw).unwrap(), before, "nothing wrote the writable one at boot");
    let _ = (std::fs::remove_file(&rw), std::fs::remove_file(&ro));
}

#[test]
fn a_disk_image_that_is_not_whole_sectors_is_refused_before_the_guest_runs() {
    let test = "a_disk_image_that_is_not_whole_sectors_is_refused_before_the_guest_runs";
    if !kvm_or_skip(test) {
        return;
    }
    let img = temp_file("disk-ragged.img", &[0u8; 1000]);
    let out = run_ebb(&["run", "--disk", img.to_str().unwrap()]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not a non-zero multiple of 512"), "{stderr}");
    let missing = run_ebb(&["run", "--disk", "/nonexistent/ebb-disk.img"]);
    let (_, stderr) = text(&missing);
    assert!(stderr.contains("cannot open disk image /nonexistent/ebb-disk.img"), "{stderr}");
    let _ = std::fs::remove_file(img);
}
