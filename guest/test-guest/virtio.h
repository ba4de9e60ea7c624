/* Polling virtio-mmio (version 2) drivers for the freestanding test guest:
 * one block device and one network device at fixed addresses shared with the
 * VMM (vmm/src/devices/mod.rs: VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE). The guest
 * runs identity-mapped, so buffer addresses are guest physical addresses. */
#ifndef VMR_VIRTIO_H
#define VMR_VIRTIO_H

#include <stdint.h>

#define VIRTIO_MMIO_BASE 0xd0000000ULL
#define VIRTIO_MMIO_SIZE 0x1000ULL
#define VIRTIO_BLK_BASE (VIRTIO_MMIO_BASE + 0 * VIRTIO_MMIO_SIZE)
#define VIRTIO_NET_BASE (VIRTIO_MMIO_BASE + 1 * VIRTIO_MMIO_SIZE)

#define VIRTIO_SECTOR_SIZE 512
#define VIRTIO_BLOCK_SIZE 4096
#define VIRTIO_NET_MTU_FRAME 1514

/* Results: 0 on success, negative on error (see virtio.c for the codes). */
int virtio_blk_init(void);
int virtio_blk_read(uint64_t sector, void *buf);        /* one sector */
int virtio_blk_write(uint64_t sector, const void *buf); /* one sector */
uint64_t virtio_blk_capacity(void);                     /* in sectors */
/* The driver's VIRTIO_BLOCK_SIZE-byte data buffer, and a write of all of it
 * (8 sectors) at `sector`: callers fill the buffer in place, which spares a
 * copy (the guest's kernel-mode code is slow on a nested KVM). */
uint8_t *virtio_blk_buf(void);
int virtio_blk_write_buf(uint64_t sector);
int virtio_blk_is_up(void);                             /* init succeeded */

int virtio_net_init(void);
void virtio_net_mac(uint8_t mac[6]);
/* Waits for the next received frame; copies at most `cap` bytes into `buf`
 * and returns the frame length (without the virtio-net header). */
int virtio_net_recv(void *buf, int cap);
int virtio_net_send(const void *frame, int len);

#endif
