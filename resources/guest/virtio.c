/* wisp test guest: virtio-mmio (modern, version 2) block driver and tests.
 * Runs in ring 3: MMIO pages are mapped U/S=1 and the rings live in guest RAM.
 * Only interrupt routing/waiting needs ring 0 (SYS_ROUTE_IRQ, SYS_WAIT_IRQ). */
#include "guest.h"

#include "virtio.h"

#define BLK_F_RO (1UL << 5)
#define BLK_F_BLK_SIZE (1UL << 6)
#define BLK_F_FLUSH (1UL << 9)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define PAT_READ 0x7769737000000000UL
#define PAT_WRITE 0x6775657374000000UL
#define PAT_SECOND 0x7365636f6e640000UL

#define MAX_BLK 4

struct queue_mem {
	struct vdesc desc[QSIZE_MAX];                            /* 4 KiB */
	struct vavail avail __attribute__((aligned(4096)));
	struct vused used __attribute__((aligned(4096)));
	struct { u32 type, rsv; u64 sector; } hdr __attribute__((aligned(64)));
	volatile u8 status;
} __attribute__((aligned(4096)));

struct blk {
	u64 base;
	u32 gsi, irqflags;
	u64 capacity, dev_features, features;
	u16 qsize, avail_idx, last_used;
	struct queue_mem *q;
};

struct mmio_dev mdevs[MAX_MMIO];
int nmdevs;
static struct blk blks[MAX_BLK];
static int nblks = -1;
static struct queue_mem qmem[MAX_BLK] __attribute__((section(".bss.noinit")));
static u8 iobuf[2 << 20] __attribute__((aligned(4096), section(".bss.noinit")));


static s64 check(const void *buf, u64 off, u32 len, u64 key);
static int blk_submit(struct blk *b, u32 type, u64 sector, void *buf, u32 len, int dev_writes,
		      int wait_irq);

/* ---------------- discovery */

static void add_mdev(u64 base, u64 size, u32 gsi, u32 flags)
{
	for (int i = 0; i < nmdevs; i++)
		if (mdevs[i].base == base) return;
	if (nmdevs < MAX_MMIO)
		mdevs[nmdevs++] = (struct mmio_dev){ base, size, gsi, flags };
}

/* _CRS buffer: Memory32Fixed (0x86) + Extended Interrupt (0x89) */
static int parse_crs(const u8 *p, const u8 *end, u64 *base, u64 *size, u32 *gsi, u32 *flags)
{
	if (p >= end || *p != 0x11) return 0; /* BufferOp */
	p++;
	p += 1 + (*p >> 6);                   /* PkgLength */
	if (*p == 0x0a) p += 2;               /* BufferSize */
	else if (*p == 0x0b) p += 3;
	else if (*p == 0x0c) p += 5;
	else p++;
	int got = 0;
	while (p + 3 <= end) {
		u8 tag = *p;
		if (tag & 0x80) {
			u16 l = p[1] | (p[2] << 8);
			if (tag == 0x86 && l >= 9) {
				*base = *(const u32 *)(p + 4);
				*size = *(const u32 *)(p + 8);
				got |= 1;
			} else if (tag == 0x89 && l >= 6) {
				*flags = p[3];
				*gsi = *(const u32 *)(p + 5);
				got |= 2;
			}
			p += 3 + l;
		} else {
			if ((tag >> 3) == 0xf) break; /* end tag */
			p += 1 + (tag & 7);
		}
	}
	return got == 3;
}

static void discover_dsdt(void)
{
	if (!g_acpi.dsdt) return;
	const u8 *d = (const u8 *)g_acpi.dsdt;
	u32 len = *(const u32 *)(d + 4);
	for (u32 i = 36; i + 8 < len; i++) {
		if (memcmp(d + i, "LNRO0005", 8)) continue;
		for (u32 j = i + 8; j + 4 < len && j < i + 512; j++) {
			if (!memcmp(d + j, "LNRO0005", 8)) break;
			if (memcmp(d + j, "_CRS", 4)) continue;
			u64 base = 0, size = 0;
			u32 gsi = 0, flags = 0;
			if (parse_crs(d + j + 4, d + len, &base, &size, &gsi, &flags))
				add_mdev(base, size, gsi, flags);
			break;
		}
	}
}

