/* wisp test guest: ACPI table discovery (ring 3), MADT, FADT, \_S5 power off. */
#include "guest.h"

struct acpi_info g_acpi;

static u8 sum8(const void *p, u32 n)
{
	const u8 *b = p;
	u8 s = 0;
	for (u32 i = 0; i < n; i++) s += b[i];
	return s;
}

static u32 rd32(u64 a) { return *(const u32 *)a; }
static u64 rd64(u64 a) { return *(const u64 *)a; }

static u64 find_rsdp(u64 hint)
{
	if (hint && !memcmp((void *)hint, "RSD PTR ", 8))
		return hint;
	for (u64 a = 0xe0000; a < 0x100000; a += 16)
		if (!memcmp((void *)a, "RSD PTR ", 8) && sum8((void *)a, 20) == 0)
			return a;
	return 0;
}

/* checks signature, sane length, checksum; records the table */
static const char *check_table(u64 a, const char *sig)
{
	if (!a || a >= 0x100000000UL)
		return fail_fmt("%s at bad address 0x%lx", sig, a);
	if (memcmp((void *)a, sig, 4))
		return fail_fmt("%s: bad signature at 0x%lx", sig, a);
	u32 len = rd32(a + 4);
	if (len < 36 || len > 0x1000000)
		return fail_fmt("%s: bad length %u", sig, len);
	if (sum8((void *)a, len))
		return fail_fmt("%s: bad checksum", sig);
	if (g_acpi.ntables < 32) {
		g_acpi.tables[g_acpi.ntables] = a;
		g_acpi.table_lens[g_acpi.ntables++] = len;
	}
	printf("acpi: %.4s at 0x%lx len %u rev %u oem %.6s\n", sig, a, len, *(u8 *)(a + 8),
	       (char *)(a + 10));
	return NULL;
}

/* \_S5 package: first element is SLP_TYPa */
static int find_s5(u64 dsdt, u32 len)
{
	const u8 *p = (const u8 *)dsdt;
	for (u32 i = 36; i + 8 < len; i++) {
		if (memcmp(p + i, "_S5_", 4))
			continue;
		u32 j = i + 4;
		if (p[j] != 0x12) /* PackageOp */
			continue;
		j++;
		j += 1 + (p[j] >> 6); /* PkgLength */
		j++;                  /* NumElements */
		u8 op = p[j];
		if (op == 0x0a) return p[j + 1]; /* BytePrefix */
		if (op == 0x00) return 0;        /* ZeroOp */
		if (op == 0x01) return 1;        /* OneOp */
		if (op == 0x0b) return p[j + 1] | (p[j + 2] << 8);
		return op;
	}
	return -1;
}

static void parse_madt(u64 a, u32 len)
{
	g_acpi.lapic_base = rd32(a + 36);
	for (u32 o = 44; o + 2 <= len;) {
		u8 type = *(u8 *)(a + o), l = *(u8 *)(a + o + 1);
		if (l < 2) break;
		if (type == 0 && (*(u8 *)(a + o + 4) & 1) && g_acpi.ncpus < MAX_CPUS)
			g_acpi.apic_ids[g_acpi.ncpus++] = *(u8 *)(a + o + 3);
		else if (type == 9 && (rd32(a + o + 8) & 1) && g_acpi.ncpus < MAX_CPUS)
			g_acpi.apic_ids[g_acpi.ncpus++] = rd32(a + o + 4);
		else if (type == 1 && g_acpi.nioapics < 4) {
			g_acpi.ioapic_base[g_acpi.nioapics] = rd32(a + o + 4);
			g_acpi.ioapic_gsi_base[g_acpi.nioapics++] = rd32(a + o + 8);
		}
		o += l;
	}
}

