/* touch: the workload generator. Writes a pattern to N pages of free RAM at CPL3, reads it
 * back, and reports a checksum and the number of bad pages.
 *
 * Arguments (--firmware-arg KEY=VALUE):
 *   pages=N       pages to touch (default 16384 = 64 MiB)
 *   passes=P      write+verify passes (default 1, at most 2047)
 *   pattern=NAME  seq | zero | random | dup (default seq)
 *   seed=S        mixed into every pattern (default 0)
 *   skip=K        leave the first K pages of free RAM alone (reach RAM above 4 GiB cheaply)
 *   corrupt=K     self-test of the checker: flip one bit in each of the first K pages after
 *                 the last write, so the run must report bad=K and exit 3
 *   loop_ms=T     after the passes, keep rewriting the pages (same values as the last pass)
 *                 for T ms: a busy working set for Active memory
 *   idle_ms=T     then spin for T ms touching no guest page but the stack: an idle phase
 *   The pages are verified once more after these phases (bad= counts that too).
 *
 * The word at index w (0..511) of page p in pass n is, for seed s:
 *   seq:    ((p << 32) | (n << 16) | w) ^ s
 *   zero:   0
 *   random: mix64(((p << 20) | (n << 9) | w) ^ s)
 *   dup:    mix64(((n << 9) | w) ^ s ^ 0xd0d0)   (every page identical)
 * The checksum is FNV-1a over every 64-bit word read back, all passes in order, starting
 * from 0xcbf29ce484222325 with prime 0x100000001b3. tests/common/mod.rs recomputes it.
 *
 * Exit status: 0 all pages good, 3 bad pages found, 4 bad arguments or too little RAM. */
#include "ebb.h"

#define WORDS (EBB_PAGE_SIZE / 8)
#define FNV_OFFSET 0xcbf29ce484222325UL
#define FNV_PRIME 0x100000001b3UL

enum pattern { SEQ, ZERO, RANDOM, DUP };
static const char *const names[] = { "seq", "zero", "random", "dup" };

static inline u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

static inline u64 word_value(enum pattern pat, u64 seed, u64 pass, u64 page, u64 w)
{
	switch (pat) {
	case SEQ: return ((page << 32) | (pass << 16) | w) ^ seed;
	case ZERO: return 0;
	case RANDOM: return mix64(((page << 20) | (pass << 9) | w) ^ seed);
	default: return mix64(((pass << 9) | w) ^ seed ^ 0xd0d0);
	}
}

/* Address of the n-th page of free RAM, or 0 if there is none. */
static u64 *page_addr(const struct ebb_boot_info *bi, u64 n)
{
	for (u64 r = 0; r < bi->nr_ranges && r < 2; r++) {
		u64 count = bi->free_ranges[r][1] / EBB_PAGE_SIZE;
		if (n < count)
			return (u64 *)(bi->free_ranges[r][0] + n * EBB_PAGE_SIZE);
		n -= count;
	}
	return 0;
}

static int fail(const char *msg)
{
	put_str("touch: error: ");
	put_str(msg);
	put_char('\n');
	return 4;
}

