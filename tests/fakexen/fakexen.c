/*
 * fakexen.c - an LD_PRELOAD stand-in for libxenctrl/libxenguest 4.17.
 *
 * There is no hypervisor on the machines that run xcsave's tests, yet the
 * tests must drive real helper binaries: Debian's stock libxl-save-helper
 * and xcsave's own helper, both linked against libxenctrl/libxenguest.
 * Preloading this library replaces the calls those helpers make: the
 * interface (xc_interface_open/close), xc_domain_save and
 * xc_domain_restore over a simulation of a small x86 HVM guest, and the
 * smaller ones around them (domain info, cpupools, the credit2 cap, the
 * hypercall buffers, shadow/log-dirty control), so the helpers run their
 * genuine protocol code above it.
 *
 * What the simulation keeps faithful to libxc 4.17 (see
 * shared/specs/xen-migration-facts.md sections 1.7, 1.8, 3.1 and 5):
 *   - the order of callbacks, progress reports and records on save;
 *   - the libxc migration stream v3 (or v2) byte format, which Xen's own
 *     verify-stream-v2 accepts;
 *   - the default precopy policy and the precopy_policy callback protocol;
 *   - restore reads the stream record by record and never past END,
 *     because the stream fd is shared with the parent;
 *   - errors are logged through the caller's xentoollog logger the way
 *     libxc's ERROR()/PERROR() do, and reported as -1 with errno set.
 *
 * It is test scaffolding: written from the public facts, not from Xen's
 * sources.  The env knobs are described in README.md next to this file.
 */

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/*
 * Xen's public headers refuse strict ISO C: hvm/save.h has an #error and
 * foreign/x86_64.h expands __align8__ to FIXME when __STRICT_ANSI__ is
 * defined, which -std=c11 does.  They are fine with GCC's C11 otherwise
 * (anonymous unions are C11, the attribute is GCC's), so drop the flag for
 * them only; every libc header above was already read in strict mode.
 */
#undef __STRICT_ANSI__
#include <xenctrl.h>
#include <xenguest.h>
#include <xentoollog.h>

#include "../../csrc/core/codec.h" /* constants and byte order only: not linked with codec.c */

/*----- constants of the simulated guest -----*/

#define FX_DEFAULT_PAGES 256UL
#define FX_MAX_PAGES (1UL << 20)    /* save-side guest size cap: 4 GiB */
#define FX_MAX_PFN (1UL << 20)      /* restore rejects pfns at or above */
#define FX_DEFAULT_DIRTY 100U
#define FX_MAX_DIRTY_STEPS 32
#define FX_MAX_PRECOPY_ITERS 10000U /* guard against a never-stopping policy */
#define FX_HVM_CTX_LEN 100U          /* odd on purpose: exercises padding */
#define FX_XEN_MAJOR 4U
#define FX_XEN_MINOR 17U
#define FX_PROGRESS_STEP 1024UL /* libxc reports every 4 MiB of pages */

/* Special pfns of an HVM guest: 0xff000 - 8 + index, as Xen lays them out. */
#define FX_SPECIAL_PFN(i) (0xff000UL - 8UL + (i))
#define FX_STORE_PFN FX_SPECIAL_PFN(4)
#define FX_CONSOLE_PFN FX_SPECIAL_PFN(7)

/* FNV-1a 64: the digest written to FAKEXEN_{SAVE,RESTORE}_DIGEST. */
#define FX_FNV_OFFSET 0xcbf29ce484222325ULL
#define FX_FNV_PRIME 0x100000001b3ULL

/*----- the handle -----*/

/*
 * xc_interface is an opaque struct in xenctrl.h, so we may define it.  The
 * helpers only pass it back to us.  The configuration is read from the
 * environment once, at open time, so that a misspelt knob fails loudly at
 * the start rather than silently doing the default.
 */
struct xc_interface_core {
    xentoollog_logger *lg;
    xentoollog_logger *lg_tofree; /* our stderr logger when given NULL */
    unsigned long pages;
    unsigned int dirty[FX_MAX_DIRTY_STEPS];
    unsigned int n_dirty; /* 1 = halve each round; >1 = explicit list */
    char fail_stage[32];  /* "" = no injected failure */
    int fail_errno;
    unsigned int stream_version;
    unsigned int delay_ms;
    char *save_digest;
    char *restore_digest;
};

/*----- logging, in libxc's shapes -----*/

static void fx_logv(xc_interface *xch, xentoollog_level level, int errnoval,
                    const char *context, const char *fmt, va_list ap)
    __attribute__((format(printf, 5, 0)));

static void fx_logv(xc_interface *xch, xentoollog_level level, int errnoval,
                    const char *context, const char *fmt, va_list ap)
{
    /* Logging must never clobber the errno we are about to report. */
    int saved_errno = errno;

    xtl_logv(xch->lg, level, errnoval, context, fmt, ap);
    errno = saved_errno;
}

