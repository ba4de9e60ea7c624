/* Port interface of the test guest (mirrors vmr_vmm::guest_abi). */
#ifndef VMR_TEST_GUEST_H
#define VMR_TEST_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;

#define VALUE_PORT 0x500
#define CMD_PORT 0x502
#define DONE_PORT 0x503
#define DEBUG_EXIT_PORT 0xf4
#define COM1 0x3f8

#define CMD_COUNT 1
#define CMD_DIRTY 2
#define CMD_EXIT 3
#define END_OF_LIST 0xffffffffu

#define ARENA ((volatile u64 *)0x400000ul)
#define ARENA_PAGES 1024
/* First page CMD_DIRTY_SPAN may write: the end of the arena (8 MiB). */
#define SPAN_FIRST_PAGE 0x800ul

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

void serial_putc(char c);
void serial_puts(const char *s);
void serial_hex(u64 v);
void serial_dec(u64 v);

/* Workloads in other files: return 0 if `cmd` was handled, -1 otherwise. */
int extra_workload(u32 cmd);

#endif
