/* hostile: a guest that drives ebb's virtio-balloon through virtio-mmio itself, as a buggy
 * or malicious driver would, from CPL3 (ebb maps the device windows for payloads).
 *
 * It negotiates the device, floods the transport with invalid queue sizes, then for
 * `rounds=R` rounds (default 50): inflates 256 pages and writes them again (touching pages
 * it gave away), sends a chain of 64 descriptors of 64 KiB of PFNs (far beyond what Linux
 * sends), a looping chain, heads and next pointers past the end of the queue, PFNs past the
 * end of RAM and duplicated ones, notifications of queues that do not exist, and junk in
 * the configuration space. It then inflates `final=N` pages (default 512) that it leaves
 * alone, so ebb's ballooned count must end at exactly N pages, checks that every page it
 * wrote reads back, prints `hostile: done`, spins for `idle_ms=T` (default 0) so that a
 * test can look at the device, and exits 0 (3 if a page it wrote read back wrong, 4 if the
 * device did not behave as virtio-mmio says).
 *
 * Device: the first virtio-mmio window at 0xd0000000 (ebb's layout), a balloon (ID 5). */
#include "ebb.h"

#define MMIO 0xd0000000UL
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define STATUS_ACK 1
#define STATUS_DRIVER 2
#define STATUS_DRIVER_OK 4
#define STATUS_FEATURES_OK 8
#define DESC_F_NEXT 1

#define QSIZE 256
#define PFNS_PER_BUFFER 256 /* Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX */
#define VICTIM_PAGES 4096

struct desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct queue {
	volatile struct desc *desc;
	volatile u16 *avail; /* flags, idx, ring[QSIZE] */
	volatile u16 *used;  /* flags, idx, then 8-byte elements */
	u16 next_avail;
	u16 slot;
};

static u64 timeout_cycles;

static inline u32 rd(u64 off) { return *(volatile u32 *)(MMIO + off); }
static inline void wr(u64 off, u32 v) { *(volatile u32 *)(MMIO + off) = v; }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static int fail(const char *msg)
{
	put_str("hostile: error: ");
	put_str(msg);
	put_char('\n');
	return 4;
}

static void setup_queue(struct queue *q, u32 index, u64 base)
{
	q->desc = (volatile struct desc *)base;
	q->avail = (volatile u16 *)(base + 0x1000);
	q->used = (volatile u16 *)(base + 0x2000);
	q->next_avail = 0;
	q->slot = 0;
	memset((void *)base, 0, 0x3000);
	wr(REG_QUEUE_SEL, index);
	wr(REG_QUEUE_NUM, QSIZE);
	wr(REG_QUEUE_DESC_LOW, (u32)base);
	wr(REG_QUEUE_DESC_HIGH, (u32)(base >> 32));
	wr(REG_QUEUE_DRIVER_LOW, (u32)(base + 0x1000));
	wr(REG_QUEUE_DRIVER_HIGH, (u32)((base + 0x1000) >> 32));
	wr(REG_QUEUE_DEVICE_LOW, (u32)(base + 0x2000));
	wr(REG_QUEUE_DEVICE_HIGH, (u32)((base + 0x2000) >> 32));
	wr(REG_QUEUE_READY, 1);
}

/* Puts head `head` in the driver ring and notifies queue `index`. */
static void offer(struct queue *q, u32 index, u16 head)
{
	q->avail[2 + q->next_avail % QSIZE] = head;
	barrier();
	q->next_avail++;
	q->avail[1] = q->next_avail;
	barrier();
	wr(REG_QUEUE_NOTIFY, index);
}

/* Waits until the device has used every buffer offered; 0 on timeout. */
static int wait_used(struct queue *q)
{
	u64 end = rdtsc() + timeout_cycles;
	while (q->used[1] != q->next_avail)
		if (rdtsc() > end)
			return 0;
	return 1;
}

/* A chain of one descriptor naming `n` PFNs from `pfns` (copied into `buf`). */
static u16 pfn_desc(struct queue *q, u64 buf, const u32 *pfns, u64 n)
{
	u16 d = q->slot++ % QSIZE;
	memcpy((void *)buf, pfns, n * 4);
	q->desc[d].addr = buf;
	q->desc[d].len = (u32)(n * 4);
	q->desc[d].flags = 0;
	q->desc[d].next = 0;
	return d;
}