static void fx_log(xc_interface *xch, xentoollog_level level,
                   const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* libxc's IPRINTF/DPRINTF: context "xc", no errno. */
static void fx_log(xc_interface *xch, xentoollog_level level,
                   const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    fx_logv(xch, level, -1, "xc", fmt, ap);
    va_end(ap);
}

static void fx_error(xc_interface *xch, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * libxc's ERROR(): level ERROR, context "xc", errnoval -1 (libxc never
 * passes errno to the logger) and the XC_INTERNAL_ERROR suffix.
 */
static void fx_error(xc_interface *xch, const char *fmt, ...)
{
    int saved_errno = errno;
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    xtl_log(xch->lg, XTL_ERROR, -1, "xc", "%s: Internal error", msg);
    errno = saved_errno;
}

static void fx_perror(xc_interface *xch, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* libxc's PERROR(): as ERROR() plus " (errno = strerror)". */
static void fx_perror(xc_interface *xch, const char *fmt, ...)
{
    int saved_errno = errno;
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    xtl_log(xch->lg, XTL_ERROR, -1, "xc", "%s (%d = %s): Internal error", msg,
            saved_errno, strerror(saved_errno));
    errno = saved_errno;
}

/* Set errno, then log like PERROR: the usual way a stage fails here. */
static void fx_fail_errno(xc_interface *xch, int errnum, const char *what)
{
    errno = errnum;
    fx_perror(xch, "%s", what);
}

/*
 * FAKEXEN_FAIL=<stage>: true (with errno set and a debug note logged) when
 * the configured stage is reached.  The caller then logs what libxc would
 * have logged for a real failure at that point.
 */
static bool fx_inject(xc_interface *xch, const char *stage)
{
    if (strcmp(xch->fail_stage, stage) != 0)
        return false;
    fx_log(xch, XTL_DEBUG, "fakexen: injecting failure at stage '%s' (%s)",
           stage, strerror(xch->fail_errno));
    errno = xch->fail_errno;
    return true;
}

/*----- environment -----*/

struct fx_errno_name {
    const char *name;
    int value;
};

static const struct fx_errno_name fx_errno_names[] = {
    {"EPERM", EPERM},         {"ENOENT", ENOENT},
    {"ESRCH", ESRCH},         {"EINTR", EINTR},
    {"EIO", EIO},             {"ENXIO", ENXIO},
    {"E2BIG", E2BIG},         {"EBADF", EBADF},
    {"EAGAIN", EAGAIN},       {"ENOMEM", ENOMEM},
    {"EACCES", EACCES},       {"EFAULT", EFAULT},
    {"EBUSY", EBUSY},         {"EEXIST", EEXIST},
    {"ENODEV", ENODEV},       {"EINVAL", EINVAL},
    {"ENOSPC", ENOSPC},       {"ESPIPE", ESPIPE},
    {"EPIPE", EPIPE},         {"ERANGE", ERANGE},
    {"ENOSYS", ENOSYS},       {"ENODATA", ENODATA},
    {"ETIME", ETIME},         {"EPROTO", EPROTO},
    {"EBADMSG", EBADMSG},     {"EOVERFLOW", EOVERFLOW},
    {"EMSGSIZE", EMSGSIZE},   {"EOPNOTSUPP", EOPNOTSUPP},
    {"ENOTSUP", ENOTSUP},     {"ECONNRESET", ECONNRESET},
    {"ENOBUFS", ENOBUFS},     {"ETIMEDOUT", ETIMEDOUT},
    {"ECANCELED", ECANCELED}, {"ELOOP", ELOOP},
};

/* An errno name ("EIO") or a positive decimal number; 0 when invalid. */
static int fx_parse_errno(const char *s)
{
    char *end = NULL;
    long v;

    for (size_t i = 0; i < sizeof(fx_errno_names) / sizeof(fx_errno_names[0]);
         i++) {
        if (strcmp(s, fx_errno_names[i].name) == 0)
            return fx_errno_names[i].value;
    }
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end != '\0' || v <= 0 || v > 4095)
        return 0;
    return (int)v;
}

static bool fx_parse_ulong(const char *s, unsigned long max, unsigned long *out)
{
    char *end = NULL;
    unsigned long v;

    if (*s < '0' || *s > '9')
        return false;
    errno = 0;
    v = strtoul(s, &end, 0);
    if (errno || *end != '\0' || v > max)
        return false;
    *out = v;
    return true;
}

static const char *const fx_stages[] = {
    "open",    "headers", "memory",  "suspend",         "context",
    "end",     "restore", "restore-complete",
};

static bool fx_stage_known(const char *s)
{
    for (size_t i = 0; i < sizeof(fx_stages) / sizeof(fx_stages[0]); i++) {
        if (strcmp(s, fx_stages[i]) == 0)
            return true;
    }
    return false;
}

/* FAKEXEN_DIRTY: "N" (N, N/2, N/4, ... per round) or "a,b,c" (c repeats). */
static bool fx_parse_dirty(xc_interface *xch, const char *s)
{
    const char *p = s;
    char item[32];
    unsigned long v;

    xch->n_dirty = 0;
    while (*p) {
        size_t n = strcspn(p, ",");

        if (n == 0 || n >= sizeof(item) || xch->n_dirty >= FX_MAX_DIRTY_STEPS)
            return false;
        memcpy(item, p, n);
        item[n] = '\0';
        if (!fx_parse_ulong(item, FX_MAX_PAGES, &v))
            return false;
        xch->dirty[xch->n_dirty++] = (unsigned int)v;
        p += n;
        if (*p == ',') {
            p++;
            if (*p == '\0')
                return false;
        }
    }
    return xch->n_dirty > 0;
}

/*
 * Read every FAKEXEN_* knob.  Returns 0, or an errno value after logging
 * which knob was bad (through the logger, so the tests see it as a frame).
 */
static int fx_read_env(xc_interface *xch)
{
    const char *v;
    unsigned long n;

    xch->pages = FX_DEFAULT_PAGES;
    xch->dirty[0] = FX_DEFAULT_DIRTY;
    xch->n_dirty = 1;
    xch->fail_errno = EIO;
    xch->stream_version = XCS_IHDR_VERSION_3;

    v = getenv("FAKEXEN_PAGES");
    if (v && *v) {
        if (!fx_parse_ulong(v, FX_MAX_PAGES, &n) || n == 0) {
            fx_error(xch, "fakexen: bad FAKEXEN_PAGES '%s' (1..%lu)", v,
                     FX_MAX_PAGES);
            return EINVAL;
        }
        xch->pages = n;
    }

    v = getenv("FAKEXEN_DIRTY");
    if (v && *v && !fx_parse_dirty(xch, v)) {
        fx_error(xch, "fakexen: bad FAKEXEN_DIRTY '%s' (N or N,N,...)", v);
        return EINVAL;
    }

    v = getenv("FAKEXEN_ERRNO");
    if (v && *v) {
        xch->fail_errno = fx_parse_errno(v);
        if (!xch->fail_errno) {
            fx_error(xch, "fakexen: bad FAKEXEN_ERRNO '%s'", v);
            return EINVAL;
        }
    }

    v = getenv("FAKEXEN_FAIL");
    if (v && *v) {
        if (!fx_stage_known(v)) {
            fx_error(xch, "fakexen: unknown FAKEXEN_FAIL stage '%s'", v);
            return EINVAL;
        }
        snprintf(xch->fail_stage, sizeof(xch->fail_stage), "%s", v);
    }

    v = getenv("FAKEXEN_STREAM_VERSION");
    if (v && *v) {
        if (!fx_parse_ulong(v, 3, &n) || n < 2) {
            fx_error(xch, "fakexen: bad FAKEXEN_STREAM_VERSION '%s' (2 or 3)",
                     v);
            return EINVAL;
        }
        xch->stream_version = (unsigned int)n;
    }

    v = getenv("FAKEXEN_DELAY_MS");
    if (v && *v) {
        if (!fx_parse_ulong(v, 60000, &n)) {
            fx_error(xch, "fakexen: bad FAKEXEN_DELAY_MS '%s'", v);
            return EINVAL;
        }
        xch->delay_ms = (unsigned int)n;
    }

    v = getenv("FAKEXEN_SAVE_DIGEST");
    if (v && *v && !(xch->save_digest = strdup(v)))
        return ENOMEM;
    v = getenv("FAKEXEN_RESTORE_DIGEST");
    if (v && *v && !(xch->restore_digest = strdup(v)))
        return ENOMEM;
    return 0;
}

/*----- xc_interface_open / xc_interface_close -----*/

xc_interface *xc_interface_open(xentoollog_logger *logger,
                                xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    xc_interface *xch = NULL;
    xc_interface *ret = NULL;
    const char *v;
    int err = 0;

    (void)dombuild_logger;
    (void)open_flags;

    xch = calloc(1, sizeof(*xch));
    if (!xch) {
        err = ENOMEM;
        goto out;
    }
    xch->lg = logger;
    if (!xch->lg) {
        /* libxc logs to stderr when the caller gives no logger. */
        xch->lg_tofree = (xentoollog_logger *)xtl_createlogger_stdiostream(
            stderr, XTL_PROGRESS, 0);
        if (!xch->lg_tofree) {
            err = ENOMEM;
            goto out;
        }
        xch->lg = xch->lg_tofree;
    }

    /*
     * What the real library logs when /dev/xen/privcmd cannot be opened:
     * the libxencall message, with the errno passed to the logger.
     */
    v = getenv("FAKEXEN_OPEN_ERRNO");
    if (v && *v) {
        err = fx_parse_errno(v);
        if (!err) {
            fx_error(xch, "fakexen: bad FAKEXEN_OPEN_ERRNO '%s'", v);
            err = EINVAL;
            goto out;
        }
        xtl_log(xch->lg, XTL_ERROR, err, "xencall",
                "Could not obtain handle on privileged command interface");
        goto out;
    }

    err = fx_read_env(xch);
    if (err)
        goto out;

    if (fx_inject(xch, "open")) {
        err = errno;
        xtl_log(xch->lg, XTL_ERROR, err, "xencall",
                "Could not obtain handle on privileged command interface");
        goto out;
    }

    ret = xch;
    xch = NULL;

out:
    if (xch) {
        free(xch->save_digest);
        free(xch->restore_digest);
        xtl_logger_destroy(xch->lg_tofree);
        free(xch);
    }
    if (!ret)
        errno = err;
    return ret;
}

int xc_interface_close(xc_interface *xch)
{
    if (!xch)
        return 0;
    free(xch->save_digest);
    free(xch->restore_digest);
    xtl_logger_destroy(xch->lg_tofree);
    free(xch);
    return 0;
}

/*----- small utilities -----*/

static void fx_put_le16(uint8_t *p, uint16_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

static void fx_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void fx_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t fx_get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

static uint64_t fx_get_le64(const uint8_t *p)
{
    return (uint64_t)fx_get_le32(p) | ((uint64_t)fx_get_le32(p + 4) << 32);
}

static uint64_t fx_mix64(uint64_t x)
{
    /* splitmix64's finaliser: cheap, and good enough to decorrelate pages. */
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t fx_fnv1a(uint64_t h, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= FX_FNV_PRIME;
    }
    return h;
}

static uint64_t fx_fnv1a_pfn(uint64_t h, uint64_t pfn)
{
    uint8_t le[8];

    fx_put_le64(le, pfn);
    return fx_fnv1a(h, le, sizeof(le));
}

static int fx_write_digest(xc_interface *xch, const char *path, uint64_t h)
{
    FILE *f = NULL;
    int rc = -1;

    f = fopen(path, "w");
    if (!f) {
        fx_perror(xch, "fakexen: cannot open digest file %s", path);
        goto out;
    }
    if (fprintf(f, "%016" PRIx64 "\n", h) < 0) {
        fx_perror(xch, "fakexen: cannot write digest file %s", path);
        goto out;
    }
    rc = 0;

out:
    if (f && fclose(f) != 0 && rc == 0) {
        fx_perror(xch, "fakexen: cannot close digest file %s", path);
        rc = -1;
    }
    return rc;
}

static void fx_delay(const xc_interface *xch)
{
    struct timespec ts;

    if (!xch->delay_ms)
        return;
    ts.tv_sec = xch->delay_ms / 1000;
    ts.tv_nsec = (long)(xch->delay_ms % 1000) * 1000000L;
    /* A signal (the helper's SIGTERM) cuts the delay short; that is fine. */
    nanosleep(&ts, NULL);
}

/*
 * writev() until everything is written.  Linux refuses more than IOV_MAX
 * iovecs per call and may write short, so loop, advancing the iovecs in
 * place.  Returns 0, or -1 with errno from writev.
 */
static int fx_writev_all(int fd, struct iovec *iov, int iovcnt)
{
    while (iovcnt > 0) {
        int cnt = iovcnt < IOV_MAX ? iovcnt : IOV_MAX;
        ssize_t r = writev(fd, iov, cnt);
        size_t done;

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = EIO;
            return -1;
        }
        done = (size_t)r;
        while (iovcnt > 0 && done >= iov->iov_len) {
            done -= iov->iov_len;
            iov++;
            iovcnt--;
        }
        if (iovcnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= done;
        }
    }
    return 0;
}

/*
 * read() exactly len bytes.  Returns 0; or -1 with errno from read(), or
 * with errno ENODATA when the stream ends early (libxc would leave errno 0
 * there, which tells a caller nothing).
 */
static int fx_read_exact(int fd, void *buf, size_t len)
{
    uint8_t *p = buf;

    while (len > 0) {
        ssize_t r = read(fd, p, len);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0) {
            errno = ENODATA;
            return -1;
        }
        p += r;
        len -= (size_t)r;
    }
    return 0;
}

static const char *fx_rec_name(uint32_t type)
{
    static const char *const names[] = {
        "End",
        "Page data",
        "x86 PV info",
        "x86 PV P2M frames",
        "x86 PV vcpu basic",
        "x86 PV vcpu extended",
        "x86 PV vcpu xsave",
        "Shared info",
        "x86 TSC info",
        "HVM context",
        "HVM params",
        "Toolstack",
        "x86 PV vcpu msrs",
        "Verify",
        "Checkpoint",
        "Checkpoint dirty pfn list",
        "Static data end",
        "x86 CPUID policy",
        "x86 MSR policy",
    };

    if (type < sizeof(names) / sizeof(names[0]))
        return names[type];
    return "Reserved";
}

/*----- the simulated guest (save side) -----*/

struct fx_save {
    xc_interface *xch;
    int fd;
    uint32_t dom;
    struct save_callbacks *cb;
    bool live;
    bool debug;
    xc_stream_type_t stream_type;
    unsigned long npages;
    uint8_t *mem;       /* npages guest pages */
    uint32_t *gen;      /* per page: how often the guest has written it */
    uint8_t *to_send;   /* per page: in the bitmap being sent */
    uint8_t *logdirty;  /* per page: dirtied since the last bitmap fetch */
    unsigned int round; /* guest run periods so far (for FAKEXEN_DIRTY) */
    struct precopy_stats stats;
    char label[48]; /* the progress "doing_what" of the current pass */
    uint64_t *batch;
    unsigned int nbatch;
    uint64_t *rec_pfns;
    struct iovec *iov;
    bool batch_written;
    bool qemu_logdirty; /* switch_qemu_logdirty(dom, 1) succeeded */
    uint8_t hvm_ctx[FX_HVM_CTX_LEN];
    uint64_t digest; /* of the last consistent (checkpointed) state */
};

