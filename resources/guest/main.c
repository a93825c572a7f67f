/* wisp test guest: ring-3 harness. */
#include "guest.h"

char g_cmdline[4096];
static int n_pass, n_fail;

const char *cmd_get(const char *key)
{
	static char val[1024];
	size_t kl = strlen(key);
	const char *p = g_cmdline;
	while (*p) {
		while (*p == ' ') p++;
		const char *tok = p;
		while (*p && *p != ' ') p++;
		if ((size_t)(p - tok) > kl && !strncmp(tok, key, kl) && tok[kl] == '=') {
			size_t vl = p - tok - kl - 1;
			if (vl >= sizeof(val)) vl = sizeof(val) - 1;
			memcpy(val, tok + kl + 1, vl);
			val[vl] = 0;
			return val;
		}
	}
	return NULL;
}

int cmd_get_int(const char *key, s64 *out)
{
	const char *v = cmd_get(key);
	if (!v || !*v) return 0;
	int neg = *v == '-';
	s64 r = parse_u64(v + neg, NULL);
	*out = neg ? -r : r;
	return 1;
}

const char *test_cmdline(void)
{
	if (!g_si->cmdline_paddr)
		return "no cmdline in start_info";
	int n = 0;
	const char *p = g_cmdline;
	while (*p) {
		while (*p == ' ') p++;
		if (!*p) break;
		n++;
		while (*p && *p != ' ') p++;
	}
	printf("cmdline: %d words: %s\n", n, g_cmdline);
	return NULL;
}

const char *test_e820(void)
{
	if (g_si->version < 1 || !g_si->memmap_paddr || !g_si->memmap_entries)
		return fail_fmt("no memmap in start_info (version %u)", g_si->version);
	struct hvm_memmap_entry *mm = (void *)g_si->memmap_paddr;
	u64 ram = 0;
	for (u32 i = 0; i < g_si->memmap_entries; i++) {
		printf("e820: [0x%016lx-0x%016lx] type %u\n", mm[i].addr, mm[i].addr + mm[i].size - 1,
		       mm[i].type);
		if (mm[i].type == 1) ram += mm[i].size;
	}
	printf("e820: %u entries, RAM %lu bytes (%lu KiB)\n", g_si->memmap_entries, ram, ram >> 10);
	s64 want;
	if (cmd_get_int("expect_mem_mib", &want)) {
		u64 hi = (u64)want << 20, lo = hi > (2UL << 20) ? hi - (2UL << 20) : 0;
		if (ram < lo || ram > hi)
			return fail_fmt("RAM %lu KiB not within [%lu, %lu] KiB", ram >> 10, lo >> 10, hi >> 10);
	}
	return NULL;
}

/* exception path self-test: #UD in ring 3 must print FAIL exception and power off */
static const char *test_fault(void)
{
	asm volatile("ud2");
	return "survived ud2";
}

/* SYS_WAIT_IRQ must return on its timeout when no interrupt comes */
static const char *test_irq_timeout(void)
{
	u64 c = irq_count, t0 = rdtsc(), lim = tsc_khz() * 200; /* 200 ms */
	u64 r = syscall3(SYS_WAIT_IRQ, c, lim, 0);
	u64 ms = (rdtsc() - t0) / tsc_khz();
	printf("irq_timeout: returned after %lu ms, irq count %lu -> %lu\n", ms, c, r);
	return ms >= 150 ? NULL : "returned too early";
}

static const struct { const char *name; const char *(*fn)(void); } tests[] = {
	{ "cmdline", test_cmdline }, { "e820", test_e820 },       { "madt", test_madt },
	{ "smp", test_smp },         { "blk_read", test_blk_read }, { "blk_write", test_blk_write },
	{ "blk_ro", test_blk_ro },   { "blk_id", test_blk_id },   { "blk_two", test_blk_two },
	{ "blk_irq", test_blk_irq }, { "acpi_power_button", test_acpi_power_button }, { "ctrl_alt_del", test_ctrl_alt_del }, { "blk_bench", test_blk_bench }, { "fault", test_fault },
	{ "irq_timeout", test_irq_timeout }, { "tick", test_tick },
	{ "blk_write_tick", test_blk_write_tick }, { "net_arp_icmp", test_net_arp_icmp },
	{ "net_tx_burst", test_net_tx_burst }, { "net_rx", test_net_rx },
};

static void run_test(const char *name)
{
	if (!strcmp(name, "boot")) { /* group alias */
		run_test("cmdline");
		run_test("e820");
		run_test("madt");
		run_test("smp");
		return;
	}
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		if (strcmp(tests[i].name, name))
			continue;
		const char *why = tests[i].fn();
		if (why) {
			printf("FAIL %s: %s\n", name, why);
			n_fail++;
		} else {
			printf("PASS %s\n", name);
			n_pass++;
		}
		return;
	}
	printf("FAIL %s: unknown test\n", name);
	n_fail++;
}

void system_exit(void)
{
	const char *how = cmd_get("exit");
	if (how && !strcmp(how, "halt")) {
		printf("wisp-guest: halting\n");
	} else if (how && !strcmp(how, "reboot")) {
		printf("wisp-guest: rebooting\n");
		hw_out(0x64, 1, 0xfe);
	} else {
		printf("wisp-guest: powering off\n");
		acpi_poweroff();
		/* the VMM may act on the request asynchronously: give it a moment */
		for (u64 t0 = rdtsc(); rdtsc() - t0 < 2000000000UL;)
			asm volatile("" ::: "memory"); /* may run in ring 0: no pause */
		printf("wisp-guest: poweroff failed\n");
	}
	if (cpl())
		syscall3(SYS_EXIT_HALT, 0, 0, 0);
	for (;;)
		asm volatile("cli; hlt");
}

extern char __bss_start[], __bss_end[];

void umain(struct hvm_start_info *si)
{
	/* ring 3 runs natively: clear .bss here rather than in (emulated) ring 0 */
	memset(__bss_start, 0, __bss_end - __bss_start);
	g_si = si;
	puts_raw("wisp-guest: booting\n");
	if (!si || si->magic != 0x336ec578) {
		printf("wisp-guest: bad start_info %p\n", si);
		printf("FAIL boot: bad hvm_start_info magic\n");
		system_exit();
	}
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;
		size_t i = 0;
		for (; c[i] && i < sizeof(g_cmdline) - 1; i++) g_cmdline[i] = c[i];
		g_cmdline[i] = 0;
	}
	printf("wisp-guest: cmdline: %s\n", g_cmdline);
	printf("wisp-guest: start_info v%u at %p rsdp 0x%lx memmap 0x%lx/%u\n", si->version, si,
	       si->rsdp_paddr, si->memmap_paddr, si->memmap_entries);
	const char *e = acpi_init(si->rsdp_paddr);
	if (e)
		printf("wisp-guest: acpi: %s\n", e);

	const char *t = cmd_get("tests");
	char list[1024];
	strcpy(list, t ? t : "cmdline,e820,madt,smp");
	char *p = list;
	while (*p) {
		char *n = p;
		while (*p && *p != ',') p++;
		if (*p) *p++ = 0;
		if (*n) run_test(n);
	}
	printf("wisp-guest: %d passed, %d failed\n", n_pass, n_fail);
	system_exit();
}
