#!/usr/bin/env bash
# Page sharing: ebb's scanner against the kernel's KSM on the same guest workload, in one
# run, and what a copy-on-write break costs:
#  1. host threads (cargo bench --bench sharing): the first write to a shared page against a
#     first-touch fault, and the scanner's CPU per page shared;
#  2. a real guest: touch writes PAGES pages of a content mix (zero, groups of duplicates,
#     random), then idles; the guest runs under ebb with --share-scan-rate, then under
#     --ksm with KSM at its defaults, then with KSM scanning as fast as it takes to spend
#     about ebb's CPU. Memory saved is the fall of the ebb process's PSS from the start of
#     the idle phase; CPU is ebb's scanner thread, or ksmd's. Both start at the idle phase
#     (ebb's scan rate is set through its control socket, KSM is switched on then), so
#     neither gets a head start during the writes.
#  3. two guests alike (touch, same seed: every page has a twin in the other VM): a sharing
#     group of two under `ebb host` (the broker in the host) against two `ebb run --ksm`
#     with KSM at ebb's CPU. Memory saved is the fall of the summed PSS of every process
#     involved (the host too, which maps the group's pool) from when both guests are idle.
# KSM's knobs are set for the run and restored afterwards (needs root). Prints a table;
# timings are never asserted: the machines are noisy.
#
#   scripts/bench-sharing.sh [PAGES] [IDLE_S]   (default 16384 pages = 64 MiB, 30 s)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PAGES=${1:-16384}
IDLE_S=${2:-30}

echo "== host threads (4096 pages, medians of 5)"
cargo bench --locked -q --bench sharing -- 4096 5 2>/dev/null | grep -v '^$'

echo
echo "== guest: touch pages=$PAGES mix=zero:20,dup:60,random:20 dup_groups=64, idle ${IDLE_S}s"
cargo build --release --locked -q
KSM=/sys/kernel/mm/ksm
if [[ ! -w $KSM/run ]]; then
    echo "*** KSM is not writable here ($KSM): only ebb is measured ***" >&2
fi
saved_knobs=()
for k in run pages_to_scan sleep_millisecs; do
    [[ -r $KSM/$k ]] && saved_knobs+=("$k=$(cat $KSM/$k)")
done
restore() {
    for kv in "${saved_knobs[@]}"; do echo "${kv#*=}" > "$KSM/${kv%%=*}" 2>/dev/null || true; done
}
trap restore EXIT

