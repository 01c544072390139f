/*
 * logdirty.c - the helper's one-shot log-dirty mode, for `xcsave plan`:
 *
 *   --xcsave-1 logdirty [--backend xen] --domid N
 *              [--interval-ms I] [--samples K] [--off]
 *
 * Turns the Xen domain's log-dirty on (libxenctrl's shadow control,
 * ENABLE_LOGDIRTY), takes the dirty bitmap K times every I ms (CLEAN: read
 * and clear, as a save's round does) and reports each take in a
 * logdirty_sample message (pages named, distinct pages so far, the real
 * interval), then turns log-dirty off (OFF) and says logdirty_off.  --off
 * only turns it off (the parent's clean-up after a helper of this mode
 * died).  Messages: hello, logdirty_on (after ENABLE succeeded: from then
 * on log-dirty is ours to turn off), logdirty_sample, logdirty_off, log,
 * complete (xcsave/proto.py).
 *
 * Log-dirty goes off whatever ends the sampling: an error, SIGTERM/SIGINT/
 * SIGHUP (the supervisor's stop; see xcs_arm_sigterm_abort), the parent's
 * death (PR_SET_PDEATHSIG) or EOF on stdin (the parent closed it).  Only
 * SIGKILL can stop us with it on; the parent then runs --off itself,
 * because we had said logdirty_on and never logdirty_off.  A log-dirty
 * that was on before we came (another save) makes ENABLE fail: we report
 * it and never turn off what is not ours.
 *
 * The guest's device model also dirties memory (qemu's own log-dirty,
 * switched by libxl during a save); a plan samples the guest's writes only.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "helper.h"

#define LD_MAX_INTERVAL_MS 60000u
#define LD_MAX_SAMPLES 600000u

struct ld_args {
    uint32_t domid;
    unsigned long interval_ms;
    unsigned long samples;
    unsigned long off;
};

static void ld_parse(int argc, char **argv, struct ld_args *a)
{
    const struct xcs_oneshot_opt opts[] = {
        {"interval-ms", 1, LD_MAX_INTERVAL_MS, &a->interval_ms},
        {"samples", 1, LD_MAX_SAMPLES, &a->samples},
        {"off", 0, 0, &a->off},
    };

    a->interval_ms = 100;
    a->samples = 30;
    a->domid = xcs_oneshot_argv("logdirty", "[--backend xen] --domid N [--interval-ms I] "
                                "[--samples K] [--off]", argc, argv, opts, 3);
}

#ifdef XCS_HAVE_XEN
#include <xenctrl.h>
#include <xentoollog.h>

static void ld_vmessage(struct xentoollog_logger *lg, xentoollog_level level,
                        int errnoval, const char *context, const char *format,
                        va_list al)
{
    (void)lg;
    xcs_vlog((uint32_t)level, errnoval, context, format, al);
}

static void ld_progress(struct xentoollog_logger *lg, const char *context,
                        const char *doing_what, int percent, unsigned long done,
                        unsigned long total)
{
    (void)lg, (void)context, (void)doing_what, (void)percent, (void)done, (void)total;
}

static void ld_destroy(struct xentoollog_logger *lg)
{
    (void)lg;
}

static xentoollog_logger ld_logger = {ld_vmessage, ld_progress, ld_destroy};

static uint64_t ld_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * fd trick: stop_fd is a pipe's read end handed to xcs_arm_sigterm_abort
 * as the "stream".  A stop (SIGTERM/SIGINT/SIGHUP, the parent's death, our
 * stdout breaking) dup2()s /dev/null over it; we notice by fstat: a pipe
 * became a character device.  The signal itself interrupts our poll().
 */
static int ld_stopped(int stop_fd)
{
    struct stat st;

    return fstat(stop_fd, &st) < 0 || !S_ISFIFO(st.st_mode);
}

/*
 * Wait until `until` (CLOCK_MONOTONIC ns); 0, or -1 if we are being
 * stopped: a stop above, or EOF (or anything) on stdin, where the parent
 * only ever closes it (it sends nothing in this mode until complete).
 */
static int ld_wait(int stop_fd, uint64_t until)
{
    for (;;) {
        struct pollfd p = {.fd = STDIN_FILENO, .events = POLLIN};
        uint64_t now = ld_now_ns();
        int r;

        if (ld_stopped(stop_fd))
            return -1;
        if (now >= until)
            return 0;
        r = poll(&p, 1, (int)((until - now + 999999) / 1000000));
        if (r < 0 && errno != EINTR)
            return -1;
        if (r > 0)
            return -1; /* EOF or a hang-up on stdin: the parent is gone */
    }
}

static uint64_t ld_popcount(const unsigned long *w, size_t words)
{
    uint64_t n = 0;

    for (size_t i = 0; i < words; i++)
        n += (uint64_t)__builtin_popcountl(w[i]);
    return n;
}

/* Log-dirty off; logdirty_off said when it is. */
static int ld_off(xc_interface *xch, uint32_t domid)
{
    if (xc_shadow_control(xch, domid, XEN_DOMCTL_SHADOW_OP_OFF, NULL, 0) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                "turning log-dirty off for domain %u", domid);
        return -1;
    }
    xcs_stub_logdirty_off();
    return 0;
}

