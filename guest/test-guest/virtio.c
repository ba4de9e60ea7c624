/* Polling virtio-mmio block and net drivers. See virtio.h. */
#include "virtio.h"

#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

#define F_VERSION_1_HI (1u << 0) /* bit 32 */
#define NET_F_MAC (1u << 5)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define AVAIL_F_NO_INTERRUPT 1

#define QSIZE 8

#define ERR_NO_DEVICE (-1)
#define ERR_FEATURES (-2)
#define ERR_QUEUE (-3)
#define ERR_IO (-4)

struct vq_desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

struct vq_avail {
	uint16_t flags;
	uint16_t idx;
	uint16_t ring[QSIZE];
	uint16_t used_event;
};

struct vq_used_elem {
	uint32_t id;
	uint32_t len;
};

struct vq_used {
	uint16_t flags;
	uint16_t idx;
	struct vq_used_elem ring[QSIZE];
	uint16_t avail_event;
};

struct vq {
	struct vq_desc desc[QSIZE] __attribute__((aligned(16)));
	struct vq_avail avail __attribute__((aligned(2)));
	struct vq_used used __attribute__((aligned(4)));
	uint16_t last_used;
	uint16_t index;
	uint64_t base;
};

static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline uint32_t rd(uint64_t base, uint32_t off)
{
	return *(volatile uint32_t *)(base + off);
}

static inline void wr(uint64_t base, uint32_t off, uint32_t v)
{
	*(volatile uint32_t *)(base + off) = v;
}

static inline uint8_t rd8(uint64_t base, uint32_t off)
{
	return *(volatile uint8_t *)(base + off);
}

static void bytes_copy(void *dst, const void *src, int n)
{
	volatile uint8_t *d = dst;
	const volatile uint8_t *s = src;
	for (int i = 0; i < n; i++)
		d[i] = s[i];
}

/* Resets the device, negotiates VERSION_1 (+ `extra_lo` low feature bits if
 * offered) and sets up `nq` queues. Returns 0 or a negative error. */
