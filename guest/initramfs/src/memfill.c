/*
 * memfill: guest workload for ebb's memory tests.
 *
 *   memfill MIB [HOLD_SECONDS]
 *
 * Maps MIB MiB of anonymous memory, writes the first and last byte of every
 * 4 KiB page (so the guest really backs it) with values of the page's index,
 * reads every one back exactly, prints "memfill: touched MIB MiB", optionally sleeps
 * HOLD_SECONDS with the memory still mapped ("memfill: holding for S s"),
 * then unmaps it (the pages go back to the guest kernel's free lists, where
 * free page reporting or the balloon can hand them to the host), prints
 * "memfill: freed MIB MiB" and exits 0. Any failure prints
 * "memfill: error: ..." and exits 1.
 *
 * scripts/build-guest.sh builds it with `gcc -static -O2` against the
 * kernel's own tools/include/nolibc (a few KiB instead of ~700 KiB of static
 * glibc: every initramfs byte costs boot time on kvm-pvm hosts, where the
 * guest kernel unpacks it through KVM's instruction emulator). It only uses
 * write/mmap/munmap/sleep so it builds against glibc just as well.
 */
#ifndef NOLIBC
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#endif

#define PAGE 4096UL

static void out(int fd, const char *s)
{
	size_t n = strlen(s);

	while (n) {
		ssize_t w = write(fd, s, n);

		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

/* Prints "memfill: <a><num><b>\n" on fd. */
static void say(int fd, const char *a, unsigned long num, const char *b)
{
	char buf[32];
	int i = sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = (char)('0' + num % 10);
		num /= 10;
	} while (num && i > 0);
	out(fd, "memfill: ");
	out(fd, a);
	out(fd, buf + i);
	out(fd, b);
	out(fd, "\n");
}

static int fail(const char *msg)
{
	out(2, "memfill: error: ");
	out(2, msg);
	out(2, "\n");
	return 1;
}

/* Decimal, no sign, no junk; returns -1 on error. */
static long parse(const char *s)
{
	unsigned long v = 0;

	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > 100000000UL)
			return -1;
		v = v * 10 + (unsigned long)(*s - '0');
	}
	return (long)v;
}

int main(int argc, char **argv)
{
	long mib, hold = 0;
	size_t len, off;
	volatile unsigned char *p;
	void *m;

	if (argc < 2 || argc > 3) {
		out(2, "usage: memfill MIB [HOLD_SECONDS]\n");
		return 1;
	}
	mib = parse(argv[1]);
	if (mib <= 0 || mib > 1048576)
		return fail("bad MiB count");
	if (argc == 3) {
		hold = parse(argv[2]);
		if (hold < 0)
			return fail("bad hold seconds");
	}

	len = (size_t)mib << 20;
	m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0);
	if (m == MAP_FAILED)
		return fail("mmap failed");
	p = m;

	/* Non-zero bytes per page force a real, private page each; both ends of
	 * the page, so a page mixed up with its neighbour shows. */
	for (off = 0; off < len; off += PAGE) {
		p[off] = (unsigned char)((off / PAGE) | 1);
		p[off + PAGE - 1] = (unsigned char)((off / PAGE) * 7 + 3);
	}
	for (off = 0; off < len; off += PAGE) {
		if (p[off] != (unsigned char)((off / PAGE) | 1) ||
		    p[off + PAGE - 1] != (unsigned char)((off / PAGE) * 7 + 3))
			return fail("readback mismatch");
	}
	say(1, "touched ", (unsigned long)mib, " MiB");

	if (hold > 0) {
		say(1, "holding for ", (unsigned long)hold, " s");
		sleep((unsigned int)hold);
	}

	if (munmap(m, len))
		return fail("munmap failed");
	say(1, "freed ", (unsigned long)mib, " MiB");
	return 0;
}
