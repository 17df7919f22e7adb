#!/usr/bin/env bash
# Build the Linux guest used by ebb's tests: a tiny kernel (bzImage + the ELF
# vmlinux with its PVH note) from Debian's linux-source-6.1 and an
# uncompressed newc initramfs (static busybox, guest/initramfs/init,
# /bin/memfill). See guest/README.md.
#
#   scripts/build-guest.sh [--print-only]
#
# Results are cached in ${EBB_GUEST_CACHE:-$HOME/.cache/ebb/guest}/<key>/,
# <key> = first 16 hex of a sha256 over every file under guest/, this script
# and the installed linux-source-6.1 version. A complete entry is reused
# without building anything. On success stdout gets exactly:
#   bzimage=/abs/path/bzImage
#   vmlinux=/abs/path/vmlinux
#   initramfs=/abs/path/initramfs.cpio
# Progress goes to stderr. --print-only never builds: it prints those lines if
# the entry is complete, otherwise explains on stderr and exits 3.
#
# Missing Debian packages are installed with apt-get (needs root). The build
# runs in <cache>/.build-<key>.<pid>/ (removed afterwards unless
# EBB_GUEST_KEEP_WORK is set); its full log is <cache>/logs/<key>.log.
set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(dirname "$(dirname "$SCRIPT")")
GUEST=$REPO/guest
CACHE_ROOT=${EBB_GUEST_CACHE:-$HOME/.cache/ebb/guest}
SRC_PKG=linux-source-6.1
TARBALL=/usr/src/linux-source-6.1.tar.xz
SRC_TOP=linux-source-6.1
OUTPUTS=(bzImage vmlinux initramfs.cpio config)
BUILD_DEPS=(build-essential gcc make libc6-dev binutils flex bison bc
	libelf-dev libssl-dev cpio busybox-static xz-utils lz4 patch)

log() { echo "build-guest: $*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	echo "usage: $0 [--print-only]" >&2
	exit 2
}

print_only=0
for arg in "$@"; do
	case "$arg" in
	--print-only) print_only=1 ;;
	-h | --help) usage ;;
	*) usage ;;
	esac
done

