/* wisp test guest: shared definitions. */
#ifndef GUEST_H
#define GUEST_H

#define MAX_CPUS      64
#define KSTACK_SIZE   16384
#define USTACK_SIZE   16384
#define SEL_KCODE     0x08
#define SEL_KDATA     0x10
#define SEL_KCODE32   0x18
#define SEL_UDATA     0x20
#define SEL_UCODE     0x28
#define SEL_TSS0      0x30
#define TRAMP_DEFAULT 0x8000
#define VEC_DEVICE    0x40
#define VEC_TIMER     0x41
#define VEC_SPURIOUS  0xff
#define LAPIC_BASE    0xfee00000UL

#ifndef __ASSEMBLY__
#include <stdarg.h>
#include <stddef.h>
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

/* ---- syscalls (int3 gate, rax = nr, rdi/rsi/rdx = args, rax = result) */
enum {
	SYS_EXIT_HALT = 1, /* cli; hlt forever */
	SYS_OUT,           /* port, width, value */
	SYS_IN,            /* port, width */
	SYS_MMIO_W32,      /* addr, value */
	SYS_MMIO_R32,      /* addr */
	SYS_MMIO_W8,       /* addr, value */
	SYS_APIC_ID,       /* -> local APIC id (cpuid in ring 0) */
	SYS_LAPIC_ENABLE,  /* enable the local APIC (SVR) */
	SYS_WAIT_IRQ,      /* old count, timeout cycles -> new count */
	SYS_TSC_KHZ,       /* -> TSC kHz from cpuid (0 if unknown) */
	SYS_ROUTE_IRQ,     /* gsi, virtio base (0 = unroute), flags: bit0 level, bit1 active low, bit2 plain (no virtio ack) */
	SYS_NOP,
};

static inline long syscall3(long nr, long a, long b, long c)
{
	long ret;
	asm volatile("int3" : "=a"(ret) : "a"(nr), "D"(a), "S"(b), "d"(c) : "memory");
	return ret;
}

static inline int cpl(void)
{
	u16 cs;
	asm volatile("mov %%cs, %0" : "=r"(cs));
	return cs & 3;
}

static inline u64 rdtsc(void)
{
	u32 lo, hi;
	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}

/* ring 3 only */
static inline void cpu_relax(void) { asm volatile("pause" ::: "memory"); }

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline u64 mmio_r64(u64 a) { return mmio_r32(a) | ((u64)mmio_r32(a + 4) << 32); }

/* privileged port I/O from either ring */
void hw_out(u16 port, int width, u32 v);
u32 hw_in(u16 port, int width);

/* ---- lib.c */
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strcpy(char *d, const char *s);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);
int snprintf(char *buf, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
void printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void puts_raw(const char *s);
u64 parse_u64(const char *s, const char **end);
const char *fail_fmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void spin_lock(volatile int *l);
void spin_unlock(volatile int *l);
u64 tsc_khz(void);
void udelay(u64 us);

/* ---- cmdline (main.c) */
extern char g_cmdline[];
const char *cmd_get(const char *key); /* value of key=..., or NULL; static buffer */
int cmd_get_int(const char *key, s64 *out);

/* ---- kernel.c (ring 0) */
struct hvm_start_info {
	u32 magic, version, flags, nr_modules;
	u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
	u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
	u64 addr, size;
	u32 type, reserved;
};
extern volatile u64 irq_count;
extern volatile u32 irq_virtio_status;
void enter_user(u64 rip, u64 rsp, u64 a0, u64 a1) __attribute__((noreturn));
void system_exit(void) __attribute__((noreturn));
extern u8 ustacks[MAX_CPUS][USTACK_SIZE];

/* ---- acpi.c */
struct acpi_info {
	int ok;
	u64 rsdp, fadt, dsdt, madt;
	int hw_reduced;
	int slp_typ; /* -1 unknown */
	u8 slp_space; u8 slp_width; u64 slp_addr; /* sleep control reg */
	u64 pm1a_cnt; u8 pm1a_space; int pm1a_width;
	int ncpus;
	u32 apic_ids[MAX_CPUS];
	int nioapics;
	u64 ioapic_base[4];
	u32 ioapic_gsi_base[4];
	u64 lapic_base;
	u64 tables[32]; u32 table_lens[32]; int ntables;
};
extern struct acpi_info g_acpi;
const char *acpi_init(u64 rsdp_hint);
u64 tsc_calibrate_pit(void);
void acpi_poweroff(void);

/* ---- tests */
const char *test_cmdline(void);
const char *test_e820(void);
const char *test_madt(void);
const char *test_smp(void);
const char *test_blk_read(void);
const char *test_blk_write(void);
const char *test_blk_ro(void);
const char *test_blk_id(void);
const char *test_blk_two(void);
const char *test_blk_irq(void);
const char *test_acpi_power_button(void);
const char *test_ctrl_alt_del(void);
const char *test_blk_bench(void);
const char *test_tick(void);
const char *test_blk_write_tick(void);
const char *test_net_arp_icmp(void);
const char *test_net_tx_burst(void);
const char *test_net_rx(void);
extern struct hvm_start_info *g_si;

/* ---- smp */
void ap_main(u64 idx);
extern volatile u32 ap_next_idx;
extern volatile int g_ap_tick;
void ap_tick_loop(u64 idx) __attribute__((noreturn));
int smp_aps_online(void);
#endif
#endif
