/* wisp test guest: virtio-net (virtio 1.x over virtio-mmio) driver and tests.
 * Ring 3, polling: RX queue 0, TX queue 1, 12-byte header (VERSION_1 always
 * has num_buffers). No interrupts are used. */
#include "virtio.h"

#define NET_F_MTU       (1UL << 3)
#define NET_F_MAC       (1UL << 5)
#define NET_F_MRG_RXBUF (1UL << 15)

#define NET_HDR 12
#define BUF_SIZE 2048
#define ET_TX 0x88b5
#define ET_RX 0x88b6

struct nq {
	struct vdesc desc[QSIZE_MAX];
	struct vavail avail __attribute__((aligned(4096)));
	struct vused used __attribute__((aligned(4096)));
} __attribute__((aligned(4096)));

static struct {
	int ok;
	u64 base, dev_features, features;
	u8 mac[6];
	u16 rxq, txq;                   /* queue sizes */
	u16 rx_avail, rx_used;
	u16 tx_avail, tx_used;
	u16 tx_free[QSIZE_MAX];
	int ntx_free;
	u32 ip;                         /* host order, 0 = none */
	/* net_neigh=1: like Linux's neighbour cache, remember the MAC of the last
	 * ARP requester and send echo replies to it, not to the frame's source */
	int neigh;
	u32 neigh_ip;
	u8 neigh_mac[6];
	u64 arp_replies, echo_replies, rx_frames, rx_other, rx_multi;
} nd;

static struct nq nqs[2] __attribute__((section(".bss.noinit")));
static u8 rxbufs[QSIZE_MAX][BUF_SIZE] __attribute__((aligned(4096), section(".bss.noinit")));
static u8 txbufs[QSIZE_MAX][BUF_SIZE] __attribute__((aligned(4096), section(".bss.noinit")));

static u32 nrd(u32 off) { return mmio_r32(nd.base + off); }
static void nwr(u32 off, u32 v) { mmio_w32(nd.base + off, v); }

static u16 be16(const u8 *p) { return (p[0] << 8) | p[1]; }
static u32 be32(const u8 *p) { return ((u32)p[0] << 24) | (p[1] << 16) | (p[2] << 8) | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = v >> 8; p[1] = v; }
static void put32(u8 *p, u32 v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }

/* the frame payload generator shared with the host tests (see README) */
static inline u8 pat_byte(u32 seq, u32 i) { return (u8)(i * 13 + seq * 7 + (i >> 8)); }

static const char *setup_queue(int qi, struct nq *q, u16 *size)
{
	nwr(VMMIO_QUEUE_SEL, qi);
	if (nrd(VMMIO_QUEUE_RDY))
		return fail_fmt("queue %d already ready", qi);
	u32 max = nrd(VMMIO_QUEUE_MAX);
	if (!max)
		return fail_fmt("queue %d not available", qi);
	u32 qs = 1;
	while (qs * 2 <= max && qs * 2 <= QSIZE_MAX) qs *= 2;
	*size = qs;
	memset(q, 0, sizeof(*q));
	q->avail.flags = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
	nwr(VMMIO_QUEUE_NUM, qs);
	nwr(VMMIO_DESC_LO, (u64)q->desc);
	nwr(VMMIO_DESC_HI, 0);
	nwr(VMMIO_AVAIL_LO, (u64)&q->avail);
	nwr(VMMIO_AVAIL_HI, 0);
	nwr(VMMIO_USED_LO, (u64)&q->used);
	nwr(VMMIO_USED_HI, 0);
	nwr(VMMIO_QUEUE_RDY, 1);
	return NULL;
}