pkg_installed() {
	[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

apt_updated=0
ensure_packages() {
	local missing=() p
	for p in "$@"; do
		pkg_installed "$p" || missing+=("$p")
	done
	[ ${#missing[@]} -eq 0 ] && return 0
	[ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]} (run as root or install them)"
	mkdir -p "$CACHE_ROOT"
	local alog=$CACHE_ROOT/apt.log
	log "installing: ${missing[*]} (log: $alog)"
	if [ $apt_updated -eq 0 ]; then
		if ! apt-get update >"$alog" 2>&1; then
			tail -n 20 "$alog" >&2
			die "apt-get update failed"
		fi
		apt_updated=1
	fi
	if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		"${missing[@]}" >>"$alog" 2>&1; then
		tail -n 30 "$alog" >&2
		die "apt-get install ${missing[*]} failed"
	fi
}

src_version() {
	dpkg-query -W -f='${Version}' "$SRC_PKG"
}

compute_key() {
	local ver=$1
	{
		echo "ebb-guest-key 1"
		echo "$SRC_PKG $ver"
		echo "script $(sha256sum <"$SCRIPT" | cut -d' ' -f1)"
		(cd "$REPO" && find guest -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
	} | sha256sum | cut -c1-16
}

entry_complete() {
	local dir=$1 f
	for f in "${OUTPUTS[@]}"; do
		[ -s "$dir/$f" ] || return 1
	done
}

print_result() {
	local dir=$1
	echo "bzimage=$dir/bzImage"
	echo "vmlinux=$dir/vmlinux"
	echo "initramfs=$dir/initramfs.cpio"
}

# --- key and cache lookup -------------------------------------------------------
[ -d "$GUEST" ] || die "no guest/ directory at $GUEST"

if ! pkg_installed "$SRC_PKG"; then
	if [ $print_only -eq 1 ]; then
		log "$SRC_PKG is not installed, so no guest can be cached; run $0 to build it"
		exit 3
	fi
	ensure_packages "$SRC_PKG"
fi
VERSION=$(src_version)
KEY=$(compute_key "$VERSION")
mkdir -p "$CACHE_ROOT" 2>/dev/null || true
CACHE_ROOT=$(readlink -m "$CACHE_ROOT")
ENTRY=$CACHE_ROOT/$KEY

if entry_complete "$ENTRY"; then
	print_result "$ENTRY"
	exit 0
fi
if [ $print_only -eq 1 ]; then
	log "no complete guest build in $ENTRY (key $KEY, $SRC_PKG $VERSION); run $0 to build it"
	exit 3
fi

# --- build ------------------------------------------------------------------------
START=$(date +%s)
mkdir -p "$CACHE_ROOT/logs"
# One builder per key; a second one waits and then finds the entry complete.
exec 9>"$CACHE_ROOT/.lock-$KEY"
if ! flock -n 9; then
	log "another build of $KEY is running; waiting for it"
	flock 9
fi
if entry_complete "$ENTRY"; then
	print_result "$ENTRY"
	exit 0
fi
# Holding the lock, anything left for this key is from an interrupted build.
rm -rf "$CACHE_ROOT/.build-$KEY".* "$ENTRY"

ensure_packages "${BUILD_DEPS[@]}"
[ -r "$TARBALL" ] || die "$TARBALL missing (is $SRC_PKG installed correctly?)"

TMP=$CACHE_ROOT/.build-$KEY.$$
LOG=$CACHE_ROOT/logs/$KEY.log
cleanup() {
	if [ -n "${EBB_GUEST_KEEP_WORK:-}" ]; then
		log "keeping work dir $TMP"
	else
		rm -rf "$TMP"
	fi
}
trap cleanup EXIT
mkdir -p "$TMP/out"
: >"$LOG"

# Run a step with all output in the log; on failure show the log's tail.
step() {
	local what=$1
	shift
	echo "=== $what: $*" >>"$LOG"
	if ! "$@" >>"$LOG" 2>&1; then
		log "$what failed; last lines of $LOG:"
		tail -n 40 "$LOG" >&2
		die "$what failed (full log: $LOG)"
	fi
}

# Keep a parent make/cargo from leaking its jobserver or flags into kbuild.
unset MAKEFLAGS MFLAGS MAKELEVEL MAKEOVERRIDES ARCH CROSS_COMPILE O
export KBUILD_BUILD_USER=ebb KBUILD_BUILD_HOST=ebb
export KBUILD_BUILD_TIMESTAMP="@0"
export LC_ALL=C
KMAKE=(nice -n 10 make ARCH=x86_64)
JOBS=$(nproc)

log "building guest $KEY ($SRC_PKG $VERSION) in $TMP; log: $LOG"

log "extracting $TARBALL"
step "extract" tar -xJf "$TARBALL" -C "$TMP"
SRC=$TMP/$SRC_TOP
[ -f "$SRC/Makefile" ] || die "$TARBALL did not contain $SRC_TOP/"

shopt -s nullglob
patches=("$GUEST"/patches/*.patch)
shopt -u nullglob
for p in "${patches[@]}"; do
	log "applying $(basename "$p")"
	step "patch $(basename "$p")" patch -d "$SRC" -p1 --forward --batch --fuzz=0 \
		--no-backup-if-mismatch -i "$p"
done

log "configuring (tinyconfig + guest/kernel.config)"
step "tinyconfig" "${KMAKE[@]}" -C "$SRC" tinyconfig
step "merge_config" env -C "$SRC" ARCH=x86_64 scripts/kconfig/merge_config.sh -m .config \
	"$GUEST/kernel.config"
step "olddefconfig" "${KMAKE[@]}" -C "$SRC" olddefconfig

# Every setting of the fragment must have survived Kconfig's dependency rules.
dropped=()
while IFS= read -r line; do
	if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		grep -qxF -- "$line" "$SRC/.config" ||
			dropped+=("$line (final: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" "$SRC/.config" || echo absent))")
	elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		! grep -qE "^${BASH_REMATCH[1]}=" "$SRC/.config" ||
			dropped+=("$line (final: $(grep -E "^${BASH_REMATCH[1]}=" "$SRC/.config"))")
	fi
done <"$GUEST/kernel.config"
if [ ${#dropped[@]} -gt 0 ]; then
	log "guest/kernel.config settings not honoured by Kconfig (missing dependencies?):"
	printf '  %s\n' "${dropped[@]}" >&2
	die "kernel config check failed"
fi

log "compiling kernel with -j$JOBS (a few minutes)"
step "kernel build" "${KMAKE[@]}" -C "$SRC" -j"$JOBS" bzImage vmlinux

if ! readelf -n "$SRC/vmlinux" 2>/dev/null | grep -A1 -E '^ +Xen ' | grep -qiE '0x00000012|PHYS32_ENTRY'; then
	die "vmlinux lacks the Xen PVH note (XEN_ELFNOTE_PHYS32_ENTRY); is CONFIG_PVH set?"
fi

log "building initramfs"
# memfill against the tree's own nolibc: a few KiB instead of ~700 KiB of
# static glibc (initramfs bytes cost boot time on kvm-pvm hosts).
# ymmcheck the same way (only its inline assembly uses AVX).
for prog in memfill ymmcheck; do
	step "$prog" gcc -static -O2 -s -Wall -Wextra -nostdlib -fno-stack-protector \
		-fno-asynchronous-unwind-tables -fno-ident \
		-include "$SRC/tools/include/nolibc/nolibc.h" \
		-o "$TMP/$prog" "$GUEST/initramfs/src/$prog.c" -lgcc
done
step "gen_init_cpio" gcc -O2 -o "$TMP/gen_init_cpio" "$SRC/usr/gen_init_cpio.c"
BUSYBOX=/bin/busybox
APPLETS="sh ash cat echo printf test mount umount tr sleep ls mkdir uname dmesg
	free ps grep head tail true false poweroff reboot halt sync cmp"
[ -x "$BUSYBOX" ] || die "$BUSYBOX missing (busybox-static)"
{
	for d in /bin /dev /proc /sys; do
		echo "dir $d 0755 0 0"
	done
	echo "dir /tmp 1777 0 0"
	echo "slink /sbin bin 0777 0 0"
	echo "nod /dev/console 0600 0 0 c 5 1"
	echo "nod /dev/null 0666 0 0 c 1 3"
	echo "nod /dev/ttyS0 0600 0 0 c 4 64"
	echo "file /init $GUEST/initramfs/init 0755 0 0"
	echo "file /bin/busybox $BUSYBOX 0755 0 0"
	echo "file /bin/memfill $TMP/memfill 0755 0 0"
	echo "file /bin/ymmcheck $TMP/ymmcheck 0755 0 0"
	# A short list of applet links, not all ~270: on kvm-pvm hosts the guest
	# kernel unpacks each cpio entry through the emulator (tens of ms apiece).
	# Debian's busybox runs its applets from sh without links anyway.
	have=$("$BUSYBOX" --list)
	for a in $APPLETS; do
		if grep -qx -- "$a" <<<"$have"; then
			echo "slink /bin/$a busybox 0777 0 0"
		fi
	done
} >"$TMP/initramfs.list"
grep -q '^slink /bin/sh ' "$TMP/initramfs.list" || die "busybox has no sh applet"
step "initramfs" sh -c '"$1" -t 0 "$2" >"$3"' _ "$TMP/gen_init_cpio" "$TMP/initramfs.list" \
	"$TMP/out/initramfs.cpio"

cp "$SRC/arch/x86/boot/bzImage" "$TMP/out/bzImage"
cp "$SRC/vmlinux" "$TMP/out/vmlinux"
cp "$SRC/.config" "$TMP/out/config"
cp "$SRC/System.map" "$TMP/out/System.map"
cp "$TMP/initramfs.list" "$TMP/out/initramfs.list"
cp "$LOG" "$TMP/out/build.log"
sync -f "$TMP/out" 2>/dev/null || true
entry_complete "$TMP/out" || die "internal error: outputs incomplete"

# The entry appears all at once, complete.
mv -T "$TMP/out" "$ENTRY"
log "done in $(($(date +%s) - START)) s: $ENTRY"
print_result "$ENTRY"