/* Enable, take K samples, disable.  0 or -1 with errno set. */
static int ld_sample(xc_interface *xch, const struct ld_args *a, int stop_fd)
{
    DECLARE_HYPERCALL_BUFFER(unsigned long, bitmap);
    xen_pfn_t max_gpfn = 0;
    unsigned long *onion = NULL;
    size_t words, bytes, pages_alloc;
    uint64_t nr, union_pages = 0, last, start;
    int rc = -1, on = 0, err = 0;

    if (xc_domain_maximum_gpfn(xch, a->domid, &max_gpfn) < 0) {
        err = errno;
        xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT,
                "domain %u: cannot read its size (does it exist?)", a->domid);
        goto out;
    }
    nr = (uint64_t)max_gpfn + 1;
    words = (size_t)((nr + 8 * sizeof(unsigned long) - 1) / (8 * sizeof(unsigned long)));
    bytes = words * sizeof(unsigned long);
    pages_alloc = (bytes + XC_PAGE_SIZE - 1) / XC_PAGE_SIZE;
    bitmap = xc_hypercall_buffer_alloc_pages(xch, bitmap, pages_alloc);
    onion = calloc(words, sizeof(unsigned long));
    if (!bitmap || !onion) {
        err = ENOMEM;
        xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT,
                "a dirty bitmap of %zu bytes", bytes);
        goto out;
    }
    if (xc_shadow_control(xch, a->domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
                          NULL, 0) < 0) {
        err = errno;
        /* Not ours to turn off: on already (a save?), or no such domain. */
        xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT,
                err == EINVAL ? "domain %u: cannot turn log-dirty on (on already: "
                                "is it being saved or migrated?)"
                              : "domain %u: cannot turn log-dirty on", a->domid);
        goto out;
    }
    on = 1;
    xcs_stub_logdirty_on(nr);
    start = last = ld_now_ns();
    for (unsigned int k = 1; k <= a->samples; k++) {
        xc_shadow_op_stats_t stats;
        uint64_t now, taken;

        if (ld_wait(stop_fd, start + (uint64_t)k * a->interval_ms * 1000000u) < 0) {
            err = EINTR;
            xcs_log(XCS_LOG_NOTICE, err, XCS_HELPER_CONTEXT,
                    "stopped after %u of %lu samples", k - 1, a->samples);
            goto out;
        }
        memset(&stats, 0, sizeof(stats));
        if (xc_logdirty_control(xch, a->domid, XEN_DOMCTL_SHADOW_OP_CLEAN,
                                HYPERCALL_BUFFER(bitmap), (unsigned long)nr, 0,
                                &stats) < 0) {
            err = errno;
            xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT,
                    "domain %u: taking the dirty bitmap", a->domid);
            goto out;
        }
        now = ld_now_ns();
        taken = ld_popcount(bitmap, words);
        for (size_t i = 0; i < words; i++) {
            union_pages += (uint64_t)__builtin_popcountl(bitmap[i] & ~onion[i]);
            onion[i] |= bitmap[i];
        }
        xcs_stub_logdirty_sample(k, taken, union_pages, now - last);
        last = now;
    }
    rc = 0;

out:
    if (on && ld_off(xch, a->domid) < 0 && rc == 0) {
        err = errno;
        rc = -1;
    }
    free(onion);
    if (bitmap)
        xc_hypercall_buffer_free_pages(xch, bitmap, pages_alloc);
    errno = err;
    return rc;
}

static int ld_run(const struct ld_args *a)
{
    xc_interface *xch = NULL;
    int pfd[2] = {-1, -1};
    int rc = -1, err = 0;

    /* The stop detector (see ld_stopped); its write end is never used. */
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        err = errno;
        xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT, "pipe");
        goto out;
    }
    xcs_arm_sigterm_abort(pfd[0]);
    xch = xc_interface_open(&ld_logger, &ld_logger, 0);
    if (!xch) {
        err = errno;
        xcs_log(XCS_LOG_ERROR, err, XCS_HELPER_CONTEXT, "xc_interface_open failed");
        goto out;
    }
    if (a->off)
        rc = ld_off(xch, a->domid);
    else
        rc = ld_sample(xch, a, pfd[0]);
    err = rc ? errno : 0;

out:
    if (xch)
        xc_interface_close(xch);
    if (pfd[0] >= 0)
        close(pfd[0]);
    if (pfd[1] >= 0)
        close(pfd[1]);
    errno = err;
    return rc;
}
#else
static int ld_run(const struct ld_args *a)
{
    (void)a;
    return xcs_not_built(XCS_HELPER_CONTEXT, "logdirty: the xen backend",
                         "xenctrl.h was missing");
}
#endif

int xcs_logdirty_main(int argc, char **argv)
{
    struct ld_args a;
    int rc, err;

    memset(&a, 0, sizeof(a));
    signal(SIGPIPE, SIG_IGN); /* a broken stdout is EPIPE, reported, not death */
    ld_parse(argc, argv, &a); /* a bad argv: one line on stderr, before hello */
    xcs_stub_hello(XCS_PROTO_VERSION, XCS_PROTO_HASH, "xen", "logdirty");
    errno = 0;
    rc = ld_run(&a);
    err = rc ? (errno ? errno : EIO) : 0;
    xcs_stub_complete(rc, err);
    return 0;
}
