/*
 * xcsave-helper - runs one domain save or restore for a toolstack.
 *
 * The toolstack forks and execs us, passes the migration stream as an fd
 * number in argv, and talks to us over stdin/stdout.  We do the page copying
 * and the libxenguest (or simulated hypervisor) calls; the toolstack stays
 * responsive and can drive many of us at once.  This is the design of Xen's
 * libxl-save-helper (2012), and in the xen-4.17 dialect we are a drop-in
 * replacement for it (LIBXL_SAVE_HELPER=/path/to/xcsave-helper).
 *
 * Protocol.  We talk on stdin and stdout, in binary, in host byte order.  We
 * speak first, and in xen-4.17 only when we have something to say.  Each
 * message is a length (u16 in xen-4.17, u32 in xcsave-1) counting the body
 * that follows; the body is a u16 message number and the packed arguments.
 * If the message needs a reply, we wait for the parent to write one native
 * int, the callback's return value.  In xcsave-1 our first message is hello
 * (protocol version, the message table's hash, backend, mode).  The messages,
 * their numbers, arguments and reply rules are the table in xcsave/proto.py;
 * the encoders are generated from it into xcsave_msgs.h.
 *
 * Ending.  A save ends with complete(retval, errno); a restore first sends
 * restore_results(store_gfn, console_gfn), whatever the result, then
 * complete.  We wait for complete's reply, then exit 0.  Exit status 255
 * means a fatal error before or outside the operation (bad argv, the control
 * pipe broke), 254 that stdin reached EOF while we waited for a reply.
 * In xen-4.17 complete's reply is ignored, as Xen's helper does.  In
 * xcsave-1 it ends a save: the caller commits the image first (fsync and
 * rename of the file behind io_fd) and replies 0 when it did, or non-zero
 * when its commit failed.  Until then the source stays suspended; on
 * non-zero, or no reply (EOF, SIGTERM: the caller died or stopped us), the
 * sim backend puts the source back as it was (save_not_committed) and the
 * caller's temporary (--out-tmp) is removed -- unless its name is gone while
 * the file still has one: the caller renamed it (committed) and died before
 * replying.  So a save either has its image in place or leaves its source as
 * it was, whenever the caller dies.  The xen backend ignores the reply.
 *
 * argv:
 *   --save-domain    <io_fd> <recv_fd> <domid> <xcflags> <cbflags> <stream_type>
 *   --restore-domain <io_fd> <send_back_fd> <domid> <store_evtchn>
 *                    <store_domid> <console_evtchn> <console_domid>
 *                    <cbflags> <stream_type>
 *        Xen 4.17's layout; dialect xen-4.17; backend xen.
 *   --xcsave-1 save|restore [--backend sim|xen] [--io-fd N] [--aux-fd N]
 *        [--domid N] [--flags N] [--cbflags N] [--stream-type N]
 *        [--store-evtchn N] [--store-domid N] [--console-evtchn N]
 *        [--console-domid N] [--sim PATH] [--format libxc|libxl|xl]
 *        [--max-pages N] [--checkpoints N] [--interval-ms N]
 *        [--xl-config PATH] [--legacy-width 32|64] [--legacy-guest pv|hvm]
 *        [--dm-out PATH] [--copy-threads N] [--build-only 0|1]
 *        [--idle-timeout-ms N]
 *        [--out-tmp PATH]   (save: the caller's temporary behind --io-fd,
 *                            removed if the save is not committed)
 *   --xcsave-1 tunnel --io-fd N --plain-fd M --role client|server
 *        --tls-dir DIR [--peer-name HOST] [--handshake-timeout-ms T]
 *        a TLS 1.3 tunnel between the TCP socket N and the plaintext
 *        socket M (tunnel_tls.c); hello's backend is "tls".
 *   --xcsave-1 wire-send --in-fd P (--channel-fd FD)... [--raw]
 *        [--compress off|zstd|adaptive] [--level N] [--max-bandwidth BYTES_PER_S]
 *        [--frame-size BYTES] [--window BYTES] [--resume-sock FD
 *        --resume-timeout-ms T] [--idle-timeout-ms T] [--copy]
 *   --xcsave-1 wire-recv --out-fd P (--channel-fd FD)... [--tee-fd F]
 *        [--frame-size BYTES] [--window BYTES] [--resume-sock FD
 *        --resume-timeout-ms T] [--idle-timeout-ms T] [--copy]
 *        the wire pumps between the plain stream and the channels to the
 *        peer (wire.c; docs/architecture.md, "Migration"); hello's backend
 *        is "wire".
 *   --version   (its "zstd libzstd|none" says whether wire compression is built)
 */

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codec.h"
#include "helper.h"
#include "stream_io.h"
#include "wire.h"

#ifndef XCS_BACKENDS
#define XCS_BACKENDS "sim"
#endif
#define XCS_HELPER_VERSION "0.1.0"
#ifdef XCS_HAVE_TLS
#define XCS_TLS "openssl" /* the tunnel mode (tunnel_tls.c) is built */
#else
#define XCS_TLS "none"
#endif

/* The largest log text we send: xen-4.17 bodies must stay under 64 KiB. */
#define XCS_LOG_MAX_XEN 4000
#define XCS_LOG_MAX_XCS 65536

#define XCS_EXIT_FATAL 255   /* exit(-1) in Xen's helper */
#define XCS_EXIT_REPLY_EOF 254 /* exit(-2): parent closed our stdin */

/*----- protocol state -----*/

static enum xcs_dialect dialect = XCS_DIALECT_XCSAVE_1;
static uint8_t *msgbuf;
static size_t msgbuf_size;

/*
 * Wire modes: the parent may send wire_rate (unasked) until it has seen our
 * complete, so one may sit in front of complete's reply.  Replies there are
 * 0 or -1 and a frame's length is 2..XCS_PARENT_MSG_MAX: such a "reply" is
 * a frame, skipped (see xcs_getreply).
 */
static int reply_after_parent_msgs;

/* Set by the SIGTERM handler (see "signals"): the parent is stopping us. */
static volatile sig_atomic_t sigterm_seen;

enum xcs_dialect xcs_current_dialect(void)
{
    return dialect;
}

int xcs_msg_exists(enum xcs_msg m)
{
    return xcs_msg_numbers[dialect][m] >= 0;
}

void xcs_send_restore_stats(uint32_t checkpoints, uint64_t pages_received, uint64_t bytes,
                            uint64_t duration_ns)
{
    int saved = errno;

    if (xcs_msg_exists(XCS_MSG_RESTORE_STATS))
        xcs_stub_restore_stats(checkpoints, pages_received, bytes, duration_ns);
    errno = saved;
}

int xcs_cb_wanted(const struct xcs_op *op, enum xcs_msg m)
{
    int num = xcs_msg_numbers[dialect][m];

    return num >= 0 && (op->cbflags & (1u << num)) != 0;
}