int ebb_main(const struct ebb_boot_info *bi)
{
	u64 pages = 16384, passes = 1, seed = 0, corrupt = 0, skip = 0, high = 0;
	u64 loop_ms = 0, idle_ms = 0;
	u64 bad = 0, sum = FNV_OFFSET, t_write = 0, t_verify = 0;
	enum pattern pat = SEQ;
	char name[16];

	if (bi->magic != EBB_BOOT_MAGIC)
		return fail("bad boot info magic");
	if (arg_u64(bi, "pages", &pages) < 0 || arg_u64(bi, "passes", &passes) < 0 ||
	    arg_u64(bi, "seed", &seed) < 0 || arg_u64(bi, "corrupt", &corrupt) < 0 ||
	    arg_u64(bi, "skip", &skip) < 0 || arg_u64(bi, "loop_ms", &loop_ms) < 0 ||
	    arg_u64(bi, "idle_ms", &idle_ms) < 0)
		return fail("pages, passes, seed, corrupt, skip, loop_ms and idle_ms take a number");
	if ((loop_ms || idle_ms) && bi->tsc_khz == 0)
		return fail("loop_ms and idle_ms need the TSC frequency, which ebb did not provide");
	if (arg_str(bi, "pattern", name, sizeof(name))) {
		int found = 0;
		for (int i = 0; i < 4; i++)
			if (str_eq(name, names[i]))
				pat = (enum pattern)i, found = 1;
		if (!found)
			return fail("pattern must be seq, zero, random or dup");
	}
	if (passes == 0 || passes > 2047)
		return fail("passes must be 1..2047");
	if (pages == 0 || pages > (1UL << 31) || skip > (1UL << 31) ||
	    page_addr(bi, skip + pages - 1) == 0)
		return fail("not enough free guest RAM for skip= + pages=");
	if (corrupt > pages)
		corrupt = pages;

	for (u64 p = 0; p < pages; p++)
		high += (u64)page_addr(bi, skip + p) >= (1UL << 32);

	put_str("touch: start pattern=");
	put_str(names[pat]);
	put_str(" pages=");
	put_u64(pages);
	put_str(" passes=");
	put_u64(passes);
	put_char('\n');

	for (u64 n = 0; n < passes; n++) {
		u64 t0 = rdtsc();
		for (u64 p = 0; p < pages; p++) {
			u64 *pg = page_addr(bi, skip + p);
			for (u64 w = 0; w < WORDS; w++)
				pg[w] = word_value(pat, seed, n, p, w);
		}
		if (n == passes - 1)
			for (u64 p = 0; p < corrupt; p++)
				page_addr(bi, skip + p)[0] ^= 1;
		u64 t1 = rdtsc();
		for (u64 p = 0; p < pages; p++) {
			const volatile u64 *pg = page_addr(bi, skip + p);
			int page_bad = 0;
			for (u64 w = 0; w < WORDS; w++) {
				u64 v = pg[w];
				page_bad |= v != word_value(pat, seed, n, p, w);
				sum = (sum ^ v) * FNV_PRIME;
			}
			bad += (u64)page_bad;
		}
		t_write += t1 - t0;
		t_verify += rdtsc() - t1;
	}

	if (loop_ms) {
		u64 end = rdtsc() + loop_ms * bi->tsc_khz, rounds = 0;
		put_str("touch: loop\n");
		while (rdtsc() < end) {
			for (u64 p = 0; p < pages; p++) {
				u64 *pg = page_addr(bi, skip + p);
				for (u64 w = 0; w < WORDS; w++)
					pg[w] = word_value(pat, seed, passes - 1, p, w);
			}
			rounds++;
		}
		put_str("touch: loop rounds=");
		put_u64(rounds);
		put_char('\n');
	}
	if (idle_ms) {
		u64 end = rdtsc() + idle_ms * bi->tsc_khz;
		put_str("touch: idle\n");
		while (rdtsc() < end)
			__asm__ volatile("pause");
	}
	if (loop_ms || idle_ms) {
		u64 late_bad = 0;
		for (u64 p = corrupt; p < pages; p++) {
			const volatile u64 *pg = page_addr(bi, skip + p);
			for (u64 w = 0; w < WORDS; w++)
				if (pg[w] != word_value(pat, seed, passes - 1, p, w)) {
					late_bad++;
					break;
				}
		}
		bad += late_bad;
	}

	put_str("touch: done pattern=");
	put_str(names[pat]);
	put_str(" pages=");
	put_u64(pages);
	put_str(" passes=");
	put_u64(passes);
	put_str(" checksum=");
	put_hex(sum);
	put_str(" bad=");
	put_u64(bad);
	put_str(" high=");
	put_u64(high);
	put_str(" write_cycles=");
	put_u64(t_write);
	put_str(" verify_cycles=");
	put_u64(t_verify);
	put_char('\n');
	return bad ? 3 : 0;
}
