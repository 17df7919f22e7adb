#!/usr/bin/env bash
# Ballooning's overhead: Waldspurger, "Memory Resource Management in VMware ESX Server"
# (OSDI 2002), section 3.2 and Figure 2. There, a Linux VM configured with 256 MB and
# ballooned down to a smaller size ran dbench within a few percent of a VM configured
# with that smaller size from the start: the balloon costs little beyond the
# guest's page structures for the memory it no longer has.
#
# Here, two Linux guests (the tiny kernel and initramfs of scripts/build-guest.sh, PVH
# vmlinux), both with a virtio-balloon (stats every second) and a control socket:
#   configured  --mem 64M, balloon left empty;
#   ballooned   --mem 128M; once its balloon driver is up the script inflates the balloon
#               to 64 MiB through the control socket ({"balloon": {"target_bytes": 67108864}}) and
#               waits until balloon_stats says actual_bytes = 64 MiB.
# Each guest's /init runs `waitfree:W` (wait until MemFree <= W MiB: in the ballooned guest,
# until the balloon has its pages), `meminfo`, `idle:2`, then the workload, `fill:FILL` REPS
# times (memfill maps FILL MiB, writes and checks every page, frees them), then sleeps. A
# run's time is the time between the serial console's `ebb-guest: step ... exit=0` line
# before it and its own `exit=0` line, timed as ebb's stdout delivers them to this script:
# the workload alone, boot and ballooning excluded. The script checks that the balloon had
# reached 64 MiB before the first run began.
#
# By default the two guests run side by side, and in step: the guest that reaches its
# `idle:2` first is stopped there (SIGSTOP to its ebb process, while the guest sleeps) and
# continued when the other one gets there, so that both workloads run at the same time and
# see the same machine (the ballooned guest takes a minute or more longer to get there: its
# balloon inflates through emulated guest kernel code). SIDE_BY_SIDE=0 runs the guests one
# after the other instead (cleaner on a quiet machine, about twice as long).
#
#   scripts/paper-balloon.sh [FILL_MIB] [REPS]     (default: 20 MiB, 3 runs)
#
# Needs: root (/dev/kvm), python3, the release build target/release/ebb (or EBB=/path; this
# script does not build it), and the guest of scripts/build-guest.sh (built here if it is
# not cached). Everything a run writes goes to a private temp dir, removed at the end.
#
# Time: on a software-virtualized (kvm-pvm) host the guest kernel is emulated: boot to user
# space takes 40-60 s, inflating the 64 MiB balloon about 85 s, and memfill fills 0.2-1
# MiB/s (every first touch of a page is an emulated guest page fault; 0.2-0.35 MiB/s here
# with two guests and another benchmark on 2 cores). The default took 6.5 minutes side by
# side on such a machine; 32 MiB x 3 took 7.5. FILL must fit in the 64 MiB guest's free
# memory (about 48 MiB): at most 44. A larger FILL brings the workload closer to the
# guest's size (the paper's setting), at 3-5 s per MiB per run.
#
# Output: a Markdown table: each configuration's MemFree before the workload, run times,
# the best, its fill rate; then the ratio ballooned / configured of the best times and of
# the means (1.00: no overhead; the paper's result is within a few percent). On a shared,
# emulated host runs of one guest differed by up to 45% (62 to 97 s) beside another
# benchmark, so read the ratio beside the spread of the runs, and on a noisy machine prefer
# more REPS to a larger FILL.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib/paper-guest.sh
source scripts/lib/paper-guest.sh
FILL=${1:-20}
REPS=${2:-3}
[[ $FILL =~ ^[0-9]+$ && $FILL -ge 1 && $FILL -le 44 ]] || { echo "paper-balloon: FILL_MIB must be 1 to 44" >&2; exit 2; }
[[ $REPS =~ ^[0-9]+$ && $REPS -ge 1 && $REPS -le 20 ]] || { echo "paper-balloon: REPS must be 1 to 20" >&2; exit 2; }

paper_setup paper-balloon

tmp=$(mktemp -d "${TMPDIR:-/tmp}/paper-balloon.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

python3 - "$EBB" "$vmlinux" "$initramfs" "$tmp" "$FILL" "$REPS" "${SIDE_BY_SIDE:-1}" <<'PY'
import json, os, re, signal, socket, subprocess, sys, threading, time

ebb, vmlinux, initramfs, tmp = sys.argv[1:5]
fill, reps, side_by_side = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] != "0"
SMALL, BIG = 64, 128          # MiB: the configured size, and the size ballooned down to SMALL
STEP = re.compile(r"ebb-guest: step (\S+) exit=(\d+)")
HOLD_AT = "meminfo"           # the step after which a guest early to the workload waits
START = "idle:2"              # the step whose end starts the timed workload
# Boot, ballooning and waiting for the other guest, then 8 s per MiB filled at worst.
deadline_s = 500 + reps * fill * 8