/* Fatal: say so on stderr (inherited from the parent, as in Xen) and exit. */
static void __attribute__((noreturn, format(printf, 1, 2))) fatal(const char *fmt, ...)
{
    char line[1024];
    va_list al;

    /*
     * The message quotes argv, which is the parent's to choose: escape
     * control characters, so that it stays ONE line on stderr (the parent
     * reports the last line) and cannot drive a terminal.
     */
    va_start(al, fmt);
    vsnprintf(line, sizeof(line), fmt, al);
    va_end(al);
    for (char *c = line; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = '?';
    fprintf(stderr, XCS_HELPER_CONTEXT ": %s\n", line);
    exit(XCS_EXIT_FATAL);
}

void xcs_exit_fatal(void)
{
    exit(XCS_EXIT_FATAL);
}

/* A buffer of at least len bytes for one body (msgtype + args). */
static uint8_t *xcs_msgbuf(size_t len)
{
    /* Room for the length prefix in front of the body, so one write suffices. */
    size_t need = len + sizeof(uint32_t);

    if (need > msgbuf_size) {
        uint8_t *nb = realloc(msgbuf, need);
        if (!nb)
            fatal("out of memory for a %zu-byte message", len);
        msgbuf = nb;
        msgbuf_size = need;
    }
    return msgbuf + sizeof(uint32_t);
}

/*
 * The parent went away in the middle of the operation: it closed our stdin
 * (exit status 254, as Xen's helper) or our stdout broke (255).  Exiting at
 * once, as Xen's helper does, would leave the source domain suspended or a
 * partial target behind; so once an operation with an abort path is under
 * way we take that path, exactly as on SIGTERM, let the backend clean up,
 * drop the frames nobody will read, and exit with the status at the end.
 */
static int parent_gone_status;
static void abort_io(void);
static void discard_out_tmp(void);
static int sigterm_iofd = -1;

static void parent_gone(int status)
{
    if (sigterm_iofd < 0) {
        /* No operation of ours to clean up; no save of ours to commit. */
        discard_out_tmp();
        exit(status);
    }
    if (!parent_gone_status)
        parent_gone_status = status;
    /*
     * Not the signal handler itself: it re-arms SIGTERM's default action,
     * and the parent's death signal (PR_SET_PDEATHSIG) may still be on its
     * way; it must find the handler, not kill us mid-cleanup.
     */
    abort_io();
}

static void write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t r = write(fd, p, n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            /* The parent is gone or closed our stdout: nobody to report to. */
            fprintf(stderr, XCS_HELPER_CONTEXT ": writing to the control pipe: %s\n",
                    strerror(errno));
            parent_gone(XCS_EXIT_FATAL);
            return;
        }
        p += r;
        n -= (size_t)r;
    }
}

/* Frame body (its msgtype filled in here) and send it. */
static void xcs_transmit(enum xcs_msg m, const uint8_t *body, size_t len)
{
    int num = xcs_msg_numbers[dialect][m];
    uint16_t num16;
    uint8_t *frame;
    size_t lsz;

    if (num < 0)
        fatal("bug: message %s does not exist in this dialect", xcs_msg_names[m]);
    if (parent_gone_status == XCS_EXIT_FATAL)
        return; /* stdout is broken: nobody reads frames any more */
    num16 = (uint16_t)num;
    memcpy((uint8_t *)body, &num16, sizeof(num16));
    if (dialect == XCS_DIALECT_XEN_417) {
        uint16_t l16;
        if (len > 0xffff)
            fatal("bug: %s message of %zu bytes exceeds xen-4.17's limit",
                  xcs_msg_names[m], len);
        l16 = (uint16_t)len;
        lsz = sizeof(l16);
        frame = (uint8_t *)body - lsz;
        memcpy(frame, &l16, lsz);
    } else {
        uint32_t l32 = (uint32_t)len;
        lsz = sizeof(l32);
        frame = (uint8_t *)body - lsz;
        memcpy(frame, &l32, lsz);
    }
    write_all(STDOUT_FILENO, frame, lsz + len);
}

/*
 * The reply to m once the parent is stopping us: "the callback failed",
 * the table's stopped column (complete's -1 is "the caller did not
 * commit", see main).
 */
static int reply_when_stopped(enum xcs_msg m)
{
    return xcs_msg_stopped_reply[m];
}

/* Wait for the parent's int reply to message m. */
static int xcs_getreply(enum xcs_msg m)
{
    int v;
    uint8_t *p = (uint8_t *)&v;
    size_t got = 0;

    if (parent_gone_status)
        return reply_when_stopped(m); /* the question never reached anyone */
    while (got < sizeof(v)) {
        ssize_t r = read(STDIN_FILENO, p + got, sizeof(v) - got);
        if (r < 0 && errno == EINTR) {
            /*
             * SIGTERM (a stop, or the parent's death) interrupted the wait:
             * stop waiting, even if something still holds our stdin open.
             */
            if (sigterm_seen)
                return reply_when_stopped(m);
            continue;
        }
        /*
         * After SIGTERM, EOF is the parent saying it will not reply (the
         * supervisor's stop() closes our stdin; libxl goes on replying, as
         * its aborted callbacks complete).  Exiting here would skip the
         * backend's cleanup (resume the guest, log-dirty off, remove a
         * partial domain): fail the callback instead, so that the
         * operation fails "naturally" and complete is still sent.
         */
        if (r <= 0 && sigterm_seen)
            return reply_when_stopped(m);
        if (r <= 0) {
            /*
             * EOF (or an error) while the operation waits for a reply: the
             * parent has given up on us (or died).  The exit status will be
             * 254, "reply pipe closed", as Xen's helper's; but first the
             * operation is aborted so the backend cleans up (parent_gone).
             */
            fprintf(stderr, XCS_HELPER_CONTEXT ": %s reading the reply to %s\n",
                    r == 0 ? "EOF" : strerror(errno), xcs_msg_names[m]);
            parent_gone(XCS_EXIT_REPLY_EOF);
            return reply_when_stopped(m);
        }
        got += (size_t)r;
        if (got == sizeof(v) && reply_after_parent_msgs && v >= 2 &&
            v <= XCS_PARENT_MSG_MAX) {
            /* A parent->helper frame's length, not a reply: drop its body. */
            uint8_t skip[XCS_PARENT_MSG_MAX];
            size_t left = (size_t)v;
            while (left) {
                ssize_t k = read(STDIN_FILENO, skip, left);
                if (k < 0 && errno == EINTR)
                    continue;
                if (k <= 0)
                    break;
                left -= (size_t)k;
            }
            got = 0;
        }
    }
    return v;
}

static uint8_t *put(uint8_t *p, const void *v, size_t n)
{
    memcpy(p, v, n);
    return p + n;
}

