/* The NIC/disk workload of the test guest, and a probe for debugger tests.
 *
 * Commands (see guest.h and vmr_vmm::guest_abi; low byte = command):
 *   CMD_NET_DISK (0x10): run the NIC/disk workload below; reports its result
 *     (0, or a negative error) on DONE_PORT.
 *   CMD_GDB_PROBE (0x11) n: call gdb_probe(i) for i in 0..n (each writes i to
 *     VALUE_PORT), then report the sum of i on DONE_PORT.
 *   CMD_BLK_SELFTEST (0x12): bring up the block device alone, report its
 *     capacity (sectors) and the first word of sector 0 on VALUE_PORT, write
 *     sector 1 ("BLKTEST" + the first word), read it back and report 0 (or a
 *     negative error) on DONE_PORT.
 *   CMD_BLK_READ (0x13) n: with the block device already up (no reset),
 *     read sector n and report its first word on VALUE_PORT, then 0 (or a
 *     negative error) on DONE_PORT.
 *   CMD_DIRTY_SPAN (0x14), then three words first, count, stride: writes
 *     the 8-byte pattern (page << 32 | round | 0x80000000, the pattern of
 *     CMD_DIRTY, with its round counter) at the start of guest pages
 *     first + i * stride for i in 0..count, and reports how many on
 *     DONE_PORT. Pages below SPAN_FIRST_PAGE (the code, data, stack and
 *     arena) are skipped; the host must name pages inside guest memory.
 *   CMD_BLK_FILL (0x15), then four words first, runs, run_len, stride (in
 *     4 KiB blocks): brings the block device up if it is not, then writes
 *     run_len consecutive blocks at first + r * stride for r in 0..runs.
 *     Each block holds its block number (u32 LE) and the fill's round
 *     (u32 LE, counting from 1) followed by 0xa5 bytes. Reports the blocks
 *     written (or a negative error) on DONE_PORT.
 *
 * Requests arrive as Ethernet frames with EtherType 0x88B5 (local
 * experimental). For request number `seq` (0, 1, ...) the guest:
 *   1. appends the request to the disk: sector seq + 1 holds
 *      "REQ" | seq (u32 LE) | length (u16 LE) | payload (zero padded);
 *   2. replies with a frame to the sender: EtherType 0x88B5, payload
 *      "RPL" | seq (u32 LE) | fnv1a32(seq, payload) (u32 LE) | the request
 *      payload with every byte XORed with (seq + 1).
 * A payload starting with "POISON" makes the guest load an empty IDT and
 * divide by zero: a triple fault. A payload starting with "QUIT" ends the
 * workload. Sector 0 is read once at start (and its first bytes reported).
 * Everything is deterministic: the same requests give the same disk writes,
 * the same replies and the same crash. */
#include <stdint.h>

#include "guest.h"
#include "virtio.h"
#include "workload.h"

#define ETHERTYPE_VMR 0x88b5
#define ETH_HDR 14

static void say(const char *s) { serial_puts(s); }

static void say_hex(uint32_t v) { serial_hex(v); }

static int starts_with(const uint8_t *p, int len, const char *pfx)
{
	int i = 0;
	for (; pfx[i]; i++)
		if (i >= len || p[i] != (uint8_t)pfx[i])
			return 0;
	return 1;
}

static uint32_t fnv1a(uint32_t seq, const uint8_t *p, int len)
{
	uint32_t h = 2166136261u;
	for (int i = 0; i < 4; i++) {
		h ^= (seq >> (8 * i)) & 0xff;
		h *= 16777619u;
	}
	for (int i = 0; i < len; i++) {
		h ^= p[i];
		h *= 16777619u;
	}
	return h;
}

static void put32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* Loads a zero-limit IDT, then divides by zero: with no way to deliver the
 * #DE (nor the #GP and #DF that follow), the CPU shuts down. A divide error
 * rather than int3, which some nested KVMs emulate and fail on instead. */
__attribute__((noinline, noreturn)) void workload_triple_fault(void)
{
	static const struct __attribute__((packed)) {
		uint16_t limit;
		uint64_t base;
	} empty_idt = {0, 0};
	__asm__ volatile("lidt %0\n\txorl %%ecx, %%ecx\n\tdivl %%ecx" ::"m"(empty_idt) : "eax", "ecx", "edx");
	for (;;)
		__asm__ volatile("hlt");
}

