/* touch: the workload generator. Writes a pattern to N pages of free RAM at CPL3, reads it
 * back, and reports a checksum and the number of bad pages.
 *
 * Arguments (--firmware-arg KEY=VALUE):
 *   pages=N       pages to touch (default 16384 = 64 MiB)
 *   passes=P      write+verify passes (default 1, at most 2047)
 *   pattern=NAME  seq | zero | random | dup (default seq)
 *   mix=SPEC      instead of pattern=: a content mix like real memory, e.g.
 *                 mix=zero:10,fill:10,dup:10,text:50,random:20 (percentages of the pages,
 *                 summing to 100; kinds left out get 0). See "Content mix" below.
 *   dup_groups=G  mix= dup pages come in G groups of identical pages (default 1, at most 2^31)
 *   seed=S        mixed into every pattern, and into order=random (default 0)
 *   skip=K        leave the first K pages of free RAM alone (reach RAM above 4 GiB cheaply)
 *   stride=S      logical page p lives at free-RAM page skip + p*S (default 1, at most 4096):
 *                 pages=N stride=8 touches N pages spread over 8N
 *   order=NAME    seq | random (default seq): the order in which the write phase of each
 *                 pass, and the loop_ms rewrite, visit the logical pages. random visits
 *                 p = (i * 2654435761 + seed) mod N for i = 0..N-1: a permutation, because
 *                 that multiplier is a prime above 2^31 >= N, so it shares no factor with N.
 *                 Verifying always goes in logical order p = 0..N-1.
 *   corrupt=K     self-test of the checker: flip one bit in each of the first K pages after
 *                 the last write, so the run must report bad=K and exit 3
 *   loop_ms=T     after the passes, keep rewriting pages (same values as the last pass)
 *                 for T ms: a busy working set for Active memory. See "The loop" below.
 *   hot=H         the loop only touches logical pages 0..H-1, the hot set (default pages;
 *                 1..pages; needs loop_ms)
 *   dist=NAME     sweep | uniform | zipf (default sweep): how the loop picks pages (needs
 *                 loop_ms)
 *   zipf_s=X      the Zipf exponent s times 100 (default 100: s = 1.0; 0..1000; needs
 *                 dist=zipf)
 *   idle_ms=T     then spin for T ms touching no guest page but the stack: an idle phase
 *   rewrite=1     then write every page once more with the last pass's values (in logical
 *                 order): the first write to each page after the idle phase, which breaks
 *                 page sharing copy-on-write
 *   The pages are verified once more after these phases (bad= counts that too).
 *   cross=1       on several vCPUs: in pass n, vCPU c writes share (c + n) mod N and
 *                 verifies share (c + n + 1) mod N, so the vCPUs write each other's pages
 *                 (default 0: each writes and verifies its own share)
 *
 * Many vCPUs (ebb --vcpus N): vCPU c of N owns logical pages [pages*c/N, pages*(c+1)/N),
 * visited in order= within the share; the phases are separated by barriers; the loop sweeps
 * the vCPU's share of the hot set (sweep) or draws from the whole hot set with a random
 * stream of its own (uniform, zipf), and progress counts every vCPU's work. On N > 1 the
 * checksum is FNV-1a (same offset and prime) over the N shares' checksums in share order.
 *
 * The word at index w (0..511) of page p in pass n is, for seed s:
 *   seq:    ((p << 32) | (n << 16) | w) ^ s
 *   zero:   0
 *   random: mix64(((p << 20) | (n << 9) | w) ^ s)
 *   dup:    mix64(((n << 9) | w) ^ s ^ 0xd0d0)   (every page identical)
 * mix64 is SplitMix64's finalizer.
 *
 * Content mix (mix=): each page gets a kind, a pure function of (p, s, the percentages):
 * k = floor(mix64(p ^ s ^ KIND_SALT) * 100 / 2^64), and the kinds zero, fill, dup, text,
 * random, in that order whatever the order in SPEC, own consecutive runs of k of their
 * percentage's length. A page of kind
 *   zero:   is all zero (what an OS hands out, and what page sharing and zero-page
 *           detection love)
 *   fill:   repeats one word, mix64(((p << 20) | (n << 9)) ^ s ^ FILL_SALT) (a memset
 *           buffer: compresses to nothing, yet shares with no other page)
 *   dup:    is the dup word above with group g in bits 20 and up:
 *           mix64(((g << 20) | (n << 9) | w) ^ s ^ 0xd0d0), where
 *           g = floor(mix64(p ^ s ^ GROUP_SALT) * G / 2^64): identical to the other pages of
 *           its group (with G = 1, to pattern=dup's pages)
 *   text:   4096 bytes of the host's blob (ebb --firmware-blob PATH) from byte offset
 *           floor(mix64(((p << 11) | n) ^ s ^ TEXT_SALT) * (blob_len - 4095) / 2^64):
 *           real data that compresses like real data. Needs a blob of at least 4096 bytes.
 *   random: the random word above (incompressible)
 * The salts are the ASCII bytes of "kind", "fill", "group" and "text" (see below).
 *
 * The loop (loop_ms=): with dist=sweep it rewrites whole pages, visiting p = order(i) for
 * i = 0..H-1 again and again (order= as in the passes, over H pages). With dist=uniform or
 * dist=zipf it makes random accesses instead, each dirtying one 64-byte cache line (as a
 * program mostly does: a page's worth of writes per access would be a memcpy) chosen at
 * random in a page chosen from the hot set: a rank r in 0..H-1, uniformly or with
 * probability proportional to 1 / (r + 1)^s (rank 0 the most frequent), and then the page
 * order(r), so order=random scatters the hottest pages over the hot set. Zipf is drawn from a
 * table built once: ranks 1..256 have exact weights; beyond, ranks are grouped in buckets
 * about 1/32 of their rank wide, each weighted by its size times the weight of its middle
 * and uniform inside (within 2^(s/32) of exact: 2% for s = 1). It needs no floating point
 * and no division per access: a binary search of at most 10 steps. Every write is the value
 * the last pass wrote there, so the final verification is exact. Each page rewritten
 * (sweep) or access (uniform, zipf) adds one to the progress counter at
 * boot_info->progress_gpa, which ebb can read while the loop runs; each vCPU adds to it
 * (atomically) after every page (sweep) or every 256 accesses (uniform, zipf). rounds= is
 * vCPU 0's.
 *
 * The checksum is FNV-1a over every 64-bit word read back, all passes in order, starting
 * from 0xcbf29ce484222325 with prime 0x100000001b3. tests/common/mod.rs recomputes it.
 * Words depend on the logical page p, not its address, and are read back in logical order,
 * so the checksum does not change with stride=, order=, hot=, dist= or zipf_s=.
 *
 * Output: "touch: start ...", "touch: loop rounds=R" (sweep) or "touch: loop accesses=A
 * rank1=K" (uniform, zipf: K accesses went to rank 0), "touch: done ... checksum=
 * bad= high= write_cycles= verify_cycles= hot= dist= cpus= cross= tsc_khz= progress=" (progress: the
 * counter as
 * the guest last stored it).
 *
 * Exit status: 0 all pages good, 3 bad pages found, 4 bad arguments or too little RAM. */
