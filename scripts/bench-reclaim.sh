#!/usr/bin/env bash
# Host-side reclaim, all measured in one run:
#  1. LZ4 (cargo bench --bench reclaim, as the rest of 1-4): compress and decompress MB/s on
#     one core, compression ratio and the share of data pages (neither zero nor same-filled)
#     that compress to <= 2 KiB, for the pages of the guest kernel images (vmlinux, bzImage,
#     initramfs.cpio: files, a proxy for an idle guest's memory) and a synthetic mix (10% zero,
#     10% same-filled, 60% text-like, 20% random); against the goal (>= 1 GB/s compress,
#     >= 4 GB/s decompress);
#  2. the eviction mechanism: UFFDIO_MOVE of a page into a registered scratch range (ebb's
#     way) against copying it out + MADV_DONTNEED, per page and per 64 pages, batches of 64;
#  3. swap-in latency as the faulting thread sees it (host threads, no KVM): a first read of
#     a page evicted into the compression cache, and of one evicted into the swap file,
#     against a bare first touch served by the same engine (ratio; goal cache <= 1.2x), and
#     the engine's own p50/p99;
#  4. the kernel's zswap as the baseline (lz4; where the kernel's crypto API lacks lz4, lzo-rle,
#     saying so loudly): a child in a fresh cgroup-v1 memory cgroup
#     limited to LIMIT MiB writes WORKLOAD MiB of the mix (the same pages), then rereads and
#     checks them: per-page write and reread time, pages/s reclaimed, memory saved (debugfs'
#     zswap figures if mounted, else /proc/meminfo Zswap/Zswapped). Needs root, zswap, cgroup
#     v1 memory, mkswap/swapon; it creates a swap file under /var/tmp and enables zswap, and
#     restores everything on exit, failure or Ctrl-C; otherwise it is skipped, saying why.
#     ebb's engine runs the same workload with a resident target of LIMIT MiB (in 1-4's
#     bench); both are printed side by side in one table, with part 3's refault latency;
#  5. victim selection in a real VM: the touch payload writes 128 MiB of the mix, then loops
#     over a hot set while --reclaim-target keeps 48 MiB resident: (a) a 16 MiB hot set
#     (fits the target), uniform accesses; (b) Zipf accesses (s = 1) over all 128 MiB.
#     Refaults per second, refaults per 1000 accesses and the workload's progress (accesses
#     per second, touch's progress counter) with --reclaim-victims cold against random, same
#     run, over the loop phase and its second half, from --stats-json every 0.5 s.
# Prints medians and ratios. Timings are never asserted; the machines are noisy.
#
#   scripts/bench-reclaim.sh [PAGES] [RUNS] [VM_RUNS]
#     PAGES: pages per case in 2 and 3 (default 4096); RUNS: rounds of 1-3 (default 5);
#     VM_RUNS: runs of each policy in 5 (default 2). EBB_BENCH_WORKLOAD_MIB (256) and
#     EBB_BENCH_LIMIT_MIB (64) size part 4. About 1.5 minutes on 2 cores once built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PAGES=${1:-4096}
RUNS=${2:-5}
VM_RUNS=${3:-2}
WORKLOAD_MIB=${EBB_BENCH_WORKLOAD_MIB:-256}
LIMIT_MIB=${EBB_BENCH_LIMIT_MIB:-64}
SWAP_MIB=$((WORKLOAD_MIB * 2))
ZSWAP=/sys/module/zswap/parameters
MEMCG_ROOT=/sys/fs/cgroup/memory

OUT=$(mktemp -d "${TMPDIR:-/tmp}/ebb-bench-reclaim.XXXXXX")
SWAPFILE=""
SWAP_ON=0
CG=""
CG_PARENT=""
OLD_ENABLED=""
OLD_COMPRESSOR=""
CHILD=""