/* Page contents: a pure function of (domid, pfn, generation). */
static void fx_fill_page(uint8_t *page, uint32_t dom, uint64_t pfn,
                         uint32_t gen)
{
    uint64_t x;

    /* Every fifth page starts out zeroed, like untouched guest RAM. */
    if (gen == 0 && pfn % 5 == 0) {
        memset(page, 0, XCS_PAGE_SIZE);
        return;
    }
    x = fx_mix64(((uint64_t)dom << 40) ^ (pfn << 8) ^ gen);
    for (unsigned int i = 0; i < XCS_PAGE_SIZE; i += 8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        fx_put_le64(page + i, x);
    }
}

static unsigned long fx_gcd(unsigned long a, unsigned long b)
{
    while (b) {
        unsigned long t = a % b;

        a = b;
        b = t;
    }
    return a;
}

static unsigned int fx_dirty_for_round(const xc_interface *xch,
                                       unsigned int round)
{
    if (xch->n_dirty > 1)
        return xch->dirty[round < xch->n_dirty ? round : xch->n_dirty - 1];
    return round >= 32 ? 0 : xch->dirty[0] >> round;
}

/*
 * The guest runs for one period: it writes FAKEXEN_DIRTY(round) distinct
 * pages, which changes their contents and marks them in the log-dirty
 * bitmap, as the hypervisor would.  The pages are picked by a stride
 * coprime with the guest size, so they are distinct and spread out.
 */
static void fx_guest_runs(struct fx_save *s)
{
    unsigned long count = fx_dirty_for_round(s->xch, s->round);
    uint64_t h = fx_mix64(((uint64_t)s->dom << 32) | s->round);
    unsigned long start, stride;

    if (count > s->npages)
        count = s->npages;
    start = (unsigned long)(h % s->npages);
    stride = (unsigned long)((h >> 32) % s->npages) | 1UL;
    while (fx_gcd(stride, s->npages) != 1)
        stride++;

    for (unsigned long k = 0; k < count; k++) {
        unsigned long pfn = (start + k * stride) % s->npages;

        s->gen[pfn]++;
        fx_fill_page(s->mem + pfn * XCS_PAGE_SIZE, s->dom, pfn, s->gen[pfn]);
        s->logdirty[pfn] = 1;
    }
    s->round++;
}

/* XEN_DOMCTL_SHADOW_OP_CLEAN: hand over the dirty bitmap and clear it. */
static unsigned long fx_fetch_logdirty(struct fx_save *s)
{
    unsigned long count = 0;

    for (unsigned long p = 0; p < s->npages; p++) {
        s->to_send[p] = s->logdirty[p];
        count += s->logdirty[p];
    }
    memset(s->logdirty, 0, s->npages);
    return count;
}

static void fx_make_hvm_ctx(struct fx_save *s)
{
    static const char tag[] = "FAKEXEN-HVM-CONTEXT";
    uint64_t x = fx_mix64(0x68766dULL ^ s->dom);

    for (unsigned int i = 0; i < FX_HVM_CTX_LEN; i++) {
        x = fx_mix64(x);
        s->hvm_ctx[i] = (uint8_t)x;
    }
    memcpy(s->hvm_ctx, tag, sizeof(tag) - 1);
    fx_put_le32(s->hvm_ctx + 20, s->dom);
}

/*----- save: writing records -----*/

/* One record: header, body, zero padding to 8 bytes, in one writev. */
static int fx_write_record(struct fx_save *s, uint32_t type, const void *body,
                           uint32_t len)
{
    static const uint8_t zeros[XCS_REC_ALIGN];
    uint8_t hdr[XCS_RHDR_SIZE];
    struct iovec iov[3];
    int n = 0;

    fx_put_le32(hdr, type);
    fx_put_le32(hdr + 4, len);
    iov[n].iov_base = hdr;
    iov[n++].iov_len = sizeof(hdr);
    if (len) {
        iov[n].iov_base = (void *)body;
        iov[n++].iov_len = len;
    }
    if (xcs_rec_padded(len) != len) {
        iov[n].iov_base = (void *)zeros;
        iov[n++].iov_len = xcs_rec_padded(len) - len;
    }
    if (fx_writev_all(s->fd, iov, n)) {
        fx_perror(s->xch, "Failed to write %s record", fx_rec_name(type));
        return -1;
    }
    return 0;
}

/*
 * One PAGE_DATA record for the batch: header, pfn array, then the pages,
 * gathered with writev straight from guest memory.  Adjacent pages are one
 * iovec, so a typical batch needs few.  All pages are NOTAB: an HVM guest
 * has no PV page tables for the saver to normalise.
 */
static int fx_write_batch(struct fx_save *s)
{
    uint8_t hdr[XCS_RHDR_SIZE + 8];
    unsigned int n = s->nbatch;
    int iovcnt = 0;

    if (n == 0)
        return 0;

    fx_delay(s->xch);
    if (!s->batch_written && fx_inject(s->xch, "memory")) {
        fx_perror(s->xch, "Failed to write page data to stream");
        return -1;
    }

    fx_put_le32(hdr, XCS_REC_PAGE_DATA);
    fx_put_le32(hdr + 4, 8U + 8U * n + XCS_PAGE_SIZE * n);
    fx_put_le32(hdr + 8, n);
    fx_put_le32(hdr + 12, 0);
    for (unsigned int i = 0; i < n; i++)
        s->rec_pfns[i] = s->batch[i] | ((uint64_t)XCS_PFINFO_NOTAB << 32);

    s->iov[iovcnt].iov_base = hdr;
    s->iov[iovcnt++].iov_len = sizeof(hdr);
    s->iov[iovcnt].iov_base = s->rec_pfns;
    s->iov[iovcnt++].iov_len = 8U * n;
    for (unsigned int i = 0; i < n; i++) {
        uint8_t *page = s->mem + s->batch[i] * XCS_PAGE_SIZE;
        struct iovec *last = &s->iov[iovcnt - 1];

        if (i > 0 && (uint8_t *)last->iov_base + last->iov_len == page) {
            last->iov_len += XCS_PAGE_SIZE;
        } else {
            s->iov[iovcnt].iov_base = page;
            s->iov[iovcnt++].iov_len = XCS_PAGE_SIZE;
        }
    }

    if (fx_writev_all(s->fd, s->iov, iovcnt)) {
        fx_perror(s->xch, "Failed to write page data to stream");
        return -1;
    }
    s->batch_written = true;
    s->nbatch = 0;
    return 0;
}

/*
 * Send every page marked in to_send, in pfn order, in batches of up to
 * 1024, reporting progress every 1024 pages and once more at the end, as
 * libxc's send_dirty_pages() does.
 */
static int fx_send_pages(struct fx_save *s, unsigned long entries)
{
    unsigned long written = 0;

    for (unsigned long p = 0; p < s->npages; p++) {
        if (!s->to_send[p])
            continue;
        if (s->nbatch == XCS_MAX_BATCH_SIZE && fx_write_batch(s))
            return -1;
        s->batch[s->nbatch++] = p;
        if ((written & (FX_PROGRESS_STEP - 1)) == 0)
            xtl_progress(s->xch->lg, "xc", s->label, written, entries);
        written++;
    }
    if (fx_write_batch(s))
        return -1;
    xtl_progress(s->xch->lg, "xc", s->label, entries, entries);
    return 0;
}

static void fx_set_label_iteration(struct fx_save *s)
{
    snprintf(s->label, sizeof(s->label), "Frames iteration %u",
             s->stats.iteration);
}

static int fx_simple_precopy_policy(struct precopy_stats stats, void *user)
{
    (void)user;
    /* libxc's default: stop when few pages are dirty, or after 5 rounds. */
    if ((stats.dirty_count >= 0 && stats.dirty_count < 50) ||
        stats.iteration >= 5)
        return XGS_POLICY_STOP_AND_COPY;
    return XGS_POLICY_CONTINUE_PRECOPY;
}

/*
 * Live precopy, in libxc 4.17's shape: the policy is asked before each
 * pass with the dirty count just fetched (the whole guest before the
 * first), and again after each pass with dirty_count -1 ("unknown"); a
 * pass is sent even when the first question answers STOP_AND_COPY.  The
 * guest runs (dirties pages) while each pass is being sent.
 */
static int fx_send_memory_live(struct fx_save *s)
{
    precopy_policy_t policy = s->cb->precopy_policy;
    unsigned long to_send = s->npages;
    unsigned int x = 0;
    int decision;

    if (!policy)
        policy = fx_simple_precopy_policy;
    s->stats = (struct precopy_stats){.dirty_count = (long)s->npages};
    memset(s->to_send, 1, s->npages);

    for (;;) {
        decision = policy(s->stats, s->cb->data);
        x++;

        if (to_send > 0 && decision != XGS_POLICY_ABORT) {
            fx_set_label_iteration(s);
            if (fx_send_pages(s, to_send))
                return -1;
            fx_guest_runs(s);
        }
        if (decision != XGS_POLICY_CONTINUE_PRECOPY)
            break;

        s->stats.iteration = x;
        s->stats.total_written += (unsigned long)s->stats.dirty_count;
        s->stats.dirty_count = -1;

        decision = policy(s->stats, s->cb->data);
        if (decision != XGS_POLICY_CONTINUE_PRECOPY)
            break;

        if (x >= FX_MAX_PRECOPY_ITERS) {
            fx_fail_errno(s->xch, ELOOP,
                          "fakexen: precopy policy never stopped");
            return -1;
        }
        to_send = fx_fetch_logdirty(s);
        s->stats.dirty_count = (long)to_send;
    }

    if (decision == XGS_POLICY_ABORT) {
        /* libxc leaves errno stale here; a definite value is more useful. */
        fx_fail_errno(s->xch, ECANCELED, "Abort precopy loop");
        return -1;
    }
    return 0;
}