static uint8_t rx[VIRTIO_NET_MTU_FRAME];
static uint8_t tx[VIRTIO_NET_MTU_FRAME];
static uint8_t sector[VIRTIO_SECTOR_SIZE];

/* One request: persisted, answered. Kept out of line so a debugger or a
 * test can break on it. */
__attribute__((noinline)) int workload_handle_request(uint32_t seq, const uint8_t *frame, int len)
{
	const uint8_t *payload = frame + ETH_HDR;
	int plen = len - ETH_HDR;
	if (starts_with(payload, plen, "POISON")) {
		say("vmr-guest: poison request ");
		say_hex(seq);
		say("\n");
		workload_triple_fault();
	}
	for (int i = 0; i < VIRTIO_SECTOR_SIZE; i++)
		sector[i] = 0;
	int keep = plen > VIRTIO_SECTOR_SIZE - 9 ? VIRTIO_SECTOR_SIZE - 9 : plen;
	sector[0] = 'R';
	sector[1] = 'E';
	sector[2] = 'Q';
	put32(sector + 3, seq);
	sector[7] = (uint8_t)plen;
	sector[8] = (uint8_t)(plen >> 8);
	for (int i = 0; i < keep; i++)
		sector[9 + i] = payload[i];
	if (virtio_blk_write((uint64_t)seq + 1, sector) != 0)
		return -1;

	int rlen = plen > VIRTIO_NET_MTU_FRAME - ETH_HDR - 11 ? VIRTIO_NET_MTU_FRAME - ETH_HDR - 11 : plen;
	for (int i = 0; i < 6; i++) {
		tx[i] = frame[6 + i];        /* to the sender */
		tx[6 + i] = frame[i];        /* from the address it used */
	}
	tx[12] = ETHERTYPE_VMR >> 8;
	tx[13] = ETHERTYPE_VMR & 0xff;
	uint8_t *r = tx + ETH_HDR;
	r[0] = 'R';
	r[1] = 'P';
	r[2] = 'L';
	put32(r + 3, seq);
	put32(r + 7, fnv1a(seq, payload, plen));
	for (int i = 0; i < rlen; i++)
		r[11 + i] = payload[i] ^ (uint8_t)(seq + 1);
	int total = ETH_HDR + 11 + rlen;
	if (total < 60)
		for (; total < 60; total++)
			tx[total] = 0;
	return virtio_net_send(tx, total);
}

int workload_net_disk(void)
{
	int r = virtio_blk_init();
	if (r) {
		say("vmr-guest: virtio-blk init failed ");
		say_hex((uint32_t)r);
		say("\n");
		return r;
	}
	r = virtio_net_init();
	if (r) {
		say("vmr-guest: virtio-net init failed ");
		say_hex((uint32_t)r);
		say("\n");
		return r;
	}
	if (virtio_blk_read(0, sector) != 0) {
		say("vmr-guest: disk read failed\n");
		return -1;
	}
	say("vmr-guest: disk sectors ");
	say_hex((uint32_t)virtio_blk_capacity());
	say(" first word ");
	say_hex((uint32_t)sector[0] | (uint32_t)sector[1] << 8 | (uint32_t)sector[2] << 16 |
		(uint32_t)sector[3] << 24);
	say("\nvmr-guest: net ready\n");
	for (uint32_t seq = 0;; seq++) {
		int len;
		do {
			len = virtio_net_recv(rx, sizeof(rx));
		} while (len < ETH_HDR || rx[12] != (ETHERTYPE_VMR >> 8) || rx[13] != (ETHERTYPE_VMR & 0xff));
		if (starts_with(rx + ETH_HDR, len - ETH_HDR, "QUIT")) {
			say("vmr-guest: quit after ");
			say_hex(seq);
			say(" requests\n");
			return 0;
		}
		if (workload_handle_request(seq, rx, len) != 0) {
			say("vmr-guest: request failed\n");
			return -1;
		}
		say("vmr-guest: request ");
		say_hex(seq);
		say(" done\n");
	}
}