#include "ebb.h"

#define WORDS (EBB_PAGE_SIZE / 8)
#define FNV_OFFSET 0xcbf29ce484222325UL
#define FNV_PRIME 0x100000001b3UL
#define MAX_PAGES (1UL << 31) /* keeps i * ORDER_MULTIPLIER below 2^63 */
#define MAX_STRIDE 4096UL
#define MAX_PASSES 2047UL /* n fits the 11 bits between w and p in the words above */
/* Knuth's multiplicative-hashing constant (TAOCP vol. 3, 6.4), a prime between 2^31 and
 * 2^32: coprime to every N <= MAX_PAGES, so i -> i * it mod N is a permutation. */
#define ORDER_MULTIPLIER 2654435761UL
#define DUP_SALT 0xd0d0UL
/* Arbitrary constants that keep the hashes below apart: ASCII "kind", "fill", "group",
 * "text" and "loop" read as little-endian numbers. */
#define KIND_SALT 0x646e696bUL
#define FILL_SALT 0x6c6c6966UL
#define GROUP_SALT 0x70756f7267UL
#define TEXT_SALT 0x74786574UL
#define LOOP_SALT 0x706f6f6cUL
/* SplitMix64's increment, 2^64 / golden ratio (Steele, Lea, Flood: "Fast splittable
 * pseudorandom number generators", OOPSLA 2014). */
#define GOLDEN_GAMMA 0x9e3779b97f4a7c15UL
#define PERCENT 100UL
#define LINE_WORDS 8UL  /* a 64-byte x86 cache line */
#define LINES (WORDS / LINE_WORDS)
#define LOOP_BATCH 256UL /* random accesses between clock reads and progress stores */
#define MAX_ZIPF_S 1000UL
#define DEFAULT_ZIPF_S 100UL
#define MIX_ARG_BYTES 128

