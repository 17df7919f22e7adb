#!/usr/bin/env bash
# Seed 000's experiment: two 128 MiB Linux guests, side by side, each read a 32 MiB file into
# their page cache, idle, then drop their caches; one has free page reporting, one does not.
# Runs tests/guest_user.rs's test of it (which checks the shape) and draws the chart of
# Consumed and Active over time that README.md shows.
#
#   scripts/seed-000.sh [PNG]      default: docs/seed-000.png
#
# Needs /dev/kvm, mkfs.ext2 and the guest (scripts/build-guest.sh builds it). About 3 minutes
# on a PVM host, where the guest kernel's work is emulated.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
png=$(realpath -m "${1:-docs/seed-000.png}")
scripts/build-guest.sh >/dev/null
EBB_REQUIRE_GUEST=1 EBB_SEED000_CHART="$png" \
    cargo test --locked --test guest_user seed_000 -- --nocapture 2>&1 |
    grep -E '^(seed 000|seed_000|test result)|panicked|chart written'