static int dev_init(uint64_t base, uint32_t device_id, uint32_t extra_lo, struct vq *qs, int nq)
{
	if (rd(base, REG_MAGIC) != 0x74726976 || rd(base, REG_VERSION) != 2 ||
	    rd(base, REG_DEVICE_ID) != device_id)
		return ERR_NO_DEVICE;
	wr(base, REG_STATUS, 0);
	wr(base, REG_STATUS, ST_ACK);
	wr(base, REG_STATUS, ST_ACK | ST_DRIVER);
	wr(base, REG_DEVICE_FEATURES_SEL, 0);
	uint32_t lo = rd(base, REG_DEVICE_FEATURES);
	wr(base, REG_DEVICE_FEATURES_SEL, 1);
	uint32_t hi = rd(base, REG_DEVICE_FEATURES);
	if (!(hi & F_VERSION_1_HI))
		return ERR_FEATURES;
	wr(base, REG_DRIVER_FEATURES_SEL, 0);
	wr(base, REG_DRIVER_FEATURES, lo & extra_lo);
	wr(base, REG_DRIVER_FEATURES_SEL, 1);
	wr(base, REG_DRIVER_FEATURES, F_VERSION_1_HI);
	wr(base, REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(rd(base, REG_STATUS) & ST_FEATURES_OK))
		return ERR_FEATURES;
	for (int i = 0; i < nq; i++) {
		struct vq *q = &qs[i];
		q->index = (uint16_t)i;
		q->base = base;
		q->last_used = 0;
		q->avail.flags = AVAIL_F_NO_INTERRUPT;
		q->avail.idx = 0;
		q->used.idx = 0;
		wr(base, REG_QUEUE_SEL, (uint32_t)i);
		if (rd(base, REG_QUEUE_READY) != 0 || rd(base, REG_QUEUE_NUM_MAX) < QSIZE)
			return ERR_QUEUE;
		wr(base, REG_QUEUE_NUM, QSIZE);
		uint64_t d = (uint64_t)&q->desc, a = (uint64_t)&q->avail, u = (uint64_t)&q->used;
		wr(base, REG_QUEUE_DESC_LOW, (uint32_t)d);
		wr(base, REG_QUEUE_DESC_HIGH, (uint32_t)(d >> 32));
		wr(base, REG_QUEUE_DRIVER_LOW, (uint32_t)a);
		wr(base, REG_QUEUE_DRIVER_HIGH, (uint32_t)(a >> 32));
		wr(base, REG_QUEUE_DEVICE_LOW, (uint32_t)u);
		wr(base, REG_QUEUE_DEVICE_HIGH, (uint32_t)(u >> 32));
		wr(base, REG_QUEUE_READY, 1);
	}
	wr(base, REG_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	return 0;
}

/* Makes descriptor chain `head` available and notifies the device. */
static void vq_submit(struct vq *q, uint16_t head)
{
	q->avail.ring[q->avail.idx % QSIZE] = head;
	mb();
	q->avail.idx++;
	mb();
	wr(q->base, REG_QUEUE_NOTIFY, q->index);
}

/* Waits for the next used element and returns it. */
static struct vq_used_elem vq_wait(struct vq *q)
{
	while (*(volatile uint16_t *)&q->used.idx == q->last_used)
		__asm__ volatile("pause");
	mb();
	struct vq_used_elem e;
	e.id = q->used.ring[q->last_used % QSIZE].id;
	e.len = q->used.ring[q->last_used % QSIZE].len;
	q->last_used++;
	return e;
}

/* ---- block ---- */

struct blk_req {
	uint32_t type;
	uint32_t reserved;
	uint64_t sector;
};

static struct vq blk_q;
static struct blk_req blk_hdr;
/* A page of its own: only the device writes it (on reads), so the page shows
 * up in a snapshot's dirty set only through the backend's dirty log, unless a
 * workload fills it for virtio_blk_write_buf (CMD_BLK_FILL). */
static uint8_t blk_data[4096] __attribute__((aligned(4096)));
static volatile uint8_t blk_status;

static int blk_up;

int virtio_blk_init(void)
{
	int r = dev_init(VIRTIO_BLK_BASE, 2, 0, &blk_q, 1);
	blk_up = r == 0;
	return r;
}

uint64_t virtio_blk_capacity(void)
{
	uint64_t lo = rd(VIRTIO_BLK_BASE, REG_CONFIG), hi = rd(VIRTIO_BLK_BASE, REG_CONFIG + 4);
	return lo | (hi << 32);
}

static int blk_rw_len(uint32_t type, uint64_t sector, uint32_t len)
{
	if (!blk_up)
		return ERR_NO_DEVICE;
	blk_hdr.type = type;
	blk_hdr.reserved = 0;
	blk_hdr.sector = sector;
	blk_status = 0xff;
	blk_q.desc[0].addr = (uint64_t)&blk_hdr;
	blk_q.desc[0].len = sizeof(blk_hdr);
	blk_q.desc[0].flags = DESC_F_NEXT;
	blk_q.desc[0].next = 1;
	blk_q.desc[1].addr = (uint64_t)blk_data;
	blk_q.desc[1].len = len;
	blk_q.desc[1].flags = DESC_F_NEXT | (type == 0 ? DESC_F_WRITE : 0);
	blk_q.desc[1].next = 2;
	blk_q.desc[2].addr = (uint64_t)&blk_status;
	blk_q.desc[2].len = 1;
	blk_q.desc[2].flags = DESC_F_WRITE;
	blk_q.desc[2].next = 0;
	vq_submit(&blk_q, 0);
	vq_wait(&blk_q);
	return blk_status == 0 ? 0 : ERR_IO;
}

static int blk_rw(uint32_t type, uint64_t sector)
{
	return blk_rw_len(type, sector, VIRTIO_SECTOR_SIZE);
}

int virtio_blk_is_up(void) { return blk_up; }

uint8_t *virtio_blk_buf(void) { return blk_data; }

int virtio_blk_write_buf(uint64_t sector)
{
	return blk_rw_len(1, sector, VIRTIO_BLOCK_SIZE);
}

int virtio_blk_read(uint64_t sector, void *buf)
{
	int r = blk_rw(0, sector);
	if (r == 0)
		bytes_copy(buf, blk_data, VIRTIO_SECTOR_SIZE);
	return r;
}

int virtio_blk_write(uint64_t sector, const void *buf)
{
	bytes_copy(blk_data, buf, VIRTIO_SECTOR_SIZE);
	return blk_rw(1, sector);
}

/* ---- net ---- */

#define NET_HDR_LEN 12
#define NET_BUF_LEN (NET_HDR_LEN + VIRTIO_NET_MTU_FRAME)

static struct vq net_q[2]; /* 0: receive, 1: transmit */
static uint8_t net_rx_buf[QSIZE][NET_BUF_LEN] __attribute__((aligned(64)));
static uint8_t net_tx_buf[NET_BUF_LEN] __attribute__((aligned(64)));

static void net_post_rx(uint16_t i)
{
	struct vq *q = &net_q[0];
	q->desc[i].addr = (uint64_t)net_rx_buf[i];
	q->desc[i].len = NET_BUF_LEN;
	q->desc[i].flags = DESC_F_WRITE;
	q->desc[i].next = 0;
	q->avail.ring[q->avail.idx % QSIZE] = i;
	mb();
	q->avail.idx++;
}

static int net_up;

int virtio_net_init(void)
{
	net_up = 0;
	int r = dev_init(VIRTIO_NET_BASE, 1, NET_F_MAC, net_q, 2);
	if (r)
		return r;
	net_up = 1;
	for (uint16_t i = 0; i < QSIZE; i++)
		net_post_rx(i);
	mb();
	wr(VIRTIO_NET_BASE, REG_QUEUE_NOTIFY, 0);
	return 0;
}

void virtio_net_mac(uint8_t mac[6])
{
	for (int i = 0; i < 6; i++)
		mac[i] = rd8(VIRTIO_NET_BASE, REG_CONFIG + i);
}

int virtio_net_recv(void *buf, int cap)
{
	if (!net_up)
		return ERR_NO_DEVICE;
	struct vq_used_elem e = vq_wait(&net_q[0]);
	uint16_t id = (uint16_t)e.id;
	if (id >= QSIZE || e.len < NET_HDR_LEN)
		return ERR_IO;
	int len = (int)e.len - NET_HDR_LEN;
	if (len > cap)
		len = cap;
	bytes_copy(buf, net_rx_buf[id] + NET_HDR_LEN, len);
	net_post_rx(id);
	mb();
	wr(VIRTIO_NET_BASE, REG_QUEUE_NOTIFY, 0);
	return len;
}

int virtio_net_send(const void *frame, int len)
{
	if (!net_up)
		return ERR_NO_DEVICE;
	if (len < 0 || len > VIRTIO_NET_MTU_FRAME)
		return ERR_IO;
	struct vq *q = &net_q[1];
	for (int i = 0; i < NET_HDR_LEN; i++)
		net_tx_buf[i] = 0;
	bytes_copy(net_tx_buf + NET_HDR_LEN, frame, len);
	q->desc[0].addr = (uint64_t)net_tx_buf;
	q->desc[0].len = (uint32_t)(NET_HDR_LEN + len);
	q->desc[0].flags = 0;
	q->desc[0].next = 0;
	vq_submit(q, 0);
	vq_wait(q);
	return 0;
}