enum pattern { SEQ, ZERO, RANDOM, DUP, MIX };
static const char *const names[] = { "seq", "zero", "random", "dup", "mix" };
#define NR_PATTERNS 4 /* pattern= takes the first four */
enum order { ORDER_SEQ, ORDER_RANDOM };
static const char *const order_names[] = { "seq", "random" };
enum kind { KIND_ZERO, KIND_FILL, KIND_DUP, KIND_TEXT, KIND_RANDOM, NR_KINDS };
static const char *const kind_names[] = { "zero", "fill", "dup", "text", "random" };
enum dist { DIST_SWEEP, DIST_UNIFORM, DIST_ZIPF, NR_DISTS };
static const char *const dist_names[] = { "sweep", "uniform", "zipf" };

/* What one page holds in one pass: word w is a (CONST), a ^ w (XOR_W), mix64(a ^ w)
 * (MIXED), or the little-endian word at text + 8w (TEXT). */
enum how { CONST, XOR_W, MIXED, TEXT };
struct content {
	enum how how;
	u64 a;
	const u8 *text;
};

struct cfg {
	enum pattern pat;
	u64 seed;
	u64 kind_end[NR_KINDS]; /* mix=: kind i owns k in [kind_end[i-1], kind_end[i]) */
	u64 dup_groups;
	const u8 *blob;
	u64 blob_len;
};

typedef u64 unaligned_u64 __attribute__((aligned(1), may_alias));

static inline u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* floor(a * b / 2^64): maps a uniform 64-bit a to 0..b-1 without dividing (Lemire). */
static inline u64 mulhi(u64 a, u64 b) { return (u64)(((unsigned __int128)a * b) >> 64); }

static void page_content(const struct cfg *c, u64 n, u64 p, struct content *ct)
{
	u64 s = c->seed;
	enum kind kind = KIND_RANDOM;
	switch (c->pat) {
	case SEQ: *ct = (struct content){ XOR_W, ((p << 32) | (n << 16)) ^ s, 0 }; return;
	case ZERO: *ct = (struct content){ CONST, 0, 0 }; return;
	case RANDOM: *ct = (struct content){ MIXED, ((p << 20) | (n << 9)) ^ s, 0 }; return;
	case DUP: *ct = (struct content){ MIXED, (n << 9) ^ s ^ DUP_SALT, 0 }; return;
	case MIX: break;
	}
	u64 k = mulhi(mix64(p ^ s ^ KIND_SALT), PERCENT);
	for (int i = NR_KINDS - 1; i >= 0; i--)
		if (k < c->kind_end[i])
			kind = (enum kind)i;
	switch (kind) {
	case KIND_ZERO: *ct = (struct content){ CONST, 0, 0 }; break;
	case KIND_FILL:
		*ct = (struct content){ CONST, mix64(((p << 20) | (n << 9)) ^ s ^ FILL_SALT), 0 };
		break;
	case KIND_DUP: {
		u64 g = mulhi(mix64(p ^ s ^ GROUP_SALT), c->dup_groups);
		*ct = (struct content){ MIXED, ((g << 20) | (n << 9)) ^ s ^ DUP_SALT, 0 };
		break;
	}
	case KIND_TEXT: {
		u64 off = mulhi(mix64(((p << 11) | n) ^ s ^ TEXT_SALT),
				c->blob_len - EBB_PAGE_SIZE + 1);
		*ct = (struct content){ TEXT, 0, c->blob + off };
		break;
	}
	default: *ct = (struct content){ MIXED, ((p << 20) | (n << 9)) ^ s, 0 }; break;
	}
}

static inline u64 content_word(const struct content *ct, u64 w)
{
	switch (ct->how) {
	case CONST: return ct->a;
	case XOR_W: return ct->a ^ w;
	case MIXED: return mix64(ct->a ^ w);
	default: return *(const unaligned_u64 *)(ct->text + 8 * w);
	}
}