def log(msg):
    print(f"paper-balloon: {msg}", file=sys.stderr, flush=True)


def ask(sock, req):
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(sock)
        c.sendall((json.dumps(req) + "\n").encode())
        return json.loads(c.makefile().readline())


class Sync:
    """Holds the first guest at HOLD_AT until the second gets there."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = None

    def arrived(self, vm):
        with self.lock:
            if self.held is None:
                vm.proc.send_signal(signal.SIGSTOP)
                self.held = vm
                log(f"{vm.name}: held (SIGSTOP) until the other guest is ready")
                return
            other = self.held
        # The other guest now sleeps its 2 s (START); the held one's sleep ran out while it
        # was stopped, so it starts its workload as soon as it continues: 2 s from now.
        def go():
            other.proc.send_signal(signal.SIGCONT)
            log(f"{other.name}: continued")
        threading.Timer(2.0, go).start()


class Vm:
    def __init__(self, name, mem, waitfree, sync=None):
        self.name, self.mem, self.sync = name, mem, sync
        self.sock = os.path.join(tmp, f"{name}.sock")
        self.lines = []           # (monotonic time, serial line)
        self.steps = []           # (monotonic time, step, exit status)
        self.t_inflated = None
        steps = [f"waitfree:{waitfree}", HOLD_AT, START] + [f"fill:{fill}"] * reps
        steps.append("idle:3600")
        argv = [ebb, "run", "--mem", f"{mem}M", "--kernel", vmlinux, "--initrd", initramfs,
                "--cmdline", "ebb.workload=" + ",".join(steps), "--balloon", "stats=1",
                "--api-sock", self.sock]
        self.err = open(os.path.join(tmp, f"{name}.stderr"), "w")
        self.serial = open(os.path.join(tmp, f"{name}.serial"), "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=self.err, start_new_session=True)
        threading.Thread(target=self.read, daemon=True).start()
        log(f"{name}: ebb {self.proc.pid} started, --mem {mem}M, workload {','.join(steps)}")

    def read(self):
        for raw in self.proc.stdout:
            t = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append((t, line))
            self.serial.write(f"{t - self.t0:9.3f} {line}\n")
            self.serial.flush()
            m = STEP.search(line)
            if not m:
                continue
            step, status = m.group(1), int(m.group(2))
            prev = self.steps[-1][0] if self.steps else self.t0
            self.steps.append((t, step, status))
            log(f"{self.name}: {step} exit={status} at {t - self.t0:.1f} s (+{t - prev:.1f} s)")
            if step == HOLD_AT and self.sync:
                self.sync.arrived(self)

    def workload_times(self):
        """Seconds of each fill run, once all are done; None before."""
        idx = [i for i, s in enumerate(self.steps) if s[1] == START]
        if not idx:
            return None
        after = self.steps[idx[0]:]
        if len(after) < reps + 1:
            if any(s[2] != 0 for s in after):
                raise RuntimeError(f"{self.name}: a fill step failed: {after[1:]}\n{self.tail()}")
            return None
        runs = after[1:reps + 1]
        if any(s[1] != f"fill:{fill}" or s[2] != 0 for s in runs):
            raise RuntimeError(f"{self.name}: a fill step failed: {runs}\n{self.tail()}")
        return [b[0] - a[0] for a, b in zip(after, after[1:reps + 1])]

    def started_at(self):
        return next((t for t, s, _ in self.steps if s == START), None)

    def line(self, text):
        return next((l for _, l in self.lines if text in l), None)

    def tail(self, n=15):
        return "\n".join(l for _, l in self.lines[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a held VM cannot act on SIGTERM
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.err.close()


def inflate(vm, deadline):
    """Inflates vm's balloon to BIG - SMALL MiB once its driver is up; waits for it."""
    target = BIG - SMALL
    while not os.path.exists(vm.sock):
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise RuntimeError(f"{vm.name}: no control socket")
        time.sleep(0.2)
    while not ask(vm.sock, {"balloon_stats": {}}).get("driver_ready"):
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise RuntimeError(f"{vm.name}: the balloon driver never came up")
        time.sleep(0.5)
    t = time.monotonic()
    reply = ask(vm.sock, {"balloon": {"target_bytes": target << 20}})
    if reply != {"ok": True}:
        raise RuntimeError(f"{vm.name}: balloon target refused: {reply}")
    log(f"{vm.name}: balloon driver up after {t - vm.t0:.0f} s; inflating to {target} MiB")
    while True:
        s = ask(vm.sock, {"balloon_stats": {}})
        if s.get("actual_bytes") == target << 20:
            vm.t_inflated = time.monotonic()
            log(f"{vm.name}: balloon at {target} MiB after {vm.t_inflated - t:.1f} s")
            return
        if time.monotonic() > deadline or vm.proc.poll() is not None:
            raise RuntimeError(f"{vm.name}: the balloon stayed at {(s.get('actual_bytes') or 0) >> 20} MiB")
        time.sleep(0.2)


