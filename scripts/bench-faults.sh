#!/usr/bin/env bash
# First-touch cost per page, all measured in one run:
#  1. host threads (cargo bench --bench faults): the kernel's own anonymous fault, a minimal
#     userfaultfd handler, and ebb's engine with its default (adaptive fault-around), with
#     fault-around off and with fixed windows, for a sequential and a scattered walk;
#  2. a real guest: the touch payload's write phase over PAGES pages, under --no-uffd (the
#     kernel's fault behind KVM), ebb's default, and ebb with --fault-around 0; then a
#     scattered walk (every 8th page, random order) with ebb's default, where Consumed is
#     compared with the pages touched;
#  3. SMP: touch on 1, 2, 4 and 8 vCPUs (each writing its share), under --no-uffd (the
#     kernel's fault, for the same number of threads) and ebb with --fault-around 0 (every
#     page one fault to the one handler thread): faults per second of the write phase's wall
#     time, and the ratio. Host threads do the same in part 1's last table.
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
import json, os, re, statistics, subprocess, sys, tempfile
pages, runs = int(sys.argv[1]), int(sys.argv[2])

def touch(extra, args):
    with tempfile.NamedTemporaryFile(suffix=".json") as stats:
        out = subprocess.run(["./target/release/ebb", "run", "--mem", "1G", "--firmware", "touch",
                              "--stats-json", stats.name, *extra,
                              *[a for kv in args for a in ("--firmware-arg", kv)]],
                             capture_output=True, text=True, check=True).stdout
        last = json.loads(open(stats.name).read().splitlines()[-1])
    return int(re.search(r"write_cycles=(\d+)", out).group(1)), last

modes = {"kernel (--no-uffd)": ["--no-uffd"], "ebb (default)": [], "ebb --fault-around 0": ["--fault-around", "0"]}
res = {m: [] for m in modes}
for r in range(runs):
    for m, extra in modes.items():
        cycles, _ = touch(extra, [f"pages={pages}"])
        res[m].append(cycles / pages)
med = {m: statistics.median(v) for m, v in res.items()}
for m, v in med.items():
    print(f"  {m:24} {v:10.0f} cycles/page")
k = med["kernel (--no-uffd)"]
print(f"ratios: ebb(default)/kernel = {med['ebb (default)']/k:.2f}, "
      f"ebb(fault-around 0)/kernel = {med['ebb --fault-around 0']/k:.2f}")

print()
scattered = max(pages // 8, 1)
print(f"== guest: touch pages={scattered} stride=8 order=random (scattered), ebb default")
ratios = []
for r in range(runs):
    cycles, last = touch([], [f"pages={scattered}", "stride=8", "order=random"])
    ratios.append(last["consumed_bytes"] / (scattered * 4096))
print(f"  Consumed / pages touched: median {statistics.median(ratios):.3f} "
      f"(max {max(ratios):.3f}; ebb's own boot data is part of Consumed)")

print()
print(f"== guest SMP: touch pages={pages} on N vCPUs, write phase, faults per second")
print("  vCPUs  kernel (--no-uffd)  ebb --fault-around 0  ebb/kernel")
for n in [1, 2, 4, 8]:
    rates = {}
    for m, extra in [("kernel", ["--no-uffd"]), ("ebb", ["--fault-around", "0"])]:
        per = []
        for r in range(runs):
            out = subprocess.run(["./target/release/ebb", "run", "--mem", "1G", "--vcpus", str(n),
                                  "--firmware", "touch", *extra, "--firmware-arg", f"pages={pages}"],
                                 capture_output=True, text=True, check=True).stdout
            cycles = int(re.search(r"write_cycles=(\d+)", out).group(1))
            khz = int(re.search(r"tsc_khz=(\d+)", out).group(1))
            per.append(pages / (cycles / (khz * 1000.0)))
        rates[m] = statistics.median(per)
    print(f"  {n:5}  {rates['kernel']:18.0f}  {rates['ebb']:20.0f}  {rates['ebb'] / rates['kernel']:10.2f}")
PY