static const char *net_init(u64 base)
{
	nd.base = base;
	nwr(VMMIO_STATUS, 0);
	nwr(VMMIO_STATUS, ST_ACK);
	nwr(VMMIO_STATUS, ST_ACK | ST_DRIVER);
	nwr(VMMIO_DEV_FSEL, 0);
	u64 f = nrd(VMMIO_DEV_FEAT);
	nwr(VMMIO_DEV_FSEL, 1);
	f |= (u64)nrd(VMMIO_DEV_FEAT) << 32;
	nd.dev_features = f;
	if (!(f & F_VERSION_1))
		return "device lacks VIRTIO_F_VERSION_1";
	nd.features = F_VERSION_1 | (f & (NET_F_MAC | NET_F_MRG_RXBUF));
	nwr(VMMIO_DRV_FSEL, 0);
	nwr(VMMIO_DRV_FEAT, (u32)nd.features);
	nwr(VMMIO_DRV_FSEL, 1);
	nwr(VMMIO_DRV_FEAT, nd.features >> 32);
	nwr(VMMIO_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(nrd(VMMIO_STATUS) & ST_FEATURES_OK))
		return "FEATURES_OK not accepted";
	const char *e;
	if ((e = setup_queue(0, &nqs[0], &nd.rxq)) || (e = setup_queue(1, &nqs[1], &nd.txq)))
		return e;
	if (nd.features & NET_F_MAC) {
		for (int i = 0; i < 6; i++) nd.mac[i] = mmio_r8(base + VMMIO_CONFIG + i);
	} else {
		static const u8 def[6] = { 0x02, 0x77, 0x69, 0x73, 0x70, 0x01 };
		memcpy(nd.mac, def, 6);
	}
	/* RX: every descriptor gets a buffer, all posted */
	struct nq *rq = &nqs[0];
	for (u16 i = 0; i < nd.rxq; i++) {
		rq->desc[i] = (struct vdesc){ (u64)rxbufs[i], BUF_SIZE, 2, 0 };
		rq->avail.ring[i] = i;
	}
	nd.rx_avail = nd.rxq;
	nd.rx_used = 0;
	mb();
	*(volatile u16 *)&rq->avail.idx = nd.rx_avail;
	/* TX: descriptor i always points at txbufs[i] */
	nd.ntx_free = 0;
	for (u16 i = 0; i < nd.txq; i++) nd.tx_free[nd.ntx_free++] = i;
	nd.tx_avail = nd.tx_used = 0;
	nwr(VMMIO_STATUS, ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	mb();
	nwr(VMMIO_NOTIFY, 0);
	return NULL;
}

static const char *net_get(void)
{
	if (nd.ok) return NULL;
	virtio_discover();
	s64 want = 0;
	cmd_get_int("net_dev", &want);
	int n = 0;
	for (int i = 0; i < nmdevs; i++) {
		u64 base = mdevs[i].base;
		if (mmio_r32(base + VMMIO_MAGIC) != 0x74726976 || mmio_r32(base + VMMIO_VERSION) != 2 ||
		    mmio_r32(base + VMMIO_DEVICE_ID) != 1)
			continue;
		if (n++ != want) continue;
		const char *e = net_init(base);
		if (e) return fail_fmt("virtio-net at 0x%lx: %s", base, e);
		nd.ok = 1;
		printf("virtio-net: 0x%lx gsi %u features 0x%lx (negotiated 0x%lx: mac=%d mrg_rxbuf=%d), "
		       "rx queue %u, tx queue %u\n", base, mdevs[i].gsi, nd.dev_features, nd.features,
		       !!(nd.features & NET_F_MAC), !!(nd.features & NET_F_MRG_RXBUF), nd.rxq, nd.txq);
		printf("net: mac %02x:%02x:%02x:%02x:%02x:%02x\n", nd.mac[0], nd.mac[1], nd.mac[2],
		       nd.mac[3], nd.mac[4], nd.mac[5]);
		const char *ip = cmd_get("ip");
		if (ip) {
			u32 v = 0;
			const char *p = ip;
			for (int k = 0; k < 4; k++) {
				v = (v << 8) | (parse_u64(p, &p) & 0xff);
				if (*p == '.') p++;
			}
			nd.ip = v;
		}
		s64 neigh = 0;
		cmd_get_int("net_neigh", &neigh);
		nd.neigh = neigh != 0;
		return NULL;
	}
	return n ? "net_dev out of range" : "no virtio-net device found";
}

/* ---------------- TX */

static void tx_reclaim(void)
{
	struct nq *q = &nqs[1];
	while (*(volatile u16 *)&q->used.idx != nd.tx_used) {
		mb();
		nd.tx_free[nd.ntx_free++] = q->used.ring[nd.tx_used % nd.txq].id;
		nd.tx_used++;
	}
}

/* Returns a buffer for a frame of up to BUF_SIZE - NET_HDR bytes, or NULL if
 * the ring stayed full for the timeout. */
static u8 *tx_alloc(u16 *id)
{
	u64 t0 = rdtsc(), lim = 5000 * tsc_khz();
	for (;;) {
		tx_reclaim();
		if (nd.ntx_free) break;
		if (rdtsc() - t0 > lim) return NULL;
		cpu_relax();
	}
	*id = nd.tx_free[--nd.ntx_free];
	memset(txbufs[*id], 0, NET_HDR);
	return txbufs[*id] + NET_HDR;
}

static void tx_send(u16 id, u32 len, int notify)
{
	struct nq *q = &nqs[1];
	q->desc[id] = (struct vdesc){ (u64)txbufs[id], NET_HDR + len, 0, 0 };
	q->avail.ring[nd.tx_avail % nd.txq] = id;
	mb();
	nd.tx_avail++;
	*(volatile u16 *)&q->avail.idx = nd.tx_avail;
	mb();
	if (notify) nwr(VMMIO_NOTIFY, 1);
}

/* ---------------- RX */

static void rx_repost(u16 id)
{
	struct nq *q = &nqs[0];
	q->avail.ring[nd.rx_avail % nd.rxq] = id;
	mb();
	nd.rx_avail++;
	*(volatile u16 *)&q->avail.idx = nd.rx_avail;
}

static u16 ip_csum(const u8 *p, u32 len, u32 sum)
{
	for (u32 i = 0; i + 1 < len; i += 2) sum += be16(p + i);
	if (len & 1) sum += p[len - 1] << 8;
	while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
	return ~sum & 0xffff;
}

/* ARP request for our address or ICMP echo request to it: answer. */
static void serve(const u8 *f, u32 len)
{
	if (!nd.ip || len < 14) return;
	u16 et = be16(f + 12);
	u16 id;
	if (et == 0x0806 && len >= 42) {
		const u8 *a = f + 14;
		if (be16(a) != 1 || be16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4 || be16(a + 6) != 1 ||
		    be32(a + 24) != nd.ip)
			return;
		u8 *r = tx_alloc(&id);
		if (!r) return;
		memset(r, 0, 60);
		memcpy(r, f + 6, 6);
		memcpy(r + 6, nd.mac, 6);
		put16(r + 12, 0x0806);
		u8 *ra = r + 14;
		put16(ra, 1);
		put16(ra + 2, 0x0800);
		ra[4] = 6;
		ra[5] = 4;
		put16(ra + 6, 2);
		memcpy(ra + 8, nd.mac, 6);
		put32(ra + 14, nd.ip);
		memcpy(ra + 18, a + 8, 10); /* requester's MAC and IP */
		if (nd.neigh) {
			nd.neigh_ip = be32(a + 14);
			memcpy(nd.neigh_mac, a + 8, 6);
		}
		tx_send(id, 60, 1);
		nd.arp_replies++;
	} else if (et == 0x0800 && len >= 14 + 20) {
		const u8 *ip = f + 14;
		u32 ihl = (ip[0] & 0xf) * 4, tot = be16(ip + 2);
		if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl + 8 || 14 + tot > len || ip[9] != 1 ||
		    be32(ip + 16) != nd.ip || (be16(ip + 6) & 0x3fff) /* fragment */)
			return;
		if (ip[ihl] != 8 || ip[ihl + 1] != 0) return; /* echo request */
		if (14 + tot > BUF_SIZE - NET_HDR) return;
		u8 *r = tx_alloc(&id);
		if (!r) return;
		if (nd.neigh && nd.neigh_ip && nd.neigh_ip == be32(ip + 12))
			memcpy(r, nd.neigh_mac, 6);
		else
			memcpy(r, f + 6, 6);
		memcpy(r + 6, nd.mac, 6);
		memcpy(r + 12, f + 12, 2 + tot);
		u8 *rip = r + 14;
		memcpy(rip + 12, ip + 16, 4);
		memcpy(rip + 16, ip + 12, 4);
		rip[8] = 64; /* TTL */
		put16(rip + 10, 0);
		put16(rip + 10, ip_csum(rip, ihl, 0));
		u8 *ic = rip + ihl;
		ic[0] = 0; /* echo reply */
		put16(ic + 2, 0);
		put16(ic + 2, ip_csum(ic, tot - ihl, 0));
		u32 flen = 14 + tot < 60 ? 60 : 14 + tot;
		if (flen > 14 + tot) memset(r + 14 + tot, 0, flen - 14 - tot);
		tx_send(id, flen, 1);
		nd.echo_replies++;
	}
}