/* Kept out of line (and with a side effect) so a debugger can break on it. */
__attribute__((noinline)) void gdb_probe(u32 i)
{
	outl(VALUE_PORT, i);
	__asm__ volatile("" ::: "memory");
}

static int blk_selftest(void)
{
	int r = virtio_blk_init();
	if (r)
		return r;
	if (virtio_blk_read(0, sector) != 0)
		return -10;
	u32 first = (u32)sector[0] | (u32)sector[1] << 8 | (u32)sector[2] << 16 | (u32)sector[3] << 24;
	outl(VALUE_PORT, (u32)virtio_blk_capacity());
	outl(VALUE_PORT, first);
	static const char tag[] = "BLKTEST";
	for (int i = 0; i < VIRTIO_SECTOR_SIZE; i++)
		sector[i] = 0;
	for (int i = 0; i < 7; i++)
		sector[i] = (uint8_t)tag[i];
	put32(sector + 7, first);
	if (virtio_blk_write(1, sector) != 0)
		return -11;
	for (int i = 0; i < 11; i++)
		sector[i] = 0;
	if (virtio_blk_read(1, sector) != 0)
		return -12;
	for (int i = 0; i < 7; i++)
		if (sector[i] != (uint8_t)tag[i])
			return -13;
	return 0;
}

/* Rounds of CMD_DIRTY_SPAN and CMD_BLK_FILL (the dirty round of main.c is
 * private to it, so the span keeps its own). */
static u32 span_round, fill_round;

static u32 dirty_span(void)
{
	u32 first = inl(CMD_PORT), count = inl(CMD_PORT), stride = inl(CMD_PORT), n = 0;
	span_round++;
	for (u32 i = 0; i < count; i++) {
		u64 page = (u64)first + (u64)i * stride;
		if (page < SPAN_FIRST_PAGE)
			continue;
		*(volatile u64 *)(page << 12) = (page << 32) | span_round | 0x80000000u;
		n++;
	}
	return n;
}

static int blk_fill(void)
{
	u32 first = inl(CMD_PORT), runs = inl(CMD_PORT), run_len = inl(CMD_PORT), stride = inl(CMD_PORT);
	if (!virtio_blk_is_up()) {
		int r = virtio_blk_init();
		if (r)
			return r;
	}
	fill_round++;
	uint8_t *b = virtio_blk_buf();
	for (int i = 8; i < VIRTIO_BLOCK_SIZE; i++)
		b[i] = 0xa5;
	put32(b + 4, fill_round);
	int n = 0;
	for (u32 r = 0; r < runs; r++)
		for (u32 k = 0; k < run_len; k++) {
			u32 block = first + r * stride + k;
			put32(b, block);
			if (virtio_blk_write_buf((uint64_t)block * (VIRTIO_BLOCK_SIZE / VIRTIO_SECTOR_SIZE)) != 0)
				return -20;
			n++;
		}
	return n;
}

int extra_workload(u32 cmd)
{
	switch (cmd & 0xff) {
	case CMD_DIRTY_SPAN:
		outl(DONE_PORT, dirty_span());
		return 0;
	case CMD_BLK_FILL:
		outl(DONE_PORT, (u32)blk_fill());
		return 0;
	case CMD_NET_DISK:
		outl(DONE_PORT, (u32)workload_net_disk());
		return 0;
	case CMD_BLK_SELFTEST:
		outl(DONE_PORT, (u32)blk_selftest());
		return 0;
	case CMD_BLK_READ: {
		int r = virtio_blk_read(cmd >> 8, sector);
		if (r == 0)
			outl(VALUE_PORT, (u32)sector[0] | (u32)sector[1] << 8 | (u32)sector[2] << 16 |
						 (u32)sector[3] << 24);
		outl(DONE_PORT, (u32)r);
		return 0;
	}
	case CMD_GDB_PROBE: {
		u32 n = cmd >> 8, sum = 0;
		for (u32 i = 0; i < n; i++) {
			gdb_probe(i);
			sum += i;
		}
		outl(DONE_PORT, sum);
		return 0;
	}
	default:
		return -1;
	}
}