/* What the generated stubs call (xcsave_msgs.h): each arg in order. */
void xcs_send(enum xcs_msg m, const struct xcs_arg *a, size_t n)
{
    size_t len = 2;
    uint8_t *buf, *p;

    for (size_t i = 0; i < n; i++)
        len += (a[i].var ? sizeof(a[i].n) : 0) + a[i].n;
    buf = xcs_msgbuf(len);
    p = buf + 2; /* the msgtype is filled in by xcs_transmit */
    for (size_t i = 0; i < n; i++) {
        if (a[i].var)
            p = put(p, &a[i].n, sizeof(a[i].n));
        if (a[i].n)
            p = put(p, a[i].v, a[i].n);
    }
    xcs_transmit(m, buf, len);
}

int xcs_ask(enum xcs_msg m, const struct xcs_arg *a, size_t n)
{
    xcs_send(m, a, n);
    return xcs_getreply(m);
}

/*
 * The other direction's framing (xcsave-1 only): a message the parent sends
 * unasked (wire_rate), LEN u32 | u16 number | args, the same layout as
 * ours.  Only rows the parent may send (the table's `p` flag) are taken.
 */
ssize_t xcs_parse_parent_msg(const uint8_t *buf, size_t have, enum xcs_msg *m,
                             const uint8_t **body, uint32_t *body_len)
{
    uint32_t len;
    uint16_t num;

    if (have < sizeof(len) + sizeof(num))
        return 0;
    memcpy(&len, buf, sizeof(len));
    memcpy(&num, buf + sizeof(len), sizeof(num));
    if (len < sizeof(num) || len > XCS_PARENT_MSG_MAX) {
        errno = EPROTO;
        return -1;
    }
    if (have < sizeof(len) + len)
        return 0;
    for (int i = 0; i < XCS_MSG_COUNT; i++) {
        if (xcs_msg_numbers[XCS_DIALECT_XCSAVE_1][i] == num && xcs_msg_from_parent[i]) {
            *m = (enum xcs_msg)i;
            *body = buf + sizeof(len) + sizeof(num);
            *body_len = len - (uint32_t)sizeof(num);
            return (ssize_t)(sizeof(len) + len);
        }
    }
    errno = EPROTO;
    return -1;
}

void xcs_vlog(uint32_t level, int errnoval, const char *context,
              const char *fmt, va_list al)
{
    size_t max = dialect == XCS_DIALECT_XEN_417 ? XCS_LOG_MAX_XEN
                                                 : XCS_LOG_MAX_XCS;
    char *text = NULL;
    int n = vasprintf(&text, fmt, al);

    if (n < 0)
        fatal("out of memory formatting a log message");
    if ((size_t)n > max)
        text[max] = '\0';
    if (getenv("XCSAVE_DEBUG"))
        fprintf(stderr, "%s: [%u] %s\n", context ? context : "", level, text);
    xcs_stub_log(level, (uint32_t)errnoval, context ? context : "", text);
    free(text);
}

void xcs_log(uint32_t level, int errnoval, const char *context,
             const char *fmt, ...)
{
    va_list al;

    va_start(al, fmt);
    xcs_vlog(level, errnoval, context, fmt, al);
    va_end(al);
}

/*----- signals -----*/

/*
 * /dev/null, opened read-only before the operation starts, so that the
 * SIGTERM handler only has to dup2() (async-signal-safe) and never open().
 */
static int sigterm_nullfd = -1;

/* Make the operation fail where it stands (see sigterm_abort); idempotent. */
static void abort_io(void)
{
    sigterm_seen = 1;
    if (sigterm_iofd >= 0)
        dup2(sigterm_nullfd, sigterm_iofd);
}

static void sigterm_abort(int signo)
{
    int saved = errno;

    /*
     * Abort the operation without touching anything that is not
     * async-signal-safe: replace the stream fd with /dev/null.  A blocked or
     * next write() then fails (EBADF: /dev/null is open read-only) and a
     * read() sees EOF, so the backend fails "naturally" and runs its own
     * cleanup: log-dirty off, the source domain resumed, a partial target
     * removed.  No logging here (Xen learnt that the hard way: cd84a2baad).
     * sigterm_seen makes EOF on stdin mean "no reply will come" rather
     * than "exit 254" (see xcs_getreply()).
     *
     * signal trick: the handler stays installed, so a SIGTERM after the
     * first is absorbed (abort_io is idempotent) and never kills us in the
     * middle of that cleanup.  It used to re-arm SIG_DFL "so a second
     * SIGTERM kills", and a toolstack SIGKILLed mid-save then left its
     * domain running with log-dirty on: PR_SET_PDEATHSIG fires each time
     * the thread we are parented to exits, and when a multi-threaded parent
     * dies the kernel reparents us to its next live thread first (CPython
     * 3.11's asyncio has a child-watcher thread beside the loop's), so its
     * death can deliver SIGTERM twice; the second one killed us before the
     * engine's out: path turned log-dirty off.  A stop() followed by the
     * parent's death is two SIGTERMs too.  Our cleanup is bounded (the
     * stream is /dev/null, replies fail at once); whoever must end us at
     * once sends SIGKILL, as the supervisor's stop() does after its grace.
     */
    (void)signo;
    abort_io();
    errno = saved;
}

/* Our parent when we started: to notice a parent that died before prctl(). */
static pid_t start_ppid;

void xcs_arm_sigterm_abort(int io_fd)
{
    struct sigaction sa;

    sigterm_nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (sigterm_nullfd < 0)
        fatal("open /dev/null: %s", strerror(errno));
    sigterm_iofd = io_fd;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = sigterm_abort;
    sigemptyset(&sa.sa_mask);
    /* No SA_RESTART: a blocked write() returns EINTR and is retried, then fails on /dev/null. */
    sa.sa_flags = 0;
    /*
     * signal trick: SIGINT and SIGHUP abort the same way.  A terminal's
     * Ctrl-C (or hangup) goes to its whole foreground process group, and we
     * are in the toolstack's: their default action would kill us in the
     * middle of a copy, with log-dirty on, the source suspended or a
     * partial target left for someone else to clean.  The toolstack got
     * the same signal and judges the run we then fail.
     */
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0 ||
        sigaction(SIGHUP, &sa, NULL) < 0)
        fatal("sigaction: %s", strerror(errno));
    /*
     * If the toolstack dies (even SIGKILL), the kernel sends us SIGTERM, so
     * the abort above runs and the backend resumes the source domain or
     * removes its partial target instead of leaving them behind.  The
     * signal follows the parent *thread* that forked us (asyncio forks from
     * the loop's thread).  A parent that died before this call is caught by
     * comparing getppid() with the one we started with.
     */
    xcs_arm_parent_death();
}

void xcs_arm_parent_death(void)
{
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) < 0)
        fatal("prctl(PR_SET_PDEATHSIG): %s", strerror(errno));
    if (getppid() != start_ppid)
        raise(SIGTERM);
}