/* Poll the RX used ring once. For each frame: answer ARP/ICMP (if ip= was
 * given) and pass it to cb. Returns the number of frames handled. */
static int rx_poll(void (*cb)(const u8 *f, u32 len))
{
	struct nq *q = &nqs[0];
	int n = 0;
	while (*(volatile u16 *)&q->used.idx != nd.rx_used) {
		mb();
		struct vused_elem ue = q->used.ring[nd.rx_used % nd.rxq];
		nd.rx_used++;
		u16 id = ue.id;
		const u8 *buf = rxbufs[id];
		u16 nbufs = buf[10] | (buf[11] << 8);
		if (nbufs > 1) {
			/* a frame larger than one buffer: not expected with 2 KiB buffers; drop it */
			nd.rx_multi++;
			rx_repost(id);
			for (u16 k = 1; k < nbufs; k++) {
				while (*(volatile u16 *)&q->used.idx == nd.rx_used) cpu_relax();
				mb();
				rx_repost(q->used.ring[nd.rx_used % nd.rxq].id);
				nd.rx_used++;
			}
			continue;
		}
		if (ue.len > NET_HDR) {
			nd.rx_frames++;
			serve(buf + NET_HDR, ue.len - NET_HDR);
			if (cb) cb(buf + NET_HDR, ue.len - NET_HDR);
		}
		rx_repost(id);
		n++;
	}
	if (n) {
		mb();
		nwr(VMMIO_NOTIFY, 0);
	}
	return n;
}