exec python3 - "$PAGES" "$IDLE_S" <<'PY'
import json, os, re, subprocess, sys, tempfile, time
pages, idle_s = int(sys.argv[1]), int(sys.argv[2])
KSM = "/sys/kernel/mm/ksm"
mem_mib = max(128, pages * 4 // 1024 * 2)

def ksm_write(knob, value):
    with open(f"{KSM}/{knob}", "w") as f:
        f.write(str(value))

def ksmd_cpu_ms():
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = open(f"/proc/{pid}/stat").read()
            except OSError:
                continue
            if "(ksmd)" in stat:
                f = stat.rsplit(")", 1)[1].split()
                return (int(f[11]) + int(f[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return 0.0

def pss_kib(pid):
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0

def ebb_scanner_cpu_ms(stats):
    # The scanner's CPU, from the newest statistics line ebb wrote.
    try:
        return json.loads(open(stats).read().strip().splitlines()[-1])["sharing_cpu_ms"]
    except (OSError, IndexError, ValueError):
        return 0.0

def ask(sock, request):
    import socket
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(sock)
        c.sendall((json.dumps(request) + "\n").encode())
        return json.loads(c.makefile().readline())

def run(name, extra, cpu_of, start):
    stats = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    sock = stats + ".sock"
    cpu = lambda: cpu_of(stats)
    args = ["./target/release/ebb", "run", "--mem", f"{mem_mib}M", "--firmware", "touch",
            "--stats-json", stats, "--stats-interval", "0.25", "--api-sock", sock, *extra]
    for kv in [f"pages={pages}", "mix=zero:20,dup:60,random:20", "dup_groups=64",
               f"idle_ms={idle_s * 1000}"]:
        args += ["--firmware-arg", kv]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        if "touch: idle" in line:
            break
    t0, pss0, cpu0 = time.time(), pss_kib(p.pid), cpu()
    start(sock)
    samples = []
    while p.poll() is None and time.time() - t0 < idle_s - 0.5:
        time.sleep(0.1)
        try:
            samples.append((time.time() - t0, pss0 - pss_kib(p.pid), cpu() - cpu0))
        except OSError:
            break
    out = p.communicate()[0]
    os.unlink(stats)
    ok = " bad=0 " in out
    final = max(s[1] for s in samples[-10:]) if samples else 0
    t90 = next((t for t, s, _ in samples if s >= 0.9 * final), float("nan")) if final > 0 else float("nan")
    cpu90 = next((c for t, s, c in samples if s >= 0.9 * final), float("nan")) if final > 0 else float("nan")
    cpu_end = samples[-1][2] if samples else 0.0
    return dict(name=name, saved_mib=final / 1024, t90=t90, cpu90=cpu90, cpu_end=cpu_end, ok=ok,
                cpu_rate=cpu_end / samples[-1][0] if samples else 0.0)

rate = 100000
results = [run(f"ebb, scan rate {rate} pages/s", [], ebb_scanner_cpu_ms,
               lambda sock: ask(sock, {"sharing": {"scan_rate": rate}}))]
ksm_ok = os.access(f"{KSM}/run", os.W_OK)
if ksm_ok:
    ksm_on = lambda _sock: ksm_write("run", 1)
    ksm_write("run", 2)  # nothing merged from before
    ksm_write("sleep_millisecs", 20)
    ksm_write("pages_to_scan", 100)
    results.append(run("KSM defaults (100 pages / 20 ms)", ["--ksm"], lambda _: ksmd_cpu_ms(), ksm_on))
    ksm_write("run", 2)
    # Scale KSM's scan rate so that ksmd spends about ebb's CPU per second of convergence.
    ebb_rate = results[0]["cpu90"] / max(results[0]["t90"], 0.1)
    ksm_rate = results[1]["cpu_rate"] or 1e-3
    n = int(min(20000, max(100, 100 * ebb_rate / ksm_rate)))
    ksm_write("pages_to_scan", n)
    results.append(run(f"KSM at ebb's CPU ({n} pages / 20 ms)", ["--ksm"], lambda _: ksmd_cpu_ms(), ksm_on))
    ksm_write("run", 2)  # unmerge what this run merged
    time.sleep(1)

def pair(name, start_procs, begin, cpu):
    """Two guests alike: start_procs() -> (pids, serial logs, stop); begin() starts sharing."""
    pids, logs, stop = start_procs()
    t_start = time.time()
    while not all(os.path.exists(l) and "touch: idle" in open(l, errors="replace").read() for l in logs):
        if time.time() - t_start > 300:
            stop()
            raise SystemExit(f"{name}: the guests never went idle")
        time.sleep(0.1)
    pss = lambda: sum(pss_kib(p) for p in pids())
    t0, pss0, cpu0 = time.time(), pss(), cpu()
    begin()
    samples = []
    while time.time() - t0 < idle_s - 1:
        time.sleep(0.2)
        try:
            samples.append((time.time() - t0, pss0 - pss(), cpu() - cpu0))
        except OSError:
            break
    stop()
    final = max(s[1] for s in samples[-10:]) if samples else 0
    t90 = next((t for t, s, _ in samples if s >= 0.9 * final), float("nan")) if final > 0 else float("nan")
    cpu90 = next((c for t, s, c in samples if s >= 0.9 * final), float("nan")) if final > 0 else float("nan")
    return dict(name=name, saved_mib=final / 1024, t90=t90, cpu90=cpu90,
                cpu_end=samples[-1][2] if samples else 0.0, ok=True)

def touch_args(log):
    return [f"pages={pages}", "mix=zero:20,dup:60,random:20", "dup_groups=64", "seed=7",
            f"idle_ms={idle_s * 1000}"]

def ebb_group():
    d = tempfile.mkdtemp(prefix="ebb-bench-group-")
    logs = [f"{d}/{n}.serial" for n in "ab"]
    cfg = f"{d}/host.toml"
    with open(cfg, "w") as f:
        f.write(f'budget = "4G"\ntick_ms = 200\nsharing_rate_idle = 0\n')
        for n, log in zip("ab", logs):
            fa = ", ".join(json.dumps(a) for a in touch_args(log))
            f.write(f'[[vm]]\nname = "{n}"\nmemory = "{mem_mib}M"\nfirmware = "touch"\n'
                    f'firmware_args = [{fa}]\nserial_log = "{log}"\nsharing_group = "g"\n')
    sock = f"{d}/host.sock"
    h = subprocess.Popen(["./target/release/ebb", "host", "--config", cfg, "--api-sock", sock],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def pids():
        kids = open(f"/proc/{h.pid}/task/{h.pid}/children").read().split()
        return [h.pid] + [int(k) for k in kids]
    def stop():
        h.terminate()
        h.wait(30)
    state.update(sock=sock, pids=pids)
    return pids, logs, stop

def ebb_group_begin():
    # Straight to each VM's socket: through the host, sharing is the policy's lever (and
    # the policy here leaves it at 0, so it never sets it back).
    for vm in ask(state["sock"], {"vms": {}})["vms"]:
        ask(vm["sock"], {"sharing": {"scan_rate": rate}})

def ebb_group_cpu():
    total = 0.0
    for pid in state["pids"]():
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = open(f"/proc/{pid}/task/{tid}/stat").read()
            except OSError:
                continue
            if "(ebb-share)" in stat or "(ebb-group-" in stat:
                f = stat.rsplit(")", 1)[1].split()
                total += (int(f[11]) + int(f[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return total

def ksm_pair():
    d = tempfile.mkdtemp(prefix="ebb-bench-ksm-")
    logs = [f"{d}/{n}.serial" for n in "ab"]
    procs = []
    for log in logs:
        args = ["./target/release/ebb", "run", "--mem", f"{mem_mib}M", "--firmware", "touch",
                "--serial-log", log, "--ksm"]
        for kv in touch_args(log):
            args += ["--firmware-arg", kv]
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    def stop():
        for p in procs:
            p.terminate()
            p.wait(30)
    return (lambda: [p.pid for p in procs]), logs, stop

state = {}
pairs = [pair(f"2 VMs, ebb sharing group, {rate} pages/s each", ebb_group, ebb_group_begin, ebb_group_cpu)]
if ksm_ok and len(results) == 3:
    ksm_write("run", 2)
    n2 = min(20000, 2 * n)  # two scanners' worth: ebb scans each VM at its rate
    ksm_write("pages_to_scan", n2)
    pairs.append(pair(f"2 VMs, KSM at ebb's CPU ({n2} pages / 20 ms)", ksm_pair,
                      lambda: ksm_write("run", 1), ksmd_cpu_ms))
    ksm_write("run", 2)
    time.sleep(1)

print(f"{'':44} {'saved MiB':>9} {'to 90%':>8} {'CPU to 90%':>11} {'CPU, all':>9}  pages ok")
for r in results:
    print(f"{r['name']:44} {r['saved_mib']:9.1f} {r['t90']:7.2f}s {r['cpu90']:9.0f}ms {r['cpu_end']:7.0f}ms  {r['ok']}")
if ksm_ok and len(results) == 3:
    e, d, f = results
    print(f"ebb reaches 90% {d['t90'] / e['t90']:.1f}x sooner than KSM's defaults and "
          f"{f['t90'] / e['t90']:.1f}x sooner than KSM at about the same CPU; "
          f"saving ebb/KSM = {e['saved_mib'] / max(d['saved_mib'], 1e-9):.2f}")
print()
for r in pairs:
    print(f"{r['name']:44} {r['saved_mib']:9.1f} {r['t90']:7.2f}s {r['cpu90']:9.0f}ms {r['cpu_end']:7.0f}ms")
if len(pairs) == 2:
    g, k = pairs
    print(f"the group reaches 90% {k['t90'] / g['t90']:.1f}x sooner than KSM at about ebb's CPU; "
          f"saving group/KSM = {g['saved_mib'] / max(k['saved_mib'], 1e-9):.2f}")
PY
