#!/usr/bin/env bash
# Makes the ordinary user the jail tests (tests/jail.rs) run `ebb host` as, and lets it use
# /dev/kvm and /dev/userfaultfd through ACLs (both are mode 0600 root here, and
# vm.unprivileged_userfaultfd is 0). Idempotent; prints the user's uid. Needs root; installs
# the `acl` package with apt where setfacl is missing.
#
#   scripts/jail-test-user.sh [USER]     (default: ebb-jail-test)
set -euo pipefail
user=${1:-ebb-jail-test}

if [[ $EUID -ne 0 ]]; then
    echo "needs root (it creates a user and changes device ACLs)" >&2
    exit 1
fi
if ! command -v setfacl >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "no setfacl and no apt-get to install the acl package" >&2
        exit 1
    fi
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acl \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acl; }; } >&2
fi
if ! id -u "$user" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$user" >&2
fi
setfacl -m "u:$user:rw" /dev/kvm
if [[ -e /dev/userfaultfd ]]; then
    setfacl -m "u:$user:rw" /dev/userfaultfd
fi
id -u "$user"
