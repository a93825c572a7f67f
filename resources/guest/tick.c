/* wisp test guest: the `tick` workload for pause/resume, snapshot/restore and
 * live-migration tests. Everything runs in ring 3 and all state lives in guest
 * RAM (plus registers), so it survives being frozen and moved to another VMM. */
#include "guest.h"

/* The tick state: kept in RAM (.bss) and volatile so it is really stored. */
static volatile u64 tick_counter;
static volatile u64 ap_tick_counter[MAX_CPUS];
volatile int g_ap_tick;          /* tick_aps=1: APs run their own tick loop after the smp payload */
static volatile int ticking;     /* set while the BSP's tick loop runs */
static volatile u64 tick_period; /* TSC cycles per tick (also used by the APs) */

static u32 *gens;   /* generation of every pattern page */
static u8 *pattern; /* pattern_mib MiB, page granular */
static u64 npages, cursor;

extern char __image_end[];

#define MIB (1UL << 20)

static u64 mix64(u64 x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9UL;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebUL;
	x ^= x >> 31;
	return x;
}

/* word j of page i at generation g */
static inline u64 page_seed(u64 i, u32 g) { return mix64((i << 32) | g); }
#define WORD_MUL 0x9e3779b97f4a7c15UL

static void write_page(u64 i)
{
	u64 *w = (u64 *)(pattern + (i << 12)), s = page_seed(i, gens[i]);
	for (u64 j = 0; j < 512; j++) w[j] = s ^ (j * WORD_MUL);
}

/* returns the first bad page or -1; *word gets the bad word index */
static s64 verify_pattern(u32 *word)
{
	for (u64 i = 0; i < npages; i++) {
		const u64 *w = (const u64 *)(pattern + (i << 12));
		u64 s = page_seed(i, gens[i]);
		for (u64 j = 0; j < 512; j++)
			if (w[j] != (s ^ (j * WORD_MUL))) {
				*word = j;
				return i;
			}
	}
	return -1;
}

static int overlaps(u64 a, u64 al, u64 b, u64 bl) { return a < b + bl && b < a + al; }

/* First 2 MiB-aligned RAM range of `len` bytes above the image that does not
 * overlap anything the VMM handed over. */
static u64 find_region(u64 len)
{
	struct hvm_memmap_entry *mm = (void *)g_si->memmap_paddr;
	u64 p = ((u64)__image_end + 2 * MIB - 1) & ~(2 * MIB - 1);
	for (; p + len <= 0xc0000000UL; p += 2 * MIB) {
		int ram = 0;
		for (u32 i = 0; i < g_si->memmap_entries; i++)
			if (mm[i].type == 1 && mm[i].addr <= p && p + len <= mm[i].addr + mm[i].size)
				ram = 1;
		if (!g_si->memmap_paddr || !g_si->memmap_entries)
			ram = 1; /* no memmap: hope for the best */
		if (!ram) continue;
		if (overlaps(p, len, (u64)g_si, sizeof(*g_si))) continue;
		if (overlaps(p, len, g_si->memmap_paddr, g_si->memmap_entries * sizeof(*mm))) continue;
		if (g_si->cmdline_paddr && overlaps(p, len, g_si->cmdline_paddr, 4096)) continue;
		int bad = 0;
		for (int i = 0; i < g_acpi.ntables; i++)
			if (overlaps(p, len, g_acpi.tables[i], g_acpi.table_lens[i])) bad = 1;
		if (!bad) return p;
	}
	return 0;
}

/* AP side (tick_aps=1): called from the smp payload, never returns. */
void ap_tick_loop(u64 idx)
{
again:
	while (!ticking) cpu_relax();
	u64 next = rdtsc() + tick_period;
	while (ticking) {
		u64 now = rdtsc();
		if ((s64)(next - now) > (s64)tick_period) /* TSC went backwards */
			next = now + tick_period;
		if ((s64)(now - next) < 0) {
			cpu_relax();
			continue;
		}
		next = ((s64)(now - next) > (s64)tick_period) ? now + tick_period : next + tick_period;
		ap_tick_counter[idx] = ap_tick_counter[idx] + 1;
		printf("tick cpu%lu %lu\n", idx, ap_tick_counter[idx]);
	}
	goto again; /* wait for the next tick test */
}

/* per-tick hook for blk_write_tick (virtio.c) */
const char *blk_tick_prepare(void);
const char *blk_tick_write(u64 counter);
const char *net_serve_prepare(void);
int net_serve_poll(void);