int xcs_not_built(const char *context, const char *what, const char *missing)
{
    xcs_log(XCS_LOG_ERROR, EOPNOTSUPP, context,
            "%s is not built into this helper (%s when xcsave was built)", what,
            missing);
    errno = EOPNOTSUPP;
    return -1;
}

int xcs_sigterm_until_ppoll(void (*handler)(int))
{
    struct sigaction sa;
    sigset_t block;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigprocmask(SIG_BLOCK, &block, NULL) < 0)
        return -1;
    return 0;
}

/*----- argv -----*/

int xcs_parse_ulong(const char *s, int base, unsigned long lo, unsigned long hi,
                    unsigned long *out)
{
    char *end = NULL;

    /* strtoul would skip spaces and take a sign ("-1" is ULONG_MAX). */
    if (!s || s[0] < '0' || s[0] > '9')
        return -1;
    errno = 0;
    *out = strtoul(s, &end, base);
    return (errno || *end || *out < lo || *out > hi) ? -1 : 0;
}

static unsigned long parse_num(const char *what, const char *s, unsigned long max)
{
    unsigned long v;

    if (!s)
        fatal("missing argument <%s>", what);
    if (xcs_parse_ulong(s, 0, 0, max, &v) < 0)
        fatal("bad <%s> '%s': expected a number from 0 to %lu", what, s, max);
    return v;
}

/* A one-shot mode's bad argv: one line (argv never echoed), exit 255. */
static void __attribute__((noreturn)) oneshot_usage(const char *mode, const char *usage,
                                                    const char *why)
{
    fatal("%s: %s (usage: --xcsave-1 %s %s)", mode, why, mode, usage);
}

uint32_t xcs_oneshot_argv(const char *mode, const char *usage, int argc, char **argv,
                          const struct xcs_oneshot_opt *opts, size_t nopts)
{
    /* getopt_long's table: --backend, --domid, then opts[i] as val 2 + i. */
    struct option table[2 + XCS_ONESHOT_MAX_OPTS + 1] = {
        {"backend", required_argument, NULL, 0},
        {"domid", required_argument, NULL, 1},
    };
    unsigned long domid = 0;
    int have_domid = 0, c;
    size_t i;

    if (nopts > XCS_ONESHOT_MAX_OPTS)
        fatal("%s: %zu options: more than a one-shot mode takes", mode, nopts);
    for (i = 0; i < nopts; i++) {
        table[2 + i].name = opts[i].name;
        table[2 + i].has_arg = opts[i].hi ? required_argument : no_argument;
        table[2 + i].val = 2 + (int)i;
    }
    optind = 3;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", table, NULL)) != -1) {
        if (c == 0) {
            if (strcmp(optarg, "xen"))
                oneshot_usage(mode, usage, "the only backend is xen (a sim domain "
                              "is handled in-process)");
        } else if (c == 1) {
            /* A domain's id: below DOMID_FIRST_RESERVED (0x7ff0). */
            if (xcs_parse_ulong(optarg, 10, 0, 0x7fef, &domid) < 0)
                oneshot_usage(mode, usage, "bad --domid: expected a number from 0 to 32751");
            have_domid = 1;
        } else if (c >= 2 && (size_t)(c - 2) < nopts) {
            const struct xcs_oneshot_opt *o = &opts[c - 2];

            if (!o->hi)
                *o->value = 1;
            else if (xcs_parse_ulong(optarg, 10, o->lo, o->hi, o->value) < 0)
                fatal("%s: bad --%s: expected a number from %lu to %lu (usage: "
                      "--xcsave-1 %s %s)", mode, o->name, o->lo, o->hi, mode, usage);
        } else {
            oneshot_usage(mode, usage, "unknown or incomplete option");
        }
    }
    if (optind != argc)
        oneshot_usage(mode, usage, "unexpected argument");
    if (!have_domid)
        oneshot_usage(mode, usage, "--domid is required");
    return (uint32_t)domid;
}

/* An fd number, or -1 ("none") where allowed. */
static int parse_fd(const char *what, const char *s, int allow_none)
{
    int fd;

    if (allow_none && s && strcmp(s, "-1") == 0)
        return -1;
    fd = (int)parse_num(what, s, INT_MAX);
    /*
     * 0 and 1 are the control pipes and 2 is stderr: a stream there would
     * be written into (or read from) the protocol itself.  The supervisor
     * (high_fd) and libxl never pass them.
     */
    if (fd <= STDERR_FILENO)
        fatal("bad <%s> %d: fds 0-2 are the helper's control pipes and stderr",
              what, fd);
    return fd;
}

static void check_fd(const char *what, int fd)
{
    if (fd >= 0 && fcntl(fd, F_GETFD) < 0)
        fatal("%s %d is not open: %s", what, fd, strerror(errno));
}

static void parse_xen_argv(int argc, char **argv, struct xcs_op *op)
{
    int n = argc - 2;
    char **a = argv + 2;

    dialect = XCS_DIALECT_XEN_417;
    op->dialect = dialect;
    if (n != (op->restore ? 9 : 6))
        fatal("--%s-domain takes %d arguments, got %d",
              op->restore ? "restore" : "save", op->restore ? 9 : 6, n);
    /* Xen's order: the fds and the domid, the mode's own, cbflags, stream type. */
    op->io_fd = parse_fd("io_fd", a[0], 0);
    op->aux_fd = parse_fd(op->restore ? "send_back_fd" : "recv_fd", a[1], 1);
    op->domid = (uint32_t)parse_num("domid", a[2], UINT32_MAX);
    if (!op->restore) {
        op->xcflags = (uint32_t)parse_num("xcflags", a[3], UINT32_MAX);
    } else {
        op->store_evtchn = (uint32_t)parse_num("store_evtchn", a[3], UINT32_MAX);
        op->store_domid = (uint32_t)parse_num("store_domid", a[4], UINT32_MAX);
        op->console_evtchn = (uint32_t)parse_num("console_evtchn", a[5], UINT32_MAX);
        op->console_domid = (uint32_t)parse_num("console_domid", a[6], UINT32_MAX);
    }
    op->cbflags = (uint32_t)parse_num("cbflags", a[n - 2], UINT32_MAX);
    op->stream_type = (int)parse_num("stream_type", a[n - 1], XCS_STREAM_COLO);
}