/* virtio_mmio.device=<size>@<base>:<irq> (may repeat) */
static void discover_cmdline(void)
{
	const char *key = "virtio_mmio.device=";
	size_t kl = strlen(key);
	for (const char *p = g_cmdline; *p;) {
		while (*p == ' ') p++;
		if (!strncmp(p, key, kl)) {
			const char *s = p + kl, *e;
			u64 size = parse_u64(s, &e);
			if (*e == 'K' || *e == 'k') size <<= 10, e++;
			else if (*e == 'M' || *e == 'm') size <<= 20, e++;
			if (*e == '@') {
				u64 base = parse_u64(e + 1, &e);
				u32 irq = 0;
				if (*e == ':') irq = parse_u64(e + 1, &e);
				add_mdev(base, size, irq, 0x1 | 0x2); /* edge, active high */
			}
		}
		while (*p && *p != ' ') p++;
	}
}

static u32 rd(struct blk *b, u32 off) { return mmio_r32(b->base + off); }
static void wr(struct blk *b, u32 off, u32 v) { mmio_w32(b->base + off, v); }

static const char *blk_init(struct blk *b)
{
	wr(b, VMMIO_STATUS, 0);
	wr(b, VMMIO_STATUS, ST_ACK);
	wr(b, VMMIO_STATUS, ST_ACK | ST_DRIVER);
	wr(b, VMMIO_DEV_FSEL, 0);
	u64 f = rd(b, VMMIO_DEV_FEAT);
	wr(b, VMMIO_DEV_FSEL, 1);
	f |= (u64)rd(b, VMMIO_DEV_FEAT) << 32;
	b->dev_features = f;
	if (!(f & F_VERSION_1))
		return "device lacks VIRTIO_F_VERSION_1";
	b->features = F_VERSION_1 | (f & (BLK_F_RO | BLK_F_BLK_SIZE | BLK_F_FLUSH));
	wr(b, VMMIO_DRV_FSEL, 0);
	wr(b, VMMIO_DRV_FEAT, (u32)b->features);
	wr(b, VMMIO_DRV_FSEL, 1);
	wr(b, VMMIO_DRV_FEAT, b->features >> 32);
	wr(b, VMMIO_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(rd(b, VMMIO_STATUS) & ST_FEATURES_OK))
		return "FEATURES_OK not accepted";
	wr(b, VMMIO_QUEUE_SEL, 0);
	if (rd(b, VMMIO_QUEUE_RDY))
		return "queue 0 already ready";
	u32 max = rd(b, VMMIO_QUEUE_MAX);
	if (!max)
		return "queue 0 not available";
	u32 qs = 1;
	while (qs * 2 <= max && qs * 2 <= QSIZE_MAX) qs *= 2;
	if (qs < 4)
		return "queue 0 too small (need 3 descriptors)";
	b->qsize = qs;
	memset(b->q, 0, sizeof(*b->q));
	wr(b, VMMIO_QUEUE_NUM, qs);
	wr(b, VMMIO_DESC_LO, (u64)b->q->desc);
	wr(b, VMMIO_DESC_HI, 0);
	wr(b, VMMIO_AVAIL_LO, (u64)&b->q->avail);
	wr(b, VMMIO_AVAIL_HI, 0);
	wr(b, VMMIO_USED_LO, (u64)&b->q->used);
	wr(b, VMMIO_USED_HI, 0);
	wr(b, VMMIO_QUEUE_RDY, 1);
	wr(b, VMMIO_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	b->capacity = mmio_r64(b->base + VMMIO_CONFIG);
	return NULL;
}

static void blk_discover(void)
{
	if (nblks >= 0) return;
	nblks = 0;
	virtio_discover();
	int empty = 0;
	for (int i = 0; i < nmdevs; i++) {
		u64 base = mdevs[i].base;
		u32 magic = mmio_r32(base + VMMIO_MAGIC), ver = mmio_r32(base + VMMIO_VERSION);
		u32 id = mmio_r32(base + VMMIO_DEVICE_ID);
		if (magic != 0x74726976) {
			printf("virtio: 0x%lx: bad magic 0x%x\n", base, magic);
			continue;
		}
		if (!id) {
			empty++;
			continue;
		}
		printf("virtio: 0x%lx size 0x%lx gsi %u flags 0x%x: version %u device %u\n", base,
		       mdevs[i].size, mdevs[i].gsi, mdevs[i].irqflags, ver, id);
		if (ver != 2) {
			printf("virtio: 0x%lx: legacy transport (version %u) not supported\n", base, ver);
			continue;
		}
		if (id != 2 || nblks >= MAX_BLK)
			continue;
		struct blk *b = &blks[nblks];
		b->base = base;
		b->gsi = mdevs[i].gsi;
		b->irqflags = mdevs[i].irqflags;
		b->q = &qmem[nblks];
		const char *e = blk_init(b);
		if (e) {
			printf("virtio-blk: 0x%lx: %s\n", base, e);
			continue;
		}
		printf("virtio-blk%d: 0x%lx capacity %lu sectors, features 0x%lx (ro=%d flush=%d), queue %u\n",
		       nblks, base, b->capacity, b->dev_features, !!(b->dev_features & BLK_F_RO),
		       !!(b->dev_features & BLK_F_FLUSH), b->qsize);
		nblks++;
	}
	printf("virtio: %d transports (%d empty), %d block devices\n", nmdevs, empty, nblks);
}

/* Find the virtio-mmio transports (DSDT, then virtio_mmio.device= on the cmdline),
 * sorted by base address. Idempotent. */
void virtio_discover(void)
{
	static int done;
	if (done) return;
	done = 1;
	discover_dsdt();
	discover_cmdline();
	/* sort by base address so the first disk is the lowest transport */
	for (int i = 0; i < nmdevs; i++)
		for (int j = i + 1; j < nmdevs; j++)
			if (mdevs[j].base < mdevs[i].base) {
				struct mmio_dev t = mdevs[i];
				mdevs[i] = mdevs[j];
				mdevs[j] = t;
			}
}

/* One synchronous request: header, optional data, status. Returns the status
 * byte, or -1 on timeout. */
static int blk_submit(struct blk *b, u32 type, u64 sector, void *buf, u32 len, int dev_writes,
		      int wait_irq)
{
	struct queue_mem *q = b->q;
	q->hdr.type = type;
	q->hdr.rsv = 0;
	q->hdr.sector = sector;
	q->status = 0xff;
	q->desc[0] = (struct vdesc){ (u64)&q->hdr, 16, 1, 1 };
	int n = 1;
	if (len) {
		q->desc[1] = (struct vdesc){ (u64)buf, len, 1 | (dev_writes ? 2 : 0), 2 };
		n = 2;
	} else {
		q->desc[0].next = 2;
	}
	q->desc[2] = (struct vdesc){ (u64)&q->status, 1, 2, 0 };
	(void)n;
	q->avail.ring[b->avail_idx % b->qsize] = 0;
	mb();
	b->avail_idx++;
	*(volatile u16 *)&q->avail.idx = b->avail_idx;
	mb();
	u64 old_irqs = irq_count;
	wr(b, VMMIO_NOTIFY, 0);
	u64 start = rdtsc(), lim = 20 * tsc_khz() * 1000;
	if (wait_irq) {
		u64 c = syscall3(SYS_WAIT_IRQ, old_irqs, lim, 0);
		if (c == old_irqs)
			return -2;
	}
	while (*(volatile u16 *)&q->used.idx == b->last_used) {
		if (rdtsc() - start > lim)
			return -1;
		cpu_relax();
	}
	mb();
	b->last_used++;
	return q->status;
}

/* The disk the single-disk tests use: blk_dev=N, else the lowest transport. */
static struct blk *first_blk(const char **why)
{
	blk_discover();
	if (nblks <= 0) {
		*why = "no virtio-blk device found";
		return NULL;
	}
	s64 n = 0;
	if (cmd_get_int("blk_dev", &n) && (n < 0 || n >= nblks)) {
		*why = "blk_dev out of range";
		return NULL;
	}
	return &blks[n];
}

static int sector0_is(struct blk *b, u64 key)
{
	return blk_submit(b, T_IN, 0, iobuf, 512, 1, 0) == 0 && check(iobuf, 0, 512, key) < 0;
}

static void fill(void *buf, u64 off, u32 len, u64 key)
{
	u64 *w = buf;
	for (u32 i = 0; i < len / 8; i++) w[i] = (off + i * 8) ^ key;
}

/* returns byte offset on disk of the first mismatch, or -1 */
static s64 check(const void *buf, u64 off, u32 len, u64 key)
{
	const u64 *w = buf;
	for (u32 i = 0; i < len / 8; i++)
		if (w[i] != ((off + i * 8) ^ key)) return off + i * 8;
	return -1;
}

static const char *read_verify(struct blk *b, u64 sector, u32 nsec, u64 key)
{
	memset(iobuf, 0, nsec * 512);
	int st = blk_submit(b, T_IN, sector, iobuf, nsec * 512, 1, 0);
	if (st)
		return fail_fmt("read of sector %lu: status %d", sector, st);
	s64 bad = check(iobuf, sector * 512, nsec * 512, key);
	if (bad >= 0)
		return fail_fmt("pattern mismatch at byte 0x%lx: 0x%lx", bad,
				*(u64 *)(iobuf + (bad - sector * 512)));
	return NULL;
}

const char *test_blk_read(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	/* with several disks and no blk_dev=, read the one holding the read pattern */
	if (nblks > 1 && !cmd_get("blk_dev"))
		for (int i = 0; i < nblks; i++)
			if (sector0_is(&blks[i], PAT_READ)) {
				b = &blks[i];
				break;
			}
	printf("blk_read: disk at 0x%lx\n", b->base);
	if (b->capacity < 16)
		return fail_fmt("capacity %lu too small", b->capacity);
	if ((e = read_verify(b, 0, 8, PAT_READ))) return e;
	if ((e = read_verify(b, b->capacity - 8, 8, PAT_READ))) return e;
	printf("blk_read: sectors 0-7 and %lu-%lu verified\n", b->capacity - 8, b->capacity - 1);
	return NULL;
}

const char *test_blk_write(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	if (b->dev_features & BLK_F_RO)
		return "device is read-only";
	if (b->capacity < (1 << 20) / 512 + 2)
		return fail_fmt("capacity %lu too small", b->capacity);
	u64 secs[3] = { 4096 / 512, (1 << 20) / 512, b->capacity - 1 };
	u32 nsec[3] = { 8, 1, 1 };
	for (int i = 0; i < 3; i++) {
		fill(iobuf, secs[i] * 512, nsec[i] * 512, PAT_WRITE);
		int st = blk_submit(b, T_OUT, secs[i], iobuf, nsec[i] * 512, 0, 0);
		if (st)
			return fail_fmt("write of sector %lu: status %d", secs[i], st);
	}
	if (!(b->features & BLK_F_FLUSH))
		return "device does not offer VIRTIO_BLK_F_FLUSH";
	int st = blk_submit(b, T_FLUSH, 0, NULL, 0, 0, 0);
	if (st)
		return fail_fmt("flush: status %d", st);
	for (int i = 0; i < 3; i++)
		if ((e = read_verify(b, secs[i], nsec[i], PAT_WRITE))) return e;
	printf("blk_write: wrote, flushed and verified sectors %lu+8, %lu, %lu\n", secs[0], secs[1],
	       secs[2]);
	return NULL;
}

const char *test_blk_ro(void)
{
	const char *e;
	if (!first_blk(&e)) return e;
	struct blk *b = NULL;
	for (int i = 0; i < nblks && !b; i++)
		if (blks[i].dev_features & BLK_F_RO) b = &blks[i];
	if (!b)
		return "no device offers VIRTIO_BLK_F_RO";
	/* write back sector 1's own pattern so a buggy device changes nothing */
	fill(iobuf, 512, 512, PAT_READ);
	int st = blk_submit(b, T_OUT, 1, iobuf, 512, 0, 0);
	if (st != 1)
		return fail_fmt("write to read-only disk: status %d, want 1 (IOERR)", st);
	if ((e = read_verify(b, 0, 8, PAT_READ))) return e;
	printf("blk_ro: write rejected with IOERR, read ok\n");
	return NULL;
}

const char *test_blk_id(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	char id[21];
	memset(iobuf, 0, 512);
	int st = blk_submit(b, T_GET_ID, 0, iobuf, 20, 1, 0);
	if (st)
		return fail_fmt("GET_ID: status %d", st);
	memcpy(id, iobuf, 20);
	id[20] = 0;
	printf("blk_id: serial \"%s\"\n", id);
	const char *want = cmd_get("blk_serial");
	if (want && strncmp(id, want, 20))
		return fail_fmt("serial \"%s\", want \"%s\"", id, want);
	return NULL;
}

const char *test_blk_two(void)
{
	const char *e;
	if (!first_blk(&e)) return e;
	if (nblks < 2)
		return fail_fmt("%d block device(s), want 2", nblks);
	/* transport order is up to the VMM (QEMU fills from the top): match by content */
	int first = -1, second = -1;
	for (int i = 0; i < nblks; i++) {
		if (first < 0 && sector0_is(&blks[i], PAT_READ)) first = i;
		else if (second < 0 && sector0_is(&blks[i], PAT_SECOND)) second = i;
	}
	if (first < 0)
		return "no disk holds the first disk's pattern in sector 0";
	if (second < 0)
		return "no disk holds the second disk's pattern in sector 0";
	printf("blk_two: first disk at 0x%lx (blk%d), second disk at 0x%lx (blk%d) verified\n",
	       blks[first].base, first, blks[second].base, second);
	return NULL;
}

const char *test_blk_irq(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	if (!b->gsi && !(b->irqflags & 0x100))
		printf("blk_irq: warning: gsi 0\n");
	/* drop anything pending from polled requests before unmasking */
	wr(b, VMMIO_INT_ACK, rd(b, VMMIO_INT_STATUS));
	/* _CRS flags: bit1 edge (else level), bit2 active low */
	u32 fl = ((b->irqflags & 2) ? 0 : 1) | ((b->irqflags & 4) ? 2 : 0);
	long pin = syscall3(SYS_ROUTE_IRQ, b->gsi, b->base, fl);
	if (pin < 0)
		return fail_fmt("no IOAPIC covers gsi %u", b->gsi);
	u64 before = irq_count;
	int st = blk_submit(b, T_IN, 0, iobuf, 4096, 1, 1);
	u64 after = irq_count;
	u32 isr = irq_virtio_status;
	syscall3(SYS_ROUTE_IRQ, b->gsi, 0, 0);
	printf("blk_irq: gsi %u (%s, active %s) -> ioapic pin %ld vector 0x%x: %lu interrupt(s), "
	       "InterruptStatus 0x%x\n", b->gsi, (fl & 1) ? "level" : "edge", (fl & 2) ? "low" : "high",
	       pin, VEC_DEVICE, after - before, isr);
	if (st == -2)
		return "no interrupt within the timeout";
	if (st)
		return fail_fmt("request status %d", st);
	if (!(isr & 1))
		return fail_fmt("InterruptStatus 0x%x lacks the used-buffer bit", isr);
	s64 bad = check(iobuf, 0, 4096, PAT_READ);
	if (bad >= 0)
		return fail_fmt("data mismatch at 0x%lx", bad);
	return NULL;
}

const char *test_blk_bench(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	s64 mib = 16;
	cmd_get_int("bench_mib", &mib);
	u64 region = (u64)mib << 20;
	if (region > b->capacity * 512) region = (b->capacity * 512) & ~((1UL << 20) - 1);
	if (region < (1 << 20))
		return "disk smaller than 1 MiB";
	u64 khz = tsc_khz();
	u64 nsec = region / 512;
	/* 4 KiB random reads */
	u64 seed = 0x12345678, n = 512, t0 = rdtsc();
	for (u64 i = 0; i < n; i++) {
		seed = seed * 6364136223846793005UL + 1442695040888963407UL;
		u64 s = ((seed >> 20) % (nsec / 8)) * 8;
		int st = blk_submit(b, T_IN, s, iobuf, 4096, 1, 0);
		if (st) return fail_fmt("random read status %d", st);
	}
	u64 cyc = rdtsc() - t0;
	u64 us = cyc * 1000 / khz;
	printf("BENCH blk randread4k %lu.%02lu\n", n * 4096 / (us ? us : 1),
	       (n * 4096 * 100 / (us ? us : 1)) % 100);
	printf("bench: %lu x 4 KiB random reads: %lu cycles, %lu us/op (tsc %lu kHz)\n", n, cyc,
	       us / n, khz);
	/* 1 MiB sequential reads */
	t0 = rdtsc();
	for (u64 o = 0; o < region; o += 1 << 20) {
		int st = blk_submit(b, T_IN, o / 512, iobuf, 1 << 20, 1, 0);
		if (st) return fail_fmt("sequential read status %d", st);
	}
	cyc = rdtsc() - t0;
	us = cyc * 1000 / khz;
	printf("BENCH blk seqread1m %lu.%02lu\n", region / (us ? us : 1),
	       (region * 100 / (us ? us : 1)) % 100);
	printf("bench: %lu MiB sequential reads: %lu cycles\n", region >> 20, cyc);
	if (b->dev_features & BLK_F_RO) {
		printf("bench: read-only device, skipping writes\n");
		return NULL;
	}
	/* 1 MiB sequential writes of the read pattern, so the disk stays valid for blk_read */
	u64 wcyc = 0;
	for (u64 o = 0; o < region; o += 1 << 20) {
		fill(iobuf, o, 1 << 20, PAT_READ);
		t0 = rdtsc();
		int st = blk_submit(b, T_OUT, o / 512, iobuf, 1 << 20, 0, 0);
		wcyc += rdtsc() - t0;
		if (st) return fail_fmt("sequential write status %d", st);
	}
	us = wcyc * 1000 / khz;
	printf("BENCH blk seqwrite1m %lu.%02lu\n", region / (us ? us : 1),
	       (region * 100 / (us ? us : 1)) % 100);
	printf("bench: %lu MiB sequential writes: %lu cycles\n", region >> 20, wcyc);
	return NULL;
}

/* ---------------- blk_write_tick hooks (tick.c) */

#define PAT_TICK 0x7469636b00000000UL
#define TICK_SECTOR ((1 << 20) / 512)
static struct blk *tick_blk;

const char *blk_tick_prepare(void)
{
	const char *e;
	struct blk *b = first_blk(&e);
	if (!b) return e;
	if (b->dev_features & BLK_F_RO)
		return "device is read-only";
	if (b->capacity < TICK_SECTOR + 64)
		return fail_fmt("capacity %lu too small", b->capacity);
	tick_blk = b;
	printf("blk_write_tick: disk at 0x%lx, sectors %u-%u\n", b->base, TICK_SECTOR, TICK_SECTOR + 63);
	return NULL;
}

/* sector 2048 + counter % 64 gets words o ^ PAT_TICK ^ counter; written,
 * flushed (if offered) and read back before the tick is reported */
const char *blk_tick_write(u64 counter)
{
	struct blk *b = tick_blk;
	u64 sec = TICK_SECTOR + counter % 64;
	fill(iobuf, sec * 512, 512, PAT_TICK ^ counter);
	int st = blk_submit(b, T_OUT, sec, iobuf, 512, 0, 0);
	if (st)
		return fail_fmt("tick %lu: write of sector %lu: status %d", counter, sec, st);
	if (b->features & BLK_F_FLUSH) {
		st = blk_submit(b, T_FLUSH, 0, NULL, 0, 0, 0);
		if (st)
			return fail_fmt("tick %lu: flush: status %d", counter, st);
	}
	return read_verify(b, sec, 1, PAT_TICK ^ counter);
}