/* Writes words from..to-1 of a page; the switch outside the loop keeps each loop tight. */
static void write_words(u64 *pg, const struct content *ct, u64 from, u64 to)
{
	switch (ct->how) {
	case CONST:
		for (u64 w = from; w < to; w++)
			pg[w] = ct->a;
		break;
	case XOR_W:
		for (u64 w = from; w < to; w++)
			pg[w] = ct->a ^ w;
		break;
	case MIXED:
		for (u64 w = from; w < to; w++)
			pg[w] = mix64(ct->a ^ w);
		break;
	default:
		for (u64 w = from; w < to; w++)
			pg[w] = *(const unaligned_u64 *)(ct->text + 8 * w);
		break;
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

/* x mod d without a division instruction (Barrett reduction): m = floor((2^64 - 1) / d)
 * makes mulhi(x, m) at most 2 below floor(x / d), so at most two corrections follow. */
struct fastmod {
	u64 d, m;
};
static struct fastmod fastmod_new(u64 d) { return (struct fastmod){ d, ~0UL / d }; }
static inline u64 fastmod(u64 x, struct fastmod f)
{
	u64 r = x - mulhi(x, f.m) * f.d;
	while (r >= f.d)
		r -= f.d;
	return r;
}

/* The logical page visited i-th (0 <= i < n.d) by the write phases; seed_mod = seed % n.d. */
static inline u64 visit(enum order order, u64 i, struct fastmod n, u64 seed_mod)
{
	if (order == ORDER_SEQ)
		return i;
	/* i < 2^31 and ORDER_MULTIPLIER < 2^32, so the product stays below 2^63 and adding
	 * seed_mod (< 2^31) cannot overflow. */
	return fastmod(i * ORDER_MULTIPLIER + seed_mod, n);
}

/* --- Zipf ranks in fixed point ------------------------------------------------------------ */

#define Q62_ONE (1UL << 62)
#define Q32_FRAC_MASK 0xffffffffUL
/* ln 2 * 2^62, rounded: Python's Decimal(2).ln() * 2**62 at 60 digits. */
#define LN2_Q62 0x2c5c85fdf473de6bUL
#define EXP_TERMS 24 /* ln2^24 / 24! < 2^-70: beyond Q62's resolution */
#define ZIPF_EXACT_RANKS 256UL /* ranks below this get a bucket each */
#define ZIPF_BUCKET_SHIFT 5    /* beyond, a bucket spans rank / 32 ranks */
/* 776 buckets cover 2^31 ranks (256 exact, then steps of rank / 32): the table has room. */
#define ZIPF_MAX_BUCKETS 800
/* Weights are in Q31: a bucket of up to 2^31 ranks times a Q62 weight <= 1, shifted right
 * by 31, and their sum (<= 2^31 ranks * 2^31) stays below 2^62. */
#define ZIPF_WEIGHT_SHIFT 31

static u32 zipf_lo[ZIPF_MAX_BUCKETS + 1]; /* first rank (1-based) of each bucket, then H+1 */
static u64 zipf_cum[ZIPF_MAX_BUCKETS];    /* running sums of the bucket weights */
static u64 zipf_buckets, zipf_total;

/* log2(x) in Q32 for 1 <= x < 2^62, by repeated squaring of the mantissa (one bit each). */
static u64 log2_q32(u64 x)
{
	u64 e = 63 - (u64)__builtin_clzl(x);
	u64 m = x << (62 - e), frac = 0; /* Q62, in [1, 2) */
	for (int bit = 31; bit >= 0; bit--) {
		m = (u64)(((unsigned __int128)m * m) >> 62); /* in [1, 4) */
		if (m >= 2 * Q62_ONE) {
			m >>= 1;
			frac |= 1UL << bit;
		}
	}
	return (e << 32) | frac;
}

/* 2^-y in Q62 for y >= 0 in Q32: 2^-int(y) as a shift, 2^-frac(y) = e^(-frac(y) ln 2) by its
 * Taylor series (the argument is below ln 2 < 1, so the terms shrink fast). */
static u64 exp2_neg_q62(u64 y)
{
	u64 k = y >> 32;
	if (k >= 62)
		return 0;
	u64 z = (u64)(((unsigned __int128)(y & Q32_FRAC_MASK) * LN2_Q62) >> 32);
	u64 term = Q62_ONE, pos = Q62_ONE, neg = 0;
	for (u64 i = 1; i <= EXP_TERMS && term; i++) {
		term = (u64)(((unsigned __int128)term * z) >> 62) / i;
		if (i & 1)
			neg += term;
		else
			pos += term;
	}
	return (pos - neg) >> k;
}

/* Builds the bucket table for ranks 1..hot with exponent s100 / 100; 0 if it does not fit. */
static int zipf_setup(u64 hot, u64 s100)
{
	u64 b = 0, lo = 1, total = 0;
	while (lo <= hot) {
		if (b == ZIPF_MAX_BUCKETS)
			return 0;
		u64 hi = lo < ZIPF_EXACT_RANKS ? lo + 1 : lo + (lo >> ZIPF_BUCKET_SHIFT);
		if (hi > hot + 1)
			hi = hot + 1;
		/* log2 of the middle rank (lo + hi - 1) / 2, halves included. */
		u64 mid_log = log2_q32(lo + hi - 1) - (1UL << 32);
		u64 weight = exp2_neg_q62(s100 * mid_log / PERCENT);
		total += (u64)(((unsigned __int128)(hi - lo) * weight) >> ZIPF_WEIGHT_SHIFT);
		zipf_lo[b] = (u32)lo;
		zipf_cum[b] = total;
		b++;
		lo = hi;
	}
	zipf_lo[b] = (u32)lo;
	zipf_buckets = b;
	zipf_total = total;
	return 1;
}

/* A 0-based rank drawn from the table, from two uniform 64-bit numbers. */
static inline u64 zipf_rank(u64 r1, u64 r2)
{
	u64 u = mulhi(r1, zipf_total), lo = 0, hi = zipf_buckets - 1;
	while (lo < hi) { /* the first bucket whose running sum exceeds u */
		u64 mid = (lo + hi) >> 1;
		if (zipf_cum[mid] > u)
			hi = mid;
		else
			lo = mid + 1;
	}
	return zipf_lo[lo] - 1 + mulhi(r2, zipf_lo[lo + 1] - zipf_lo[lo]);
}

/* --- arguments ----------------------------------------------------------------------------- */

static int fail(const char *msg)
{
	put_str("touch: error: ");
	put_str(msg);
	put_char('\n');
	return 4;
}

/* Looks name up in a table of n names; returns its index or -1. */
static int lookup(const char *name, const char *const *table, int n)
{
	for (int i = 0; i < n; i++)
		if (str_eq(name, table[i]))
			return i;
	return -1;
}

/* Parses "kind:pct,kind:pct..." into cumulative ends; 0 if malformed or not summing to 100. */
static int parse_mix(const char *s, u64 kind_end[NR_KINDS])
{
	u64 pct[NR_KINDS] = { 0 }, sum = 0;
	int seen = 0;
	while (*s) {
		char name[16];
		u64 n = 0, v = 0, digits = 0;
		while (*s && *s != ':' && n + 1 < sizeof(name))
			name[n++] = *s++;
		name[n] = 0;
		if (*s++ != ':')
			return 0;
		int k = lookup(name, kind_names, NR_KINDS);
		if (k < 0 || (seen & (1 << k)))
			return 0;
		seen |= 1 << k;
		for (; *s >= '0' && *s <= '9' && v <= PERCENT; s++, digits++)
			v = v * 10 + (u64)(*s - '0');
		if (!digits || v > PERCENT || (*s && *s != ','))
			return 0;
		if (*s == ',' && !*++s)
			return 0;
		pct[k] = v;
		sum += v;
	}
	if (sum != PERCENT)
		return 0;
	for (int i = 0; i < NR_KINDS; i++)
		kind_end[i] = (i ? kind_end[i - 1] : 0) + pct[i];
	return 1;
}

static u64 str_len(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static void put_mix(const u64 kind_end[NR_KINDS])
{
	for (int i = 0; i < NR_KINDS; i++) {
		put_str(i ? "," : "");
		put_str(kind_names[i]);
		put_char(':');
		put_u64(kind_end[i] - (i ? kind_end[i - 1] : 0));
	}
}

static void put_params(const struct cfg *c, u64 pages, u64 passes, u64 stride, enum order order)
{
	put_str("pattern=");
	put_str(names[c->pat]);
	if (c->pat == MIX) {
		put_str(" mix=");
		put_mix(c->kind_end);
		put_str(" dup_groups=");
		put_u64(c->dup_groups);
	}
	put_str(" pages=");
	put_u64(pages);
	put_str(" passes=");
	put_u64(passes);
	put_str(" stride=");
	put_u64(stride);
	put_str(" order=");
	put_str(order_names[order]);
}

/* --- many vCPUs ------------------------------------------------------------------------ */

/* What every vCPU works from: set by vCPU 0 before it lets the others go. */
struct job {
	const struct ebb_boot_info *bi;
	struct cfg c;
	u64 pages, passes, corrupt, skip, stride, loop_ms, idle_ms, hot, rewrite, cross, ncpu;
	enum order order;
	enum dist dist;
};
static struct job job;
static volatile u64 go;                  /* 1 once job is set */
static u64 bar_count, bar_gen;           /* the barrier's arrivals and generation */
static u64 share_sum[EBB_MAX_CPUS];      /* FNV state per share, across passes */
static u64 total_bad, total_accesses, total_rank1;

static void barrier(void)
{
	if (job.ncpu == 1)
		return;
	u64 gen = __atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE);
	if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == job.ncpu) {
		__atomic_store_n(&bar_count, 0, __ATOMIC_RELAXED);
		__atomic_store_n(&bar_gen, gen + 1, __ATOMIC_RELEASE);
		return;
	}
	while (__atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE) == gen)
		__asm__ volatile("pause");
}