static u64 timeout_cycles(const char *key, s64 def_s)
{
	s64 s = def_s;
	cmd_get_int(key, &s);
	return (u64)s * 1000 * tsc_khz();
}

/* ---------------- tests */

const char *test_net_arp_icmp(void)
{
	const char *e = net_get();
	if (e) return e;
	if (!nd.ip) return "needs ip=A.B.C.D";
	s64 want = -1;
	cmd_get_int("net_echo_count", &want);
	u64 lim = want >= 0 ? timeout_cycles("net_timeout_s", 60) : timeout_cycles("net_serve_s", 10);
	printf("net_arp_icmp: serving %u.%u.%u.%u for %lu s%s\n", nd.ip >> 24, (nd.ip >> 16) & 0xff,
	       (nd.ip >> 8) & 0xff, nd.ip & 0xff, lim / tsc_khz() / 1000,
	       want >= 0 ? " or until the echo count is reached" : "");
	u64 a0 = nd.arp_replies, e0 = nd.echo_replies, t0 = rdtsc();
	while (rdtsc() - t0 < lim) {
		if (want >= 0 && nd.echo_replies - e0 >= (u64)want) break;
		if (!rx_poll(NULL)) cpu_relax();
	}
	tx_reclaim();
	printf("net_arp_icmp: answered %lu ARP requests, %lu echo requests (%lu frames received)\n",
	       nd.arp_replies - a0, nd.echo_replies - e0, nd.rx_frames);
	if (want >= 0 && nd.echo_replies - e0 < (u64)want)
		return fail_fmt("answered %lu of %ld echo requests before the timeout",
				nd.echo_replies - e0, want);
	return NULL;
}