def wait_runs(vm, deadline):
    while True:
        times = vm.workload_times()
        if times is not None:
            return times
        if vm.proc.poll() is not None:
            raise RuntimeError(f"{vm.name}: ebb exited ({vm.proc.returncode}):\n{vm.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{vm.name}: timed out; last lines:\n{vm.tail()}")
        time.sleep(0.5)


def experiment():
    t_begin = time.monotonic()
    deadline = t_begin + deadline_s * (1 if side_by_side else 2)
    vms, results = [], {}
    sync = Sync() if side_by_side else None
    try:
        # The 64 MiB guest's MemFree is below 60 MiB from boot on: its waitfree passes at
        # once. The 128 MiB guest has about 112 MiB free before the balloon and about 48
        # after its 64 MiB: waitfree:54 passes during the balloon's last few MiB, which
        # `meminfo` (about 10 s of emulated kernel work) and `idle:2` leave time to finish.
        order = [("ballooned", BIG, 54), ("configured", SMALL, 60)]
        for name, mem, waitfree in order:
            vm = Vm(name, mem, waitfree, sync)
            vms.append(vm)
            if not side_by_side:
                if name == "ballooned":
                    inflate(vm, deadline)
                results[name] = wait_runs(vm, deadline)
                vm.stop()
        if side_by_side:
            inflate(vms[0], deadline)
            for vm in vms:
                results[vm.name] = wait_runs(vm, deadline)
    finally:
        for vm in vms:
            vm.stop()
    return vms, results, time.monotonic() - t_begin


try:
    vms, results, total = experiment()
except (RuntimeError, OSError, ValueError) as e:
    log(f"failed: {e}")
    sys.exit(1)
except KeyboardInterrupt:
    log("interrupted")
    sys.exit(130)

by = {vm.name: vm for vm in vms}
b, c = by["ballooned"], by["configured"]
early = b.t_inflated is None or b.started_at() is None or b.t_inflated > b.started_at()
print()
print(f"Ballooning overhead: fill:{fill} (memfill writes and checks {fill} MiB) x {reps}, "
      f"{'side by side, in step' if side_by_side else 'one guest after the other'}, "
      f"{total:.0f} s in all")
if side_by_side:
    print(f"(workload starts {abs(b.started_at() - c.started_at()):.1f} s apart)")
print()
cols = " | ".join(f"run {i + 1} s" for i in range(reps))
print(f"| configuration | MemFree before | {cols} | best s | best MiB/s |")
print("|:---|---:|" + "---:|" * reps + "---:|---:|")
for name, label in [("configured", f"configured {SMALL} MiB"),
                    ("ballooned", f"{BIG} MiB ballooned to {SMALL} MiB")]:
    vm, t = by[name], results[name]
    free = vm.line("MemFree:")
    free = free.split("MemFree:")[1].split("kB")[0].strip() if free else "?"
    free = f"{int(free) / 1024:.1f} MiB" if free.isdigit() else free
    runs = " | ".join(f"{x:.2f}" for x in t)
    print(f"| {label} | {free} | {runs} | {min(t):.2f} | {fill / min(t):.2f} |")
ct, bt = results["configured"], results["ballooned"]
print()
print(f"ratio ballooned / configured: best {min(bt) / min(ct):.3f}, "
      f"mean {sum(bt) / len(bt) / (sum(ct) / len(ct)):.3f}")
if early:
    print("warning: the balloon was still inflating when the ballooned guest's first run "
          "began: its first run is not a clean measurement")
PY