/* Share s of n items among the vCPUs: [lo, hi). */
static u64 share_lo(u64 n, u64 s) { return n * s / job.ncpu; }

static inline u64 *page_of(u64 p) { return page_addr(job.bi, job.skip + p * job.stride); }

/* Writes share s of the pages in pass n in the job's order (corrupting the first pages on
 * the last pass, if asked). */
static void write_share(u64 s, u64 n)
{
	u64 lo = share_lo(job.pages, s), len = share_lo(job.pages, s + 1) - lo;
	if (!len)
		return;
	struct fastmod m = fastmod_new(len);
	u64 seed_mod = job.c.seed % len;
	for (u64 i = 0; i < len; i++) {
		u64 p = lo + visit(job.order, i, m, seed_mod);
		struct content ct;
		page_content(&job.c, n, p, &ct);
		write_words(page_of(p), &ct, 0, WORDS);
	}
	if (n == job.passes - 1)
		for (u64 p = lo; p < lo + len && p < job.corrupt; p++)
			page_of(p)[0] ^= 1;
}

/* Verifies share s against pass n, folding every word into the share's checksum; returns the
 * bad pages. */
static u64 verify_share(u64 s, u64 n)
{
	u64 bad = 0, sum = share_sum[s];
	for (u64 p = share_lo(job.pages, s); p < share_lo(job.pages, s + 1); p++) {
		const volatile u64 *pg = page_of(p);
		struct content ct;
		int page_bad = 0;
		page_content(&job.c, n, p, &ct);
		for (u64 w = 0; w < WORDS; w++) {
			u64 v = pg[w];
			page_bad |= v != content_word(&ct, w);
			sum = (sum ^ v) * FNV_PRIME;
		}
		bad += (u64)page_bad;
	}
	share_sum[s] = sum;
	return bad;
}

