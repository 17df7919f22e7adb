#!/usr/bin/env bash
# The whole test suite, as CI runs it: build the guest kernel (cached), then format check,
# clippy with warnings denied, and every test (unit, userfaultfd/KVM integration, Linux e2e).
#
#   scripts/ci.sh            everything
#   EBB_SKIP_GUEST=1 ...     do not build the guest kernel (Linux tests then skip loudly)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*" >&2; }

if [[ -z "${EBB_SKIP_GUEST:-}" ]]; then
    step "guest kernel and initramfs (scripts/build-guest.sh, cached)"
    scripts/build-guest.sh
    # Linux tests must run, not skip, once the guest is built.
    export EBB_REQUIRE_GUEST=1
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "cargo test (benchmarks are run by scripts/bench-*.sh, never as tests)"
cargo test --locked --lib --bins --tests
