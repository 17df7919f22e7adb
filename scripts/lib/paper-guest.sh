# shellcheck shell=bash
# Sourced by scripts/paper-*.sh, from the repository root: what every paper experiment with
# Linux guests needs before it starts.
#
#   paper_setup NAME    checks $EBB (default target/release/ebb), python3 and /dev/kvm, and
#                       sets vmlinux and initramfs to the guest of scripts/build-guest.sh
#                       (built if not cached); exits with "NAME: why" on the first failure.

paper_setup() {
    local name=$1 rc=0 guest
    EBB=${EBB:-$PWD/target/release/ebb}
    if [[ ! -x $EBB ]]; then
        echo "$name: no ebb binary at $EBB: run 'cargo build --release' (or set EBB=)" >&2
        exit 1
    fi
    command -v python3 >/dev/null || { echo "$name: needs python3" >&2; exit 1; }
    [[ -w /dev/kvm ]] || { echo "$name: needs /dev/kvm (read-write)" >&2; exit 1; }
    guest=$(scripts/build-guest.sh --print-only 2>/dev/null) || rc=$?
    if [[ $rc -eq 3 ]]; then
        echo "$name: the guest is not built: building it (scripts/build-guest.sh)" >&2
        guest=$(scripts/build-guest.sh)
    elif [[ $rc -ne 0 ]]; then
        echo "$name: scripts/build-guest.sh --print-only failed ($rc)" >&2
        exit 1
    fi
    vmlinux=$(sed -n 's/^vmlinux=//p' <<<"$guest")
    initramfs=$(sed -n 's/^initramfs=//p' <<<"$guest")
    [[ -r $vmlinux && -r $initramfs ]] || { echo "$name: no guest files in: $guest" >&2; exit 1; }
}