/* The loop phase on vCPU cpu: sweeps its share of the hot set, or makes random accesses
 * anywhere in it (a stream of its own); returns its rounds (sweep). */
static u64 loop_phase(u64 cpu, volatile u64 *progress)
{
	u64 end = rdtsc() + job.loop_ms * job.bi->tsc_khz, last = job.passes - 1, rounds = 0;
	if (job.dist == DIST_SWEEP) {
		u64 lo = share_lo(job.hot, cpu), len = share_lo(job.hot, cpu + 1) - lo;
		if (!len) {
			while (rdtsc() < end)
				__asm__ volatile("pause");
			return 0;
		}
		struct fastmod m = fastmod_new(len);
		u64 seed_mod = job.c.seed % len;
		while (rdtsc() < end) {
			for (u64 i = 0; i < len; i++) {
				u64 p = lo + visit(job.order, i, m, seed_mod);
				struct content ct;
				page_content(&job.c, last, p, &ct);
				write_words(page_of(p), &ct, 0, WORDS);
				__atomic_add_fetch(progress, 1, __ATOMIC_RELAXED);
			}
			rounds++;
		}
		return rounds;
	}
	struct fastmod hot_mod = fastmod_new(job.hot);
	u64 seed_hot = job.c.seed % job.hot;
	u64 state = job.c.seed ^ LOOP_SALT ^ (cpu * GOLDEN_GAMMA), rank1 = 0, count = 0;
	while (rdtsc() < end) {
		for (u64 k = 0; k < LOOP_BATCH; k++) {
			u64 r1 = mix64(state += GOLDEN_GAMMA), rank, line;
			if (job.dist == DIST_ZIPF) {
				u64 r2 = mix64(state += GOLDEN_GAMMA);
				rank = zipf_rank(r1, r2);
				line = r2 % LINES; /* low bits; mulhi used the high ones */
			} else {
				rank = mulhi(r1, job.hot);
				line = r1 % LINES;
			}
			rank1 += rank == 0;
			u64 p = visit(job.order, rank, hot_mod, seed_hot);
			struct content ct;
			page_content(&job.c, last, p, &ct);
			write_words(page_of(p), &ct, line * LINE_WORDS, (line + 1) * LINE_WORDS);
		}
		count += LOOP_BATCH;
		__atomic_add_fetch(progress, LOOP_BATCH, __ATOMIC_RELAXED);
	}
	__atomic_add_fetch(&total_accesses, count, __ATOMIC_RELAXED);
	__atomic_add_fetch(&total_rank1, rank1, __ATOMIC_RELAXED);
	return rounds;
}

/* Everything after the arguments, on vCPU cpu; vCPU 0 also reports. Returns the exit status
 * (vCPU 0) once every vCPU is done. */