enum {
    OPT_BACKEND = 256, OPT_IO_FD, OPT_AUX_FD, OPT_DOMID, OPT_FLAGS, OPT_CBFLAGS,
    OPT_STREAM_TYPE, OPT_STORE_EVTCHN, OPT_STORE_DOMID, OPT_CONSOLE_EVTCHN,
    OPT_CONSOLE_DOMID, OPT_SIM, OPT_FORMAT, OPT_MAX_PAGES, OPT_CHECKPOINTS,
    OPT_INTERVAL_MS, OPT_XL_CONFIG, OPT_LEGACY_WIDTH, OPT_LEGACY_GUEST,
    OPT_DM_OUT, OPT_COPY_THREADS, OPT_BUILD_ONLY, OPT_PLAIN_FD, OPT_ROLE,
    OPT_TLS_DIR, OPT_PEER_NAME, OPT_HANDSHAKE_TIMEOUT_MS, OPT_IDLE_TIMEOUT_MS,
    OPT_OUT_TMP, OPT_IN_FD, OPT_OUT_FD, OPT_CHANNEL_FD, OPT_RAW, OPT_COMPRESS, OPT_LEVEL,
    OPT_MAX_BANDWIDTH, OPT_FRAME_SIZE, OPT_WINDOW, OPT_TEE_FD, OPT_RESUME_SOCK,
    OPT_RESUME_TIMEOUT_MS, OPT_DEVICE_MODEL, OPT_FOREIGN, OPT_COPY
};

/* The wire modes' own options (wire-send/wire-recv), checked once parsed. */
static void check_wire_argv(struct xcs_op *op, int given)
{
    if (!op->wire) {
        if (given)
            fatal("--in-fd, --out-fd, --channel-fd, --raw, --compress, --level, "
                  "--max-bandwidth, --frame-size, --window, --tee-fd, --resume-* and "
                  "--copy are wire-send/wire-recv options");
        return;
    }
    if (op->io_fd < 0)
        fatal("%s needs %s", op->wire == 1 ? "wire-send" : "wire-recv",
              op->wire == 1 ? "--in-fd" : "--out-fd");
    if (op->wire_nchan == 0)
        fatal("the wire modes need at least one --channel-fd");
    if (op->wire == 2 && (op->wire_raw || op->wire_compress || op->wire_rate))
        fatal("--raw, --compress and --max-bandwidth are wire-send options");
    if (op->wire == 1 && op->wire_tee_fd >= 0)
        fatal("--tee-fd is a wire-recv option");
    if (op->wire_raw && (op->wire_nchan != 1 || op->wire_compress ||
                         op->wire_resume_sock >= 0))
        fatal("wire-send --raw takes one --channel-fd and no --compress or --resume-sock");
    if (!op->wire_level)
        op->wire_level = op->wire_compress == 1 ? XCS_WIRE_ZSTD_LEVEL : XCS_WIRE_ADAPTIVE_LEVEL;
    if (op->wire_window < op->wire_frame)
        fatal("--window %llu is smaller than --frame-size %u",
              (unsigned long long)op->wire_window, op->wire_frame);
    if ((op->wire_resume_sock >= 0) != (op->wire_resume_ms > 0))
        fatal("--resume-sock and --resume-timeout-ms go together");
    for (unsigned i = 0; i < op->wire_nchan; i++) {
        if (op->wire_chan[i] == op->io_fd || op->wire_chan[i] == op->wire_tee_fd ||
            op->wire_chan[i] == op->wire_resume_sock)
            fatal("--channel-fd %d is also another fd of this run", op->wire_chan[i]);
        for (unsigned j = 0; j < i; j++)
            if (op->wire_chan[i] == op->wire_chan[j])
                fatal("--channel-fd %d is given twice", op->wire_chan[i]);
    }
    if (op->wire_tee_fd >= 0 && op->wire_tee_fd == op->io_fd)
        fatal("--tee-fd and --out-fd must differ");
#ifndef XCS_HAVE_ZSTD
    if (op->wire_compress)
        fatal("--compress %s: zstd is not built into this helper (libzstd-dev was "
              "missing when xcsave was built); use --compress off",
              op->wire_compress == 1 ? "zstd" : "adaptive");
#endif
}

