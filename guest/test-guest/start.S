/* Entry: the VMM has set up long mode, flat segments and identity paging.
   The very first instruction writes the boot marker port so the host can
   time VMM start to first guest instruction. */
    .section .text.start, "ax"
    .code64
    .global _start
_start:
    outb %al, $0x99
    lea stack_top(%rip), %rsp
    xor %ebp, %ebp
    call guest_main
1:  outb %al, $0xf4
    jmp 1b
