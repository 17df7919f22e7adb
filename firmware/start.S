/* Payload entry: ebb starts us at CPL3 with rdi = struct ebb_boot_info *. */
	.section .text.start, "ax"
	.globl _start
_start:
	call ebb_main
	mov %eax, %edi
	call ebb_exit
1:	jmp 1b
	.section .note.GNU-stack, "", @progbits
