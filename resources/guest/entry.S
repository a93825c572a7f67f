/* wisp test guest: PVH entry, long-mode switch, traps, AP trampoline. */
#include "guest.h"

/* ---------------- PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY) */
	.section .note.Xen, "a", @note
	.p2align 2
	.long 4			/* namesz */
	.long 8			/* descsz: 64-bit value, like Linux's note */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.quad pvh_start32

/* ---------------- 32-bit PVH entry: flat protected mode, paging off, %ebx = start_info */
	.section .text.boot, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl	%ebx, %edi
	lgdt	gdt_desc
	ljmp	$SEL_KCODE32, $1f
1:	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%cr4, %eax
	orl	$0x20, %eax		/* PAE */
	movl	%eax, %cr4
	movl	$pml4, %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx	/* EFER */
	rdmsr
	orl	$0x100, %eax		/* LME */
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax	/* PG | PE */
	andl	$0x9fffffff, %eax	/* caches on (CD=NW=0) */
	movl	%eax, %cr0
	ljmp	$SEL_KCODE, $bsp_long64

	.code64
bsp_long64:
	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	movl	%edi, %edi		/* zero-extend start_info */
	movq	$(kstacks + KSTACK_SIZE), %rsp
	xorl	%ebp, %ebp
	call	kmain
2:	cli
	hlt
	jmp	2b

/* APs arrive here in long mode from the trampoline */
	.globl ap_long64
ap_long64:
	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	movl	$1, %eax
	lock xaddl %eax, ap_next_idx
	cmpl	$MAX_CPUS, %eax
	jae	3f
	movl	%eax, %edi
	movq	%rdi, %rcx
	incq	%rcx
	shlq	$14, %rcx		/* KSTACK_SIZE */
	addq	$kstacks, %rcx
	movq	%rcx, %rsp
	xorl	%ebp, %ebp
	call	ap_main
3:	cli
	hlt
	jmp	3b

/* enter_user(rip, rsp, a0, a1): iretq to ring 3 */
	.globl enter_user
enter_user:
	pushq	$(SEL_UDATA | 3)
	pushq	%rsi
	pushq	$0x202
	pushq	$(SEL_UCODE | 3)
	pushq	%rdi
	movq	%rdx, %rdi
	movq	%rcx, %rsi
	movl	$(SEL_UDATA | 3), %eax
	movl	%eax, %ds
	movl	%eax, %es
	xorl	%eax, %eax
	xorl	%ebx, %ebx
	xorl	%ecx, %ecx
	xorl	%edx, %edx
	xorl	%ebp, %ebp
	iretq

/* ---------------- traps */
.macro TRAP vec, haserr
	.p2align 4
trap\vec:
	.if \haserr == 0
	pushq	$0
	.endif
	pushq	$\vec
	jmp	trap_common
.endm

	TRAP 0,0
	TRAP 1,0
	TRAP 2,0
	TRAP 3,0
	TRAP 4,0
	TRAP 5,0
	TRAP 6,0
	TRAP 7,0
	TRAP 8,1
	TRAP 9,0
	TRAP 10,1
	TRAP 11,1
	TRAP 12,1
	TRAP 13,1
	TRAP 14,1
	TRAP 15,0
	TRAP 16,0
	TRAP 17,1
	TRAP 18,0
	TRAP 19,0
	TRAP 20,0
	TRAP 21,1
	TRAP 22,0
	TRAP 23,0
	TRAP 24,0
	TRAP 25,0
	TRAP 26,0
	TRAP 27,0
	TRAP 28,0
	TRAP 29,1
	TRAP 30,1
	TRAP 31,0

trap_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	call	trap_handler
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp
	iretq

/* device interrupt: count it, ack the virtio-mmio InterruptStatus if one is
 * registered (so a level-triggered line drops), EOI the local APIC */
	.p2align 4
	.globl irq_device
irq_device:
	pushq	%rax
	pushq	%rcx
	lock incq irq_count
	movq	irq_virtio_base, %rcx
	testq	%rcx, %rcx
	jz	1f
	movl	0x60(%rcx), %eax
	orl	%eax, irq_virtio_status
	movl	%eax, 0x64(%rcx)
1:	movl	$0xfee000b0, %eax
	movl	$0, (%rax)
	popq	%rcx
	popq	%rax
	iretq

/* LAPIC timer: only wakes a CPU sitting in hlt (SYS_WAIT_IRQ timeouts) */
	.p2align 4
	.globl irq_timer
irq_timer:
	pushq	%rax
	movl	$0xfee000b0, %eax
	movl	$0, (%rax)
	popq	%rax
	iretq

	.p2align 4
	.globl irq_spurious
irq_spurious:
	iretq

	.section .rodata
	.p2align 3
	.globl trap_table
trap_table:
	.irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad trap\v
	.endr

/* ---------------- AP trampoline: copied to a page below 1 MiB, patched with its base */
	.section .data
	.p2align 4
	.globl tramp_start, tramp_end, tramp_far32
	.code16
tramp_start:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	(tramp_gdt - tramp_start)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	.byte	0x66, 0xea		/* ljmpl $SEL_KCODE32, $(base + tramp32 - tramp_start) */
tramp_far32:
	.long	tramp32 - tramp_start	/* base added at copy time */
	.word	SEL_KCODE32
	.code32
tramp32:
	movl	$SEL_KDATA, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	$pml4, %eax		/* same setup as enable_long_mode (no stack here) */
	movl	%cr4, %ecx
	orl	$0x20, %ecx
	movl	%ecx, %cr4
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax
	andl	$0x9fffffff, %eax
	movl	%eax, %cr0
	ljmp	$SEL_KCODE, $ap_long64
	.p2align 2
tramp_gdt:
	.word	gdt_end - gdt - 1
	.long	gdt
tramp_end:
	.code64

/* ---------------- GDT */
	.p2align 4
	.globl gdt, gdt_end, gdt_desc
gdt:
	.quad	0
	.quad	0x00af9a000000ffff	/* 0x08 kernel code 64 */
	.quad	0x00cf92000000ffff	/* 0x10 kernel data */
	.quad	0x00cf9a000000ffff	/* 0x18 kernel code 32 */
	.quad	0x00cff2000000ffff	/* 0x20 user data */
	.quad	0x00affa000000ffff	/* 0x28 user code 64 */
	.fill	MAX_CPUS * 2, 8, 0	/* 0x30: one 16-byte TSS descriptor per CPU */
gdt_end:
	.p2align 3
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt

/* ---------------- identity page tables: 4 GiB with 2 MiB pages, U/S=1 */
	.section .data.pagetables, "aw"
	.p2align 12
	.globl pml4
pml4:
	.quad	pdpt + 0x7
	.fill	511, 8, 0
pdpt:
	.quad	pd + 0x0000 + 0x7
	.quad	pd + 0x1000 + 0x7
	.quad	pd + 0x2000 + 0x7
	.quad	pd + 0x3000 + 0x7
	.fill	508, 8, 0
pd:
	.set	i, 0
	.rept	1536
	.quad	(i << 21) | 0x87	/* P RW US PS */
	.set	i, i + 1
	.endr
	.rept	512
	.quad	(i << 21) | 0x9f	/* P RW US PWT PCD PS: MMIO hole */
	.set	i, i + 1
	.endr