const char *acpi_init(u64 hint)
{
	const char *e;
	g_acpi.slp_typ = -1;
	/* defaults used when there is no MADT */
	g_acpi.nioapics = 1;
	g_acpi.ioapic_base[0] = 0xfec00000;
	g_acpi.ioapic_gsi_base[0] = 0;
	u64 rsdp = find_rsdp(hint);
	if (!rsdp)
		return "no RSDP";
	g_acpi.rsdp = rsdp;
	u8 rev = *(u8 *)(rsdp + 15);
	if (sum8((void *)rsdp, 20))
		return "RSDP checksum";
	u64 root = 0;
	int entsz = 4;
	if (rev >= 2) {
		u32 l = rd32(rsdp + 20);
		if (l < 36 || sum8((void *)rsdp, l))
			return "RSDP extended checksum";
		root = rd64(rsdp + 24);
		entsz = 8;
	}
	printf("acpi: RSDP at 0x%lx rev %u\n", rsdp, rev);
	if (root) {
		if ((e = check_table(root, "XSDT"))) return e;
	} else {
		root = rd32(rsdp + 16);
		if ((e = check_table(root, "RSDT"))) return e;
	}
	u32 rlen = rd32(root + 4);
	for (u32 o = 36; o + entsz <= rlen; o += entsz) {
		u64 t = entsz == 8 ? rd64(root + o) : rd32(root + o);
		if (t >= 0x100000000UL) continue;
		if (!memcmp((void *)t, "FACP", 4)) {
			if ((e = check_table(t, "FACP"))) return e;
			g_acpi.fadt = t;
		} else if (!memcmp((void *)t, "APIC", 4)) {
			if ((e = check_table(t, "APIC"))) return e;
			g_acpi.madt = t;
		} else {
			char sig[5] = { 0 };
			memcpy(sig, (void *)t, 4);
			if ((e = check_table(t, sig))) return e;
		}
	}
	if (!g_acpi.fadt) return "no FADT";
	if (!g_acpi.madt) return "no MADT";
	u64 f = g_acpi.fadt;
	u32 flen = rd32(f + 4);
	u64 dsdt = 0;
	if (flen >= 148) dsdt = rd64(f + 140);
	if (!dsdt) dsdt = rd32(f + 40);
	if ((e = check_table(dsdt, "DSDT"))) return e;
	g_acpi.dsdt = dsdt;
	g_acpi.hw_reduced = flen >= 116 && (rd32(f + 112) & (1 << 20));
	if (flen >= 256) {
		g_acpi.slp_space = *(u8 *)(f + 244);
		g_acpi.slp_width = *(u8 *)(f + 245);
		g_acpi.slp_addr = rd64(f + 248);
	}
	g_acpi.pm1a_cnt = rd32(f + 64);
	g_acpi.pm1a_space = 1;
	g_acpi.pm1a_width = 2;
	if (flen >= 184 && rd64(f + 176)) {
		g_acpi.pm1a_space = *(u8 *)(f + 172);
		g_acpi.pm1a_cnt = rd64(f + 176);
	}
	g_acpi.slp_typ = find_s5(dsdt, rd32(dsdt + 4));
	printf("acpi: FADT hw_reduced=%d sleep_ctl space %u addr 0x%lx pm1a_cnt space %u addr 0x%lx _S5 %d\n",
	       g_acpi.hw_reduced, g_acpi.slp_space, g_acpi.slp_addr, g_acpi.pm1a_space,
	       g_acpi.pm1a_cnt, g_acpi.slp_typ);
	g_acpi.nioapics = 0;
	parse_madt(g_acpi.madt, rd32(g_acpi.madt + 4));
	if (!g_acpi.nioapics) {
		g_acpi.nioapics = 1;
		g_acpi.ioapic_base[0] = 0xfec00000;
	}
	g_acpi.ok = 1;
	return NULL;
}

static void gas_write(u8 space, u64 addr, int width, u32 v)
{
	if (space == 1) {
		hw_out(addr, width, v);
	} else if (space == 0) {
		if (width == 1) {
			if (cpl()) syscall3(SYS_MMIO_W8, addr, v, 0);
			else mmio_w8(addr, v);
		} else {
			if (cpl()) syscall3(SYS_MMIO_W32, addr, v, 0);
			else mmio_w32(addr, v);
		}
	}
}

void acpi_poweroff(void)
{
	if (!g_acpi.ok)
		return;
	int typ = g_acpi.slp_typ >= 0 ? g_acpi.slp_typ : 5;
	if (g_acpi.hw_reduced || (g_acpi.slp_addr && !g_acpi.pm1a_cnt)) {
		if (g_acpi.slp_addr)
			gas_write(g_acpi.slp_space, g_acpi.slp_addr, 1, ((typ & 7) << 2) | (1 << 5));
	} else if (g_acpi.pm1a_cnt) {
		gas_write(g_acpi.pm1a_space, g_acpi.pm1a_cnt, 2, ((typ & 7) << 10) | (1 << 13));
	}
}

/* TSC frequency against the PIT: channel 0 as a free-running 16-bit down
 * counter (mode 2, reload 65536), read back with latch commands. The counter
 * ticks at 1.193182 MHz; 11932 ticks is 10 ms. Returns 0 if no PIT answers. */
static u32 pit_read0(void)
{
	hw_out(0x43, 1, 0x00); /* latch channel 0 */
	u32 lo = hw_in(0x40, 1);
	return lo | (hw_in(0x40, 1) << 8);
}

u64 tsc_calibrate_pit(void)
{
	hw_out(0x43, 1, 0x34); /* ch0, lo/hi, mode 2, binary */
	hw_out(0x40, 1, 0);
	hw_out(0x40, 1, 0);
	u32 prev = pit_read0(), ticks = 0, still = 0;
	u64 t0 = rdtsc();
	while (ticks < 11932) {
		u32 c = pit_read0();
		if (c == prev) {
			if (++still > 200) return 0; /* frozen: no PIT */
			continue;
		}
		still = 0;
		ticks += (prev - c) & 0xffff;
		prev = c;
	}
	u64 t1 = rdtsc();
	hw_out(0x43, 1, 0x30); /* ch0 back to mode 0 (one-shot, idle) */
	hw_out(0x40, 1, 0);
	hw_out(0x40, 1, 0);
	return (t1 - t0) * 1193182 / ((u64)ticks * 1000);
}
