#!/usr/bin/env bash
# Guest- and client-facing parsers under random input, at scale (tests/fuzz.rs): balloon
# virtqueues (descriptor tables, rings, PFN arrays, statistics, free page reports),
# virtio-mmio register sequences, control-socket request lines.
#
#   scripts/fuzz.sh [CASES_PER_TARGET] [FIRST_SEED]   (default 3,400,000: over 10^7 in all)
#
# A failure names the seed that reproduces it:
#   EBB_FUZZ_SEED=<seed> EBB_FUZZ_CASES=1 cargo test --release --test fuzz
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export EBB_FUZZ_CASES=${1:-3400000}
export EBB_FUZZ_SEED=${2:-$(date +%s)}
echo "fuzz: $EBB_FUZZ_CASES cases per target from seed $EBB_FUZZ_SEED" >&2
time cargo test --release --locked --test fuzz -- --nocapture 2>&1 | grep -E '^fuzz |test result|panicked|seed'
