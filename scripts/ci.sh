#!/usr/bin/env bash
# The whole test suite, as CI runs it: build the guest kernel (cached), then format check,
# clippy with warnings denied, and every test (unit, userfaultfd/KVM integration, Linux e2e).
#
#   scripts/ci.sh            everything
#   EBB_SKIP_GUEST=1 ...     do not build the guest kernel (Linux tests then skip loudly)
#   EBB_CI_REPEATS=N ...     run the suites that can flake N times in all (default 3; their
#                            Linux tests at most twice)
#
# The integration suites that drive the memory engine, a device or the host run three times
# in a row (their Linux-booting tests twice), and any failing run fails CI: a test that fails
# one run in three is a bug, and a single green run must not land it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n=== %s\n' "$*" >&2; }

if [[ -z "${EBB_SKIP_GUEST:-}" ]]; then
    step "guest kernel and initramfs (scripts/build-guest.sh, cached)"
    scripts/build-guest.sh
    # Linux tests must run, not skip, once the guest is built.
    export EBB_REQUIRE_GUEST=1
fi

# The swap tests mount a tmpfs and build ext4 on a loop device (to make a swap device fail
# for real), and the Linux user-space tests make an ext2 disk image (mkfs.ext2); they skip
# loudly without these tools, so install them where we can.
if [[ $EUID -eq 0 ]] && { ! command -v mkfs.ext4 >/dev/null || ! command -v losetup >/dev/null; }; then
    step "tools for the swap tests (e2fsprogs, mount)"
    if command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq e2fsprogs mount \
            || echo "could not install e2fsprogs/mount: the swap-failure tests will skip" >&2
    fi
fi

# tests/service.rs judges the host's Prometheus text with promtool, from Debian's prometheus
# package (only the tool is used; no server is started). CI must run that check, not skip it.
if [[ $EUID -eq 0 ]] && ! command -v promtool >/dev/null && command -v apt-get >/dev/null; then
    step "promtool (Debian's prometheus package)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
        || echo "could not install prometheus: the promtool check will fail" >&2
fi
if command -v promtool >/dev/null || [[ -n "${CI:-}" ]]; then
    export EBB_REQUIRE_PROMTOOL=1
fi

# tests/jail.rs runs `ebb host` as an ordinary user: make it, with /dev/kvm and
# /dev/userfaultfd granted by ACL (the test calls this too, and skips loudly if it fails).
if [[ $EUID -eq 0 ]]; then
    step "the ordinary user of the jail tests (scripts/jail-test-user.sh)"
    scripts/jail-test-user.sh >/dev/null || echo "no test user: the ordinary-user host test will skip" >&2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --locked --all-targets -- -D warnings

step "cargo doc, warnings denied (broken intra-doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps

step "cargo test (benchmarks are run by scripts/bench-*.sh, never as tests)"
cargo test --locked --lib --bins --tests

# Suites whose tests race real threads, devices and processes. Their tests that boot Linux
# (named *linux*, and all of balloon) take minutes each, because the guest kernel is emulated
# on PVM hosts: they run twice in all; everything else runs EBB_CI_REPEATS times (3). That
# keeps CI near its 35-minute budget on 2 cores (docs/testing.md has the figures).
REPEATED=(host balloon sharing swap uffd reclaim lab hostile api races handler_failure groups host_stall jail disk smp service lifecycle restart)
LINUX_ONLY=(balloon)
repeats=${EBB_CI_REPEATS:-3}
for ((run = 2; run <= repeats; run++)); do
    for suite in "${REPEATED[@]}"; do
        filter=()
        if ((run > 2)); then
            [[ " ${LINUX_ONLY[*]} " == *" $suite "* ]] && continue
            filter=(-- --skip linux)
        fi
        step "repeat $run of $repeats: cargo test --test $suite ${filter[*]}"
        started=$SECONDS
        cargo test --locked --test "$suite" "${filter[@]}"
        echo "repeat $run of $repeats: $suite passed in $((SECONDS - started)) s" >&2
    done
done
echo "ci.sh: everything passed in $SECONDS s" >&2
