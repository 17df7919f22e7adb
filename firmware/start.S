/* Payload entry: ebb starts every vCPU here at CPL3 with rdi = struct ebb_boot_info * and
 * rsi = the vCPU's index. vCPU 0 runs ebb_main and exits with its status; the others run
 * ebb_ap_main and then spin until the VM ends (hlt is not allowed at CPL3). */
	.section .text.start, "ax"
	.globl _start
_start:
	test %esi, %esi
	jnz 2f
	call ebb_main
	mov %eax, %edi
	call ebb_exit
1:	jmp 1b
2:	call ebb_ap_main
3:	pause
	jmp 3b
	.section .note.GNU-stack, "", @progbits
