/* wisp test guest: ring-0 part. Kept tiny: under PVM every ring-0
 * instruction is emulated (~1 us each). Setup, traps, syscalls only. */
#include "guest.h"

struct tss {
	u32 rsv0;
	u64 rsp0, rsp1, rsp2, rsv1;
	u64 ist[7];
	u64 rsv2;
	u16 rsv3, iomap_base;
	u8 iomap[0x400 / 8 + 1]; /* ports 0..0x3ff; bit set = denied */
} __attribute__((packed));

/* I/O bitmap: only the COM1 ports 0x3f8-0x3ff are open to ring 3. */
static struct tss tss[MAX_CPUS] __attribute__((aligned(16))) = {
	[0 ... MAX_CPUS - 1] = {
		.iomap_base = 104,
		.iomap = { [0 ... 126] = 0xff, [127] = 0x00, [128] = 0xff },
	},
};

struct idt_entry {
	u16 off0, sel;
	u8 ist, type;
	u16 off1;
	u32 off2, rsv;
} __attribute__((packed));

/* written in ring 0 before .bss is cleared: keep out of .bss */
static struct idt_entry idt[256] __attribute__((aligned(16), section(".data")));
static struct { u16 limit; u64 base; } __attribute__((packed)) idt_desc __attribute__((section(".data")));

u8 kstacks[MAX_CPUS][KSTACK_SIZE] __attribute__((aligned(4096), section(".bss.noinit")));
u8 ustacks[MAX_CPUS][USTACK_SIZE] __attribute__((aligned(4096), section(".bss.noinit")));
static u8 bsp_ustack[256 * 1024] __attribute__((aligned(4096), section(".bss.noinit")));
volatile u64 irq_count;
volatile u32 irq_virtio_status;
volatile u64 irq_virtio_base;
struct hvm_start_info *g_si;

extern u64 gdt[];
extern const u64 trap_table[32];
extern char irq_device[], irq_timer[], irq_spurious[];
void umain(struct hvm_start_info *si);
void user_ap_main(u64 idx, u64 apic_id);

struct frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vec, err, rip, cs, rflags, rsp, ss;
};

static void set_gate(int v, u64 h, int dpl)
{
	idt[v].off0 = h & 0xffff;
	idt[v].sel = SEL_KCODE;
	idt[v].ist = 0;
	idt[v].type = 0x8e | (dpl << 5); /* present, 64-bit interrupt gate */
	idt[v].off1 = (h >> 16) & 0xffff;
	idt[v].off2 = h >> 32;
}

static void cpu_tables(u64 idx)
{
	u64 base = (u64)&tss[idx], limit = sizeof(struct tss) - 1;
	u64 *d = &gdt[SEL_TSS0 / 8 + 2 * idx];
	tss[idx].rsp0 = (u64)&kstacks[idx + 1][0];
	d[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
	       (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	d[1] = base >> 32;
	asm volatile("lidt %0" :: "m"(idt_desc));
	asm volatile("ltr %w0" :: "r"((u16)(SEL_TSS0 + 16 * idx)));
}

void kmain(struct hvm_start_info *si)
{
	for (int v = 0; v < 32; v++)
		set_gate(v, trap_table[v], v == 3 ? 3 : 0);
	set_gate(VEC_DEVICE, (u64)irq_device, 0);
	set_gate(VEC_TIMER, (u64)irq_timer, 0);
	set_gate(VEC_SPURIOUS, (u64)irq_spurious, 0);
	idt_desc.limit = sizeof(idt) - 1;
	idt_desc.base = (u64)idt;
	cpu_tables(0);
	/* mask the legacy PICs; devices are routed through the IOAPIC */
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
	enter_user((u64)umain, (u64)bsp_ustack + sizeof(bsp_ustack) - 8, (u64)si, 0);
}

void ap_main(u64 idx)
{
	u32 a, b, c, d;
	cpu_tables(idx);
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
	enter_user((u64)user_ap_main, (u64)&ustacks[idx + 1][0] - 8, idx, b >> 24);
}

void hw_out(u16 port, int width, u32 v)
{
	if (cpl()) {
		syscall3(SYS_OUT, port, width, v);
		return;
	}
	if (width == 1) outb(port, v);
	else if (width == 2) outw(port, v);
	else outl(port, v);
}

u32 hw_in(u16 port, int width)
{
	if (cpl())
		return syscall3(SYS_IN, port, width, 0);
	if (width == 1) return inb(port);
	if (width == 2) return inw(port);
	return inl(port);
}

static u64 tsc_khz_cpuid(void)
{
	u32 a, b, c, d;
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000000), "c"(0));
	if (a >= 0x40000010 && (b == 0x4b4d564b || b == 0x61774d56)) { /* KVMKVMKVM / VMware leaf */
		u32 max = a;
		asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x40000010), "c"(0));
		if (max >= 0x40000010 && a)
			return a;
	}
	asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0), "c"(0));
	u32 maxl = a;
	if (maxl >= 0x15) {
		asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x15), "c"(0));
		if (a && b && c)
			return (u64)c * b / a / 1000;
	}
	if (maxl >= 0x16) {
		asm volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(0x16), "c"(0));
		if (a & 0xffff)
			return (u64)(a & 0xffff) * 1000;
	}
	return 0;
}

