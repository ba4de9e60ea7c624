/* NIC/disk workload of the test guest (see workload.c). */
#ifndef VMR_WORKLOAD_H
#define VMR_WORKLOAD_H
#include <stdint.h>

/* Command numbers served by extra_workload (guest.h has the built-in ones). */
#define CMD_NET_DISK 0x10
#define CMD_GDB_PROBE 0x11
#define CMD_BLK_SELFTEST 0x12
#define CMD_BLK_READ 0x13
#define CMD_DIRTY_SPAN 0x14
#define CMD_BLK_FILL 0x15

/* Serves requests from the NIC until a QUIT request; returns 0, or a
 * negative error. Never returns after a POISON request. */
int workload_net_disk(void);
int workload_handle_request(uint32_t seq, const uint8_t *frame, int len);
void workload_triple_fault(void) __attribute__((noreturn));
void gdb_probe(unsigned int i);

#endif