static int fx_suspend_domain(struct fx_save *s)
{
    int r;

    if (!s->cb->suspend) {
        fx_fail_errno(s->xch, EINVAL, "fakexen: no suspend callback");
        return -1;
    }
    r = s->cb->suspend(s->cb->data);
    if (r == 0) {
        /* libxc logs "save callback suspend() failed" and leaves errno. */
        errno = EINVAL;
        fx_error(s->xch,
                 "Guest did not suspend: save callback suspend() failed: %d",
                 r);
        return -1;
    }
    if (fx_inject(s->xch, "suspend")) {
        fx_perror(s->xch, "Unable to refresh domain information");
        return -1;
    }
    xtl_progress(s->xch->lg, "xc", "Domain now suspended", 0, 0);
    return 0;
}

/* The last pass: pause the guest, then send what it dirtied meanwhile. */
static int fx_suspend_and_send_dirty(struct fx_save *s)
{
    unsigned long count;

    if (fx_suspend_domain(s))
        return -1;
    count = fx_fetch_logdirty(s);
    if (s->live)
        fx_set_label_iteration(s);
    else
        snprintf(s->label, sizeof(s->label), "Checkpointed save");
    return fx_send_pages(s, count);
}

/* XCFLAGS_DEBUG on a live plain save: a VERIFY record, then every page. */
static int fx_verify_frames(struct fx_save *s)
{
    fx_log(s->xch, XTL_DEBUG, "Enabling verify mode");
    if (fx_write_record(s, XCS_REC_VERIFY, NULL, 0))
        return -1;
    snprintf(s->label, sizeof(s->label), "Frames verify");
    memset(s->to_send, 1, s->npages);
    return fx_send_pages(s, s->npages);
}

static int fx_send_memory(struct fx_save *s)
{
    if (s->live) {
        if (fx_send_memory_live(s) || fx_suspend_and_send_dirty(s))
            return -1;
        if (s->debug && s->stream_type == XC_STREAM_PLAIN)
            return fx_verify_frames(s);
        return 0;
    }
    if (s->stream_type != XC_STREAM_PLAIN)
        return fx_suspend_and_send_dirty(s);

    /* Suspend to file: pause first, then one pass over everything. */
    if (fx_suspend_domain(s))
        return -1;
    snprintf(s->label, sizeof(s->label), "Frames");
    memset(s->to_send, 1, s->npages);
    return fx_send_pages(s, s->npages);
}

static int fx_write_headers(struct fx_save *s)
{
    uint8_t hdrs[XCS_IHDR_SIZE + XCS_DHDR_SIZE] = {0};
    struct iovec iov = {.iov_base = hdrs, .iov_len = sizeof(hdrs)};

    if (fx_inject(s->xch, "headers")) {
        fx_perror(s->xch, "Unable to write Image/Domain headers to stream");
        return -1;
    }
    /* The image header is big-endian; the domain header little-endian. */
    xcs_put_be64(hdrs, XCS_IHDR_MARKER);
    xcs_put_be32(hdrs + 8, XCS_IHDR_ID);
    xcs_put_be32(hdrs + 12, s->xch->stream_version);
    xcs_put_be16(hdrs + 16, 0); /* little-endian stream */
    fx_put_le32(hdrs + 24, XCS_DHDR_TYPE_X86_HVM);
    fx_put_le16(hdrs + 28, XCS_PAGE_SHIFT);
    fx_put_le32(hdrs + 32, FX_XEN_MAJOR);
    fx_put_le32(hdrs + 36, FX_XEN_MINOR);
    if (fx_writev_all(s->fd, &iov, 1)) {
        fx_perror(s->xch, "Unable to write Image/Domain headers to stream");
        return -1;
    }
    return 0;
}

/* v3 static data: a small CPUID and MSR policy, then STATIC_DATA_END. */
static int fx_write_static_data(struct fx_save *s)
{
    static const uint32_t leaves[][2] = {
        {0x0, 0xffffffffU}, {0x1, 0xffffffffU}, {0x7, 0x0},
        {0x80000000U, 0xffffffffU}, {0x80000001U, 0xffffffffU},
    };
    static const uint32_t msrs[] = {0xceU, 0x10aU};
    uint8_t cpuid[sizeof(leaves) / sizeof(leaves[0]) * 24];
    uint8_t msr[sizeof(msrs) / sizeof(msrs[0]) * 16];

    if (s->xch->stream_version < XCS_IHDR_VERSION_3)
        return 0;

    for (size_t i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
        uint8_t *e = cpuid + 24 * i;
        uint64_t x = fx_mix64(leaves[i][0]);

        fx_put_le32(e, leaves[i][0]);
        fx_put_le32(e + 4, leaves[i][1]);
        fx_put_le32(e + 8, (uint32_t)x);
        fx_put_le32(e + 12, (uint32_t)(x >> 32));
        fx_put_le32(e + 16, (uint32_t)fx_mix64(x));
        fx_put_le32(e + 20, (uint32_t)(fx_mix64(x) >> 32));
    }
    for (size_t i = 0; i < sizeof(msrs) / sizeof(msrs[0]); i++) {
        fx_put_le32(msr + 16 * i, msrs[i]);
        fx_put_le32(msr + 16 * i + 4, 0); /* flags: must be zero */
        fx_put_le64(msr + 16 * i + 8, fx_mix64(msrs[i]) & 0xffffULL);
    }

    if (fx_write_record(s, XCS_REC_X86_CPUID_POLICY, cpuid, sizeof(cpuid)) ||
        fx_write_record(s, XCS_REC_X86_MSR_POLICY, msr, sizeof(msr)) ||
        fx_write_record(s, XCS_REC_STATIC_DATA_END, NULL, 0))
        return -1;
    return 0;
}

/* Digest of what was saved: every page in pfn order, then the context. */
static uint64_t fx_save_digest(const struct fx_save *s)
{
    uint64_t h = FX_FNV_OFFSET;

    for (unsigned long p = 0; p < s->npages; p++) {
        h = fx_fnv1a_pfn(h, p);
        h = fx_fnv1a(h, s->mem + p * XCS_PAGE_SIZE, XCS_PAGE_SIZE);
    }
    return fx_fnv1a(h, s->hvm_ctx, FX_HVM_CTX_LEN);
}

/* HVM end of checkpoint: X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS (4.17 order). */
static int fx_end_of_checkpoint(struct fx_save *s)
{
    static const uint64_t params[][2] = {
        {XCS_HVM_PARAM_STORE_PFN, FX_STORE_PFN},
        {XCS_HVM_PARAM_IOREQ_PFN, FX_SPECIAL_PFN(5)},
        {XCS_HVM_PARAM_BUFIOREQ_PFN, FX_SPECIAL_PFN(3)},
        {XCS_HVM_PARAM_PAGING_RING_PFN, FX_SPECIAL_PFN(0)},
        {XCS_HVM_PARAM_MONITOR_RING_PFN, FX_SPECIAL_PFN(1)},
        {XCS_HVM_PARAM_SHARING_RING_PFN, FX_SPECIAL_PFN(2)},
        {XCS_HVM_PARAM_CONSOLE_PFN, FX_CONSOLE_PFN},
        {XCS_HVM_PARAM_IDENT_PT, FX_SPECIAL_PFN(6) << XCS_PAGE_SHIFT},
    };
    uint8_t tsc[24] = {0};
    uint8_t hp[8 + sizeof(params) / sizeof(params[0]) * 16] = {0};

    if (fx_inject(s->xch, "context")) {
        fx_perror(s->xch, "Unable to get HVM context");
        return -1;
    }

    fx_put_le32(tsc, 0);                                /* mode */
    fx_put_le32(tsc + 4, 2000000);                      /* khz */
    fx_put_le64(tsc + 8, 1000000000ULL * (s->dom + 1)); /* nsec */
    fx_put_le32(tsc + 16, 0);                           /* incarnation */

    fx_put_le32(hp, sizeof(params) / sizeof(params[0]));
    for (size_t i = 0; i < sizeof(params) / sizeof(params[0]); i++) {
        fx_put_le64(hp + 8 + 16 * i, params[i][0]);
        fx_put_le64(hp + 16 + 16 * i, params[i][1]);
    }

    if (fx_write_record(s, XCS_REC_X86_TSC_INFO, tsc, sizeof(tsc)) ||
        fx_write_record(s, XCS_REC_HVM_CONTEXT, s->hvm_ctx, FX_HVM_CTX_LEN) ||
        fx_write_record(s, XCS_REC_HVM_PARAMS, hp, sizeof(hp)))
        return -1;
    /* The guest is paused and its state complete: this is what a restore
     * of this checkpoint must reproduce. */
    s->digest = fx_save_digest(s);
    return 0;
}

static int fx_save_setup(struct fx_save *s)
{
    unsigned long n = s->npages;

    s->mem = malloc(n * XCS_PAGE_SIZE);
    s->gen = calloc(n, sizeof(*s->gen));
    s->to_send = calloc(n, 1);
    s->logdirty = calloc(n, 1);
    s->batch = malloc(XCS_MAX_BATCH_SIZE * sizeof(*s->batch));
    s->rec_pfns = malloc(XCS_MAX_BATCH_SIZE * sizeof(*s->rec_pfns));
    s->iov = malloc((XCS_MAX_BATCH_SIZE + 2) * sizeof(*s->iov));
    if (!s->mem || !s->gen || !s->to_send || !s->logdirty || !s->batch ||
        !s->rec_pfns || !s->iov) {
        fx_fail_errno(s->xch, ENOMEM,
                      "Unable to allocate memory for the simulated guest");
        return -1;
    }
    for (unsigned long p = 0; p < n; p++)
        fx_fill_page(s->mem + p * XCS_PAGE_SIZE, s->dom, p, 0);
    fx_make_hvm_ctx(s);
    return 0;
}

static void fx_save_cleanup(struct fx_save *s)
{
    free(s->iov);
    free(s->rec_pfns);
    free(s->batch);
    free(s->logdirty);
    free(s->to_send);
    free(s->gen);
    free(s->mem);
}

