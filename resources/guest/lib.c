/* wisp test guest: freestanding helpers (both rings). */
#include "guest.h"

void *memcpy(void *d, const void *s, size_t n)
{
	asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
	return d;
}

void *memset(void *d, int c, size_t n)
{
	void *r = d;
	asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return r;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *dd = d;
	const u8 *ss = s;
	if (dd < ss) {
		for (size_t i = 0; i < n; i++) dd[i] = ss[i];
	} else {
		for (size_t i = n; i > 0; i--) dd[i - 1] = ss[i - 1];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] - y[i];
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n]) n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) a++, b++;
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		if (a[i] != b[i] || !a[i])
			return (u8)a[i] - (u8)b[i];
	}
	return 0;
}

char *strcpy(char *d, const char *s)
{
	char *r = d;
	while ((*d++ = *s++)) ;
	return r;
}

u64 parse_u64(const char *s, const char **end)
{
	u64 v = 0;
	int base = 10;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (;; s++) {
		int d;
		if (*s >= '0' && *s <= '9') d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f') d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F') d = *s - 'A' + 10;
		else break;
		v = v * base + d;
	}
	if (end) *end = s;
	return v;
}

struct outbuf { char *p; size_t n, len; };

static void ob_put(struct outbuf *o, char c)
{
	if (o->len + 1 < o->n) o->p[o->len] = c;
	o->len++;
}

int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap)
{
	struct outbuf o = { buf, n, 0 };
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			ob_put(&o, *fmt);
			continue;
		}
		fmt++;
		int zero = 0, width = 0, lng = 0;
		if (*fmt == '0') zero = 1, fmt++;
		while (*fmt >= '0' && *fmt <= '9') width = width * 10 + (*fmt++ - '0');
		int prec = -1;
		if (*fmt == '.') {
			fmt++;
			prec = 0;
			while (*fmt >= '0' && *fmt <= '9') prec = prec * 10 + (*fmt++ - '0');
		}
		while (*fmt == 'l' || *fmt == 'z') lng = 1, fmt++;
		char tmp[24];
		int tl = 0, neg = 0;
		u64 v;
		switch (*fmt) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			if (!s) s = "(null)";
			int l = 0;
			while (s[l] && (prec < 0 || l < prec)) l++;
			for (; width > l; width--) ob_put(&o, ' ');
			for (int i = 0; i < l; i++) ob_put(&o, s[i]);
			continue;
		}
		case 'c':
			ob_put(&o, (char)va_arg(ap, int));
			continue;
		case '%':
			ob_put(&o, '%');
			continue;
		case 'd': case 'i': {
			s64 sv = lng ? va_arg(ap, s64) : va_arg(ap, int);
			if (sv < 0) neg = 1, v = -(u64)sv;
			else v = sv;
			do tmp[tl++] = '0' + v % 10; while (v /= 10);
			break;
		}
		case 'u':
			v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
			do tmp[tl++] = '0' + v % 10; while (v /= 10);
			break;
		case 'p':
			lng = 1;
			ob_put(&o, '0'); ob_put(&o, 'x');
			/* fallthrough */
		case 'x':
			v = lng ? va_arg(ap, u64) : va_arg(ap, unsigned);
			do tmp[tl++] = "0123456789abcdef"[v & 15]; while (v >>= 4);
			break;
		default:
			ob_put(&o, '%');
			ob_put(&o, *fmt);
			continue;
		}
		if (neg) {
			if (zero) { ob_put(&o, '-'); width--; }
			else tmp[tl++] = '-';
		}
		for (; width > tl; width--) ob_put(&o, zero ? '0' : ' ');
		while (tl) ob_put(&o, tmp[--tl]);
	}
	if (n) buf[o.len < n ? o.len : n - 1] = 0;
	return o.len;
}

int snprintf(char *buf, size_t n, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int r = vsnprintf(buf, n, fmt, ap);
	va_end(ap);
	return r;
}

static volatile int print_lock;

void spin_lock(volatile int *l)
{
	int user = cpl() != 0;
	/* Bounded by time, not iterations: a holder may be descheduled by a busy
	 * host for many ms, but a CPU that died holding the lock must not wedge the
	 * exception path forever. ~2 s at up to 4 GHz; rdtsc is fine in ring 0. */
	u64 start = rdtsc(), max = 8000000000UL;
	while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) {
		if (rdtsc() - start > max) return;
		if (user) cpu_relax(); /* no pause in ring 0: keep to known-emulated insns */
	}
}

void spin_unlock(volatile int *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/* COM1 is open to ring 3 through the TSS I/O bitmap, so this works in both rings. */
void puts_raw(const char *s)
{
	spin_lock(&print_lock);
	for (; *s; s++) {
		if (*s == '\n') outb(0x3f8, '\r');
		outb(0x3f8, *s);
	}
	spin_unlock(&print_lock);
}

void printf(const char *fmt, ...)
{
	char buf[512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	puts_raw(buf);
}

const char *fail_fmt(const char *fmt, ...)
{
	static char buf[256];
	char tmp[256]; /* arguments may point into buf */
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(tmp, sizeof(tmp), fmt, ap);
	va_end(ap);
	strcpy(buf, tmp);
	return buf;
}

static u64 g_tsc_khz;

u64 tsc_khz(void)
{
	if (!g_tsc_khz) {
		s64 v;
		if (cmd_get_int("tsc_khz", &v) && v > 0) g_tsc_khz = v;
		else g_tsc_khz = syscall3(SYS_TSC_KHZ, 0, 0, 0);
		if (!g_tsc_khz) {
			g_tsc_khz = tsc_calibrate_pit();
			if (g_tsc_khz) printf("tsc: %lu kHz (PIT calibration)\n", g_tsc_khz);
		}
		if (!g_tsc_khz) {
			g_tsc_khz = 3000000; /* assumed 3 GHz */
			printf("tsc: frequency unknown, assuming %lu kHz\n", g_tsc_khz);
		}
	}
	return g_tsc_khz;
}

void udelay(u64 us)
{
	u64 start = rdtsc(), cyc = us * tsc_khz() / 1000;
	while (rdtsc() - start < cyc)
		cpu_relax();
}