static u32 ioapic_rw(u64 base, u32 reg, u32 v, int wr)
{
	mmio_w32(base, reg);
	if (wr) mmio_w32(base + 0x10, v);
	return mmio_r32(base + 0x10);
}

/* Route a GSI to VEC_DEVICE on this CPU through the IOAPIC covering it. */
static long route_irq(u32 gsi, u64 vbase, u32 flags)
{
	for (int i = 0; i < g_acpi.nioapics; i++) {
		u64 b = g_acpi.ioapic_base[i];
		u32 first = g_acpi.ioapic_gsi_base[i];
		u32 n = ((ioapic_rw(b, 1, 0, 0) >> 16) & 0xff) + 1;
		if (gsi < first || gsi >= first + n)
			continue;
		u32 pin = gsi - first, apic;
		u32 a, bb, c, d;
		asm volatile("cpuid" : "=a"(a), "=b"(bb), "=c"(c), "=d"(d) : "a"(1), "c"(0));
		apic = bb >> 24;
		mmio_w32(LAPIC_BASE + 0xf0, 0x100 | VEC_SPURIOUS);
		if (!vbase && !(flags & 4)) {
			ioapic_rw(b, 0x10 + 2 * pin, 1 << 16, 1);
			irq_virtio_base = 0;
			return 0;
		}
		/* flags bit 2: a plain interrupt, no virtio InterruptStatus to ack */
		irq_virtio_base = (flags & 4) ? 0 : vbase;
		irq_virtio_status = 0;
		ioapic_rw(b, 0x11 + 2 * pin, apic << 24, 1);
		ioapic_rw(b, 0x10 + 2 * pin,
			  VEC_DEVICE | ((flags & 1) << 15) | ((flags & 2) ? 1 << 13 : 0), 1);
		return pin;
	}
	return -1;
}

static void syscall_dispatch(struct frame *f)
{
	u64 a = f->rdi, b = f->rsi, r = 0;
	switch (f->rax) {
	case SYS_EXIT_HALT:
		for (;;)
			asm volatile("cli; hlt");
	case SYS_OUT:
		hw_out(a, b, f->rdx);
		break;
	case SYS_IN:
		r = hw_in(a, b);
		break;
	case SYS_MMIO_W32:
		mmio_w32(a, b);
		break;
	case SYS_MMIO_R32:
		r = mmio_r32(a);
		break;
	case SYS_MMIO_W8:
		mmio_w8(a, b);
		break;
	case SYS_APIC_ID: {
		u32 ea, eb, ec, ed;
		asm volatile("cpuid" : "=a"(ea), "=b"(eb), "=c"(ec), "=d"(ed) : "a"(1), "c"(0));
		r = eb >> 24;
		break;
	}
	case SYS_LAPIC_ENABLE:
		mmio_w32(LAPIC_BASE + 0xf0, 0x100 | VEC_SPURIOUS);
		break;
	case SYS_WAIT_IRQ: {
		/* periodic LAPIC timer so hlt wakes up to check the timeout */
		u64 start = rdtsc();
		mmio_w32(LAPIC_BASE + 0xf0, 0x100 | VEC_SPURIOUS);
		mmio_w32(LAPIC_BASE + 0x3e0, 0xb);                /* divide by 1 */
		mmio_w32(LAPIC_BASE + 0x320, VEC_TIMER | (1 << 17)); /* periodic */
		mmio_w32(LAPIC_BASE + 0x380, 50000000);
		while (irq_count == a && rdtsc() - start < b)
			asm volatile("sti; hlt; cli" ::: "memory");
		mmio_w32(LAPIC_BASE + 0x380, 0);
		mmio_w32(LAPIC_BASE + 0x320, 1 << 16);             /* masked */
		r = irq_count;
		break;
	}
	case SYS_TSC_KHZ:
		r = tsc_khz_cpuid();
		break;
	case SYS_ROUTE_IRQ:
		r = route_irq(a, b, f->rdx);
		break;
	case SYS_NOP:
		break;
	default:
		r = -1;
	}
	f->rax = r;
}

static const char *const exc_names[32] = {
	"#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "?", "#TS", "#NP",
	"#SS", "#GP", "#PF", "?", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

void trap_handler(struct frame *f)
{
	if (f->vec == 3 && (f->cs & 3) == 3) {
		syscall_dispatch(f);
		return;
	}
	u64 cr2;
	asm volatile("mov %%cr2, %0" : "=r"(cr2));
	const char *n = exc_names[f->vec & 31] ? exc_names[f->vec & 31] : "?";
	printf("wisp-guest: exception %lu %s err 0x%lx rip 0x%lx cs 0x%lx rsp 0x%lx cr2 0x%lx\n",
	       f->vec, n, f->err, f->rip, f->cs, f->rsp, cr2);
	printf("FAIL exception: vector %lu (%s) at rip 0x%lx cr2 0x%lx err 0x%lx\n", f->vec, n,
	       f->rip, cr2, f->err);
	system_exit();
}