/*
 * Remus: after each checkpoint's records, a CHECKPOINT record, then
 * postcopy() (guest resumed) and checkpoint() (the toolstack's part).
 * Returns 1 to take another checkpoint, 0 when the caller ended
 * checkpointing (a success, as in libxc: no END record is ever written),
 * -1 on failure.
 */
static int fx_remus_checkpoint(struct fx_save *s)
{
    int r;

    if (fx_write_record(s, XCS_REC_CHECKPOINT, NULL, 0))
        return -1;
    r = s->cb->postcopy(s->cb->data);
    if (r > 0) {
        fx_guest_runs(s); /* resumed until the next checkpoint suspends it */
        r = s->cb->checkpoint(s->cb->data);
    }
    if (r > 0) {
        s->live = false; /* later checkpoints copy only dirty pages */
        return 1;
    }
    if (r == 0) {
        fx_log(s->xch, XTL_INFO, "Checkpointing ended by the caller");
        return 0;
    }
    fx_fail_errno(s->xch, EINVAL, "Checkpoint callback failed");
    return -1;
}

int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom, uint32_t flags,
                   struct save_callbacks *callbacks,
                   xc_stream_type_t stream_type, int recv_fd)
{
    struct fx_save s = {
        .xch = xch,
        .fd = io_fd,
        .dom = dom,
        .cb = callbacks,
        .live = !!(flags & XCFLAGS_LIVE),
        .debug = !!(flags & XCFLAGS_DEBUG),
        .stream_type = stream_type,
        .npages = xch->pages,
    };
    bool plain_end = false;
    int saved_errno = 0;
    int rc = -1;
    int r;

    (void)recv_fd;

    if (!callbacks) {
        fx_fail_errno(xch, EINVAL, "fakexen: no save callbacks");
        goto out;
    }
    if (stream_type == XC_STREAM_COLO) {
        fx_fail_errno(xch, EOPNOTSUPP,
                      "fakexen: COLO streams are not simulated");
        goto out;
    }
    if (stream_type == XC_STREAM_REMUS &&
        (!callbacks->postcopy || !callbacks->checkpoint)) {
        fx_fail_errno(xch, EINVAL,
                      "fakexen: Remus needs postcopy and checkpoint callbacks");
        goto out;
    }
    if (stream_type != XC_STREAM_PLAIN && stream_type != XC_STREAM_REMUS) {
        fx_fail_errno(xch, EINVAL, "Bad stream_type");
        goto out;
    }

    fx_log(xch, XTL_DEBUG, "fd %d, dom %u, flags %u, hvm 1", io_fd, dom,
           flags);
    fx_log(xch, XTL_INFO, "Saving domain %u, type x86 HVM", dom);

    if (fx_save_setup(&s))
        goto out;

    xtl_progress(xch->lg, "xc", "Start of stream", 0, 0);

    if (fx_write_headers(&s) || fx_write_static_data(&s))
        goto out;

    /* HVM start_of_stream: qemu must log its own writes while we copy. */
    if (s.live && callbacks->switch_qemu_logdirty) {
        r = callbacks->switch_qemu_logdirty(dom, 1, callbacks->data);
        if (r) {
            fx_fail_errno(xch, EINVAL, "Couldn't enable qemu log-dirty mode");
            goto out;
        }
        s.qemu_logdirty = true;
    }

    for (;;) {
        if (fx_send_memory(&s) || fx_end_of_checkpoint(&s))
            goto out;
        if (stream_type == XC_STREAM_PLAIN) {
            plain_end = true;
            break;
        }
        r = fx_remus_checkpoint(&s);
        if (r < 0)
            goto out;
        if (r == 0)
            break;
    }

    if (plain_end) {
        xtl_progress(xch->lg, "xc", "End of stream", 0, 0);
        if (fx_inject(xch, "end")) {
            fx_perror(xch, "Failed to write End record");
            goto out;
        }
        if (fx_write_record(&s, XCS_REC_END, NULL, 0))
            goto out;
        xtl_progress(xch->lg, "xc", "Complete", 0, 0);
    }

    if (xch->save_digest && fx_write_digest(xch, xch->save_digest, s.digest))
        goto out;

    rc = 0;

out:
    if (rc) {
        saved_errno = errno;
        fx_perror(xch, "Save failed");
    }
    /* Cleanup runs on success and failure alike, as libxc's does. */
    if (s.qemu_logdirty) {
        r = callbacks->switch_qemu_logdirty(dom, 0, callbacks->data);
        if (r) {
            if (!rc)
                saved_errno = EINVAL;
            errno = EINVAL;
            fx_perror(xch, "Couldn't disable qemu log-dirty mode");
            rc = -1;
        }
    }
    fx_save_cleanup(&s);
    if (rc)
        errno = saved_errno;
    return rc;
}

/*----- restore -----*/

struct fx_rec {
    uint32_t type;
    uint32_t length;
    uint8_t *data; /* padded length bytes, at least 1 */
};

struct fx_restore {
    xc_interface *xch;
    int fd;
    uint32_t dom;
    struct restore_callbacks *cb;
    xc_stream_type_t stream_type;
    uint32_t version;
    bool seen_sde;
    bool seen_cpuid;
    bool seen_msr;
    bool verify;
    bool page_data_seen;
    uint8_t **pages; /* pfn-indexed; NULL = not populated */
    unsigned long pages_len;
    uint8_t *hvm_ctx;
    uint32_t hvm_ctx_len;
    uint64_t store_gfn;
    uint64_t console_gfn;
    bool buffering; /* Remus: records since the last CHECKPOINT */
    struct fx_rec *buf;
    size_t nbuf;
    size_t capbuf;
};

/* Read the image and domain headers: exactly 40 bytes, nothing more. */
static int fx_read_headers(struct fx_restore *c)
{
    uint8_t ih[XCS_IHDR_SIZE];
    uint8_t dh[XCS_DHDR_SIZE];
    uint64_t marker;
    uint32_t id, type;
    uint16_t options, page_shift;

    if (fx_read_exact(c->fd, ih, sizeof(ih))) {
        fx_perror(c->xch, "Failed to read Image Header from stream");
        return -1;
    }
    marker = xcs_get_be64(ih);
    id = xcs_get_be32(ih + 8);
    c->version = xcs_get_be32(ih + 12);
    options = xcs_get_be16(ih + 16);
    if (marker != XCS_IHDR_MARKER) {
        errno = EINVAL;
        fx_error(c->xch, "Invalid marker: Got 0x%016" PRIx64, marker);
        return -1;
    }
    if (id != XCS_IHDR_ID) {
        errno = EINVAL;
        fx_error(c->xch, "Invalid ID: Expected 0x%08x, Got 0x%08x",
                 XCS_IHDR_ID, id);
        return -1;
    }
    if (c->version < XCS_IHDR_VERSION_2 || c->version > XCS_IHDR_VERSION_3) {
        errno = EINVAL;
        fx_error(c->xch, "Invalid Version: Expected 2 <= ver <= 3, Got %u",
                 c->version);
        return -1;
    }
    if (options & XCS_IHDR_OPT_BIG_ENDIAN) {
        errno = EOPNOTSUPP;
        fx_error(c->xch, "Unable to handle big endian streams");
        return -1;
    }

    if (fx_read_exact(c->fd, dh, sizeof(dh))) {
        fx_perror(c->xch, "Failed to read Domain Header from stream");
        return -1;
    }
    type = fx_get_le32(dh);
    page_shift = (uint16_t)(dh[4] | (dh[5] << 8));
    if (type != XCS_DHDR_TYPE_X86_HVM) {
        errno = EINVAL;
        fx_error(c->xch,
                 "fakexen: stream guest type %u, but the simulated domain is "
                 "x86 HVM (2)",
                 type);
        return -1;
    }
    if (page_shift != XCS_PAGE_SHIFT) {
        errno = EINVAL;
        fx_error(c->xch, "Invalid page shift %u, expected %u", page_shift,
                 XCS_PAGE_SHIFT);
        return -1;
    }
    if (fx_get_le32(dh + 8) == 0)
        fx_log(c->xch, XTL_INFO,
               "Found x86 HVM domain, converted from legacy stream format");
    else
        fx_log(c->xch, XTL_INFO, "Found x86 HVM domain from Xen %u.%u",
               fx_get_le32(dh + 8), fx_get_le32(dh + 12));
    return 0;
}

/*
 * One record: the 8-byte header, then exactly the padded body.  Never
 * more: whatever follows END belongs to the parent (libxl's records, or
 * the device model's "Qemu..." blob).
 */
static int fx_read_record(struct fx_restore *c, struct fx_rec *rec)
{
    uint8_t hdr[XCS_RHDR_SIZE];
    uint32_t padded;

    rec->data = NULL;
    if (fx_read_exact(c->fd, hdr, sizeof(hdr))) {
        fx_perror(c->xch, "Failed to read Record Header from stream");
        return -1;
    }
    rec->type = fx_get_le32(hdr);
    rec->length = fx_get_le32(hdr + 4);
    if (rec->length > XCS_REC_LENGTH_MAX) {
        errno = EMSGSIZE;
        fx_error(c->xch, "Record (0x%08x, %s) length %#x exceeds max (%#x)",
                 rec->type, fx_rec_name(rec->type), rec->length,
                 XCS_REC_LENGTH_MAX);
        return -1;
    }
    padded = xcs_rec_padded(rec->length);
    rec->data = malloc(padded ? padded : 1);
    if (!rec->data) {
        fx_fail_errno(c->xch, ENOMEM, "Unable to allocate memory for record");
        return -1;
    }
    if (padded && fx_read_exact(c->fd, rec->data, padded)) {
        fx_perror(c->xch, "Failed to read Record (0x%08x, %s) data from stream",
                  rec->type, fx_rec_name(rec->type));
        free(rec->data);
        rec->data = NULL;
        return -1;
    }
    return 0;
}

