/* wisp test guest: the ACPI power button of a hardware-reduced platform.
 * Finds the Generic Event Device (_HID "ACPI0013") in the DSDT, its interrupt
 * (the _CRS Extended Interrupt descriptor) and its event register (the
 * SystemIO OperationRegion its _EVT method reads), waits for the interrupt,
 * and checks the register reports the power button (bit 0), as an OS's _EVT
 * would. The harness then powers off through the sleep register. */
#include "guest.h"

static int aml_int(const u8 *p, const u8 *end, u64 *v)
{
	if (p >= end) return -1;
	switch (p[0]) {
	case 0x00: *v = 0; return 1;
	case 0x01: *v = 1; return 1;
	case 0x0a: if (p + 2 > end) return -1; *v = p[1]; return 2;
	case 0x0b: if (p + 3 > end) return -1; *v = p[1] | (p[2] << 8); return 3;
	case 0x0c:
		if (p + 5 > end) return -1;
		*v = p[1] | (p[2] << 8) | ((u64)p[3] << 16) | ((u64)p[4] << 24);
		return 5;
	}
	return -1;
}

const char *test_acpi_power_button(void)
{
	if (!g_acpi.dsdt) return "no DSDT";
	const u8 *d = (const u8 *)g_acpi.dsdt;
	u32 len = *(const u32 *)(d + 4);
	const u8 *end = d + len, *ged = 0;
	for (const u8 *p = d + 36; p + 8 <= end; p++)
		if (!memcmp(p, "ACPI0013", 8)) { ged = p; break; }
	if (!ged) return "no Generic Event Device (ACPI0013) in the DSDT";
	/* The next Extended Interrupt descriptor is the GED's _CRS. */
	u32 gsi = 0, flags = 0; int found = 0;
	for (const u8 *p = ged; p + 9 <= end && p < ged + 256; p++)
		if (p[0] == 0x89 && p[1] == 6 && p[2] == 0 && p[4] == 1) {
			flags = p[3];
			gsi = p[5] | (p[6] << 8) | ((u32)p[7] << 16) | ((u32)p[8] << 24);
			found = 1;
			break;
		}
	if (!found) return "no interrupt in the GED's _CRS";
	/* OperationRegion (name, SystemIO, offset, length): 5B 80 NameSeg 01 ... */
	u64 port = 0, rlen = 0; found = 0;
	for (const u8 *p = ged; p + 8 <= end && p < ged + 512; p++)
		if (p[0] == 0x5b && p[1] == 0x80 && p[6] == 0x01) {
			int n = aml_int(p + 7, end, &port);
			if (n > 0 && aml_int(p + 7 + n, end, &rlen) > 0) found = 1;
			break;
		}
	if (!found || port > 0xffff) return "no SystemIO event register for the GED";
	u32 fl = ((flags & 2) ? 0 : 1) | ((flags & 4) ? 2 : 0) | 4;
	long pin = syscall3(SYS_ROUTE_IRQ, gsi, 0, fl);
	if (pin < 0) return fail_fmt("no IOAPIC covers gsi %u", gsi);
	s64 secs = 60;
	cmd_get_int("power_timeout_s", &secs);
	/* Everything that takes time (the TSC calibration) happens before the
	 * host is told to press the button. */
	u64 lim = (u64)secs * 1000 * tsc_khz();
	u64 before = irq_count;
	printf("acpi_power_button: waiting for the power button (GED gsi %u, register port 0x%lx)\n",
	       gsi, port);
	u64 after = syscall3(SYS_WAIT_IRQ, before, lim, 0);
	syscall3(SYS_ROUTE_IRQ, gsi, 0, 0);
	if (after == before) return fail_fmt("no GED interrupt within %ld s", secs);
	long ev = syscall3(SYS_IN, port, 1, 0);
	printf("acpi_power_button: interrupt, event register 0x%lx\n", ev);
	if (!(ev & 1)) return fail_fmt("event register 0x%lx lacks the power-button bit", ev);
	return NULL;
}

/* Ctrl-Alt-Del from the VMM (SendCtrlAltDel): the i8042 raises ISA IRQ 1 and
 * the scancode set 2 make/break sequence for Ctrl, Alt, Del is read from the
 * data port while the status register says the output buffer is full. */
const char *test_ctrl_alt_del(void)
{
	static const u8 want[] = { 0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x14, 0xf0 };
	u8 got[sizeof(want)];
	u32 n = 0;
	long pin = syscall3(SYS_ROUTE_IRQ, 1, 0, 4); /* ISA IRQ 1: edge, active high */
	if (pin < 0) return "no IOAPIC covers IRQ 1";
	s64 secs = 60;
	cmd_get_int("power_timeout_s", &secs);
	u64 lim = (u64)secs * 1000 * tsc_khz(), t0 = rdtsc();
	printf("ctrl_alt_del: waiting for the keyboard\n");
	while (n < sizeof(want) && rdtsc() - t0 < lim) {
		u64 before = irq_count;
		if (!(syscall3(SYS_IN, 0x64, 1, 0) & 1)) {
			syscall3(SYS_WAIT_IRQ, before, lim, 0);
			continue;
		}
		got[n++] = (u8)syscall3(SYS_IN, 0x60, 1, 0);
	}
	syscall3(SYS_ROUTE_IRQ, 1, 0, 0);
	if (n < sizeof(want)) return fail_fmt("got %u of %u scancodes", n, (u32)sizeof(want));
	for (u32 i = 0; i < n; i++)
		if (got[i] != want[i])
			return fail_fmt("scancode %u is 0x%02x, want 0x%02x", i, got[i], want[i]);
	printf("ctrl_alt_del: received Ctrl-Alt-Del\n");
	return NULL;
}
