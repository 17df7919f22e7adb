#!/usr/bin/env bash
# Boot time and memory overhead: the same kernel and initramfs under ebb and under QEMU
# `-M microvm` (Debian's qemu-system-x86; `-cpu host,arch-capabilities=off`, because QEMU 7.2
# aborts on PVM hosts setting MSR 0x10a otherwise), several times each, alternating, timed from
# process start to the same serial line. Prints medians, their ratio, and each VMM's RSS
# beyond guest memory at that moment.
#
#   scripts/bench-boot.sh [RUNS]        (default 3)
#   KERNEL=bzimage|vmlinux              (default vmlinux: PVH entry on both VMMs)
#   MARKER='Run /init as init process'  (the line both must print)
#   MEM=256M
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RUNS=${1:-3}
KERNEL=${KERNEL:-vmlinux}
MARKER=${MARKER:-Run /init as init process}
MEM=${MEM:-256M}

if ! command -v qemu-system-x86_64 >/dev/null; then
    echo "installing qemu-system-x86 (the baseline) ..." >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86) >&2
fi
cargo build --release --locked -q
eval "$(scripts/build-guest.sh | sed 's/^/GUEST_/')"
case $KERNEL in
    bzimage) KPATH=$GUEST_bzimage ;;
    vmlinux) KPATH=$GUEST_vmlinux ;;
    *) echo "KERNEL must be bzimage or vmlinux" >&2; exit 2 ;;
esac

# QEMU gets the command line ebb builds (read from ebb's log), so the kernel does the same work.
exec python3 - "$RUNS" "$KPATH" "$GUEST_initramfs" "$MEM" "$MARKER" <<'PY'
import os, re, statistics, subprocess, sys, time, select

runs, kernel, initrd, mem, marker = sys.argv[1:]
cmdline = None
runs = int(runs)
mem_bytes = int(mem[:-1]) << {"M": 20, "G": 30}[mem[-1]]

def guest_rss_kib(pid):
    """RSS of the guest-RAM mapping(s): anonymous mappings of exactly the guest's size."""
    total, size, rss = 0, None, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                size = hi - lo
            elif line.startswith("Rss:") and size is not None:
                if size in (mem_bytes, mem_bytes + (2 << 20)):  # QEMU may pad by 2 MiB
                    total += int(line.split()[1])
                size = None
    return total

def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))

def boot(argv):
    """Returns (seconds to marker, VmRSS KiB, guest-RAM RSS KiB, stderr text)."""
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    out, err = b"", b""
    try:
        while True:
            r, _, _ = select.select([p.stdout, p.stderr], [], [], max(0, 600 - (time.monotonic() - t0)))
            if not r:
                raise RuntimeError(f"timeout waiting for {marker!r}: {argv[0]}")
            if p.stderr in r:
                err += os.read(p.stderr.fileno(), 65536)
            if p.stdout in r:
                chunk = os.read(p.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError(f"{argv[0]} exited before {marker!r}:\n{(out + err)[-2000:].decode(errors='replace')}")
                out += chunk
                if marker.encode() in out:
                    elapsed = time.monotonic() - t0
                    return elapsed, vm_rss_kib(p.pid), guest_rss_kib(p.pid), err.decode(errors="replace")
    finally:
        p.kill()
        p.wait()

ebb = ["./target/release/ebb", "run", "--mem", mem, "--kernel", kernel, "--initrd", initrd]
def qemu(cmdline):
    return ["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,arch-capabilities=off", "-m", mem,
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", kernel, "-initrd", initrd, "-append", cmdline]
res = {"ebb": [], "qemu": []}
for i in range(runs):
    for name in ("ebb", "qemu"):
        t, total, guest, err = boot(ebb if name == "ebb" else qemu(cmdline))
        if name == "ebb" and cmdline is None:
            cmdline = re.search(r"kernel command line: (.*)", err).group(1).strip()
        res[name].append((t, total, guest))
        print(f"run {i+1}/{runs} {name:4}: {t:7.2f} s to {marker!r}, RSS {total/1024:6.1f} MiB "
              f"(guest RAM {guest/1024:6.1f} MiB, VMM {(total-guest)/1024:5.1f} MiB)", flush=True)

def med(name, k):
    return statistics.median(r[k] for r in res[name])
e, q = med("ebb", 0), med("qemu", 0)
print()
print(f"kernel: {kernel}\ncommand line: {cmdline}")
print(f"median time to {marker!r}: ebb {e:.2f} s, QEMU microvm {q:.2f} s, ebb/QEMU = {e/q:.2f}")
for name in ("ebb", "qemu"):
    over = statistics.median((r[1] - r[2]) / 1024 for r in res[name])
    print(f"median {name} RSS beyond guest memory: {over:.1f} MiB")
PY