static int fx_static_data_end(struct fx_restore *c)
{
    unsigned int missing = 0;
    int r;

    if (c->seen_sde) {
        errno = EINVAL;
        fx_error(c->xch, "Multiple STATIC_DATA_END records found");
        return -1;
    }
    c->seen_sde = true;
    if (!c->seen_cpuid)
        missing |= XGR_SDD_MISSING_CPUID;
    if (!c->seen_msr)
        missing |= XGR_SDD_MISSING_MSR;
    if (c->cb && c->cb->static_data_done) {
        r = c->cb->static_data_done(missing, c->cb->data);
        if (r != 0) {
            errno = EINVAL;
            fx_error(c->xch, "static_data_done() callback failed: %d", r);
            return -1;
        }
    }
    return 0;
}

/* Make room for pfn in the page table (doubling), keeping it sparse. */
static int fx_grow_pages(struct fx_restore *c, uint64_t pfn)
{
    unsigned long len = c->pages_len ? c->pages_len : 256;
    uint8_t **p;

    if (pfn < c->pages_len)
        return 0;
    while (len <= pfn)
        len *= 2;
    p = realloc(c->pages, len * sizeof(*p));
    if (!p) {
        fx_fail_errno(c->xch, ENOMEM, "Failed to realloc the page table");
        return -1;
    }
    memset(p + c->pages_len, 0, (len - c->pages_len) * sizeof(*p));
    c->pages = p;
    c->pages_len = len;
    return 0;
}

static bool fx_type_has_data(uint32_t type)
{
    switch (type) {
    case XCS_PFINFO_BROKEN:
    case XCS_PFINFO_XALLOC:
    case XCS_PFINFO_XTAB:
        return false;
    default:
        return true;
    }
}

static bool fx_type_known(uint32_t type)
{
    uint32_t t = type >> XCS_PFINFO_LTAB_SHIFT;

    return !(t >= 5 && t <= 8);
}

static int fx_handle_page_data(struct fx_restore *c, const struct fx_rec *rec)
{
    const uint8_t *d = rec->data;
    const uint8_t *data;
    uint32_t count;
    uint64_t n_data = 0;

    /* A v2 stream has no STATIC_DATA_END: the first page implies it. */
    if (c->version < XCS_IHDR_VERSION_3 && !c->seen_sde &&
        fx_static_data_end(c)) {
        fx_error(c->xch, "Inferred STATIC_DATA_END record failed");
        return -1;
    }
    if (!c->seen_sde) {
        errno = EINVAL;
        fx_error(c->xch, "No STATIC_DATA_END seen");
        return -1;
    }
    if (rec->length < 8) {
        errno = EINVAL;
        fx_error(c->xch, "PAGE_DATA record truncated: length %u, min 8",
                 rec->length);
        return -1;
    }
    count = fx_get_le32(d);
    if (count < 1) {
        errno = EINVAL;
        fx_error(c->xch, "Expected at least 1 pfn in PAGE_DATA record");
        return -1;
    }
    if (count > XCS_MAX_BATCH_SIZE) {
        errno = EMSGSIZE;
        fx_error(c->xch, "Max batch size exceeded (%u). Giving up.", count);
        return -1;
    }
    if (rec->length < 8 + 8 * (uint64_t)count) {
        errno = EINVAL;
        fx_error(c->xch,
                 "PAGE_DATA record (length %u) too short to contain %u pfns "
                 "worth of information",
                 rec->length, count);
        return -1;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = fx_get_le64(d + 8 + 8 * i);
        uint64_t pfn = w & XCS_PAGE_DATA_PFN_MASK;
        uint32_t type = (uint32_t)((w & XCS_PAGE_DATA_TYPE_MASK) >> 32);

        if (w & XCS_PAGE_DATA_RSVD_MASK) {
            errno = EINVAL;
            fx_error(c->xch, "Reserved bits set in pfn[%u]: 0x%016" PRIx64, i,
                     w);
            return -1;
        }
        if (pfn >= FX_MAX_PFN) {
            errno = EINVAL;
            fx_error(c->xch,
                     "pfn %#" PRIx64 " (index %u) outside domain maximum", pfn,
                     i);
            return -1;
        }
        if (!fx_type_known(type)) {
            errno = EINVAL;
            fx_error(c->xch,
                     "Unknown type %#" PRIx32 " for pfn %#" PRIx64
                     " (index %u)",
                     type, pfn, i);
            return -1;
        }
        if (fx_type_has_data(type))
            n_data++;
    }
    if (rec->length != 8 + 8 * (uint64_t)count + XCS_PAGE_SIZE * n_data) {
        errno = EINVAL;
        fx_error(c->xch,
                 "PAGE_DATA record wrong size: length %u, expected %u + %u + "
                 "%" PRIu64,
                 rec->length, 8U, 8U * count, XCS_PAGE_SIZE * n_data);
        return -1;
    }
    if (!c->page_data_seen && fx_inject(c->xch, "restore")) {
        fx_perror(c->xch, "Failed to populate physmap");
        return -1;
    }
    c->page_data_seen = true;

    data = d + 8 + 8 * (size_t)count;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = fx_get_le64(d + 8 + 8 * i);
        uint64_t pfn = w & XCS_PAGE_DATA_PFN_MASK;
        uint32_t type = (uint32_t)((w & XCS_PAGE_DATA_TYPE_MASK) >> 32);

        /* XTAB and BROKEN are holes; everything else gets a frame. */
        if (type == XCS_PFINFO_XTAB || type == XCS_PFINFO_BROKEN)
            continue;
        if (fx_grow_pages(c, pfn))
            return -1;
        if (!c->pages[pfn]) {
            c->pages[pfn] = calloc(1, XCS_PAGE_SIZE);
            if (!c->pages[pfn]) {
                fx_fail_errno(c->xch, ENOMEM, "Failed to populate physmap");
                return -1;
            }
        }
        if (!fx_type_has_data(type))
            continue;
        if (c->verify) {
            if (memcmp(c->pages[pfn], data, XCS_PAGE_SIZE))
                fx_error(c->xch, "verify pfn %#" PRIx64 " failed (type %#x)",
                         pfn, type >> XCS_PFINFO_LTAB_SHIFT);
        } else {
            memcpy(c->pages[pfn], data, XCS_PAGE_SIZE);
        }
        data += XCS_PAGE_SIZE;
    }
    return 0;
}

static int fx_handle_hvm_params(struct fx_restore *c, const struct fx_rec *rec)
{
    uint32_t count;

    if (rec->length < 8) {
        errno = EINVAL;
        fx_error(c->xch, "HVM_PARAMS record truncated: length %u, min 8",
                 rec->length);
        return -1;
    }
    count = fx_get_le32(rec->data);
    if (rec->length < 8 + 16 * (uint64_t)count) {
        errno = EINVAL;
        fx_error(c->xch,
                 "HVM_PARAMS record truncated: header 8, count %u, expected "
                 "len %" PRIu64 ", got %u",
                 count, 8 + 16 * (uint64_t)count, rec->length);
        return -1;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t index = fx_get_le64(rec->data + 8 + 16 * i);
        uint64_t value = fx_get_le64(rec->data + 16 + 16 * i);

        if (index == XCS_HVM_PARAM_STORE_PFN)
            c->store_gfn = value;
        else if (index == XCS_HVM_PARAM_CONSOLE_PFN)
            c->console_gfn = value;
    }
    return 0;
}

static int fx_handle_policy(struct fx_restore *c, const struct fx_rec *rec,
                            uint32_t unit, bool *seen)
{
    if (c->seen_sde) {
        errno = EINVAL;
        fx_error(c->xch, "%s record found after STATIC_DATA_END",
                 fx_rec_name(rec->type));
        return -1;
    }
    if (rec->length % unit) {
        errno = EINVAL;
        fx_error(c->xch, "%s record length %u, expected multiple of %u",
                 fx_rec_name(rec->type), rec->length, unit);
        return -1;
    }
    *seen = true;
    return 0;
}

static int fx_process_record(struct fx_restore *c, const struct fx_rec *rec);

/*
 * CHECKPOINT: an error in a plain stream.  In a Remus stream the first one
 * starts buffering (everything up to the next CHECKPOINT is applied as one
 * consistent unit); each later one applies the buffered records.  Returns
 * 0 to go on, 1 to fail over to the last consistent state, -1 on error.
 */
static int fx_handle_checkpoint(struct fx_restore *c)
{
    int r;

    if (c->stream_type == XC_STREAM_PLAIN) {
        errno = EINVAL;
        fx_error(c->xch, "Found checkpoint in non-checkpointed stream");
        return -1;
    }
    r = c->cb->checkpoint(c->cb->data);
    if (r == XGR_CHECKPOINT_FAILOVER) {
        if (c->buffering)
            return 1;
        errno = EINVAL;
        fx_error(c->xch, "Failover requested before a consistent state");
        return -1;
    }
    if (r != XGR_CHECKPOINT_SUCCESS) {
        errno = EINVAL;
        fx_error(c->xch, "checkpoint() callback failed: %d", r);
        return -1;
    }
    if (!c->buffering) {
        c->buffering = true;
        return 0;
    }
    fx_log(c->xch, XTL_INFO, "All records buffered");
    for (size_t i = 0; i < c->nbuf; i++) {
        if (fx_process_record(c, &c->buf[i]))
            return -1;
    }
    for (size_t i = 0; i < c->nbuf; i++) {
        free(c->buf[i].data);
        c->buf[i].data = NULL;
    }
    c->nbuf = 0;
    fx_log(c->xch, XTL_INFO, "All records processed");
    return 0;
}