static const char *parse_xcs_argv(int argc, char **argv, struct xcs_op *op)
{
    static const struct option opts[] = {
        {"backend", required_argument, NULL, OPT_BACKEND},
        {"io-fd", required_argument, NULL, OPT_IO_FD},
        {"aux-fd", required_argument, NULL, OPT_AUX_FD},
        {"domid", required_argument, NULL, OPT_DOMID},
        {"flags", required_argument, NULL, OPT_FLAGS},
        {"cbflags", required_argument, NULL, OPT_CBFLAGS},
        {"stream-type", required_argument, NULL, OPT_STREAM_TYPE},
        {"store-evtchn", required_argument, NULL, OPT_STORE_EVTCHN},
        {"store-domid", required_argument, NULL, OPT_STORE_DOMID},
        {"console-evtchn", required_argument, NULL, OPT_CONSOLE_EVTCHN},
        {"console-domid", required_argument, NULL, OPT_CONSOLE_DOMID},
        {"sim", required_argument, NULL, OPT_SIM},
        {"format", required_argument, NULL, OPT_FORMAT},
        {"max-pages", required_argument, NULL, OPT_MAX_PAGES},
        {"checkpoints", required_argument, NULL, OPT_CHECKPOINTS},
        {"interval-ms", required_argument, NULL, OPT_INTERVAL_MS},
        {"xl-config", required_argument, NULL, OPT_XL_CONFIG},
        {"legacy-width", required_argument, NULL, OPT_LEGACY_WIDTH},
        {"legacy-guest", required_argument, NULL, OPT_LEGACY_GUEST},
        {"dm-out", required_argument, NULL, OPT_DM_OUT},
        {"copy-threads", required_argument, NULL, OPT_COPY_THREADS},
        {"build-only", required_argument, NULL, OPT_BUILD_ONLY},
        {"idle-timeout-ms", required_argument, NULL, OPT_IDLE_TIMEOUT_MS},
        {"plain-fd", required_argument, NULL, OPT_PLAIN_FD},
        {"role", required_argument, NULL, OPT_ROLE},
        {"tls-dir", required_argument, NULL, OPT_TLS_DIR},
        {"peer-name", required_argument, NULL, OPT_PEER_NAME},
        {"handshake-timeout-ms", required_argument, NULL, OPT_HANDSHAKE_TIMEOUT_MS},
        {"out-tmp", required_argument, NULL, OPT_OUT_TMP},
        {"in-fd", required_argument, NULL, OPT_IN_FD},
        {"out-fd", required_argument, NULL, OPT_OUT_FD},
        {"channel-fd", required_argument, NULL, OPT_CHANNEL_FD},
        {"raw", no_argument, NULL, OPT_RAW},
        {"compress", required_argument, NULL, OPT_COMPRESS},
        {"level", required_argument, NULL, OPT_LEVEL},
        {"max-bandwidth", required_argument, NULL, OPT_MAX_BANDWIDTH},
        {"frame-size", required_argument, NULL, OPT_FRAME_SIZE},
        {"window", required_argument, NULL, OPT_WINDOW},
        {"tee-fd", required_argument, NULL, OPT_TEE_FD},
        {"resume-sock", required_argument, NULL, OPT_RESUME_SOCK},
        {"resume-timeout-ms", required_argument, NULL, OPT_RESUME_TIMEOUT_MS},
        {"device-model", required_argument, NULL, OPT_DEVICE_MODEL},
        {"foreign", required_argument, NULL, OPT_FOREIGN},
        {"copy", no_argument, NULL, OPT_COPY},
        {NULL, 0, NULL, 0},
    };
    /*
     * The options that are a number and nothing more: parsed (named after
     * the long option) into their unsigned field of op, from 0 to max.  The
     * int fields are written through their unsigned variant, which C allows.
     */
    const struct {
        int id;
        unsigned int *to;
        unsigned long max;
    } nums[] = {
        {OPT_DOMID, &op->domid, UINT32_MAX},
        {OPT_FLAGS, &op->xcflags, UINT32_MAX},
        {OPT_CBFLAGS, &op->cbflags, UINT32_MAX},
        {OPT_STREAM_TYPE, (unsigned int *)&op->stream_type, XCS_STREAM_COLO},
        {OPT_STORE_EVTCHN, &op->store_evtchn, UINT32_MAX},
        {OPT_STORE_DOMID, &op->store_domid, UINT32_MAX},
        {OPT_CONSOLE_EVTCHN, &op->console_evtchn, UINT32_MAX},
        {OPT_CONSOLE_DOMID, &op->console_domid, UINT32_MAX},
        {OPT_CHECKPOINTS, &op->checkpoints, 1u << 20},
        {OPT_INTERVAL_MS, &op->interval_ms, 3600u * 1000},
        /* at most a day: an int of milliseconds for poll() */
        {OPT_IDLE_TIMEOUT_MS, &op->idle_ms, 86400u * 1000},
        {OPT_BUILD_ONLY, (unsigned int *)&op->sim_build_only, 1},
        {OPT_DEVICE_MODEL, (unsigned int *)&op->dm_by_caller, 1},
        {OPT_FOREIGN, (unsigned int *)&op->foreign, 1},
    };
    const char *backend = "sim";
    int role = -1;
    int wire_given = 0;
    int c, idx = 0;
    size_t i;

    dialect = XCS_DIALECT_XCSAVE_1;
    op->dialect = dialect;
    if (argc < 3 || (strcmp(argv[2], "save") && strcmp(argv[2], "restore") &&
                     strcmp(argv[2], "tunnel") && strcmp(argv[2], "wire-send") &&
                     strcmp(argv[2], "wire-recv")))
        fatal("--xcsave-1 needs a mode: save, restore, tunnel, wire-send or wire-recv");
    op->restore = strcmp(argv[2], "restore") == 0;
    op->tunnel = strcmp(argv[2], "tunnel") == 0;
    op->wire = !strcmp(argv[2], "wire-send") ? 1 : !strcmp(argv[2], "wire-recv") ? 2 : 0;
    op->wire_level = 0; /* not given: check_wire_argv() picks the mode's */
    op->wire_frame = XCS_WIRE_FRAME_DEFAULT;
    op->wire_window = XCS_WIRE_WINDOW_DEFAULT;
    op->handshake_timeout_ms = 10000;
    optind = 3;
    opterr = 0;
    while ((c = getopt_long(argc, argv, "", opts, &idx)) != -1) {
        for (i = 0; i < sizeof(nums) / sizeof(nums[0]) && nums[i].id != c; i++)
            ;
        if (i < sizeof(nums) / sizeof(nums[0])) {
            *nums[i].to = (unsigned int)parse_num(opts[idx].name, optarg, nums[i].max);
            continue;
        }
        switch (c) {
        case OPT_BACKEND: backend = optarg; break;
        case OPT_IO_FD: op->io_fd = parse_fd("io-fd", optarg, 0); break;
        case OPT_AUX_FD: op->aux_fd = parse_fd("aux-fd", optarg, 1); break;
        case OPT_SIM: op->sim_path = optarg; break;
        case OPT_FORMAT:
            /* A stream the engines write and read: not auto, not legacy. */
            if (xcs_fmt_parse(optarg, &op->wrap) < 0 ||
                (op->wrap != XCS_FMT_LIBXC && !xcs_fmt_has_libxl(op->wrap)))
                fatal("bad --format '%s': expected libxc, libxl or xl", optarg);
            break;
        case OPT_MAX_PAGES:
            op->max_pages = parse_num("max-pages", optarg, 1UL << 40);
            break;
        case OPT_COPY_THREADS:
            op->copy_threads = (unsigned)parse_num("copy-threads", optarg,
                                                   XCS_MAX_COPY_THREADS);
            if (op->copy_threads == 0)
                fatal("bad <copy-threads> '%s': expected a number from 1 to %d",
                      optarg, XCS_MAX_COPY_THREADS);
            break;
        case OPT_XL_CONFIG: op->xl_config_path = optarg; break;
        case OPT_DM_OUT: op->dm_path = optarg; break;
        case OPT_OUT_TMP: op->out_tmp = optarg; break;
        case OPT_LEGACY_WIDTH:
            op->legacy_width = (unsigned)parse_num("legacy-width", optarg, 64);
            if (op->legacy_width != 32 && op->legacy_width != 64)
                fatal("bad --legacy-width %u: expected 32 or 64", op->legacy_width);
            break;
        case OPT_LEGACY_GUEST:
            if (strcmp(optarg, "pv") && strcmp(optarg, "hvm"))
                fatal("bad --legacy-guest '%s': expected pv or hvm", optarg);
            op->legacy_hvm = !strcmp(optarg, "hvm");
            break;
        case OPT_PLAIN_FD: op->plain_fd = parse_fd("plain-fd", optarg, 0); break;
        case OPT_ROLE:
            if (strcmp(optarg, "client") && strcmp(optarg, "server"))
                fatal("bad --role '%s': expected client or server", optarg);
            role = !strcmp(optarg, "server");
            break;
        case OPT_TLS_DIR: op->tls_dir = optarg; break;
        case OPT_PEER_NAME: op->peer_name = optarg; break;
        case OPT_HANDSHAKE_TIMEOUT_MS:
            op->handshake_timeout_ms = (unsigned)parse_num("handshake-timeout-ms", optarg,
                                                           3600u * 1000);
            if (op->handshake_timeout_ms == 0)
                fatal("bad <handshake-timeout-ms> 0: expected 1 to %u", 3600u * 1000);
            break;
        case OPT_IN_FD:
        case OPT_OUT_FD:
            if (op->wire != (c == OPT_IN_FD ? 1 : 2))
                fatal("--%s is a %s option", c == OPT_IN_FD ? "in-fd" : "out-fd",
                      c == OPT_IN_FD ? "wire-send" : "wire-recv");
            op->io_fd = parse_fd(c == OPT_IN_FD ? "in-fd" : "out-fd", optarg, 0);
            break;
        case OPT_CHANNEL_FD:
            if (op->wire_nchan >= XCS_WIRE_MAX_CHANNELS)
                fatal("more than %d --channel-fd", XCS_WIRE_MAX_CHANNELS);
            op->wire_chan[op->wire_nchan++] = parse_fd("channel-fd", optarg, 0);
            wire_given = 1;
            break;
        case OPT_RAW: op->wire_raw = 1; wire_given = 1; break;
        case OPT_COMPRESS:
            if (!strcmp(optarg, "off"))
                op->wire_compress = 0;
            else if (!strcmp(optarg, "zstd"))
                op->wire_compress = 1;
            else if (!strcmp(optarg, "adaptive"))
                op->wire_compress = 2;
            else
                fatal("bad --compress '%s': expected off, zstd or adaptive", optarg);
            wire_given = 1;
            break;
        case OPT_LEVEL:
            op->wire_level = (int)parse_num("level", optarg, 19);
            if (op->wire_level == 0)
                fatal("bad <level> 0: expected 1 to 19");
            wire_given = 1;
            break;
        case OPT_MAX_BANDWIDTH:
            op->wire_rate = parse_num("max-bandwidth", optarg, 1ul << 50);
            wire_given = 1;
            break;
        case OPT_FRAME_SIZE:
            op->wire_frame = (uint32_t)parse_num("frame-size", optarg, XCS_WIRE_FRAME_MAX);
            if (op->wire_frame < XCS_WIRE_FRAME_MIN)
                fatal("bad <frame-size> %u: expected %u to %u", op->wire_frame,
                      XCS_WIRE_FRAME_MIN, XCS_WIRE_FRAME_MAX);
            wire_given = 1;
            break;
        case OPT_WINDOW:
            op->wire_window = parse_num("window", optarg, XCS_WIRE_WINDOW_MAX);
            wire_given = 1;
            break;
        case OPT_TEE_FD: op->wire_tee_fd = parse_fd("tee-fd", optarg, 0); wire_given = 1; break;
        case OPT_COPY: op->wire_copy = 1; wire_given = 1; break;
        case OPT_RESUME_SOCK:
            op->wire_resume_sock = parse_fd("resume-sock", optarg, 0);
            wire_given = 1;
            break;
        case OPT_RESUME_TIMEOUT_MS:
            op->wire_resume_ms = (unsigned)parse_num("resume-timeout-ms", optarg, 3600u * 1000);
            wire_given = 1;
            break;
        default:
            fatal("unknown or incomplete option '%s'", argv[optind - 1]);
        }
    }
    if (optind != argc)
        fatal("unexpected argument '%s'", argv[optind]);
    check_wire_argv(op, wire_given);
    if (op->wire)
        return "wire";
    if (op->io_fd < 0)
        fatal("--io-fd is required");
    if (op->tunnel) {
        if (op->plain_fd < 0 || role < 0 || !op->tls_dir)
            fatal("tunnel needs --plain-fd, --role and --tls-dir");
        if (op->plain_fd == op->io_fd)
            fatal("--plain-fd and --io-fd must differ");
        op->tls_server = role;
        if (!op->tls_server && !op->peer_name)
            fatal("tunnel --role client needs --peer-name (the server's name to check)");
        backend = "tls";
    } else if (op->plain_fd >= 0 || role >= 0 || op->tls_dir || op->peer_name) {
        fatal("--plain-fd, --role, --tls-dir and --peer-name are tunnel options");
    }
    if (op->out_tmp && (op->restore || op->tunnel))
        fatal("--out-tmp is a save option");
    if (op->dm_by_caller && (op->restore || op->tunnel))
        fatal("--device-model is a save option");
    if (op->foreign && (!op->restore || op->legacy_width))
        fatal("--foreign is a restore option (a legacy stream is converted as foreign already)");
    return backend;
}