const char *test_net_tx_burst(void)
{
	const char *e = net_get();
	if (e) return e;
	s64 n = 100, mtu = 1500, delay = 0;
	cmd_get_int("burst", &n);
	cmd_get_int("mtu", &mtu);
	cmd_get_int("net_tx_delay_ms", &delay);
	u32 maxlen = 14 + mtu;
	if (n <= 0 || mtu < 46 || maxlen > BUF_SIZE - NET_HDR)
		return "bad burst= or mtu= (mtu 46..2022)";
	if (delay > 0) udelay(delay * 1000);
	printf("net_tx_burst: sending %ld frames, 60..%u bytes, ethertype 0x%x\n", n, maxlen, ET_TX);
	u64 bytes = 0, t0 = rdtsc();
	for (s64 k = 0; k < n; k++) {
		u32 len = n == 1 ? 60 : 60 + (u32)((u64)k * (maxlen - 60) / (n - 1));
		u16 id;
		u8 *f = tx_alloc(&id);
		if (!f) return fail_fmt("TX ring stuck after %ld frames", k);
		memset(f, 0xff, 6);
		memcpy(f + 6, nd.mac, 6);
		put16(f + 12, ET_TX);
		u8 *p = f + 14;
		put32(p, k);
		for (u32 i = 4; i < len - 14; i++) p[i] = pat_byte(k, i);
		tx_send(id, len, 1);
		bytes += len;
		rx_poll(NULL); /* keep RX drained (and ARP answered) */
	}
	u64 lim = timeout_cycles("net_timeout_s", 60);
	while (nd.tx_used != nd.tx_avail && rdtsc() - t0 < lim) {
		tx_reclaim();
		cpu_relax();
	}
	if (nd.tx_used != nd.tx_avail)
		return fail_fmt("%u frames not returned by the device", (u16)(nd.tx_avail - nd.tx_used));
	u64 us = (rdtsc() - t0) * 1000 / tsc_khz();
	printf("net_tx_burst: %ld frames, %lu bytes sent in %lu us\n", n, bytes, us);
	return NULL;
}

static u64 rx_good, rx_bad;
static u32 rx_et = ET_RX;

static void rx_check(const u8 *f, u32 len)
{
	if (len < 14 || be16(f + 12) != rx_et) return;
	if (len < 18) {
		rx_bad++;
		printf("net_rx: bad frame: %u bytes, too short\n", len);
		return;
	}
	const u8 *p = f + 14;
	u32 seq = be32(p), pl = len - 14;
	for (u32 i = 4; i < pl; i++)
		if (p[i] != pat_byte(seq, i)) {
			rx_bad++;
			printf("net_rx: bad frame seq %u len %u: payload byte %u is 0x%02x, want 0x%02x\n", seq,
			       len, i, p[i], pat_byte(seq, i));
			return;
		}
	rx_good++;
}

const char *test_net_rx(void)
{
	const char *e = net_get();
	if (e) return e;
	s64 want = 100, et = ET_RX;
	cmd_get_int("rx_count", &want);
	/* rx_ethertype= (decimal) lets one guest receive another's net_tx_burst. */
	cmd_get_int("rx_ethertype", &et);
	rx_et = (u32)et & 0xffff;
	rx_good = rx_bad = 0;
	u64 lim = timeout_cycles("net_timeout_s", 60), t0 = rdtsc();
	printf("net_rx: ready for %ld frames with ethertype 0x%x\n", want, rx_et);
	while (rx_good < (u64)want && rdtsc() - t0 < lim)
		if (!rx_poll(rx_check)) cpu_relax();
	printf("net_rx: %lu good, %lu bad frames (%lu received in all, %lu oversized)\n", rx_good,
	       rx_bad, nd.rx_frames, nd.rx_multi);
	if (rx_good < (u64)want)
		return fail_fmt("%lu of %ld good frames before the timeout (%lu bad)", rx_good, want, rx_bad);
	if (rx_bad)
		return fail_fmt("%lu bad frames", rx_bad);
	return NULL;
}

/* ---------------- tick_net=1: answer ARP/ICMP between ticks (tick.c) */

const char *net_serve_prepare(void)
{
	const char *e = net_get();
	if (e) return e;
	if (!nd.ip) return "tick_net needs ip=A.B.C.D";
	printf("tick: answering ARP/ICMP for %u.%u.%u.%u between ticks\n", nd.ip >> 24,
	       (nd.ip >> 16) & 0xff, (nd.ip >> 8) & 0xff, nd.ip & 0xff);
	return NULL;
}

int net_serve_poll(void) { return rx_poll(NULL); }