/* Returns 0, or -1 with errno set and the reason logged. */
static int fx_process_record(struct fx_restore *c, const struct fx_rec *rec)
{
    switch (rec->type) {
    case XCS_REC_END:
        return 0;
    case XCS_REC_PAGE_DATA:
        return fx_handle_page_data(c, rec);
    case XCS_REC_VERIFY:
        fx_log(c->xch, XTL_DEBUG, "Verify mode enabled");
        c->verify = true;
        return 0;
    case XCS_REC_STATIC_DATA_END:
        return fx_static_data_end(c);
    case XCS_REC_X86_CPUID_POLICY:
        return fx_handle_policy(c, rec, 24, &c->seen_cpuid);
    case XCS_REC_X86_MSR_POLICY:
        return fx_handle_policy(c, rec, 16, &c->seen_msr);
    case XCS_REC_X86_TSC_INFO:
        if (rec->length != 24) {
            errno = EINVAL;
            fx_error(c->xch,
                     "X86_TSC_INFO record wrong size: length %u, expected 24",
                     rec->length);
            return -1;
        }
        return 0;
    case XCS_REC_HVM_CONTEXT: {
        uint8_t *p = realloc(c->hvm_ctx, rec->length ? rec->length : 1);

        if (!p) {
            fx_fail_errno(c->xch, ENOMEM, "Unable to allocate HVM context");
            return -1;
        }
        memcpy(p, rec->data, rec->length);
        c->hvm_ctx = p;
        c->hvm_ctx_len = rec->length;
        return 0;
    }
    case XCS_REC_HVM_PARAMS:
        return fx_handle_hvm_params(c, rec);
    default:
        break;
    }
    if (rec->type & XCS_REC_TYPE_OPTIONAL) {
        fx_log(c->xch, XTL_DEBUG, "Ignoring optional record %#x",
               rec->type);
        return 0;
    }
    errno = EINVAL;
    fx_error(c->xch, "Mandatory record %#x (%s) not handled", rec->type,
             fx_rec_name(rec->type));
    return -1;
}

static int fx_buffer_record(struct fx_restore *c, struct fx_rec *rec)
{
    if (c->nbuf == c->capbuf) {
        size_t cap = c->capbuf ? c->capbuf * 2 : 64;
        struct fx_rec *p = realloc(c->buf, cap * sizeof(*p));

        if (!p) {
            fx_fail_errno(c->xch, ENOMEM,
                          "Failed to realloc memory for buffered records");
            return -1;
        }
        c->buf = p;
        c->capbuf = cap;
    }
    c->buf[c->nbuf++] = *rec;
    rec->data = NULL;
    return 0;
}

/* Digest of what was restored; equals the saver's for the same stream. */
static uint64_t fx_restore_digest(const struct fx_restore *c)
{
    uint64_t h = FX_FNV_OFFSET;

    for (unsigned long p = 0; p < c->pages_len; p++) {
        if (!c->pages[p])
            continue;
        h = fx_fnv1a_pfn(h, p);
        h = fx_fnv1a(h, c->pages[p], XCS_PAGE_SIZE);
    }
    return fx_fnv1a(h, c->hvm_ctx, c->hvm_ctx_len);
}

/* The domain is complete: apply the context, publish the results. */
static int fx_stream_complete(struct fx_restore *c)
{
    if (fx_inject(c->xch, "restore-complete")) {
        fx_perror(c->xch, "Unable to set HVM context");
        return -1;
    }
    if (!c->hvm_ctx_len) {
        errno = EINVAL;
        fx_error(c->xch, "HVM_CONTEXT record missing");
        return -1;
    }
    if (c->xch->restore_digest &&
        fx_write_digest(c->xch, c->xch->restore_digest, fx_restore_digest(c)))
        return -1;
    return 0;
}

int xc_domain_restore(xc_interface *xch, int io_fd, uint32_t dom,
                      unsigned int store_evtchn, unsigned long *store_mfn,
                      uint32_t store_domid, unsigned int console_evtchn,
                      unsigned long *console_mfn, uint32_t console_domid,
                      xc_stream_type_t stream_type,
                      struct restore_callbacks *callbacks, int send_back_fd)
{
    struct fx_restore c = {
        .xch = xch,
        .fd = io_fd,
        .dom = dom,
        .cb = callbacks,
        .stream_type = stream_type,
    };
    struct fx_rec rec = {.data = NULL};
    int saved_errno = 0;
    int rc = -1;
    int r;

    (void)send_back_fd;
    fx_log(xch, XTL_DEBUG, "fd %d, dom %u, hvm 1, stream_type %d", io_fd, dom,
           (int)stream_type);

    if (stream_type == XC_STREAM_COLO) {
        fx_fail_errno(xch, EOPNOTSUPP,
                      "fakexen: COLO streams are not simulated");
        goto out;
    }
    if (stream_type != XC_STREAM_PLAIN && stream_type != XC_STREAM_REMUS) {
        fx_fail_errno(xch, EINVAL, "Bad stream_type");
        goto out;
    }
    if (stream_type == XC_STREAM_REMUS &&
        (!callbacks || !callbacks->checkpoint)) {
        fx_fail_errno(xch, EINVAL,
                      "fakexen: Remus needs a checkpoint callback");
        goto out;
    }
    if (fx_read_headers(&c))
        goto out;

    fx_log(xch, XTL_INFO, "Restoring domain");
    for (;;) {
        if (fx_read_record(&c, &rec)) {
            /* Remus: the primary died mid-checkpoint; use the last one. */
            if (c.buffering)
                break;
            goto out;
        }
        if (c.buffering && rec.type != XCS_REC_END &&
            rec.type != XCS_REC_CHECKPOINT) {
            if (fx_buffer_record(&c, &rec))
                goto out;
            continue;
        }
        if (rec.type == XCS_REC_CHECKPOINT) {
            r = fx_handle_checkpoint(&c);
            if (r < 0)
                goto out;
            free(rec.data);
            rec.data = NULL;
            if (r > 0)
                break;
            continue;
        }
        if (fx_process_record(&c, &rec))
            goto out;
        free(rec.data);
        rec.data = NULL;
        if (rec.type == XCS_REC_END)
            break;
    }

    if (fx_stream_complete(&c))
        goto out;
    fx_log(xch, XTL_INFO, "Restore successful");
    fx_log(xch, XTL_INFO, "XenStore: mfn %#" PRIx64 ", dom %u, evt %u",
           c.store_gfn, store_domid, store_evtchn);
    fx_log(xch, XTL_INFO, "Console: mfn %#" PRIx64 ", dom %u, evt %u",
           c.console_gfn, console_domid, console_evtchn);
    *store_mfn = (unsigned long)c.store_gfn;
    *console_mfn = (unsigned long)c.console_gfn;
    rc = 0;

out:
    if (rc) {
        saved_errno = errno;
        fx_perror(xch, "Restore failed");
    }
    free(rec.data);
    for (size_t i = 0; i < c.nbuf; i++)
        free(c.buf[i].data);
    free(c.buf);
    for (unsigned long p = 0; p < c.pages_len; p++)
        free(c.pages[p]);
    free(c.pages);
    free(c.hvm_ctx);
    if (rc)
        errno = saved_errno;
    return rc;
}

/*----- the scheduler: credit2 caps (auto-converge's xen actuator) -----*/

/*
 * xc_domain_getinfo, xc_cpupool_getinfo/_infofree and
 * xc_sched_credit2_domain_get/_set, for the helper's sched-cap mode
 * (csrc/sched_cap.c); xc_domain_getinfolist for the guest-type check of a
 * save or restore.  Knobs, read at each call (README.md):
 *   FAKEXEN_GUEST     pvh (default), hvm or pv
 *   FAKEXEN_SCHED     the cpupool's scheduler: credit2 (default), credit,
 *                     or an XEN_SCHEDULER_* number
 *   FAKEXEN_VCPUS     the domain's vCPUs (default 2)
 *   FAKEXEN_CAP_FILE  "WEIGHT CAP\n": the domain's credit2 parameters, read
 *                     by _get and rewritten (whole, renamed into place) by
 *                     _set, so a test reads back what was set; missing:
 *                     weight 256, cap 0.  Unset: kept in memory only.
 */
#define FX_DEFAULT_VCPUS 2UL
#define FX_DEFAULT_WEIGHT 256U

static struct xen_domctl_sched_credit2 fx_sched_mem = {FX_DEFAULT_WEIGHT, 0};

static int fx_sched_id(xc_interface *xch, uint32_t *out)
{
    const char *v = getenv("FAKEXEN_SCHED");
    unsigned long n;

    if (!v || !*v || !strcmp(v, "credit2"))
        *out = XEN_SCHEDULER_CREDIT2;
    else if (!strcmp(v, "credit"))
        *out = XEN_SCHEDULER_CREDIT;
    else if (fx_parse_ulong(v, 255, &n))
        *out = (uint32_t)n;
    else {
        fx_error(xch, "fakexen: bad FAKEXEN_SCHED '%s'", v);
        errno = EINVAL;
        return -1;
    }
    return 0;
}

/*
 * The domain as FAKEXEN_VCPUS and FAKEXEN_GUEST describe it: its vCPUs,
 * whether it is an HVM container (PVH and HVM) and its emulation flags
 * (PVH: the local APIC only; HVM: every emulated device, a device model).
 */
static int fx_domain(xc_interface *xch, unsigned long *vcpus, int *hvm, uint32_t *emu)
{
    const char *v = getenv("FAKEXEN_VCPUS");
    const char *g = getenv("FAKEXEN_GUEST");

    *vcpus = FX_DEFAULT_VCPUS;
    if (v && *v && (!fx_parse_ulong(v, 128, vcpus) || *vcpus == 0)) {
        fx_error(xch, "fakexen: bad FAKEXEN_VCPUS '%s' (1..128)", v);
        errno = EINVAL;
        return -1;
    }
    if (!g || !*g || !strcmp(g, "pvh")) {
        *hvm = 1;
        *emu = XEN_X86_EMU_LAPIC;
    } else if (!strcmp(g, "hvm")) {
        *hvm = 1;
        *emu = XEN_X86_EMU_ALL;
    } else if (!strcmp(g, "pv")) {
        *hvm = 0;
        *emu = 0;
    } else {
        fx_error(xch, "fakexen: bad FAKEXEN_GUEST '%s' (pv, pvh or hvm)", g);
        errno = EINVAL;
        return -1;
    }
    return 0;
}

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain,
                          unsigned int max_domains, xc_domaininfo_t *info)
{
    unsigned long vcpus;
    uint32_t emu;
    int hvm;

    if (fx_domain(xch, &vcpus, &hvm, &emu) < 0)
        return -1;
    if (max_domains == 0)
        return 0;
    memset(info, 0, sizeof(*info));
    info->domain = (domid_t)first_domain;
    info->flags = hvm ? XEN_DOMINF_hvm_guest : 0;
    info->nr_online_vcpus = (uint32_t)vcpus;
    info->max_vcpu_id = (uint32_t)vcpus - 1;
    info->arch_config.emulation_flags = emu;
    return 1;
}

