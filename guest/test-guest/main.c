/* The test guest's main loop: poll the command port and run workloads.
   See vmr_vmm::guest_abi for the protocol. */
#include "guest.h"

void serial_putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) {
    }
    outb(COM1, (u8)c);
}

void serial_puts(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

void serial_hex(u64 v)
{
    for (int i = 60; i >= 0; i -= 4)
        serial_putc("0123456789abcdef"[(v >> i) & 0xf]);
}

void serial_dec(u64 v)
{
    char buf[21];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        serial_putc(buf[--n]);
}

__attribute__((weak)) int extra_workload(u32 cmd)
{
    (void)cmd;
    return -1;
}

/* Counting: an LCG stored into 64 arena pages, each value on VALUE_PORT,
   a serial line every 16 steps. steps == 0 runs forever. */
static void count(u32 steps)
{
    u64 x = 0x853c49e6748fea9bul;
    for (u64 i = 0; steps == 0 || i < steps; i++) {
        x = x * 6364136223846793005ul + 1442695040888963407ul;
        ARENA[(i % 64) * 512] = x;
        outl(VALUE_PORT, (u32)(x >> 32));
        if (i % 16 == 15) {
            serial_puts("tick ");
            serial_dec(i + 1);
            serial_putc(' ');
            serial_hex(x);
            serial_putc('\n');
        }
    }
    outl(DONE_PORT, steps);
}

void guest_main(void)
{
    u32 round = 0;
    serial_puts("vmr test guest: 64-bit\n");
    for (;;) {
        u32 cmd = inl(CMD_PORT);
        if (cmd == END_OF_LIST) {
            /* Nothing serves the command port (a plain `vmm run`). */
            serial_puts("no command port: exiting\n");
            outb(DEBUG_EXIT_PORT, 0);
        }
        switch (cmd & 0xff) {
        case 0:
            break;
        case CMD_COUNT:
            count(cmd >> 8);
            break;
        case CMD_DIRTY: {
            /* Registers only: no calls, no stack, so the dirtied pages are
               exactly the listed ones. */
            u32 n = 0, page;
            round++;
            while ((page = inl(CMD_PORT)) != END_OF_LIST) {
                if (page < ARENA_PAGES) {
                    ARENA[(u64)page * 512] = ((u64)page << 32) | round | 0x80000000u;
                    n++;
                }
            }
            outl(DONE_PORT, n);
            break;
        }
        case CMD_EXIT:
            outb(DEBUG_EXIT_PORT, (u8)(cmd >> 8));
            break;
        default:
            if (extra_workload(cmd) != 0)
                outl(DONE_PORT, 0xffffffffu);
            break;
        }
    }
}
