#!/usr/bin/env bash
# Regenerates src/jail/names.rs, the table the seccomp SIGSYS handler names refused calls
# with, from the kernel headers (Debian: linux-libc-dev).
set -euo pipefail
header=${1:-/usr/include/x86_64-linux-gnu/asm/unistd_64.h}
out=$(dirname "$0")/../src/jail/names.rs
{
    echo "//! x86_64 syscall numbers and names, for the SIGSYS handler to name a refused call."
    echo "//! Generated from the kernel's \`asm/unistd_64.h\` (scripts/gen-syscall-names.sh); do not edit."
    echo
    echo "/// \`(number, name)\` of every x86_64 system call, by number."
    echo "pub const SYSCALL_NAMES: &[(i64, &str)] = &["
    grep '^#define __NR_' "$header" | awk '{sub("__NR_","",$2); printf "    (%s, \"%s\"),\n", $3, $2}'
    echo "];"
} > "$out"