static const char *tick_run(int with_blk)
{
	s64 ms = 100, mib = 16, per = 1, every = 10, count = -1, corrupt = -1;
	cmd_get_int("tick_corrupt", &corrupt); /* self-test: flip a bit at this tick */
	cmd_get_int("tick_ms", &ms);
	cmd_get_int("pattern_mib", &mib);
	cmd_get_int("dirty_pages_per_tick", &per);
	cmd_get_int("verify_every", &every);
	cmd_get_int("tick_count", &count);
	if (ms <= 0) return "tick_ms must be > 0";
	if (mib < 0 || per < 0 || every < 0) return "negative pattern_mib/dirty_pages_per_tick/verify_every";
	const char *e;
	if (with_blk && (e = blk_tick_prepare())) return e;
	s64 tn = 0;
	int with_net = cmd_get_int("tick_net", &tn) && tn;
	if (with_net && (e = net_serve_prepare())) return e;
	s64 ta = 0;
	if (cmd_get_int("tick_aps", &ta) && ta && g_acpi.ncpus > 1 && !smp_aps_online()) {
		/* start the APs so they run their own tick loops */
		if ((e = test_smp())) return fail_fmt("starting the APs: %s", e);
	}

	npages = (u64)mib * MIB / 4096;
	if (npages) {
		u64 glen = (npages * 4 + 2 * MIB - 1) & ~(2 * MIB - 1);
		u64 base = find_region(glen + npages * 4096);
		if (!base)
			return fail_fmt("no free RAM for a %ld MiB pattern", mib);
		gens = (u32 *)base;
		pattern = (u8 *)(base + glen);
		for (u64 i = 0; i < npages; i++) {
			gens[i] = 0;
			write_page(i);
		}
		printf("tick: pattern %ld MiB at 0x%lx (generations at 0x%lx)\n", mib, (u64)pattern, base);
	}
	if ((u64)per > npages) per = npages;
	cursor = 0;
	tick_counter = 0;
	u64 khz = tsc_khz(), period = (u64)ms * khz;
	tick_period = period;
	printf("tick: every %ld ms (%lu cycles, tsc %lu kHz), %ld dirty pages/tick, verify every %ld ticks, "
	       "count %ld%s\n", ms, period, khz, per, every, count, with_blk ? ", disk writes" : "");
	ticking = 1;
	u64 prev = rdtsc(), next = prev + period;
	for (;;) {
		u64 now = rdtsc();
		if ((s64)(now - prev) < 0) {
			printf("tick: tsc jump backwards by %lu ms\n", (prev - now) / khz);
			next = now + period;
		}
		prev = now;
		if ((s64)(now - next) < 0) {
			if (!with_net || !net_serve_poll()) cpu_relax();
			continue;
		}
		if ((s64)(now - next) > (s64)period) {
			/* paused, frozen or restored: don't try to catch up */
			printf("tick: tsc jump +%lu ms\n", (now - next + period) / khz);
			next = now;
		}
		next += period;
		u64 c = tick_counter + 1;
		tick_counter = c;
		for (s64 k = 0; k < per; k++) {
			gens[cursor]++;
			write_page(cursor);
			cursor = cursor + 1 == npages ? 0 : cursor + 1;
		}
		if (npages && (s64)c == corrupt) {
			u64 pg = (c * 7919) % npages;
			printf("tick: self-test: corrupting page %lu\n", pg);
			((volatile u64 *)(pattern + (pg << 12)))[5] ^= 1UL << 17;
		}
		if (npages && every && c % every == 0) {
			u32 word = 0;
			s64 bad = verify_pattern(&word);
			if (bad >= 0) {
				ticking = 0;
				u64 got = ((u64 *)(pattern + (bad << 12)))[word];
				return fail_fmt("pattern mismatch at page %ld: word %u is 0x%lx, want 0x%lx "
						"(generation %u)", bad, word, got,
						page_seed(bad, gens[bad]) ^ (word * WORD_MUL), gens[bad]);
			}
		}
		if (with_blk && (e = blk_tick_write(c))) {
			ticking = 0;
			return e;
		}
		printf("tick %lu ok\n", c);
		if (count >= 0 && c >= (u64)count) break;
	}
	ticking = 0;
	if (npages) {
		u32 word = 0;
		s64 bad = verify_pattern(&word);
		if (bad >= 0)
			return fail_fmt("pattern mismatch at page %ld", bad);
	}
	return NULL;
}

const char *test_tick(void) { return tick_run(0); }
const char *test_blk_write_tick(void) { return tick_run(1); }