static const struct xcs_backend *find_backend(const char *name)
{
    if (!strcmp(name, "sim"))
        return &xcs_backend_sim;
#ifdef XCS_HAVE_XEN
    if (!strcmp(name, "xen"))
        return &xcs_backend_xen;
#endif
    return NULL;
}

/*----- the caller's temporary (--out-tmp) -----*/

/* io_fd's file, recorded before anything can dup2() over io_fd. */
static dev_t out_tmp_dev;
static ino_t out_tmp_ino;
/*
 * fd trick: a second fd on io_fd's open file, which the SIGTERM abort does
 * not dup2() over, so that out_tmp_renamed() can still fstat the file.
 */
static int out_tmp_fd = -1;
static const char *out_tmp_path; /* --out-tmp, once checked */

/*
 * --out-tmp PATH names the file behind io_fd: the caller's private
 * temporary, renamed into place by the caller's commit.  Refuse to start
 * unless PATH (not followed if a symlink) is that very file, so the helper
 * can only ever remove the file it was given to write.
 */
static void check_out_tmp(const struct xcs_op *op)
{
    struct stat fd_st, path_st;

    if (!op->out_tmp)
        return;
    if (fstat(op->io_fd, &fd_st) < 0 || lstat(op->out_tmp, &path_st) < 0)
        fatal("--out-tmp %s: %s", op->out_tmp, strerror(errno));
    if (!S_ISREG(fd_st.st_mode) || fd_st.st_dev != path_st.st_dev ||
        fd_st.st_ino != path_st.st_ino)
        fatal("--out-tmp %s is not the file of --io-fd %d", op->out_tmp, op->io_fd);
    out_tmp_dev = fd_st.st_dev;
    out_tmp_ino = fd_st.st_ino;
    out_tmp_fd = fcntl(op->io_fd, F_DUPFD_CLOEXEC, STDERR_FILENO + 1);
    if (out_tmp_fd < 0)
        fatal("dup of --io-fd %d: %s", op->io_fd, strerror(errno));
    out_tmp_path = op->out_tmp;
}

/* Whether the caller renamed its temporary into place (its commit): the
 * name is gone but the file still has a name somewhere. */
static int out_tmp_renamed(void)
{
    struct stat st;

    if (!out_tmp_path || fstat(out_tmp_fd, &st) < 0 || st.st_nlink == 0)
        return 0;
    if (lstat(out_tmp_path, &st) == 0)
        return st.st_dev != out_tmp_dev || st.st_ino != out_tmp_ino;
    return errno == ENOENT;
}

/*
 * The save will not be committed (it failed, or the caller said its commit
 * failed, or died before answering): remove the caller's temporary, so
 * that a toolstack SIGKILLed mid-save leaves none behind (it cannot remove
 * it itself).  A live caller removes it too; whoever is second gets ENOENT.
 * Only while the name is still the file we were given: after a commit
 * renamed it away the name is gone, and a file put there by someone else is
 * not ours to remove (the lstat-unlink race needs write access to the
 * caller's own directory, which could remove the file anyway).
 */
