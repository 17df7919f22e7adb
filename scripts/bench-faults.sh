#!/usr/bin/env bash
# First-touch cost per page, all measured in one run:
#  1. host threads (cargo bench --bench faults): the kernel's own anonymous fault, a minimal
#     userfaultfd handler, and ebb's engine without and with fault-around;
#  2. a real guest: the touch payload's write phase over PAGES pages, under --no-uffd (the
#     kernel's fault behind KVM), ebb's handler, and ebb with --fault-around 63.
# Prints medians and ratios. Timings are never asserted; the machines are noisy.
#
#   scripts/bench-faults.sh [PAGES] [RUNS]     (default 16384 pages = 64 MiB, 5 runs)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PAGES=${1:-16384}
RUNS=${2:-5}

echo "== host threads"
cargo bench --locked -q --bench faults -- "$PAGES" "$RUNS" 2>/dev/null | grep -v '^$'

echo
echo "== guest: touch pages=$PAGES, write phase (first touch), cycles per page"
cargo build --release --locked -q
exec python3 - "$PAGES" "$RUNS" <<'PY'
import re, statistics, subprocess, sys
pages, runs = int(sys.argv[1]), int(sys.argv[2])
modes = {"kernel (--no-uffd)": ["--no-uffd"], "ebb": [], "ebb --fault-around 63": ["--fault-around", "63"]}
res = {m: [] for m in modes}
for r in range(runs):
    for m, extra in modes.items():
        out = subprocess.run(["./target/release/ebb", "run", "--mem", "1G", "--firmware", "touch",
                              "--firmware-arg", f"pages={pages}", *extra],
                             capture_output=True, text=True, check=True).stdout
        cycles = int(re.search(r"write_cycles=(\d+)", out).group(1))
        res[m].append(cycles / pages)
med = {m: statistics.median(v) for m, v in res.items()}
for m, v in med.items():
    print(f"  {m:24} {v:10.0f} cycles/page")
k = med["kernel (--no-uffd)"]
print(f"ratios: ebb/kernel = {med['ebb']/k:.2f}, ebb+around63/kernel = {med['ebb --fault-around 63']/k:.2f}")
PY
