#!/usr/bin/env bash
# Page sharing as the number of VMs grows: Waldspurger, "Memory Resource Management in
# VMware ESX Server" (OSDI 2002), section 4.3 and Figure 4. There, N identical Linux VMs
# ran under ESX with content-based page sharing, and the memory it saved grew
# with N: about two thirds of all VM memory at 10 VMs, a good part of one VM's sharing
# being zero pages.
#
# Here, for each N: `ebb host --policy esx` runs N identical Linux guests (the tiny kernel and
# initramfs of scripts/build-guest.sh, PVH vmlinux, 64 MiB each, `ebb.workload=idle:...`,
# so every guest boots to user space and sleeps) in one `sharing_group`, with a budget of
# twice their memory (the host stays in High: nothing is ballooned, compressed or swapped)
# and the ESX policy's sharing scan rate at 20000 pages/s per VM (each 64 MiB VM is hashed
# in about a second). The script waits until every guest printed `ebb-guest: init started`
# and then until the host's figures are stable (the VMs' consumed memory and sharing's
# saving each moved by less than 0.5 MiB over the last 12 s), takes the last report the
# host wrote (--stats-json, one line per tick) and each VM's own last statistics line
# (--stats-json, for the zero pages), and stops the host with SIGTERM.
#
#   scripts/paper-sharing.sh [N...]        (default: 1 2 4 6 8 10)
#
# Needs: root (/dev/kvm; the host runs each VM as its own uid), python3, the release build
# target/release/ebb (or EBB=/path/to/ebb; this script does not build it), and the guest of
# scripts/build-guest.sh (built here if it is not cached: about 2.5 minutes, more on a busy
# machine). Everything a run writes goes to a private temp dir, removed at the end.
#
# Time: on a software-virtualized (kvm-pvm) host one guest takes 25-45 s of a CPU to reach
# user space, so N guests on 2 cores take roughly 20-60 s x N to boot (the more, the busier
# the machine), then 15-30 s to converge: `1 2` took 3.5 minutes here beside another
# benchmark, the default list takes about 20-35 minutes. A step gives up after
# 180 + 90 x N s and reports what it had (marked "not converged").
#
# Output: a Markdown table, one row per N:
#   consumed/VM   host memory each VM consumes after sharing (mean; ebb's figure: guest
#                 pages, its part of the group's pool, metadata)
#   saved         host memory sharing saves, all VMs together (the host's
#                 sharing_saved_bytes: shared guest pages less the pool pages they map, plus
#                 the zero pages the scanners dropped); per VM
#   % of touched  saved / (consumed + saved): the share of the memory the guests would hold
#                 without sharing that sharing saves
#   % of config.  saved / (N x 64 MiB): the paper's measure. A guest here touches only part
#                 of its 64 MiB (ebb backs no page a guest never touched, and this Linux does
#                 not zero its free memory at boot), so this stays below the paper's figure;
#                 the growth with N is what compares
#   zero/VM       of the saving, zero pages dropped (each VM's zero_pages_shared; a counter
#                 of pages dropped so far, so a page dropped and written again still counts)
#   pool          the group's pool: one host copy of each shared content
# The saving per VM should grow with N (each new VM shares what the first holds once) toward
# that VM's whole shareable part.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib/paper-guest.sh
source scripts/lib/paper-guest.sh
Ns=("$@")
[[ ${#Ns[@]} -gt 0 ]] || Ns=(1 2 4 6 8 10)
for n in "${Ns[@]}"; do
    [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 64 ]] || { echo "paper-sharing: N must be 1 to 64, not '$n'" >&2; exit 2; }
done

paper_setup paper-sharing

tmp=$(mktemp -d "${TMPDIR:-/tmp}/paper-sharing.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

python3 - "$EBB" "$vmlinux" "$initramfs" "$tmp" "${Ns[@]}" <<'PY'
import json, os, signal, subprocess, sys, time

ebb, vmlinux, initramfs, tmp = sys.argv[1:5]
ns = [int(a) for a in sys.argv[5:]]
MEM_MIB = 64
RATE = 20000             # sharing scan rate, pages/s per VM
MIB = 1 << 20
STABLE_S = 12            # figures stable this long: converged
STABLE_MIB = 0.5         # "stable": moved by less than this
UID_BASE = 190000        # VM uids apart from other hosts' (the default base is 100000)


def log(msg):
    print(f"paper-sharing: {msg}", file=sys.stderr, flush=True)


def last_json_line(path):
    """The last complete JSON line of `path`, or None."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - (1 << 20)))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def booted(serial):
    try:
        with open(serial, errors="replace") as f:
            return "ebb-guest: init started" in f.read()
    except OSError:
        return False


def alive_pid_of_ours(pid, d):
    """True if `pid` still runs an ebb whose command line names our directory `d`."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode(errors="replace")
    except OSError:
        return False
    return d in cmd


def stop_host(host, d, pids):
    if host.poll() is None:
        host.send_signal(signal.SIGTERM)
        try:
            host.wait(60)
        except subprocess.TimeoutExpired:
            log("the host did not stop 60 s after SIGTERM: killing it")
            host.kill()
            host.wait(10)
    # The VMs die with the host (PR_SET_PDEATHSIG); make sure, by pid, of ours only.
    deadline = time.time() + 10
    while time.time() < deadline and any(alive_pid_of_ours(p, d) for p in pids):
        time.sleep(0.2)
    for p in pids:
        if alive_pid_of_ours(p, d):
            log(f"vm process {p} outlived the host: killing it")
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run(n):
    d = os.path.join(tmp, f"n{n}")
    os.makedirs(d)
    names = [f"vm{i + 1}" for i in range(n)]
    timeout = 180 + 90 * n
    idle = timeout + 600     # the guests sleep longer than the run can last
    cfg = os.path.join(d, "host.toml")
    with open(cfg, "w") as f:
        f.write(f'budget = "{2 * n * MEM_MIB}M"\ntick_ms = 1000\npolicy = "esx"\n'
                f"sharing_rate_idle = {RATE}\nsharing_rate_busy = {RATE}\n")
        for name in names:
            args = ["--stats-json", os.path.join(d, f"{name}.jsonl"), "--stats-interval", "1"]
            f.write(f'\n[[vm]]\nname = "{name}"\nmemory = "{MEM_MIB}M"\n'
                    f"kernel = {json.dumps(vmlinux)}\ninitrd = {json.dumps(initramfs)}\n"
                    f'cmdline = "ebb.workload=idle:{idle}"\nsharing_group = "paper"\n'
                    f"serial_log = {json.dumps(os.path.join(d, name + '.serial'))}\n"
                    f"args = {json.dumps(args)}\n")
    stats = os.path.join(d, "host.jsonl")
    argv = [ebb, "host", "--config", cfg, "--policy", "esx", "--stats-json", stats,
            "--vm-uid-base", str(UID_BASE)]
    env = dict(os.environ, TMPDIR=d)  # the host's run dir (VM sockets) goes in d too
    hostlog = open(os.path.join(d, "host.log"), "w")
    t0 = time.time()
    host = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=hostlog, stderr=hostlog,
                            env=env, start_new_session=True)
    log(f"N={n}: host {host.pid} started, {n} x {MEM_MIB} MiB (gives up after {timeout} s)")
    pids, history, t_boot, converged, failure = set(), [], None, False, None
    rep = None
    try:
        while True:
            time.sleep(2)
            now = time.time() - t0
            if host.poll() is not None:
                failure = f"the host exited early ({host.returncode})"
                break
            rep = last_json_line(stats) or rep
            if rep:
                pids.update(v["pid"] for v in rep["vms"] if v.get("pid"))
                ended = [v["name"] for v in rep["vms"] if v.get("exit")]
                if ended:
                    failure = f"VMs ended: {', '.join(ended)}"
                    break
            if t_boot is None:
                up = sum(booted(os.path.join(d, f"{x}.serial")) for x in names)
                if up == n:
                    t_boot = now
                    log(f"N={n}: all {n} guests in user space after {now:.0f} s")
            elif rep:
                consumed = sum(v["consumed_bytes"] for v in rep["vms"]) / MIB
                saved = sum(v["sharing_saved_bytes"] for v in rep["vms"]) / MIB
                history.append((now, consumed, saved))
                window = [h for h in history if h[0] >= now - STABLE_S]
                if now - t_boot >= STABLE_S and history[0][0] <= now - STABLE_S and all(
                    max(h[i] for h in window) - min(h[i] for h in window) < STABLE_MIB
                    for i in (1, 2)
                ):
                    converged = True
                    log(f"N={n}: converged after {now:.0f} s: saved {saved:.1f} MiB")
                    break
            if now > timeout:
                failure = "timed out " + ("before every guest booted" if t_boot is None
                                          else "before the figures settled")
                break
        rep = last_json_line(stats) or rep
        vm_stats = [last_json_line(os.path.join(d, f"{x}.jsonl")) or {} for x in names]
    finally:
        stop_host(host, d, pids)
        hostlog.close()
    elapsed = time.time() - t0
    if failure:
        log(f"N={n}: {failure}; host log tail:")
        with open(os.path.join(d, "host.log"), errors="replace") as f:
            for line in f.read().splitlines()[-10:]:
                log("  " + line)
    if not rep:
        return dict(n=n, ok=False, why=failure or "no report", secs=elapsed)
    vms = rep["vms"]
    zero = sum(s.get("zero_pages_shared", 0) for s in vm_stats) * 4096
    pool = max((s.get("sharing_group_pool_bytes") or 0 for s in vm_stats), default=0)
    return dict(
        n=n, ok=converged, why=failure, secs=elapsed, boot=t_boot,
        consumed=sum(v["consumed_bytes"] for v in vms) / MIB,
        saved=sum(v["sharing_saved_bytes"] for v in vms) / MIB,
        shared=sum(v["shared_bytes"] for v in vms) / MIB,
        zero=zero / MIB, zero_known=all("zero_pages_shared" in s for s in vm_stats),
        pool=pool / MIB, state=rep.get("state"),
        levers={v.get("share_scan_rate") for v in vms},
        reclaimed=sum(v.get("ballooned_bytes", 0) + v.get("compressed_bytes", 0)
                      + v.get("swapped_bytes", 0) for v in vms) / MIB,
    )


rows = []
try:
    for n in ns:
        rows.append(run(n))
except KeyboardInterrupt:
    log("interrupted")

print()
print(f"Page sharing, N identical Linux VMs of {MEM_MIB} MiB in one sharing group "
      f"(ebb host --policy esx, scan {RATE} pages/s per VM)")
print()
print("| N | consumed/VM MiB | saved MiB (all) | saved/VM MiB | saved % of touched "
      "| saved % of configured | zero pages/VM MiB | pool MiB | boot s | run s | converged |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
for r in rows:
    n = r["n"]
    if "consumed" not in r:
        print(f"| {n} | - | - | - | - | - | - | - | - | {r['secs']:.0f} | no: {r['why']} |")
        continue
    touched = r["consumed"] + r["saved"]
    zero = f"{r['zero'] / n:.1f}" if r["zero_known"] else "n/a"
    boot = f"{r['boot']:.0f}" if r["boot"] is not None else "-"
    conv = "yes" if r["ok"] else f"no: {r['why']}"
    print(f"| {n} | {r['consumed'] / n:.1f} | {r['saved']:.1f} | {r['saved'] / n:.1f} "
          f"| {100 * r['saved'] / touched if touched else 0:.1f}% "
          f"| {100 * r['saved'] / (n * MEM_MIB):.1f}% | {zero} | {r['pool']:.1f} "
          f"| {boot} | {r['secs']:.0f} | {conv} |")
odd = [r for r in rows if "consumed" in r and (r["reclaimed"] > 0 or r["state"] != "high")]
for r in odd:
    print(f"\nwarning: N={r['n']}: the host was in state {r['state']} with "
          f"{r['reclaimed']:.1f} MiB reclaimed: the budget did not cover the VMs")
if any(not r["ok"] for r in rows):
    sys.exit(1)
PY
