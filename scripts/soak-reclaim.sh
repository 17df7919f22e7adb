#!/usr/bin/env bash
# The reclaim soak at scale: host threads (no KVM) write and verify every page of a 32 MiB
# registered mapping while the reclaim worker evicts toward a 256 KiB target and faults bring
# pages back through the compression cache and the swap file. It stops after CYCLES
# evictions (and half as many restores) and fails on the first page that reads back wrong.
# CI runs the same test with 10^6 cycles; this runs 10^7 by default (about 8 minutes here).
#
#   scripts/soak-reclaim.sh [CYCLES]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export EBB_RECLAIM_CYCLES=${1:-10000000}
exec cargo test --release --locked --test reclaim pages_survive_a_million_evictions_and_restores_unchanged \
    -- --nocapture