# Undoes what the zswap part did, in order; safe to call twice.
restore() {
    set +e
    if [[ -n $CHILD ]]; then
        kill "$CHILD" 2>/dev/null
        wait "$CHILD" 2>/dev/null
        CHILD=""
    fi
    if [[ -n $CG && -d $CG ]]; then
        while read -r pid; do echo "$pid" >"$CG_PARENT/cgroup.procs"; done <"$CG/cgroup.procs"
        rmdir "$CG" || echo "bench-reclaim: could not remove the cgroup $CG" >&2
    fi
    CG=""
    if ((SWAP_ON)); then
        swapoff "$SWAPFILE" || echo "bench-reclaim: swapoff $SWAPFILE failed" >&2
        SWAP_ON=0
    fi
    if [[ -n $SWAPFILE ]]; then
        rm -f "$SWAPFILE"
        SWAPFILE=""
    fi
    # Off first, so that restoring the compressor builds no pool; then as it was.
    if [[ -n $OLD_ENABLED ]]; then
        echo N >"$ZSWAP/enabled"
    fi
    if [[ -n $OLD_COMPRESSOR ]]; then
        echo "$OLD_COMPRESSOR" >"$ZSWAP/compressor"
        OLD_COMPRESSOR=""
    fi
    if [[ -n $OLD_ENABLED ]]; then
        echo "$OLD_ENABLED" >"$ZSWAP/enabled"
        OLD_ENABLED=""
    fi
    set -e
}
cleanup() {
    restore
    rm -rf "$OUT"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== host threads (cargo bench --bench reclaim)"
images=""
if guest=$(scripts/build-guest.sh 2>"$OUT/build-guest.log"); then
    eval "$(echo "$guest" | sed 's/^/GUEST_/')"
    images="$GUEST_vmlinux:$GUEST_bzimage:$GUEST_initramfs"
else
    echo "  *** guest images unavailable (scripts/build-guest.sh failed, see below); part 1 uses the mix only ***"
    tail -5 "$OUT/build-guest.log"
fi
cargo build --release --locked -q
EBB_GUEST_IMAGES="$images" EBB_BENCH_OUT="$OUT" \
    cargo bench --locked -q --bench reclaim -- "$PAGES" "$RUNS" "$WORKLOAD_MIB" "$LIMIT_MIB" |
    grep -v '^$'

echo
echo "== 4. the kernel's zswap (lz4 where the kernel has it) on the same workload: $WORKLOAD_MIB MiB of the mix in a memory cgroup of $LIMIT_MIB MiB"
zswap_skip() {
    echo "  *** SKIPPED the zswap baseline: $* ***"
    restore
    return 0
}
run_zswap() {
    [[ $(id -u) == 0 ]] || { zswap_skip "not root"; return; }
    [[ -w $ZSWAP/enabled && -w $ZSWAP/compressor ]] || { zswap_skip "no zswap in this kernel ($ZSWAP)"; return; }
    [[ -f $MEMCG_ROOT/memory.limit_in_bytes ]] || { zswap_skip "no cgroup v1 memory controller at $MEMCG_ROOT"; return; }
    for c in mkswap swapon swapoff python3; do
        command -v "$c" >/dev/null || { zswap_skip "$c is missing"; return; }
    done
    local rel
    rel=$(awk -F: '$2 == "memory" { print $3 }' /proc/self/cgroup)
    CG_PARENT=$MEMCG_ROOT${rel%/}
    [[ -d $CG_PARENT ]] || { zswap_skip "cannot find this shell's memory cgroup ($CG_PARENT)"; return; }

    SWAPFILE=/var/tmp/ebb-bench-reclaim-swap.$$
    if ! fallocate -l "${SWAP_MIB}M" "$SWAPFILE" 2>/dev/null; then
        dd if=/dev/zero of="$SWAPFILE" bs=1M count="$SWAP_MIB" status=none ||
            { zswap_skip "cannot create a $SWAP_MIB MiB swap file under /var/tmp"; return; }
    fi
    chmod 600 "$SWAPFILE"
    mkswap -q "$SWAPFILE" >/dev/null || { zswap_skip "mkswap $SWAPFILE failed"; return; }
    swapon -p 32767 "$SWAPFILE" || { zswap_skip "swapon $SWAPFILE failed"; return; }
    SWAP_ON=1
    OLD_ENABLED=$(cat "$ZSWAP/enabled")
    OLD_COMPRESSOR=$(cat "$ZSWAP/compressor")
    echo lz4 >"$ZSWAP/compressor" 2>/dev/null || true
    echo Y >"$ZSWAP/enabled" || { zswap_skip "cannot enable zswap"; return; }
    if [[ $(cat "$ZSWAP/compressor") != lz4 ]]; then
        # zswap takes the name and falls back to its default when the crypto API lacks it.
        echo lzo-rle >"$ZSWAP/compressor" 2>/dev/null || true
        echo "  *** zswap cannot use lz4 here (the kernel's crypto API has no lz4; CONFIG_CRYPTO_LZ4 unset?):" \
            "the baseline runs with $(cat "$ZSWAP/compressor") instead ***"
    fi
    CG=$CG_PARENT/ebb-bench-reclaim.$$
    mkdir "$CG" || { CG=""; zswap_skip "cannot create a memory cgroup under $CG_PARENT"; return; }
    echo $((LIMIT_MIB << 20)) >"$CG/memory.limit_in_bytes"
    echo "  (swap file $SWAP_MIB MiB, zswap compressor $(cat "$ZSWAP/compressor"), max_pool_percent" \
        "$(cat "$ZSWAP/max_pool_percent"), cgroup swappiness $(cat "$CG/memory.swappiness"), page-cluster" \
        "$(cat /proc/sys/vm/page-cluster))"
    python3 - "$OUT/mix-pool.bin" "$CG" "$WORKLOAD_MIB" "$OUT/zswap.json" <<'PY' &
# The child: reads the pool, measures its own write loop without a limit, joins the cgroup,
# then writes and rereads the workload.
import json, mmap, os, resource, sys, time
pool_path, cg, mib, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
PAGE = 4096
raw = open(pool_path, "rb").read()
pool = [raw[i:i + PAGE] for i in range(0, len(raw), PAGE)]
n = mib << 20 >> 12

def vmstat():
    return {k: int(v) for k, v in (l.split() for l in open("/proc/vmstat"))}

def meminfo(key):
    for l in open("/proc/meminfo"):
        if l.startswith(key + ":"):
            return int(l.split()[1]) * 1024
    return None

def debugfs(name):
    try:
        return int(open(f"/sys/kernel/debug/zswap/{name}").read())
    except OSError:
        return None

def cgread(name):
    return int(open(f"{cg}/{name}").read().split()[0])

def write_all(m):
    t = time.perf_counter()
    for i in range(n):
        m[i * PAGE:(i + 1) * PAGE] = pool[i % len(pool)]
    return time.perf_counter() - t

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime

def anon():
    # Private anonymous memory, as a guest's RAM (mmap(-1, n) alone would be shared memory).
    return mmap.mmap(-1, n * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

# The same loop without a limit: what writing costs this interpreter without reclaim.
m = anon()
nolimit = write_all(m)
m.close()

with open(f"{cg}/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
m = anon()
v0, (u0, s0) = vmstat(), cpu()
write = write_all(m)
v1, (u1, s1) = vmstat(), cpu()
d = lambda k, a, b: b.get(k, 0) - a.get(k, 0)
res = {
    "pages": n, "nolimit_write_s": nolimit, "write_s": write,
    "write_user_s": u1 - u0, "write_sys_s": s1 - s0,
    "zswpout": d("zswpout", v0, v1), "pswpout": d("pswpout", v0, v1),
    "zswpwb": d("zswpwb", v0, v1), "swpout_zero": d("swpout_zero", v0, v1),
    "zswap_pool_bytes": meminfo("Zswap"), "zswapped_bytes": meminfo("Zswapped"),
    "debugfs_stored_pages": debugfs("stored_pages"), "debugfs_pool_total_size": debugfs("pool_total_size"),
    "cg_usage_bytes": cgread("memory.usage_in_bytes"), "cg_max_usage_bytes": cgread("memory.max_usage_in_bytes"),
    "cg_kmem_bytes": cgread("memory.kmem.usage_in_bytes"),
    "cg_rss_bytes": next(int(l.split()[1]) for l in open(f"{cg}/memory.stat") if l.startswith("rss ")),
}
t = time.perf_counter()
bad = sum(1 for i in range(n) if m[i * PAGE:(i + 1) * PAGE] != pool[i % len(pool)])
res["reread_s"] = time.perf_counter() - t
v2 = vmstat()
res.update({"bad": bad, "zswpin": d("zswpin", v1, v2), "pswpin": d("pswpin", v1, v2),
            "swpin_zero": d("swpin_zero", v1, v2), "swap_ra": d("swap_ra", v1, v2),
            "swap_ra_hit": d("swap_ra_hit", v1, v2)})
json.dump(res, open(out, "w"))
PY
    CHILD=$!
    wait "$CHILD" || echo "  *** the zswap child failed (status $?) ***"
    CHILD=""
    restore
}
run_zswap

python3 - "$OUT/results.json" "$OUT/zswap.json" "$WORKLOAD_MIB" "$LIMIT_MIB" <<'PY'
import json, os, sys
ebb = json.load(open(sys.argv[1]))
w, s = ebb.get("workload") or {}, ebb.get("swapin") or {}
z = json.load(open(sys.argv[2])) if os.path.exists(sys.argv[2]) else None
mib, limit = sys.argv[3], sys.argv[4]
MiB = 1 << 20
if z and z["bad"]:
    print(f"  !!! zswap run read back {z['bad']} wrong pages")

def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)

rows = []
def row(name, zv, ev, spec):
    rows.append((name, fmt(zv, spec), fmt(ev, spec)))

def per(a, b, scale=1.0):
    return None if a is None or not b else a / b * scale

zp = z["pages"] if z else None
zg = lambda k: z.get(k) if z else None
reclaimed = z and z["zswpout"] + z["pswpout"] - z["zswpwb"] + z["swpout_zero"]
if z:
    debug = z["debugfs_stored_pages"] is not None
    stored = z["debugfs_stored_pages"] * 4096 if debug else z["zswapped_bytes"]
    pool = z["debugfs_pool_total_size"] if debug else z["zswap_pool_bytes"]
else:
    stored = pool = None
ebb_stored = w["cache_pages"] * 4096 if w.get("cache_pages") is not None else None
ebb_pool = w.get("cache_bytes")
saved = lambda a, b: None if a is None or b is None else (a - b) / MiB
mb = lambda v: None if v is None else v / MiB
row("write, us/page", per(zg("write_s"), zp, 1e6), w.get("write_us"), ".2f")
row("  (same write loop, no limit)", per(zg("nolimit_write_s"), zp, 1e6), None, ".2f")
row("reread + check, us/page", per(zg("reread_s"), zp, 1e6), w.get("reread_us"), ".2f")
row("pages reclaimed (while writing)", reclaimed, w.get("evictions"), "d")
row("  of which zero pages (nothing kept)", zg("swpout_zero"), w.get("zero_dropped"), "d")
row("reclaimed pages/s, wall", per(reclaimed, zg("write_s")), w.get("evictions_per_wall_s"), ".0f")
row("reclaimed pages per CPU second", per(reclaimed, zg("write_sys_s")),
    w.get("evictions_per_cpu_s"), ".0f")
row("compressed: guest MiB held", mb(stored), mb(ebb_stored), ".1f")
row("compressed: pool memory, MiB", mb(pool), mb(ebb_pool), ".1f")
row("compressed: memory saved, MiB", saved(stored, pool), saved(ebb_stored, ebb_pool), ".1f")
row("written to disk, MiB", z and z["pswpout"] * 4096 / MiB, mb(w.get("swapped_bytes")), ".1f")
row("resident after the writes, MiB", mb(zg("cg_rss_bytes")), mb(w.get("resident_bytes")), ".1f")
row("resident + compressed pool, MiB", None if stored is None else (z["cg_rss_bytes"] + pool) / MiB,
    mb(w.get("consumed_bytes")), ".1f")
row("refaults while rereading", z and z["zswpin"] + z["pswpin"], w.get("refaults"), "d")
row("refault latency p50, us (part 3, cache)", None, s.get("cache_us"), ".1f")
row("  from the swap file, us (part 3)", None, s.get("swap_us"), ".1f")
print(f"  {'':40} {'zswap (kernel)':>16} {'ebb':>12}")
for name, a, b in rows:
    print(f"  {name:40} {a:>16} {b:>12}")
if z:
    print(f"  zswap: written to disk {z['pswpout']} pages ({z['zswpwb']} written back from zswap), "
          f"refaults {z['zswpin']} from zswap + {z['pswpin']} from disk, swap readahead "
          f"{z['swap_ra_hit']} hits of {z['swap_ra']}; memory figures from "
          f"{'debugfs' if z['debugfs_stored_pages'] is not None else '/proc/meminfo (Zswapped, Zswap)'}")
    print(f"  zswap reclaims in the writer's own context (direct reclaim: CPU = its system time, "
          f"{z['write_sys_s']:.2f} s, faults included);")
    print(f"  ebb's worker reclaims beside the writer, which does not wait for it (memory overshoots the "
          f"target until the worker catches up: {w.get('settle_s', 0):.2f} s here).")
if z:
    charged = pool is not None and z["cg_usage_bytes"] >= pool
    print(f"  the cgroup's own usage after the writes: {z['cg_usage_bytes'] / MiB:.1f} MiB "
          f"(kmem {z['cg_kmem_bytes'] / MiB:.1f} MiB, peak {z['cg_max_usage_bytes'] / MiB:.1f} MiB): "
          f"zswap's pool is {'' if charged else 'NOT '}charged to the v1 cgroup here, and its size is "
          f"bounded by max_pool_percent of host RAM,")
    print("  not by the limit; ebb's cache is capped at 10% of guest RAM (--zcache-max), the rest goes "
          "to its swap file.")
if w.get("refaults"):
    print(f"  ebb's reread: {w['reread_us'] * w['pages'] / w['refaults']:.1f} us per refault on average "
          f"(engine p50 cache {w['swapin_cache_p50_us']:.1f} us, swap file {w['swapin_swap_p50_us']:.1f} us; "
          f"p99 {w['swapin_cache_p99_us']:.0f} / {w['swapin_swap_p99_us']:.0f} us) while the worker evicts beside it.")
print("  ebb: resident + compressed pool is Consumed (resident + cache slabs); its refault latency is "
      "one page's, measured alone in part 3.")
PY

echo
echo "== 5. victim selection, real VM: touch writes 128 MiB of the mix, then loops; --reclaim-target 48M"
python3 - "$OUT/text-blob.bin" "$VM_RUNS" <<'PY'
import json, os, re, statistics, subprocess, sys, tempfile
blob, runs = sys.argv[1], int(sys.argv[2])
common = ["pages=32768", "mix=zero:10,fill:10,text:60,random:20", "loop_ms=6000"]
scenarios = [
    ("(a) 16 MiB hot set, uniform", ["hot=4096", "dist=uniform"]),
    ("(b) Zipf over all 128 MiB", ["hot=32768", "dist=zipf", "zipf_s=100"]),
]

def run(policy, args):
    with tempfile.NamedTemporaryFile(suffix=".json") as stats:
        p = subprocess.run(["./target/release/ebb", "run", "--mem", "256M", "--firmware", "touch",
                            "--firmware-blob", blob, "--reclaim-target", "48M",
                            "--reclaim-victims", policy, "--stats-json", stats.name,
                            "--stats-interval", "0.5",
                            *[a for kv in common + args for a in ("--firmware-arg", kv)]],
                           capture_output=True, text=True)
        lines = [json.loads(l) for l in open(stats.name).read().splitlines()]
    done = re.search(r"touch: done .*bad=(\d+).*progress=(\d+)", p.stdout)
    if p.returncode != 0 or not done or done.group(1) != "0":
        sys.exit(f"ebb run ({policy}) failed: status {p.returncode}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    # The loop: the lines taken while it ran (the counter moved, and had not reached its
    # final value: the check that follows the loop refaults every evicted page).
    final = int(done.group(2))
    loop = [l for l in lines if 0 < (l["guest_progress"] or 0) < final]
    if len(loop) < 4:
        sys.exit(f"too few statistics lines in the loop ({len(loop)})")
    def rate(a, b, key):
        return (b[key] - a[key]) * 1000 / (b["t_ms"] - a["t_ms"])
    half = loop[len(loop) // 2]
    last = lines[-1]
    return {"refaults_s": rate(loop[0], loop[-1], "refaults"),
            "refaults_s_2nd": rate(half, loop[-1], "refaults"),
            "progress_s": rate(loop[0], loop[-1], "guest_progress"),
            "progress_s_2nd": rate(half, loop[-1], "guest_progress"),
            "per_1k": (loop[-1]["refaults"] - loop[0]["refaults"]) * 1000
                      / (loop[-1]["guest_progress"] - loop[0]["guest_progress"]),
            "evictions": last["evictions"], "refaults": last["refaults"],
            "swapin_p50": last["swapin_zcache_p50_us"], "reclaim_cpu_ms": last["reclaim_cpu_ms"]}

for name, args in scenarios:
    res = {"cold": [], "random": []}
    for r in range(runs):
        for pol in (("cold", "random") if r % 2 == 0 else ("random", "cold")):
            res[pol].append(run(pol, args))
    med = {pol: {k: statistics.median(x[k] for x in v) for k in v[0]} for pol, v in res.items()}
    print(f"  {name} ({', '.join(args)}), {runs} run(s) each, median:")
    print(f"    {'policy':8} {'refaults/s':>11} {'(2nd half)':>11} {'per 1k acc.':>12} {'accesses/s':>13}"
          f" {'(2nd half)':>13} {'evictions':>10} {'refaults':>9} {'worker CPU':>11}")
    for pol, m in med.items():
        print(f"    {pol:8} {m['refaults_s']:11.0f} {m['refaults_s_2nd']:11.0f} {m['per_1k']:12.3f}"
              f" {m['progress_s']:13.0f} {m['progress_s_2nd']:13.0f} {m['evictions']:10.0f}"
              f" {m['refaults']:9.0f} {m['reclaim_cpu_ms']:8.0f} ms")
    c, r = med["cold"], med["random"]
    ratio = lambda a, b: f"{a / b:.2f}" if b else ("1.00" if a == b else "inf")
    print(f"    random/cold: refaults/s in the loop {ratio(r['refaults_s'], c['refaults_s'])}, "
          f"refaults per access {ratio(r['per_1k'], c['per_1k'])}, "
          f"progress {ratio(r['progress_s'], c['progress_s'])}")
print("  refaults/s, refaults per 1000 accesses and accesses/s (the guest's progress) over the loop")
print("  phase (6 s), and over its second half; evictions and refaults over the whole run (writing")
print("  and checking the pages included).")
PY