static void discard_out_tmp(void)
{
    struct stat st;

    if (!out_tmp_path || lstat(out_tmp_path, &st) < 0 ||
        st.st_dev != out_tmp_dev || st.st_ino != out_tmp_ino)
        return;
    if (unlink(out_tmp_path) < 0 && errno != ENOENT)
        fprintf(stderr, XCS_HELPER_CONTEXT ": removing the uncommitted %s: %s\n",
                out_tmp_path, strerror(errno));
}

/*----- main -----*/

int main(int argc, char **argv)
{
    struct xcs_op op;
    struct xcs_restore_out out = {0, 0};
    const struct xcs_backend *be = NULL;
    const char *backend = "xen";
    int r, errnoval, committed;

    start_ppid = getppid();
    memset(&op, 0, sizeof(op));
    op.io_fd = -1;
    op.aux_fd = -1;
    op.plain_fd = -1;
    op.wire_tee_fd = -1;
    op.wire_resume_sock = -1;
    op.wrap = XCS_FMT_LIBXC; /* --format's default */

    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        printf("xcsave-helper %s protocol %d table 0x%016llx backends %s tls %s zstd %s\n",
               XCS_HELPER_VERSION, XCS_PROTO_VERSION,
               (unsigned long long)XCS_PROTO_HASH, XCS_BACKENDS, XCS_TLS,
               xcs_wire_zstd_built() ? "libzstd" : "none");
        return 0;
    }
    /*
     * The one-shot modes own their whole run (argv, messages, exit status);
     * the frame buffer their messages grew is freed here, as below.
     */
    if (argc >= 3 && !strcmp(argv[1], "--xcsave-1") &&
        (!strcmp(argv[2], "sched-cap") || !strcmp(argv[2], "logdirty"))) {
        r = !strcmp(argv[2], "sched-cap") ? xcs_sched_cap_main(argc, argv)
                                           : xcs_logdirty_main(argc, argv);
        free(msgbuf);
        return r;
    }
    if (argc >= 2 && !strcmp(argv[1], "--save-domain")) {
        parse_xen_argv(argc, argv, &op);
    } else if (argc >= 2 && !strcmp(argv[1], "--restore-domain")) {
        op.restore = 1;
        parse_xen_argv(argc, argv, &op);
    } else if (argc >= 2 && !strcmp(argv[1], "--xcsave-1")) {
        backend = parse_xcs_argv(argc, argv, &op);
    } else {
        fatal("unexpected mode argument '%s' (see the comment at the top of "
              "helper_main.c)", argc >= 2 ? argv[1] : "");
    }
    check_fd("io_fd", op.io_fd);
    check_fd(op.restore ? "send_back_fd" : "recv_fd", op.aux_fd);
    check_fd("plain_fd", op.plain_fd);
    check_fd("tee_fd", op.wire_tee_fd);
    check_fd("resume_sock", op.wire_resume_sock);
    for (unsigned i = 0; i < op.wire_nchan; i++)
        check_fd("channel_fd", op.wire_chan[i]);
    check_out_tmp(&op);

    /*
     * A closed control pipe or stream socket must surface as EPIPE from
     * write(), so the backend's error path runs and reports it, rather than
     * killing us silently with SIGPIPE.
     */
    signal(SIGPIPE, SIG_IGN);
    /*
     * Likewise a write past RLIMIT_FSIZE must fail with EFBIG (reported in
     * one line, the output file removed) rather than kill us with SIGXFSZ.
     */
    signal(SIGXFSZ, SIG_IGN);

    if (op.tunnel || op.wire) {
        /* Not a domain operation: no backend, no restore_results. */
        xcs_stub_hello(XCS_PROTO_VERSION, XCS_PROTO_HASH, backend,
                       op.tunnel ? "tunnel" : op.wire == 1 ? "wire-send" : "wire-recv");
        errno = 0;
        r = op.tunnel ? xcs_tunnel(&op) : xcs_wire(&op);
        reply_after_parent_msgs = op.wire;
        errnoval = r ? (errno ? errno : EIO) : 0;
        xcs_stub_complete(r, errnoval);
        free(msgbuf);
        return parent_gone_status;
    }
    be = find_backend(backend);
    if (op.dialect == XCS_DIALECT_XCSAVE_1)
        xcs_stub_hello(XCS_PROTO_VERSION, XCS_PROTO_HASH, be ? be->name : backend,
                       op.restore ? "restore" : "save");
    if (!be) {
        xcs_log(XCS_LOG_ERROR, EOPNOTSUPP, XCS_HELPER_CONTEXT,
                "backend '%s' is not built into this helper (built: %s)",
                backend, XCS_BACKENDS);
        xcs_exit_fatal();
    }

    /*
     * The idle timeout on the stream fd (stream_io.c: poll before reads,
     * SO_RCVTIMEO/SO_SNDTIMEO on a socket, a private non-blocking
     * description for a pipe we write).  The pipe trick is for the sim
     * engine only: libxc's own writes expect a blocking fd.
     */
    if (op.idle_ms &&
        xcs_stream_idle(op.io_fd, (int)op.idle_ms, be == &xcs_backend_sim) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                "setting the idle timeout on io_fd %d", op.io_fd);
        xcs_exit_fatal();
    }
    xcs_log(XCS_LOG_DEBUG, 0, XCS_HELPER_CONTEXT, "starting %s",
            op.restore ? "restore" : "save");
    errno = 0;
    if (op.restore)
        r = be->restore(&op, &out);
    else
        r = be->save(&op);
    errnoval = r ? (errno ? errno : EIO) : 0;

    if (op.restore)
        xcs_stub_restore_results(out.store_gfn, out.console_gfn);
    xcs_log(XCS_LOG_DEBUG, errnoval, XCS_HELPER_CONTEXT, "complete r=%d", r);
    committed = xcs_stub_complete(r, errnoval);
    /*
     * No answer (the caller died, or stopped us), yet the caller may have
     * died between its rename -- the commit -- and its reply: then the
     * image is in place and the source stays as a save leaves it.
     */
    if (committed != 0 && (sigterm_seen || parent_gone_status) && out_tmp_renamed())
        committed = 0;
    /*
     * xcsave-1: the caller answers a successful save's complete only once
     * it has committed the image (0), or with non-zero if its commit
     * failed; a caller that died never answers (-1, reply_when_stopped).
     * Until that answer the source stays suspended, as a save leaves it;
     * without a commit the backend puts it back (save_not_committed), so
     * the source is never left suspended with no image anywhere.  The
     * xen-4.17 dialect is Xen's: its reply is ignored, as Xen's helper does.
     */
    if (!op.restore && r == 0 && committed != 0 &&
        op.dialect == XCS_DIALECT_XCSAVE_1 && be->save_not_committed)
        be->save_not_committed(&op);
    if (!op.restore && (r != 0 || committed != 0))
        discard_out_tmp();
    if (out_tmp_fd >= 0)
        close(out_tmp_fd);
    free(msgbuf);
    return parent_gone_status;
}