/* The same domain in libxc's older shape (what sched-cap asks). */
int xc_domain_getinfo(xc_interface *xch, uint32_t first_domid,
                      unsigned int max_doms, xc_dominfo_t *info)
{
    xc_domaininfo_t d;
    int n = xc_domain_getinfolist(xch, first_domid, max_doms ? 1 : 0, &d);

    if (n <= 0)
        return n;
    memset(info, 0, sizeof(*info));
    info->domid = d.domain;
    info->hvm = !!(d.flags & XEN_DOMINF_hvm_guest);
    info->nr_online_vcpus = d.nr_online_vcpus;
    info->max_vcpu_id = d.max_vcpu_id;
    info->cpupool = d.cpupool;
    return 1;
}

xc_cpupoolinfo_t *xc_cpupool_getinfo(xc_interface *xch, uint32_t poolid)
{
    xc_cpupoolinfo_t *info = calloc(1, sizeof(*info));

    if (!info)
        return NULL;
    info->cpupool_id = poolid;
    if (fx_sched_id(xch, &info->sched_id) < 0) {
        free(info);
        return NULL;
    }
    return info;
}

void xc_cpupool_infofree(xc_interface *xch, xc_cpupoolinfo_t *info)
{
    (void)xch;
    free(info);
}

/*
 * Before a credit2 call: EINVAL on a domain under another scheduler, as
 * Xen; *path is FAKEXEN_CAP_FILE (NULL: the parameters live in memory).
 */
static int fx_credit2_check(xc_interface *xch, const char **path)
{
    uint32_t id;

    *path = getenv("FAKEXEN_CAP_FILE");
    if (*path && !**path)
        *path = NULL;
    if (fx_sched_id(xch, &id) < 0)
        return -1;
    if (id != XEN_SCHEDULER_CREDIT2) {
        errno = EINVAL;
        return -1;
    }
    return 0;
}

int xc_sched_credit2_domain_get(xc_interface *xch, uint32_t domid,
                                struct xen_domctl_sched_credit2 *sdom)
{
    const char *path;
    unsigned int weight, cap;
    FILE *f = NULL;
    int rc = -1;

    (void)domid;
    if (fx_credit2_check(xch, &path) < 0)
        goto out;
    *sdom = fx_sched_mem;
    if (!path) {
        rc = 0;
        goto out;
    }
    f = fopen(path, "re");
    if (!f) {
        if (errno == ENOENT) {
            sdom->weight = FX_DEFAULT_WEIGHT;
            sdom->cap = 0;
            rc = 0;
        }
        goto out;
    }
    if (fscanf(f, "%u %u", &weight, &cap) != 2 || weight > 65535 || cap > 65535) {
        fx_error(xch, "fakexen: FAKEXEN_CAP_FILE %s is not 'WEIGHT CAP'", path);
        errno = EINVAL;
        goto out;
    }
    sdom->weight = (uint16_t)weight;
    sdom->cap = (uint16_t)cap;
    rc = 0;

out:
    if (f)
        fclose(f);
    return rc;
}

int xc_sched_credit2_domain_set(xc_interface *xch, uint32_t domid,
                                struct xen_domctl_sched_credit2 *sdom)
{
    const char *path;
    char tmp[4096];
    FILE *f = NULL;
    int rc = -1;

    (void)domid;
    if (fx_credit2_check(xch, &path) < 0)
        goto out;
    if (!path) {
        fx_sched_mem = *sdom;
        rc = 0;
        goto out;
    }
    if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp)) {
        errno = ENAMETOOLONG;
        goto out;
    }
    f = fopen(tmp, "we");
    if (!f)
        goto out;
    {
        int wrote = fprintf(f, "%u %u\n", sdom->weight, sdom->cap);
        int closed = fclose(f);

        f = NULL;
        if (wrote < 0 || closed != 0) {
            unlink(tmp);
            goto out;
        }
    }
    if (rename(tmp, path) < 0)
        goto out;
    rc = 0;

out:
    if (f)
        fclose(f);
    return rc;
}

/*----- log-dirty for `xcsave plan` (the helper's logdirty mode) -----*/

/*
 * xc_domain_maximum_gpfn, xc_shadow_control (ENABLE_LOGDIRTY, OFF),
 * xc_logdirty_control (CLEAN) and the hypercall buffers they use.  The
 * guest dirties FAKEXEN_LOGDIRTY_PAGES pages (default 100) between two
 * CLEANs: the k-th CLEAN names pfns (k-1)*n .. k*n-1, modulo
 * FAKEXEN_WSS (default: every page), so the counts are known exactly.
 * Whether log-dirty is on lives in the file FAKEXEN_LOGDIRTY ("1"/"0";
 * missing: off) when set, so that a test sees it across processes (a
 * helper killed with it on, the clean-up helper that turns it off); else
 * in this process.  ENABLE while on fails with EINVAL, as Xen refuses a
 * second enable.  FAKEXEN_LOGDIRTY_FAIL=maxgpfn|enable|clean|off fails that
 * call with FAKEXEN_ERRNO; FAKEXEN_DELAY_MS delays each CLEAN.
 */
static int fx_ld_on_here;
static unsigned long fx_ld_cleans;

static bool fx_ld_fail(xc_interface *xch, const char *what)
{
    const char *v = getenv("FAKEXEN_LOGDIRTY_FAIL");

    if (!v || strcmp(v, what) != 0)
        return false;
    fx_log(xch, XTL_DEBUG, "fakexen: injecting log-dirty failure at '%s'", what);
    errno = xch->fail_errno;
    return true;
}

static unsigned long fx_ld_knob(const char *name, unsigned long dflt,
                                unsigned long max)
{
    const char *v = getenv(name);
    unsigned long n;

    if (!v || !*v || !fx_parse_ulong(v, max, &n))
        return dflt;
    return n;
}

static int fx_ld_get(void)
{
    const char *path = getenv("FAKEXEN_LOGDIRTY");
    char c = '0';
    FILE *f;

    if (!path || !*path)
        return fx_ld_on_here;
    f = fopen(path, "re");
    if (!f)
        return 0;
    if (fread(&c, 1, 1, f) != 1)
        c = '0';
    fclose(f);
    return c == '1';
}

static int fx_ld_set(int on)
{
    const char *path = getenv("FAKEXEN_LOGDIRTY");
    FILE *f;

    fx_ld_on_here = on;
    if (!path || !*path)
        return 0;
    f = fopen(path, "we");
    if (!f)
        return -1;
    fputs(on ? "1\n" : "0\n", f);
    return fclose(f);
}

int xc_domain_maximum_gpfn(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns)
{
    (void)domid;
    if (fx_ld_fail(xch, "maxgpfn")) {
        fx_perror(xch, "Unable to get maximum gpfn");
        return -1;
    }
    *gpfns = xch->pages - 1;
    return 0;
}

void *xc__hypercall_buffer_alloc_pages(xc_interface *xch, xc_hypercall_buffer_t *b,
                                       int nr_pages)
{
    (void)xch;
    b->hbuf = calloc((size_t)nr_pages, XC_PAGE_SIZE);
    return b->hbuf;
}

void xc__hypercall_buffer_free_pages(xc_interface *xch, xc_hypercall_buffer_t *b,
                                     int nr_pages)
{
    (void)xch;
    (void)nr_pages;
    free(b->hbuf);
    b->hbuf = NULL;
}

int xc_shadow_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                      unsigned int *mb, unsigned int mode)
{
    (void)domid;
    (void)mb;
    (void)mode;
    if (sop == XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY) {
        if (fx_ld_fail(xch, "enable")) {
            fx_perror(xch, "Couldn't enable shadow mode");
            return -1;
        }
        if (fx_ld_get()) {
            errno = EINVAL; /* Xen: log-dirty is already on */
            return -1;
        }
        fx_ld_cleans = 0;
        return fx_ld_set(1);
    }
    if (sop == XEN_DOMCTL_SHADOW_OP_OFF) {
        if (fx_ld_fail(xch, "off")) {
            fx_perror(xch, "Couldn't disable shadow mode");
            return -1;
        }
        return fx_ld_set(0);
    }
    errno = EOPNOTSUPP;
    return -1;
}

long long xc_logdirty_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                              xc_hypercall_buffer_t *dirty_bitmap, unsigned long pages,
                              unsigned int mode, xc_shadow_op_stats_t *stats)
{
    unsigned long n = fx_ld_knob("FAKEXEN_LOGDIRTY_PAGES", 100, FX_MAX_PAGES);
    unsigned long wss = fx_ld_knob("FAKEXEN_WSS", xch->pages, xch->pages);
    unsigned long *bits = dirty_bitmap ? dirty_bitmap->hbuf : NULL;
    unsigned long count = 0;

    (void)domid;
    (void)mode;
    fx_delay(xch);
    if (fx_ld_fail(xch, "clean")) {
        fx_perror(xch, "Failed to retrieve logdirty bitmap");
        return -1;
    }
    if (sop != XEN_DOMCTL_SHADOW_OP_CLEAN || !bits || pages > xch->pages) {
        errno = EINVAL;
        return -1;
    }
    if (!fx_ld_get()) {
        errno = EINVAL; /* log-dirty is off: no bitmap to take */
        return -1;
    }
    if (wss == 0)
        wss = 1;
    memset(bits, 0, (pages + 63) / 64 * 8);
    for (unsigned long i = 0; i < n; i++) {
        unsigned long pfn = (fx_ld_cleans * n + i) % wss;

        if (pfn < pages && !(bits[pfn / 64] & (1UL << (pfn % 64)))) {
            bits[pfn / 64] |= 1UL << (pfn % 64);
            count++;
        }
    }
    fx_ld_cleans++;
    if (stats) {
        stats->dirty_count = (uint32_t)count;
        stats->fault_count = 0;
    }
    return 0;
}
