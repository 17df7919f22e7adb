/* ebb firmware ABI: what a payload may rely on when it starts (see src/boot/firmware.rs).
 *
 * 64-bit mode, CPL3, all guest RAM identity-mapped and user-writable (and the virtio-mmio
 * device windows from 0xd0000000: loads and stores there reach ebb's devices), interrupts off, no
 * IDT (an exception is a triple fault that ebb reports), a TSS I/O bitmap that lets every
 * port through, rsp at the top of a stack below 640 KiB, rdi = struct ebb_boot_info *,
 * rsi = this vCPU's index. Every vCPU starts at the entry at once (ebb --vcpus N), each on its
 * own 12 KiB stack: vCPU 0 calls ebb_main and its return value ends the VM; the others call
 * ebb_ap_main (rt.c's does nothing) and then spin until the VM ends. */
#ifndef EBB_H
#define EBB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

#define EBB_BOOT_MAGIC 0x31544f4f42424245UL /* "EBBBOOT1" little-endian */
#define EBB_UART_PORT 0x3f8                 /* 16550 THR */
#define EBB_DEBUG_EXIT_PORT 0xf4            /* 32-bit write: exit status (low 8 bits) */
#define EBB_PAGE_SIZE 4096UL
#define EBB_MAX_CPUS 32UL                    /* most vCPUs ebb gives a VM */

struct ebb_boot_info {
	u64 magic;
	u64 args_gpa;    /* NUL-terminated "key=value key=value" */
	u64 args_len;
	u64 mem_bytes;   /* configured guest RAM */
	u64 nr_ranges;   /* valid entries in free_ranges */
	u64 free_ranges[2][2]; /* [start, length], page aligned, free for the payload */
	u64 tsc_khz;     /* TSC frequency, for timed phases (0 if unknown) */
	u64 blob_gpa;    /* the host's data blob (--firmware-blob): page aligned, below 4 GiB,
			  * outside free_ranges; 0 if none */
	u64 blob_len;    /* its length in bytes (0 if none) */
	u64 progress_gpa; /* a u64 (0 at start) the payload bumps as it works; ebb reads it */
	u64 nr_cpus;     /* vCPUs running the payload, 1..EBB_MAX_CPUS */
};
/* Offsets: magic 0, args_gpa 8, args_len 16, mem_bytes 24, nr_ranges 32, free_ranges 40,
 * tsc_khz 72, blob_gpa 80, blob_len 88, progress_gpa 96, nr_cpus 104; 112 bytes in all. */
_Static_assert(sizeof(struct ebb_boot_info) == 112, "must match FirmwareBootInfo");
_Static_assert(__builtin_offsetof(struct ebb_boot_info, progress_gpa) == 96, "layout");
_Static_assert(__builtin_offsetof(struct ebb_boot_info, nr_cpus) == 104, "layout");

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* rt.c */
void ebb_exit(int status) __attribute__((noreturn));
void put_char(char c);
void put_str(const char *s);
void put_u64(u64 v);
void put_hex(u64 v);
/* Looks up key in the boot arguments; returns 1 and sets *out (decimal or 0x hex) if found. */
int arg_u64(const struct ebb_boot_info *bi, const char *key, u64 *out);
/* Copies the value of key (up to cap-1 bytes) into buf; returns 1 if found. */
int arg_str(const struct ebb_boot_info *bi, const char *key, char *buf, u64 cap);
int str_eq(const char *a, const char *b);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

/* Provided by each payload. */
int ebb_main(const struct ebb_boot_info *bi);
/* The other vCPUs' work; a payload may provide it (rt.c's weak one returns at once). */
void ebb_ap_main(const struct ebb_boot_info *bi, u32 cpu);

#endif