static int work(u64 cpu)
{
	u64 ncpu = job.ncpu, t_write = 0, t_verify = 0, bad = 0, local_progress = 0, rounds;
	for (u64 n = 0; n < job.passes; n++) {
		/* cross=1: vCPU c writes share c + n and verifies share c + n + 1 (mod ncpu). */
		u64 w = job.cross ? (cpu + n) % ncpu : cpu;
		u64 v = job.cross ? (cpu + n + 1) % ncpu : cpu;
		barrier();
		u64 t0 = rdtsc();
		write_share(w, n);
		barrier();
		u64 t1 = rdtsc();
		bad += verify_share(v, n);
		barrier();
		t_write += t1 - t0;
		t_verify += rdtsc() - t1;
	}
	volatile u64 *progress = job.bi->progress_gpa ? (volatile u64 *)job.bi->progress_gpa
						      : &local_progress;
	if (job.loop_ms) {
		if (cpu == 0)
			put_str("touch: loop\n");
		rounds = loop_phase(cpu, progress);
		barrier();
		if (cpu == 0) {
			if (job.dist == DIST_SWEEP) {
				put_str("touch: loop rounds=");
				put_u64(rounds);
			} else {
				put_str("touch: loop accesses=");
				put_u64(total_accesses);
				put_str(" rank1=");
				put_u64(total_rank1);
			}
			put_char('\n');
		}
	}
	if (job.idle_ms) {
		u64 end = rdtsc() + job.idle_ms * job.bi->tsc_khz;
		if (cpu == 0)
			put_str("touch: idle\n");
		while (rdtsc() < end)
			__asm__ volatile("pause");
	}
	u64 lo = share_lo(job.pages, cpu), hi = share_lo(job.pages, cpu + 1);
	if (job.rewrite) {
		barrier();
		if (cpu == 0)
			put_str("touch: rewrite\n");
		for (u64 p = lo; p < hi; p++) {
			struct content ct;
			page_content(&job.c, job.passes - 1, p, &ct);
			write_words(page_of(p), &ct, 0, WORDS);
		}
	}
	if (job.loop_ms || job.idle_ms || job.rewrite) {
		barrier(); /* the loop's random accesses reach every share */
		for (u64 p = lo > job.corrupt ? lo : job.corrupt; p < hi; p++) {
			const volatile u64 *pg = page_of(p);
			struct content ct;
			page_content(&job.c, job.passes - 1, p, &ct);
			for (u64 w = 0; w < WORDS; w++)
				if (pg[w] != content_word(&ct, w)) {
					bad++;
					break;
				}
		}
	}
	__atomic_add_fetch(&total_bad, bad, __ATOMIC_RELAXED);
	barrier();
	if (cpu != 0)
		return 0;

	u64 sum = share_sum[0], high = 0;
	if (ncpu > 1) {
		sum = FNV_OFFSET;
		for (u64 s = 0; s < ncpu; s++)
			sum = (sum ^ share_sum[s]) * FNV_PRIME;
	}
	for (u64 p = 0; p < job.pages; p++)
		high += (u64)page_of(p) >= (1UL << 32);
	put_str("touch: done ");
	put_params(&job.c, job.pages, job.passes, job.stride, job.order);
	put_str(" checksum=");
	put_hex(sum);
	put_str(" bad=");
	put_u64(total_bad);
	put_str(" high=");
	put_u64(high);
	put_str(" write_cycles=");
	put_u64(t_write);
	put_str(" verify_cycles=");
	put_u64(t_verify);
	put_str(" hot=");
	put_u64(job.hot);
	put_str(" dist=");
	put_str(dist_names[job.dist]);
	put_str(" cpus=");
	put_u64(ncpu);
	put_str(" cross=");
	put_u64(job.cross);
	put_str(" tsc_khz=");
	put_u64(job.bi->tsc_khz);
	put_str(" progress=");
	put_u64(*progress);
	put_char('\n');
	return total_bad ? 3 : 0;
}

void ebb_ap_main(const struct ebb_boot_info *bi, u32 cpu)
{
	(void)bi;
	while (!go)
		__asm__ volatile("pause");
	if (cpu < job.ncpu)
		work(cpu);
}

