/* Tiny runtime shared by the payloads: serial output, exit, argument parsing. */
#include "ebb.h"

void ebb_exit(int status)
{
	outl(EBB_DEBUG_EXIT_PORT, (u32)status);
	for (;;)
		; /* ebb stops the vCPU on the write; never reached */
}

/* Payloads that use one vCPU leave the others idle. */
__attribute__((weak)) void ebb_ap_main(const struct ebb_boot_info *bi, u32 cpu)
{
	(void)bi;
	(void)cpu;
}

void put_char(char c) { outb(EBB_UART_PORT, (u8)c); }

void put_str(const char *s)
{
	while (*s)
		put_char(*s++);
}

void put_u64(u64 v)
{
	char buf[21];
	int i = 20;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	put_str(&buf[i]);
}

void put_hex(u64 v)
{
	static const char digits[] = "0123456789abcdef";
	put_str("0x");
	for (int shift = 60; shift >= 0; shift -= 4)
		put_char(digits[(v >> shift) & 0xf]);
}

int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* Finds "key=" at the start of a word; returns a pointer to the value or 0. */
static const char *find_arg(const struct ebb_boot_info *bi, const char *key)
{
	const char *p = (const char *)bi->args_gpa;
	const char *end = p + bi->args_len;
	while (p < end) {
		const char *k = key, *q = p;
		while (*k && q < end && *q == *k)
			k++, q++;
		if (!*k && q < end && *q == '=')
			return q + 1;
		while (p < end && *p != ' ')
			p++;
		while (p < end && *p == ' ')
			p++;
	}
	return 0;
}

int arg_str(const struct ebb_boot_info *bi, const char *key, char *buf, u64 cap)
{
	const char *v = find_arg(bi, key);
	u64 n = 0;
	if (!v || cap == 0)
		return 0;
	while (v[n] && v[n] != ' ' && n + 1 < cap) {
		buf[n] = v[n];
		n++;
	}
	buf[n] = 0;
	return 1;
}

int arg_u64(const struct ebb_boot_info *bi, const char *key, u64 *out)
{
	char buf[24];
	u64 v = 0, base = 10;
	const char *p = buf;
	if (!arg_str(bi, key, buf, sizeof(buf)))
		return 0;
	if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X'))
		base = 16, p += 2;
	if (!*p)
		return -1;
	for (; *p; p++) {
		u64 d;
		if (*p >= '0' && *p <= '9')
			d = (u64)(*p - '0');
		else if (base == 16 && *p >= 'a' && *p <= 'f')
			d = (u64)(*p - 'a' + 10);
		else if (base == 16 && *p >= 'A' && *p <= 'F')
			d = (u64)(*p - 'A' + 10);
		else
			return -1;
		v = v * base + d;
	}
	*out = v;
	return 1;
}

void *memset(void *d, int c, u64 n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, u64 n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}
