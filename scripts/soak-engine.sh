#!/usr/bin/env bash
# The engine soak at scale (tests/soak.rs, no KVM): host threads as vCPUs and as the event
# loop write, read and release the pages of a 16 MiB registered mapping against a model of
# every byte, while the reclaim worker evicts toward a 1 MiB target and the sharing scanner
# merges duplicates that the next write breaks again. It stops once copy-on-write breaks and
# evictions both reach SCALE times the CI run's 10^5 (10^7 by default) and fails on the
# first byte that reads wrong. Breaks are the slower: about 3,000 a second in a release build
# on a loaded 2-core machine (measured while eviction had stopped, see tests/soak.rs), so 10^7
# takes an hour or more there.
#
#   scripts/soak-engine.sh [SCALE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export EBB_SOAK_SCALE=${1:-100}
exec cargo test --release --locked --test soak no_guest_write_is_lost_to_eviction_sharing_or_release \
    -- --exact --include-ignored --nocapture