int ebb_main(const struct ebb_boot_info *bi)
{
	u64 pages = 16384, passes = 1, corrupt = 0, skip = 0, stride = 1;
	u64 loop_ms = 0, idle_ms = 0, hot = 0, zipf_s = DEFAULT_ZIPF_S, rewrite = 0, cross = 0;
	struct cfg c = { .pat = SEQ, .dup_groups = 1 };
	enum order order = ORDER_SEQ;
	enum dist dist = DIST_SWEEP;
	char name[16], mix[MIX_ARG_BYTES];
	int has_hot = 0, has_zipf_s = 0, has_mix;

	if (bi->magic != EBB_BOOT_MAGIC)
		return fail("bad boot info magic");
	if (arg_u64(bi, "pages", &pages) < 0 || arg_u64(bi, "passes", &passes) < 0 ||
	    arg_u64(bi, "seed", &c.seed) < 0 || arg_u64(bi, "corrupt", &corrupt) < 0 ||
	    arg_u64(bi, "skip", &skip) < 0 || arg_u64(bi, "loop_ms", &loop_ms) < 0 ||
	    arg_u64(bi, "idle_ms", &idle_ms) < 0 || arg_u64(bi, "stride", &stride) < 0 ||
	    (has_hot = arg_u64(bi, "hot", &hot)) < 0 ||
	    (has_zipf_s = arg_u64(bi, "zipf_s", &zipf_s)) < 0 ||
	    arg_u64(bi, "dup_groups", &c.dup_groups) < 0 || arg_u64(bi, "rewrite", &rewrite) < 0 ||
	    arg_u64(bi, "cross", &cross) < 0)
		return fail("pages, passes, seed, corrupt, skip, stride, loop_ms, idle_ms, hot, "
			    "zipf_s, dup_groups, rewrite and cross take a number");
	if ((loop_ms || idle_ms) && bi->tsc_khz == 0)
		return fail("loop_ms and idle_ms need the TSC frequency, which ebb did not provide");
	if (arg_str(bi, "pattern", name, sizeof(name))) {
		int i = lookup(name, names, NR_PATTERNS);
		if (i < 0)
			return fail("pattern must be seq, zero, random or dup");
		c.pat = (enum pattern)i;
	}
	if (arg_str(bi, "order", name, sizeof(name))) {
		int i = lookup(name, order_names, 2);
		if (i < 0)
			return fail("order must be seq or random");
		order = (enum order)i;
	}
	if (arg_str(bi, "dist", name, sizeof(name))) {
		int i = lookup(name, dist_names, NR_DISTS);
		if (i < 0)
			return fail("dist must be sweep, uniform or zipf");
		dist = (enum dist)i;
	}
	has_mix = arg_str(bi, "mix", mix, sizeof(mix));
	if (has_mix) {
		if (arg_str(bi, "pattern", name, sizeof(name)))
			return fail("give pattern= or mix=, not both");
		if (str_len(mix) + 1 >= sizeof(mix))
			return fail("mix= is too long");
		if (!parse_mix(mix, c.kind_end))
			return fail("mix must be KIND:PERCENT,... with kinds zero, fill, dup, text, "
				    "random (each at most once) and percentages summing to 100");
		c.pat = MIX;
	}
	c.blob = (const u8 *)bi->blob_gpa;
	c.blob_len = bi->blob_len;
	if (has_mix && c.kind_end[KIND_TEXT] > c.kind_end[KIND_DUP]) {
		if (c.blob_len == 0)
			return fail("mix= text pages copy the host's blob, and there is none: "
				    "run ebb with --firmware-blob PATH");
		if (c.blob_len < EBB_PAGE_SIZE)
			return fail("mix= text pages need a blob of at least 4096 bytes");
	}
	if (passes == 0 || passes > MAX_PASSES)
		return fail("passes must be 1..2047");
	if (stride == 0 || stride > MAX_STRIDE)
		return fail("stride must be 1..4096");
	if (c.dup_groups == 0 || c.dup_groups > MAX_PAGES)
		return fail("dup_groups must be 1..2147483648");
	/* With pages <= 2^31, stride <= 2^12 and skip <= 2^31 the last index stays below 2^44. */
	if (pages == 0 || pages > MAX_PAGES || skip > MAX_PAGES ||
	    page_addr(bi, skip + (pages - 1) * stride) == 0)
		return fail("not enough free guest RAM for skip= + pages= * stride=");
	if (!has_hot)
		hot = pages;
	if (hot == 0 || hot > pages)
		return fail("hot must be 1..pages");
	if (has_zipf_s && dist != DIST_ZIPF)
		return fail("zipf_s needs dist=zipf");
	if (zipf_s > MAX_ZIPF_S)
		return fail("zipf_s must be 0..1000 (the exponent times 100)");
	if ((has_hot || dist != DIST_SWEEP) && !loop_ms)
		return fail("hot= and dist= shape the loop phase: they need loop_ms");
	if (dist == DIST_ZIPF && !zipf_setup(hot, zipf_s))
		return fail("the Zipf table is too small for hot="); /* cannot happen below 2^31 */
	if (corrupt > pages)
		corrupt = pages;
	if (cross > 1)
		return fail("cross must be 0 or 1");
	if (bi->nr_cpus == 0 || bi->nr_cpus > EBB_MAX_CPUS)
		return fail("the boot info's nr_cpus is out of range");

	job = (struct job){ bi, c, pages, passes, corrupt, skip, stride, loop_ms, idle_ms, hot,
			    rewrite, cross, bi->nr_cpus, order, dist };
	put_str("touch: start ");
	put_params(&c, pages, passes, stride, order);
	put_str(" cpus=");
	put_u64(job.ncpu);
	put_char('\n');
	for (u64 s = 0; s < EBB_MAX_CPUS; s++)
		share_sum[s] = FNV_OFFSET;
	__atomic_store_n(&go, 1, __ATOMIC_RELEASE);
	return work(0);
}