static u64 page_of(u64 addr) { return addr >> 12; }

int ebb_main(const struct ebb_boot_info *bi)
{
	u64 rounds = 50, final = 512, idle_ms = 0;
	if (bi->magic != EBB_BOOT_MAGIC)
		return fail("bad boot info magic");
	if (arg_u64(bi, "rounds", &rounds) < 0 || arg_u64(bi, "final", &final) < 0 ||
	    arg_u64(bi, "idle_ms", &idle_ms) < 0)
		return fail("rounds, final and idle_ms take a number");
	if (final > PFNS_PER_BUFFER * 8)
		return fail("final is at most 2048");
	timeout_cycles = (bi->tsc_khz ? bi->tsc_khz : 1000000) * 5000; /* 5 s */

	/* Free RAM: queues, buffers, then the pages the balloon gets. */
	u64 base = bi->free_ranges[0][0], room = bi->free_ranges[0][1];
	if (room < (1UL << 20) + (VICTIM_PAGES + 2048) * EBB_PAGE_SIZE)
		return fail("give the VM more memory (32 MiB is enough)");
	u64 q0 = base, q1 = base + 0x4000, bufs = base + 0x10000;
	u64 victims = base + 0x100000, finals = victims + VICTIM_PAGES * EBB_PAGE_SIZE;
	static u32 pfns[16384];

	if (rd(REG_MAGIC) != 0x74726976 || rd(REG_VERSION) != 2 || rd(REG_DEVICE_ID) != 5)
		return fail("no virtio-balloon at 0xd0000000 (run with --balloon)");
	wr(REG_STATUS, 0);
	wr(REG_STATUS, STATUS_ACK);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
	wr(REG_DRIVER_FEATURES_SEL, 0);
	wr(REG_DRIVER_FEATURES, 0);
	wr(REG_DRIVER_FEATURES_SEL, 1);
	wr(REG_DRIVER_FEATURES, 1); /* VIRTIO_F_VERSION_1 */
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
	if (!(rd(REG_STATUS) & STATUS_FEATURES_OK))
		return fail("FEATURES_OK refused");
	/* A flood of invalid queue sizes: counted by ebb, not logged 20,000 times. */
	wr(REG_QUEUE_SEL, 0);
	for (u32 i = 0; i < 20000; i++)
		wr(REG_QUEUE_NUM, 3 + 2 * (i % 1000));
	struct queue inflate, deflate;
	setup_queue(&inflate, 0, q0);
	setup_queue(&deflate, 1, q1);
	wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
	put_str("hostile: device ready\n");

	u64 mem_pages = bi->mem_bytes >> 12;
	for (u64 r = 0; r < rounds; r++) {
		/* Inflate 256 victim pages, then write them anyway. */
		u64 first = (r * 256) % VICTIM_PAGES;
		for (u64 i = 0; i < PFNS_PER_BUFFER; i++)
			pfns[i] = (u32)page_of(victims + ((first + i) % VICTIM_PAGES) * EBB_PAGE_SIZE);
		offer(&inflate, 0, pfn_desc(&inflate, bufs, pfns, PFNS_PER_BUFFER));
		if (!wait_used(&inflate))
			return fail("an inflate buffer was never used");
		for (u64 i = 0; i < PFNS_PER_BUFFER; i++) {
			u64 *p = (u64 *)(victims + ((first + i) % VICTIM_PAGES) * EBB_PAGE_SIZE);
			*p = r ^ i ^ 0x5a5a;
		}
		/* A chain of 64 descriptors of 64 KiB of PFNs: 1 Mi PFNs, past the end of RAM. */
		for (u64 i = 0; i < 16384; i++)
			pfns[i] = (u32)(i * 7919);
		memcpy((void *)bufs, pfns, sizeof(pfns));
		u16 head = inflate.slot % QSIZE;
		for (u16 i = 0; i < 64; i++) {
			u16 d = inflate.slot++ % QSIZE;
			inflate.desc[d].addr = bufs;
			inflate.desc[d].len = 65536;
			inflate.desc[d].flags = i < 63 ? DESC_F_NEXT : 0;
			inflate.desc[d].next = (u16)((d + 1) % QSIZE);
		}
		offer(&inflate, 0, head);
		/* A looping chain, a head and a next pointer past the end of the queue, over a
		 * buffer naming a PFN past the end of RAM (what ebb keeps of a broken chain must
		 * not balloon a page). */
		*(volatile u32 *)bufs = 0xffffffff;
		u16 a = inflate.slot++ % QSIZE, b = inflate.slot++ % QSIZE;
		inflate.desc[a].addr = bufs, inflate.desc[a].len = 4, inflate.desc[a].flags = DESC_F_NEXT;
		inflate.desc[a].next = b;
		inflate.desc[b].addr = bufs, inflate.desc[b].len = 4, inflate.desc[b].flags = DESC_F_NEXT;
		inflate.desc[b].next = a;
		offer(&inflate, 0, a);
		u16 c = inflate.slot++ % QSIZE;
		inflate.desc[c].addr = bufs, inflate.desc[c].len = 4, inflate.desc[c].flags = DESC_F_NEXT;
		inflate.desc[c].next = 5000;
		offer(&inflate, 0, c);
		offer(&inflate, 0, 1000); /* head past the end: the device refuses the ring */
		/* That broke the inflate queue for good: give the device 2 ms to chew on it all,
		 * then start over with a reset. */
		for (u64 end = rdtsc() + 2 * (bi->tsc_khz ? bi->tsc_khz : 1000000); rdtsc() < end;)
			__asm__ volatile("pause");
		wr(REG_STATUS, 0);
		wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER);
		wr(REG_DRIVER_FEATURES_SEL, 1);
		wr(REG_DRIVER_FEATURES, 1);
		wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK);
		setup_queue(&inflate, 0, q0);
		setup_queue(&deflate, 1, q1);
		wr(REG_STATUS, STATUS_ACK | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
		/* PFNs past the end of RAM and duplicates, on the deflate queue. */
		pfns[0] = 0xffffffff, pfns[1] = (u32)mem_pages, pfns[2] = (u32)page_of(victims);
		pfns[3] = pfns[2];
		offer(&deflate, 1, pfn_desc(&deflate, bufs, pfns, 4));
		if (!wait_used(&deflate))
			return fail("a deflate buffer was never used");
		/* Notifications of queues that do not exist, junk in the config space. */
		wr(REG_QUEUE_NOTIFY, 7);
		wr(REG_QUEUE_NOTIFY, 0xffffffff);
		wr(REG_CONFIG + 0, (u32)r);
		wr(REG_CONFIG + 8, 0xdeadbeef);
	}

	/* The final balloon: 2 buffers of distinct pages, plus a duplicate of one. */
	for (u64 i = 0; i < final; i++)
		pfns[i] = (u32)page_of(finals + i * EBB_PAGE_SIZE);
	for (u64 done = 0; done < final; done += PFNS_PER_BUFFER) {
		u64 n = final - done < PFNS_PER_BUFFER ? final - done : PFNS_PER_BUFFER;
		offer(&inflate, 0, pfn_desc(&inflate, bufs + done * 4, pfns + done, n));
		if (!wait_used(&inflate))
			return fail("a final inflate buffer was never used");
	}
	if (final) {
		offer(&inflate, 0, pfn_desc(&inflate, bufs + 0x8000, pfns, 1));
		if (!wait_used(&inflate))
			return fail("the duplicate inflate buffer was never used");
	}
	/* Every victim page written in the last round reads back. */
	u64 bad = 0;
	if (rounds) {
		u64 r = rounds - 1, first = (r * 256) % VICTIM_PAGES;
		for (u64 i = 0; i < PFNS_PER_BUFFER; i++) {
			u64 *p = (u64 *)(victims + ((first + i) % VICTIM_PAGES) * EBB_PAGE_SIZE);
			bad += *p != (r ^ i ^ 0x5a5a);
		}
	}
	put_str("hostile: done rounds=");
	put_u64(rounds);
	put_str(" final=");
	put_u64(final);
	put_str(" bad=");
	put_u64(bad);
	put_char('\n');
	if (idle_ms && bi->tsc_khz) {
		u64 end = rdtsc() + idle_ms * bi->tsc_khz;
		while (rdtsc() < end)
			__asm__ volatile("pause");
	}
	return bad ? 3 : 0;
}
