/* hello: prints one line over the UART and exits 0. */
#include "ebb.h"

int ebb_main(const struct ebb_boot_info *bi)
{
	if (bi->magic != EBB_BOOT_MAGIC) {
		put_str("hello: bad boot info magic\n");
		return 1;
	}
	put_str("Hello from ebb firmware at CPL3\n");
	return 0;
}
