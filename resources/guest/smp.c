/* wisp test guest: MADT and SMP bring-up tests (driven from ring 3). */
#include "guest.h"

volatile u32 ap_next_idx = 1;
static volatile u32 ap_online, ap_payload_done;
extern char tramp_start[], tramp_end[], tramp_far32[];

const char *test_madt(void)
{
	if (!g_acpi.ok)
		return "ACPI tables not found or invalid";
	char ids[256];
	int l = 0;
	ids[0] = 0;
	for (int i = 0; i < g_acpi.ncpus && l < 240; i++)
		l += snprintf(ids + l, sizeof(ids) - l, "%s%u", i ? "," : "", g_acpi.apic_ids[i]);
	printf("madt: %d enabled cpus, apic ids %s\n", g_acpi.ncpus, ids);
	for (int i = 0; i < g_acpi.nioapics; i++)
		printf("madt: ioapic at 0x%lx gsi_base %u\n", g_acpi.ioapic_base[i], g_acpi.ioapic_gsi_base[i]);
	s64 want;
	if (cmd_get_int("expect_cpus", &want) && want != g_acpi.ncpus)
		return fail_fmt("expected %ld cpus, MADT has %d", want, g_acpi.ncpus);
	return NULL;
}

/* ring-3 payload run by every AP after its ring-0 setup */
void user_ap_main(u64 idx, u64 apic_id)
{
	printf("cpu %lu apic_id %lu online\n", idx, apic_id);
	__atomic_fetch_add(&ap_online, 1, __ATOMIC_SEQ_CST);
	volatile u64 sum = 0;
	for (u64 i = 1; i <= 100000; i++) sum += i;
	if (sum == 100000UL * 100001 / 2)
		__atomic_fetch_add(&ap_payload_done, 1, __ATOMIC_SEQ_CST);
	if (g_ap_tick)
		ap_tick_loop(idx);
	syscall3(SYS_EXIT_HALT, 0, 0, 0);
	for (;;) ;
}

static int overlaps(u64 a, u64 al, u64 b, u64 bl) { return a < b + bl && b < a + al; }

/* A free page below 1 MiB for the real-mode trampoline: RAM per the memmap and
 * clear of everything the VMM handed us. */
static u64 pick_trampoline(void)
{
	struct hvm_memmap_entry *mm = (void *)g_si->memmap_paddr;
	for (u64 p = TRAMP_DEFAULT; p < 0x9f000; p += 0x1000) {
		int ram = !g_si->memmap_paddr || g_si->memmap_entries == 0;
		for (u32 i = 0; i < g_si->memmap_entries; i++)
			if (mm[i].type == 1 && mm[i].addr <= p && p + 0x1000 <= mm[i].addr + mm[i].size)
				ram = 1;
		if (!ram) continue;
		if (overlaps(p, 0x1000, (u64)g_si, sizeof(*g_si))) continue;
		if (overlaps(p, 0x1000, g_si->memmap_paddr, g_si->memmap_entries * sizeof(*mm))) continue;
		if (overlaps(p, 0x1000, g_si->cmdline_paddr, 4096)) continue;
		if (overlaps(p, 0x1000, g_acpi.rsdp, 36)) continue;
		int bad = 0;
		for (int i = 0; i < g_acpi.ntables; i++)
			if (overlaps(p, 0x1000, g_acpi.tables[i], g_acpi.table_lens[i])) bad = 1;
		if (!bad) return p;
	}
	return 0;
}

static void lapic_w(u32 reg, u32 v) { syscall3(SYS_MMIO_W32, LAPIC_BASE + reg, v, 0); }
static u32 lapic_r(u32 reg) { return syscall3(SYS_MMIO_R32, LAPIC_BASE + reg, 0, 0); }

static void send_ipi(u32 apic, u32 low)
{
	lapic_w(0x310, apic << 24);
	lapic_w(0x300, low);
	for (int i = 0; i < 1000 && (lapic_r(0x300) & (1 << 12)); i++) /* delivery pending */
		udelay(10);
}

const char *test_smp(void)
{
	if (!g_acpi.ok)
		return "ACPI tables not found or invalid";
	u32 bsp = syscall3(SYS_APIC_ID, 0, 0, 0);
	if (ap_online)
		return "APs already started";
	s64 ta = 0;
	g_ap_tick = cmd_get_int("tick_aps", &ta) && ta;
	int naps = 0;
	for (int i = 0; i < g_acpi.ncpus; i++)
		if (g_acpi.apic_ids[i] != bsp) naps++;
	printf("smp: bsp apic_id %u, %d APs, tsc %lu kHz\n", bsp, naps, tsc_khz());
	if (!naps)
		return NULL;
	u64 tramp = pick_trampoline();
	if (!tramp)
		return "no free page below 1 MiB for the trampoline";
	u64 tl = tramp_end - tramp_start;
	memcpy((void *)tramp, tramp_start, tl);
	*(u32 *)(tramp + (tramp_far32 - tramp_start)) += tramp;
	printf("smp: trampoline at 0x%lx (%lu bytes)\n", tramp, tl);
	syscall3(SYS_LAPIC_ENABLE, 0, 0, 0);
	u32 vec = tramp >> 12;
	for (int i = 0; i < g_acpi.ncpus; i++) {
		u32 id = g_acpi.apic_ids[i];
		if (id == bsp) continue;
		if (id > 255) {
			printf("smp: apic id %u needs x2APIC, skipped\n", id);
			continue;
		}
		send_ipi(id, 0x0000c500); /* INIT, level assert */
		udelay(10000);
		send_ipi(id, 0x00000600 | vec); /* STARTUP */
		udelay(200);
		send_ipi(id, 0x00000600 | vec);
		udelay(200);
	}
	s64 tmo = 60;
	cmd_get_int("smp_timeout_s", &tmo);
	u64 start = rdtsc(), lim = (u64)tmo * tsc_khz() * 1000;
	while ((ap_online < (u32)naps || ap_payload_done < (u32)naps) && rdtsc() - start < lim)
		cpu_relax();
	u64 ms = (rdtsc() - start) / tsc_khz();
	printf("smp: %u/%d APs online, %u payloads done after ~%lu ms\n", ap_online, naps,
	       ap_payload_done, ms);
	if (ap_online != (u32)naps || ap_payload_done != (u32)naps)
		return fail_fmt("%u of %d APs online, %u payloads done", ap_online, naps, ap_payload_done);
	return NULL;
}

int smp_aps_online(void) { return ap_online; }
