/*
 * ymmcheck: does the guest kernel keep a process's AVX registers across a
 * context switch?
 *
 *   ymmcheck [ROUNDS]
 *
 * Prints what CPUID leaf 1 tells user space:
 *
 *   ymmcheck: cpuid avx=A osxsave=O
 *
 * and, if AVX is offered (A=1), forks once. Each process, ROUNDS times
 * (default 10), loads all 16 ymm registers with a pattern of its own, spins
 * long enough for the timer to switch it out several times (the other
 * process runs in between), then compares the registers with its pattern.
 * The parent prints
 *
 *   ymmcheck: kept K lost L             (rounds of both processes)
 *
 * and exits 0; "ymmcheck: error: ..." and exit 1 on failure.
 *
 * On kvm-pvm hosts the guest kernel runs with `noxsave` (the emulator that
 * runs its CPL0 code has no XSAVE) and saves only the legacy SSE state on a
 * switch. CPUID then says AVX=1 but OSXSAVE=0, so a program that asks before
 * using AVX (glibc's string functions do) uses none; one that uses AVX
 * without asking still can, and the upper halves of its ymm registers then
 * leak from one process to the next: L is not 0. tests/guest_user.rs keeps
 * that visible. Built like memfill, against nolibc; only the inline assembly
 * uses AVX.
 */
#ifndef NOLIBC
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#endif

static void out(const char *s)
{
	size_t n = strlen(s);

	while (n) {
		ssize_t w = write(1, s, n);

		if (w <= 0)
			return;
		s += w;
		n -= (size_t)w;
	}
}

static void num(unsigned long v)
{
	char buf[24];
	int i = sizeof(buf) - 1;

	buf[i] = '\0';
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v && i > 0);
	out(buf + i);
}

/* CPUID leaf 1, ECX: bit 28 AVX, bit 27 OSXSAVE (CR4.OSXSAVE as the OS set it). */
static unsigned int cpuid1_ecx(void)
{
	unsigned int a = 1, b, c = 0, d;

	__asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d));
	return c;
}

#define LOAD(n) "vmovdqu (%0), %%ymm" #n "\n\t"
#define STORE(n) "vmovdqu %%ymm" #n ", " #n "*32(%0)\n\t"

/* One round: load, spin, store back; returns 1 if every register held. */
static int one_round(unsigned int tag)
{
	unsigned int pattern[8], seen[16 * 8];
	unsigned long spin;
	int i;

	for (i = 0; i < 8; i++)
		pattern[i] = tag * 0x01010101u + (unsigned int)i;
	__asm__ volatile(LOAD(0) LOAD(1) LOAD(2) LOAD(3) LOAD(4) LOAD(5)
			 LOAD(6) LOAD(7) LOAD(8) LOAD(9) LOAD(10) LOAD(11)
			 LOAD(12) LOAD(13) LOAD(14) LOAD(15)
			 : : "r"(pattern) : "memory");
	/* About 50 ms of user time: several timer ticks at HZ=100. */
	for (spin = 0; spin < 200000000UL; spin++)
		__asm__ volatile("" : : : "memory");
	__asm__ volatile(STORE(0) STORE(1) STORE(2) STORE(3) STORE(4) STORE(5)
			 STORE(6) STORE(7) STORE(8) STORE(9) STORE(10) STORE(11)
			 STORE(12) STORE(13) STORE(14) STORE(15) "vzeroupper"
			 : : "r"(seen) : "memory");
	for (i = 0; i < 16 * 8; i++)
		if (seen[i] != pattern[i % 8])
			return 0;
	return 1;
}

static unsigned long rounds_kept(unsigned int tag, unsigned long rounds)
{
	unsigned long kept = 0, r;

	for (r = 0; r < rounds; r++)
		kept += (unsigned long)one_round(tag);
	return kept;
}

int main(int argc, char **argv)
{
	unsigned long rounds = 10, kept;
	unsigned int ecx;
	int status = 0;
	pid_t child;

	if (argc > 1) {
		rounds = 0;
		for (const char *s = argv[1]; *s; s++) {
			if (*s < '0' || *s > '9' || rounds > 1000000) {
				out("ymmcheck: error: ROUNDS must be a number\n");
				return 1;
			}
			rounds = rounds * 10 + (unsigned long)(*s - '0');
		}
	}
	ecx = cpuid1_ecx();
	out("ymmcheck: cpuid avx=");
	num((ecx >> 28) & 1);
	out(" osxsave=");
	num((ecx >> 27) & 1);
	out("\n");
	if (!(ecx & (1u << 28)))
		return 0;
	child = fork();
	if (child < 0) {
		out("ymmcheck: error: fork failed\n");
		return 1;
	}
	if (child == 0)
		/* The child's count travels in its exit status. */
		return (int)rounds_kept(0xc3, rounds > 255 ? 255 : rounds);
	kept = rounds_kept(0x3c, rounds);
	if (waitpid(child, &status, 0) != child || !WIFEXITED(status)) {
		out("ymmcheck: error: the child did not exit\n");
		return 1;
	}
	kept += (unsigned long)WEXITSTATUS(status);
	rounds += rounds > 255 ? 255 : rounds;
	out("ymmcheck: kept ");
	num(kept);
	out(" lost ");
	num(rounds - kept);
	out("\n");
	return 0;
}
