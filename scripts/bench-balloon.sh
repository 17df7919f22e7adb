#!/usr/bin/env bash
# Balloon inflate rate: the same kernel under ebb and under QEMU -M microvm with
# virtio-balloon-device, both idling in `rootwait` with init_on_free=1 (so every page is
# backed). Sets a balloon of TARGET and times target-set -> actual-reached; prints MiB/s
# inflated and host memory returned per second (drop of the VMM's RSS), for both.
#
#   scripts/bench-balloon.sh [TARGET_MIB]     (default 64; guest RAM 128 MiB)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TARGET=${1:-64}
command -v qemu-system-x86_64 >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-system-x86
} >&2
cargo build --release --locked -q
eval "$(scripts/build-guest.sh | sed 's/^/GUEST_/')"
exec python3 - "$TARGET" "$GUEST_vmlinux" <<'PY'
import json, os, socket, subprocess, sys, tempfile, time
target, kernel = int(sys.argv[1]), sys.argv[2]
mem = 128
cmd = "root=/dev/vda rootwait init_on_free=1"
tmp = tempfile.mkdtemp()

def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

def until(what, f, timeout=400):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        v = f()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"timeout: {what}")

import threading
def serial_marker(proc, marker="Waiting for root device"):
    """An event set once the guest prints `marker` (its drivers, the balloon's included,
    have probed by then): the same ready signal for both VMMs."""
    seen = threading.Event()
    def pump():
        for line in proc.stdout:
            if marker.encode() in line:
                seen.set()
    threading.Thread(target=pump, daemon=True).start()
    return seen

def measure(name, proc, ready, set_target, actual):
    seen = serial_marker(proc)
    until(f"{name} guest idle", lambda: seen.is_set() and ready())
    time.sleep(3)  # let boot-time activity settle
    rss0, t0 = rss_mib(proc.pid), time.monotonic()
    set_target()
    until(f"{name} actual", lambda: actual() >= target)
    dt = time.monotonic() - t0
    rss1 = rss_mib(proc.pid)
    proc.kill(); proc.wait()
    print(f"{name:5}: {target} MiB in {dt:5.2f} s = {target/dt:6.2f} MiB/s inflated; "
          f"RSS {rss0:.0f} -> {rss1:.0f} MiB = {(rss0-rss1)/dt:6.2f} MiB/s returned to the host")
    return dt

# ebb
sock = os.path.join(tmp, "ebb.sock")
def ebb_req(req):
    s = socket.socket(socket.AF_UNIX); s.connect(sock); s.sendall((json.dumps(req) + "\n").encode())
    r = s.makefile().readline(); s.close(); return json.loads(r)
p = subprocess.Popen(["./target/release/ebb", "run", "--kernel", kernel, "--mem", f"{mem}M", "--cmdline", cmd,
                      "--balloon", "", "--api-sock", sock], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
def ebb_ready():
    try: return ebb_req({"balloon_stats": {}})["driver_ready"]
    except OSError: return False
e = measure("ebb", p, ebb_ready, lambda: ebb_req({"balloon": {"target_bytes": target << 20}}),
            lambda: ebb_req({"balloon_stats": {}})["actual_bytes"] >> 20)

# QEMU: QMP `balloon` takes the guest's memory size, not the balloon size.
qmp_path = os.path.join(tmp, "qmp.sock")
q = subprocess.Popen(["qemu-system-x86_64", "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,arch-capabilities=off",
                      "-m", f"{mem}M", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
                      "-kernel", kernel, "-append", "console=ttyS0 noxsave clearcpuid=smap,smep,popcnt,umip,pku " + cmd,
                      "-device", "virtio-balloon-device", "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
until("qmp socket", lambda: os.path.exists(qmp_path))
qs = socket.socket(socket.AF_UNIX); qs.connect(qmp_path); qf = qs.makefile()
qf.readline()
def qmp(cmd, **args):
    qs.sendall((json.dumps({"execute": cmd, "arguments": args} if args else {"execute": cmd}) + "\n").encode())
    while True:
        r = json.loads(qf.readline())
        if "return" in r or "error" in r:
            return r
qmp("qmp_capabilities")
def q_ready():
    # The driver is up once query-balloon answers (it fails while no driver has probed).
    r = qmp("query-balloon"); return "return" in r
def q_actual():
    r = qmp("query-balloon"); return mem - r["return"]["actual"] // (1 << 20)
qd = measure("qemu", q, q_ready, lambda: qmp("balloon", value=(mem - target) << 20), q_actual)
print(f"ebb/QEMU inflate time = {e/qd:.2f}")
PY
