/*
 * wire.c - the helper's wire pumps (xcsave-helper --xcsave-1 wire-send /
 * wire-recv): the plain migration stream between two xcsave hosts, over
 * one or more channels, optionally compressed, under a rate cap, resumable.
 *
 *   save helper --pipe--> wire-send ==ch0..chN-1==> wire-recv --pipe--> restore helper
 *
 * Python opened (and authenticated) the channels and hands us their fds;
 * bulk data never crosses the control pipe.  docs/architecture.md
 * ("Migration") is the contract; in short:
 *
 * Frames (wire.h): a 32-byte header, then for DATA the payload.  The
 * sender cuts the plain stream into frames of at most frame_max bytes,
 * numbers them (seq 0, 1, ...), compresses each one that pays, and hands
 * each to whichever channel is free; the receiver keeps out-of-order frames
 * (at most `window` bytes: seq < next expected + window / frame_max) and
 * writes them strictly in seq order, so the plain stream's order, and with
 * it "a page re-sent in a later round wins", is kept.  The receiver ACKs
 * (seq = next expected) every 1 MiB or 100 ms, and at least every second
 * while it runs (a keepalive); the sender holds at most window/frame_max
 * frames unacknowledged and stops reading its input beyond (back-pressure
 * to the save helper).  At the input's EOF the sender sends END (seq =
 * frames, aux = bytes) on every channel; the receiver, once everything is
 * written and END has come on every channel, answers with an END of its
 * own on every channel (the final acknowledgement) and both pumps finish.
 * Neither reads a byte past the last frame it expects on a channel (headers
 * and payloads are read to their exact length), so Python continues on
 * channel 0 with the stream's next message.
 *
 * Compression (sender, zstd): a frame goes raw when zstd does not bring it
 * under 90% of its size.  "adaptive" compresses while that moves the stream
 * faster, judged over windows of 16 frames made the same way (adapt()): the
 * share of the window's busy time (input waits left out) the pump waited
 * for the link, and how long a MiB of plain stream took, compressed and raw
 * apart.  (Per-frame waits cannot tell: socket buffers of megabytes take a
 * frame or not whatever its size.)
 * - Compressing, and the link still kept us waiting 1/8 of the time: the
 *   link is the limit even so, and each byte saved is link time saved; go
 *   on, with no check.  Waiting half the time leaves room for level 3
 *   (zstd's default) over the level asked for (--level): in the trial each
 *   frame is compressed at both levels, and level 3 stays only if it made
 *   those same frames 1% smaller (on some data it does not) and the link
 *   still waits; else it is not tried again.
 * - Raw, and the link does not keep us waiting: it takes more than we feed
 *   it, and compressing could only cost; stay raw (and the first time
 *   compressing does not wait, a raw window is how we learn this).
 * - Otherwise the way that moved a MiB 1/8 faster wins (a tie goes raw: it
 *   costs no CPU, which the save helper on the same machine can use), and
 *   a window the other way checks the verdict every 4 windows, half as often
 *   each time it is confirmed (at most every 64).
 * Under a cap the link's rate is known: compressing pays whenever zstd takes
 * 1/8 less per MiB than the cap does, even while the cap's burst hides it.
 * A window into compressing after one that waited is not judged (the
 * buffers are full of raw bytes).  Two frames in a row that did not pay make
 * the next 7 go raw without trying (random memory costs zstd time for
 * nothing).
 *
 * Rate cap (sender): a token bucket on wire bytes, headers included; burst
 * max(64 KiB, rate/20).  wire_rate on stdin changes it at once.
 *
 * Resume: a channel that fails (EOF, reset, no progress for the idle
 * timeout) is reported in wire_lost; without --resume-sock that fails the
 * pump, with it the pump goes on with the others and waits up to
 * --resume-timeout-ms for a replacement fd (SCM_RIGHTS on the SEQPACKET
 * resume socket, u32 channel index as data).  The receiver sends RESUME
 * (seq = next expected) first on a replacement; the sender then re-sends
 * the frames it had sent on the lost channel from that seq on, on any
 * channel.  Frames already held are discarded as duplicates.
 *
 * Splice: a raw frame's bytes need not enter our memory at all.  With one
 * channel and no resume, the sender leaves a raw frame's bytes in its input
 * pipe until the channel is free, then sends the header (corked) and
 * splice()s the bytes from the pipe to the socket; the receiver splice()s
 * the frame it expects next, raw, from the socket into its output pipe
 * (without resume and without a tee).  Each pump then costs the stream no
 * copy; a frame that goes through memory (compressed, out of order, kept
 * for a resume or the tee) is read into a pooled buffer and written from
 * there, a copy in and a copy out.  --copy turns splicing off (tests,
 * benchmarks).  A spliced frame is the pipe's or the socket's until it is
 * whole: the sender's cannot be re-sent (hence no resume) and the
 * receiver's is written as it comes (hence only in order).
 *
 * Every fd is polled in one ppoll() loop; SIGTERM is blocked except inside
 * ppoll (xcs_sigterm_until_ppoll, as in the TLS tunnel).  Channels are used
 * with MSG_DONTWAIT, not O_NONBLOCK: their open file descriptions are shared
 * with Python's sockets (except while splicing, which has no such flag:
 * then O_NONBLOCK for the run, put back at the end; see xcs_wire).  The
 * plain-stream pipe is made O_NONBLOCK for the run and put back at the end.
 */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "stream_io.h"
#include "helper.h"
#include "wire.h"

#ifdef XCS_HAVE_ZSTD
#include <zstd.h>
#endif

#define WIRE_CONTEXT "xcsave-helper wire"
#define MS (1000000ull)
#define STATS_NS (500 * MS)
#define ACK_NS (100 * MS)
#define ACK_BYTES (1u << 20)
#define KEEPALIVE_NS (1000 * MS)
#define RAW_BUF (256u * 1024u)
#define MIN_WRITE (16u * 1024u)
#define WINDOW_FRAMES 4096u /* frames in a window at most, whatever --window says */
#define POOL_MAX 8u /* frame buffers kept for reuse at most */
/* Under a cap, what may wait for the link ahead of the stream's next byte,
 * in ms of the cap: the input pipe, and (--raw) the stage (size_pipe()). */
#define CAP_PIPE_MS 4u
#define CAP_STAGE_MS 2u
#define CAP_PIPE_MIN (64u * 1024u)

/* ------------------------------------------------------------ pump state */

enum { FR_FREE = 0, FR_QUEUED, FR_WRITING, FR_WRITTEN };

/* A sender's frame, kept until acknowledged (slot seq % window_frames). */
struct sframe {
    uint8_t *buf; /* header + payload */
    size_t len;
    uint32_t raw_len;
    int state;
    int ch;       /* the channel it went (or goes) out on */
};

/* A receiver's frame, waiting for its turn (slot seq % window_frames). */
struct rframe {
    uint8_t *data;
    uint32_t len;
};

struct chan {
    int fd;                /* our copy; -1 while lost */
    int lost_errno;
    uint64_t lost_at;
    int awaiting_resume;   /* sender: a replacement, its RESUME not read yet */
    /* out: a control header, or (sender) a DATA frame, one at a time */
    uint8_t ctl[XCS_WIRE_HDR];
    size_t ctl_len, ctl_off;
    int64_t cur;           /* sender: seq of the DATA frame being written, -1 none */
    size_t cur_off;
    uint64_t stall_since;  /* output pending without progress since (0: none) */
    /* in: a header, then (receiver, DATA) its payload */
    uint8_t hdr[XCS_WIRE_HDR];
    size_t hdr_have;
    struct xcs_wire_hdr h;
    uint8_t *payload;
    size_t pay_have;
    int end_sent, end_seen; /* sender: END sent / receiver's END read; receiver: mirror */
    /* splice (see the top): this channel's frame moves between the pipe
     * and the socket in the kernel; the sender's header waits in sp_hdr */
    int sp;
    uint8_t sp_hdr[XCS_WIRE_HDR];
    int flags;              /* the fd's file status flags before the run (-1: not ours to restore) */
    uint64_t bytes;         /* wire bytes sent (sender) or received (receiver) */
};

struct pump {
    const struct xcs_op *op;
    int send;
    unsigned nch;
    struct chan ch[XCS_WIRE_MAX_CHANNELS];
    uint64_t wf;           /* window in frames */
    uint32_t fmax;
    /* sender */
    struct sframe *sf;
    uint64_t acked, next_seq;
    uint64_t ack_hi;       /* the highest ACK/RESUME seq read (acked stops at a frame
                              still being written: a re-send the receiver had) */
    size_t raw_off;        /* --raw: bytes of stage written */
    uint8_t *stage_buf;    /* the frame being filled: header room, then stage */
    uint8_t *stage;        /* stage_buf + XCS_WIRE_HDR (--raw: a buffer of its own) */
    size_t stage_len;
    int in_eof, in_dry;
    /* receiver */
    struct rframe *rf;
    uint64_t next_exp, total, total_bytes;
    size_t out_off;
    uint64_t acked_bytes, last_ack;
    int finishing;
    uint64_t ack_every;    /* ACK after this many bytes written: min(1 MiB, window / 2) */
    /* both */
    uint64_t stream_bytes, wire_bytes, frames, frames_compressed, blocked_ns;
    uint64_t t0, last_stats, last_rx;
    int in_flags;          /* io_fd's file status flags before the run */
    int zc;                /* raw frames may be spliced (see the top) */
    int next_z;            /* sender: the next frame compressed (1), raw (0), undecided (-1) */
    int splicing;          /* receiver: the channel splicing frame next_exp, or -1 */
    int sp_out_full;       /* receiver: that splice waits for room in the pipe */
    uint64_t spliced;      /* frames spliced (debug: log_usage) */
    int pipe_set;          /* sender: the input pipe's size as size_pipe() set it, 0 none */
    uint64_t pipe_want;    /* what size_pipe() asked for it */
    /* rate cap */
    uint64_t rate, bucket_t;
    double tokens;
    /* the parent's messages on stdin */
    uint8_t pin[XCS_PARENT_MSG_MAX + 8];
    size_t pin_have;
    /* zstd and the adaptive rule */
    void *cctx, *dctx;
    uint8_t *zbuf;         /* adaptive's trial: a frame at --level too */
    /* frame buffers (XCS_WIRE_HDR + frame_max) for reuse: see buf_get() */
    uint8_t *pool[POOL_MAX];
    unsigned pooled;
    uint64_t ew_comp;      /* ns zstd takes per MiB of plain stream (EWMA 1/8) */
    int have_comp, not_worth, skip;
    int zmode;             /* adaptive: this window's frames are compressed */
    int settling;          /* the window after a change: buffers refill, not judged */
    unsigned win_frames, comp_tries;
    uint64_t z_mib, raw_mib; /* ns a MiB took, compressing or raw (EWMA 1/4 of windows) */
    int have_z_mib, have_raw_mib;
    int checking;          /* this window goes the way we think slower, to check */
    unsigned windows, probe_every; /* windows since the last check; between checks */
    uint64_t win_t0, win_blocked0, win_idle0, win_plain; /* the window so far */
    uint64_t idle_ns;      /* sender: time spent waiting for input alone (adapt()) */
    int level;             /* zstd's level now: --level, or ADAPT_LEVEL (adapt()) */
    int high_failed;       /* ADAPT_LEVEL did not pay: not tried again */
    int trial;             /* ADAPT_LEVEL on trial: each frame at --level too */
    uint64_t trial_high, trial_low; /* the trial's frames' sizes at either level */
};

static volatile sig_atomic_t wire_stop;

static void wire_sigterm(int signo)
{
    (void)signo;
    wire_stop = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int __attribute__((format(printf, 3, 4))) fail(struct pump *p, int eno,
                                                      const char *fmt, ...)
{
    char line[512];
    va_list al;

    va_start(al, fmt);
    vsnprintf(line, sizeof(line), fmt, al);
    va_end(al);
    xcs_log(XCS_LOG_ERROR, eno, WIRE_CONTEXT, "%s: %s", p->send ? "wire-send" : "wire-recv",
            line);
    errno = eno;
    return -1;
}

/*
 * Frame buffers, each XCS_WIRE_HDR + frame_max bytes, the same for every
 * frame both ways, kept for reuse (at most POOL_MAX).  A frame of a MiB
 * malloc'd and freed every time is fresh pages every time (glibc trims the
 * heap and maps big blocks): a page fault per 4 KiB, on top of the copy.
 */
static uint8_t *buf_get(struct pump *p)
{
    return p->pooled ? p->pool[--p->pooled] : malloc(XCS_WIRE_HDR + (size_t)p->fmax);
}

static void buf_put(struct pump *p, uint8_t *b)
{
    if (b && p->pooled < POOL_MAX)
        p->pool[p->pooled++] = b;
    else
        free(b);
}

static void send_stats(struct pump *p)
{
    uint64_t per[XCS_WIRE_MAX_CHANNELS];

    for (unsigned i = 0; i < p->nch; i++)
        per[i] = p->ch[i].bytes;
    xcs_stub_wire_stats(p->stream_bytes, p->wire_bytes, p->frames, p->frames_compressed,
                        p->rate, p->blocked_ns, now_ns() - p->t0, per, p->nch);
    p->last_stats = now_ns();
}

/* ------------------------------------------------------------ rate cap */

static uint64_t burst(const struct pump *p)
{
    return p->rate / 20 > 65536 ? p->rate / 20 : 65536;
}

static void bucket_refill(struct pump *p, uint64_t now)
{
    if (p->rate) {
        p->tokens += (double)(now - p->bucket_t) * (double)p->rate / 1e9;
        if (p->tokens > (double)burst(p))
            p->tokens = (double)burst(p);
    }
    p->bucket_t = now;
}

/* How many of `want` bytes may go now (0: wait, see bucket_wait). */
static size_t bucket_allow(const struct pump *p, size_t want)
{
    size_t least = want < MIN_WRITE ? want : MIN_WRITE;

    if (!p->rate)
        return want;
    if (least > burst(p) / 4)
        least = burst(p) / 4;
    if (p->tokens < (double)least)
        return 0;
    return p->tokens < (double)want ? (size_t)p->tokens : want;
}

/* Nanoseconds until bucket_allow(want) is not 0. */
static uint64_t bucket_wait(const struct pump *p, size_t want)
{
    size_t least = want < MIN_WRITE ? want : MIN_WRITE;

    if (least > burst(p) / 4)
        least = burst(p) / 4;
    if (!p->rate || p->tokens >= (double)least)
        return 0;
    return (uint64_t)(((double)least - p->tokens) * 1e9 / (double)p->rate) + 1;
}

/*
 * fd trick: under a cap, the sender shrinks its input pipe to a few ms of
 * the cap (and, --raw, reads a stage of a few ms).  The stream is ordered,
 * so whatever waits there when the guest stops waits in its downtime: a
 * MiB pipe is 10 ms at 100 MiB/s, and how full it is at the stop varies
 * from run to run (docs/performance.md).  The save helper grows the pipe
 * to XCS_PIPE_SIZE when it starts (xcs_pipe_grow), which may be after us,
 * so this runs before every wait and sets the size again when it is not
 * ours; shrinking fails (EBUSY) while the pipe holds more than the new
 * size, and is tried again then.  A lifted cap gives the pipe back its
 * XCS_PIPE_SIZE.  The save engine reads the size when it needs it (the
 * page-lifetime rule, engine_save.c, which waits if it grew meanwhile).
 */
static void size_pipe(struct pump *p)
{
    uint64_t want = (uint64_t)p->rate * CAP_PIPE_MS / 1000;
    int now;

    if (!p->send || (!p->rate && !p->pipe_set))
        return;
    want = !p->rate ? XCS_PIPE_SIZE : want < CAP_PIPE_MIN ? CAP_PIPE_MIN
                                    : want > XCS_PIPE_SIZE ? XCS_PIPE_SIZE : want;
    now = fcntl(p->op->io_fd, F_GETPIPE_SZ);
    if (now < 0 || (p->rate && want == p->pipe_want && now == p->pipe_set))
        return; /* not a pipe; or ours already */
    now = fcntl(p->op->io_fd, F_SETPIPE_SZ, (int)want);
    if (now > 0) { /* (the kernel rounds up to a power of two pages) */
        p->pipe_set = p->rate ? now : 0;
        p->pipe_want = want;
    }
}

static void set_rate(struct pump *p, uint64_t rate)
{
    uint64_t now = now_ns();

    bucket_refill(p, now); /* what the old rate earned until now */
    p->rate = rate;
    if (rate && p->tokens > (double)burst(p))
        p->tokens = (double)burst(p);
    if (!rate)
        p->tokens = 0;
    xcs_log(XCS_LOG_INFO, 0, WIRE_CONTEXT, "rate cap %llu bytes/s", (unsigned long long)rate);
}

/* ------------------------------------------------------------ the parent */

/*
 * Our stdin: the parent's wire_rate messages; EOF means the parent has gone
 * (or stopped us).  One read() after POLLIN never blocks (a pipe returns
 * what it holds), so stdin keeps its blocking mode for complete's reply.
 */
static int read_parent(struct pump *p)
{
    ssize_t n = read(STDIN_FILENO, p->pin + p->pin_have, sizeof(p->pin) - p->pin_have);

    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return 0;
    if (n <= 0)
        return fail(p, EPIPE, "the parent closed the control pipe");
    p->pin_have += (size_t)n;
    for (;;) {
        enum xcs_msg m;
        const uint8_t *body;
        uint32_t blen;
        uint64_t rate;
        ssize_t used = xcs_parse_parent_msg(p->pin, p->pin_have, &m, &body, &blen);

        if (used < 0)
            return fail(p, EPROTO, "the parent sent a bad control message");
        if (used == 0)
            break;
        if (m != XCS_MSG_WIRE_RATE || blen != sizeof(rate))
            return fail(p, EPROTO, "the parent sent an unexpected %s message",
                        xcs_msg_names[m]);
        memcpy(&rate, body, sizeof(rate));
        if (p->send)
            set_rate(p, rate);
        memmove(p->pin, p->pin + used, p->pin_have - (size_t)used);
        p->pin_have -= (size_t)used;
    }
    return 0;
}

/* ------------------------------------------------------------ channels */

/* Reset a channel's in/out state (a new fd, or lost). */
static void chan_reset(struct chan *c)
{
    c->ctl_len = c->ctl_off = 0;
    c->cur = -1;
    c->cur_off = 0;
    c->stall_since = 0;
    c->hdr_have = 0;
    c->pay_have = 0;
    free(c->payload);
    c->payload = NULL;
    c->end_sent = c->end_seen = 0;
    c->awaiting_resume = 0;
    c->sp = 0;
}

/* The sender's frames that were on channel i and may not have arrived: queued again. */
static void requeue(struct pump *p, unsigned i, uint64_t from, int written_too)
{
    for (uint64_t s = from; s < p->next_seq; s++) {
        struct sframe *f = &p->sf[s % p->wf];
        if (f->ch == (int)i && (f->state == FR_WRITING ||
                                (written_too && f->state == FR_WRITTEN)))
            f->state = FR_QUEUED;
    }
}

/*
 * Channel i failed: wire_lost, and without resume the end of the pump.
 * With resume it waits for a replacement (take_replacement).
 */
static int chan_lost(struct pump *p, unsigned i, int eno, const char *why)
{
    struct chan *c = &p->ch[i];

    xcs_stub_wire_lost(i, eno, why);
    if (p->op->wire_resume_sock < 0)
        return fail(p, eno, "channel %u: %s", i, why);
    xcs_log(XCS_LOG_WARN, eno, WIRE_CONTEXT, "channel %u lost (%s); waiting up to %u ms "
            "for a replacement", i, why, p->op->wire_resume_ms);
    close(c->fd);
    c->fd = -1;
    c->lost_errno = eno;
    c->lost_at = now_ns();
    chan_reset(c);
    if (p->send)
        requeue(p, i, p->acked, 0);
    return 0;
}

static int chan_io_failed(struct pump *p, unsigned i, int eno)
{
    char why[128];

    if (eno == 0)
        snprintf(why, sizeof(why), "the peer closed the channel (EOF)");
    else
        snprintf(why, sizeof(why), "%s", strerror(eno));
    return chan_lost(p, i, eno == 0 || eno == EPIPE ? ECONNRESET : eno, why);
}

/*
 * A replacement channel on the resume socket: SCM_RIGHTS, u32 index.  The
 * fd arrives close-on-exec (MSG_CMSG_CLOEXEC); any extra fd is closed.
 */
static int take_replacement(struct pump *p)
{
    struct msghdr mh;
    struct iovec iov;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(4 * sizeof(int))];
    } cm;
    uint8_t data[8];
    int fd = -1, rc = -1;
    ssize_t n;
    uint32_t idx;
    struct chan *c;

    memset(&mh, 0, sizeof(mh));
    iov.iov_base = data;
    iov.iov_len = sizeof(data);
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cm.buf;
    mh.msg_controllen = sizeof(cm.buf);
    n = recvmsg(p->op->wire_resume_sock, &mh, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&mh); h; h = CMSG_NXTHDR(&mh, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        for (size_t k = 0; k < (h->cmsg_len - CMSG_LEN(0)) / sizeof(int); k++) {
            int got;
            memcpy(&got, CMSG_DATA(h) + k * sizeof(int), sizeof(int));
            if (fd < 0)
                fd = got;
            else
                close(got);
        }
    }
    if (n < 0) {
        rc = fail(p, errno, "the resume socket: %s", strerror(errno));
        goto out;
    }
    if (n == 0) {
        rc = fail(p, EPIPE, "the parent closed the resume socket");
        goto out;
    }
    if (n != 4 || fd < 0 || (mh.msg_flags & (MSG_CTRUNC | MSG_TRUNC))) {
        rc = fail(p, EINVAL, "the resume socket: a message without one fd and a u32 index");
        goto out;
    }
    memcpy(&idx, data, sizeof(idx));
    if (idx >= p->nch) {
        rc = fail(p, EINVAL, "the resume socket: channel %u of %u", idx, p->nch);
        goto out;
    }
    c = &p->ch[idx];
    if (c->fd >= 0) {
        /* Replaced before we noticed the loss (a silent link): the old one is dead to us. */
        xcs_log(XCS_LOG_WARN, 0, WIRE_CONTEXT, "channel %u replaced", idx);
        close(c->fd);
        chan_reset(c);
        if (p->send)
            requeue(p, idx, p->acked, 0);
    }
    c->fd = fd;
    fd = -1;
    c->lost_at = 0;
    chan_reset(c);
    if (p->send) {
        c->awaiting_resume = 1;
    } else {
        struct xcs_wire_hdr h = {XCS_WIRE_MAGIC, XCS_WT_RESUME, 0, (uint16_t)idx, 0, 0,
                                 p->next_exp, 0};
        xcs_wire_hdr_put(c->ctl, &h);
        c->ctl_len = XCS_WIRE_HDR;
    }
    xcs_log(XCS_LOG_INFO, 0, WIRE_CONTEXT, "channel %u resumed", idx);
    rc = 1;
out:
    if (fd >= 0)
        close(fd);
    return rc;
}

/* Lost channels past the resume timeout fail the pump. */
static int check_lost(struct pump *p, uint64_t now, uint64_t *wake)
{
    for (unsigned i = 0; i < p->nch; i++) {
        struct chan *c = &p->ch[i];
        uint64_t until;
        if (c->fd >= 0)
            continue;
        until = c->lost_at + (uint64_t)p->op->wire_resume_ms * MS;
        if (now >= until)
            return fail(p, c->lost_errno, "channel %u was lost and not replaced within %u ms",
                        i, p->op->wire_resume_ms);
        if (until < *wake)
            *wake = until;
    }
    return 0;
}

/*
 * Write from buf[*off..len) on channel i, under the cap when `capped`.
 * Returns 1 if bytes moved, 0 if none could, -1 if the pump fails; a
 * channel failure with resume returns 0 with the channel lost (fd -1).
 */
static int chan_write(struct pump *p, unsigned i, const uint8_t *buf, size_t len, size_t *off,
                      int capped, int more)
{
    struct chan *c = &p->ch[i];
    size_t want = len - *off;
    ssize_t w;

    if (capped) {
        want = bucket_allow(p, want);
        if (want == 0)
            return 0;
    }
    w = send(c->fd, buf + *off, want, MSG_DONTWAIT | MSG_NOSIGNAL | (more ? MSG_MORE : 0));
    if (w < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (w < 0)
        return chan_io_failed(p, i, errno) < 0 ? -1 : 0;
    *off += (size_t)w;
    if (p->send) { /* the data direction's bytes only: a receiver counts what it reads */
        c->bytes += (uint64_t)w;
        p->wire_bytes += (uint64_t)w;
    }
    c->stall_since = 0;
    if (capped && p->rate)
        p->tokens -= (double)w;
    return w > 0;
}

/*
 * Splice (sender): up to `want` bytes of the frame channel i is sending,
 * from the input pipe, where they wait already (splice_cut counted them), to
 * the channel, under the cap.  Returns as chan_write.
 */
static int chan_splice_out(struct pump *p, unsigned i, size_t want)
{
    struct chan *c = &p->ch[i];
    ssize_t n;

    want = bucket_allow(p, want);
    if (want == 0)
        return 0;
    n = splice(p->op->io_fd, NULL, c->fd, NULL, want, SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0; /* the socket is full: the bytes are in the pipe */
    if (n == 0)
        return fail(p, EPIPE, "the plain stream ended inside frame %lld", (long long)c->cur);
    if (n < 0)
        return chan_io_failed(p, i, errno) < 0 ? -1 : 0;
    c->cur_off += (size_t)n;
    c->bytes += (uint64_t)n;
    p->wire_bytes += (uint64_t)n;
    c->stall_since = 0;
    if (p->rate)
        p->tokens -= (double)n;
    return 1;
}

/*
 * Splice (receiver): more of the payload of frame next_exp from channel i
 * into the output pipe.  When neither can move, sp_out_full says which side
 * to wait for (the socket holds bytes: the pipe is full).  Returns as chan_read.
 */
static int chan_splice_in(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    ssize_t n = splice(c->fd, NULL, p->op->io_fd, NULL, c->h.wire_len - c->pay_have,
                       SPLICE_F_NONBLOCK | SPLICE_F_MOVE);
    int queued = 0;

    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        p->sp_out_full = ioctl(c->fd, FIONREAD, &queued) == 0 && queued > 0;
        return 0;
    }
    if (n < 0 && errno == EPIPE)
        return fail(p, EPIPE, "writing the plain stream: %s", strerror(errno));
    if (n <= 0)
        return chan_io_failed(p, i, n < 0 ? errno : 0) < 0 ? -1 : 0;
    p->sp_out_full = 0;
    c->pay_have += (size_t)n;
    c->bytes += (uint64_t)n;
    p->wire_bytes += (uint64_t)n;
    p->last_rx = now_ns();
    return 1;
}

/* Read into buf[*have..want) from channel i: 1 moved, 0 nothing, -1 failed (as above). */
static int chan_read(struct pump *p, unsigned i, uint8_t *buf, size_t want, size_t *have)
{
    ssize_t n = recv(p->ch[i].fd, buf + *have, want - *have, MSG_DONTWAIT);

    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (n <= 0)
        return chan_io_failed(p, i, n < 0 ? errno : 0) < 0 ? -1 : 0;
    *have += (size_t)n;
    p->last_rx = now_ns();
    if (!p->send) {
        p->ch[i].bytes += (uint64_t)n;
        p->wire_bytes += (uint64_t)n;
    }
    return 1;
}

static void queue_ctl(struct pump *p, unsigned i, int type, uint64_t seq, uint64_t aux)
{
    struct chan *c = &p->ch[i];
    struct xcs_wire_hdr h = {XCS_WIRE_MAGIC, (uint8_t)type, 0, (uint16_t)i, 0, 0, seq, aux};

    xcs_wire_hdr_put(c->ctl, &h);
    c->ctl_len = XCS_WIRE_HDR;
    c->ctl_off = 0;
}

/* A channel's pending control header out: 1 moved, 0 not, -1 failed. */
static int flush_ctl(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    int r;

    if (c->fd < 0 || c->ctl_len == 0)
        return 0;
    r = chan_write(p, i, c->ctl, c->ctl_len, &c->ctl_off, p->send, 0);
    if (r > 0 && c->fd >= 0 && c->ctl_off == c->ctl_len)
        c->ctl_len = c->ctl_off = 0;
    return r;
}

/* ------------------------------------------------------------ sender */

/* The level adapt() tries over --level, and the frames of its windows. */
#define ADAPT_LEVEL 3
#define ADAPT_WINDOW_FRAMES 16

/* Nanoseconds the cap takes to send n bytes (0: no cap). */
static uint64_t cap_ns(const struct pump *p, uint64_t n)
{
    return p->rate ? (uint64_t)((double)n * 1e9 / (double)p->rate) : 0;
}

/* EWMA (weight 1/4: windows are few) of a window's ns per MiB; the first sets it. */
static void ewma_window(uint64_t *avg, int *have, uint64_t sample)
{
    *avg = *have ? *avg - *avg / 4 + sample / 4 : sample;
    *have = 1;
}

/* Whether zstd's time per MiB is 1/8 less than `link` ns per MiB. */
static int zstd_beats(const struct pump *p, uint64_t link)
{
    return p->have_comp && p->ew_comp * 8 < link * 7;
}

/*
 * The adaptive rule (see the top), after each frame made: at the end of a
 * window, whether the next one compresses, and at what level.
 */
static void adapt(struct pump *p)
{
    uint64_t now, wall, idle, blocked, per_mib;
    int waited, idle_half, cap_says, z_faster, was = p->zmode, level = p->level;
    const char *why = NULL;

    if (p->op->wire_compress != 2 || ++p->win_frames < ADAPT_WINDOW_FRAMES)
        return;
    now = now_ns();
    wall = now - p->win_t0;
    idle = p->idle_ns - p->win_idle0;
    wall = wall > idle ? wall - idle : 1; /* the time the pump had work */
    blocked = p->blocked_ns - p->win_blocked0;
    waited = blocked * 8 >= wall;
    idle_half = blocked * 2 >= wall;
    per_mib = (uint64_t)((double)wall * (1 << 20) / (double)(p->win_plain ? p->win_plain : 1));
    if (p->settling) { /* the buffers refilled after a change: judge the next window */
        p->settling = 0;
        goto next;
    }
    if (p->zmode) {
        ewma_window(&p->z_mib, &p->have_z_mib, per_mib);
    } else {
        ewma_window(&p->raw_mib, &p->have_raw_mib, per_mib);
    }
    cap_says = zstd_beats(p, cap_ns(p, 1u << 20)); /* under a cap, zstd outruns it */
    z_faster = cap_says ||
               (p->have_z_mib && p->have_raw_mib && p->z_mib * 8 < p->raw_mib * 7);
    if (p->trial) {
        p->trial = 0;
        if (p->trial_high * 100 > p->trial_low * 99) {
            p->high_failed = 1;
            p->level = p->op->wire_level;
            why = "level 3 did not make the same frames 1% smaller";
        }
    }
    if (why) {
        /* the trial's verdict is this window's change */
    } else if (p->checking) {
        /*
         * The check's verdict.  Going back the way we came confirms it:
         * the next check comes half as often (each costs a window the
         * slower way), every 4 windows at first, at most every 64.
         */
        p->checking = 0;
        p->windows = 0;
        p->probe_every = z_faster != p->zmode ? (p->probe_every < 64 ? p->probe_every * 2 : 64)
                                              : 4;
        p->zmode = z_faster;
        why = z_faster ? "compressing moves a MiB faster" : "raw moves a MiB faster";
    } else if (p->zmode && (waited || cap_says)) {
        /* The link is the limit even compressed: no check needed. */
        if (idle_half && !p->high_failed && p->level < ADAPT_LEVEL) {
            p->trial = 1;
            p->trial_high = p->trial_low = 0;
            p->level = ADAPT_LEVEL;
            why = "the link leaves half the time idle";
        }
    } else if (p->zmode && p->level != p->op->wire_level) {
        p->level = p->op->wire_level;
        p->high_failed = 1;
        why = "the CPU is the limit at level 3";
    } else if (p->zmode && !p->have_raw_mib) {
        p->zmode = 0;
        p->checking = 1;
        why = "the link does not wait: a raw window measures it";
    } else if (p->zmode && !z_faster) {
        p->zmode = 0;
        p->windows = 0;
        why = "raw moves a MiB faster";
    } else if (p->zmode && ++p->windows >= p->probe_every) {
        p->zmode = 0;
        p->checking = 1;
        why = "a raw window checks that compressing is still faster";
    } else if (!p->zmode && !waited) {
        /* Raw frames do not wait: the link takes more than we feed it, and
         * compressing could only cost.  Nothing to check. */
        p->windows = 0;
    } else if (!p->zmode && (z_faster || (!p->have_z_mib && zstd_beats(p, per_mib)))) {
        p->zmode = 1;
        p->windows = 0;
        why = "compressing moves a MiB faster";
    } else if (!p->zmode && ++p->windows >= p->probe_every) {
        p->zmode = 1;
        p->checking = 1;
        why = "a compressed window checks that raw is still faster";
    }
    if (why && (p->zmode != was || p->level != level)) {
        /* Into compressing after a window that waited: the buffers are
         * full of raw bytes, so the next window is not judged.  Raw needs
         * no settling: its frames are the larger. */
        p->settling = p->zmode && waited;
        xcs_log(XCS_LOG_DEBUG, 0, WIRE_CONTEXT,
                "adaptive: %s from frame %llu, level %d: %s (zstd %llu us/MiB, "
                "a MiB took %llu us, waiting %llu%% of the time)",
                p->zmode ? "compressing" : "raw", (unsigned long long)p->next_seq, p->level,
                why, (unsigned long long)(p->ew_comp / 1000),
                (unsigned long long)(per_mib / 1000),
                (unsigned long long)(wall ? blocked * 100 / wall : 0));
    }
next:
    p->win_frames = 0;
    p->win_t0 = now;
    p->win_blocked0 = p->blocked_ns;
    p->win_idle0 = p->idle_ns;
    p->win_plain = 0;
}

/* Whether to try zstd on the next frame (the adaptive rule: see the top). */
static int want_compress(struct pump *p)
{
    if (p->op->wire_compress == 0)
        return 0;
    if (p->op->wire_compress == 1)
        return 1;
    if (p->skip > 0) {
        p->skip--;
        return 0;
    }
    return p->zmode;
}

/*
 * The staged plain bytes become frame next_seq (queued), in place: a raw
 * frame is the stage's buffer itself (the header goes in the room before
 * it), a compressed one the buffer zstd wrote into; the stage gets another.
 */
static int make_frame(struct pump *p)
{
    struct sframe *f = &p->sf[p->next_seq % p->wf];
    struct xcs_wire_hdr h = {XCS_WIRE_MAGIC, XCS_WT_DATA, XCS_WC_RAW, 0,
                             (uint32_t)p->stage_len, (uint32_t)p->stage_len, p->next_seq, 0};
    uint8_t *out = NULL, *next = buf_get(p);

    if (!next)
        return fail(p, ENOMEM, "out of memory for a frame of %u bytes", p->fmax);
#ifdef XCS_HAVE_ZSTD
    if (p->next_z) {
        uint64_t t = now_ns();
        size_t cap = p->stage_len - p->stage_len / 10;
        size_t n = ZSTD_compressCCtx(p->cctx, next + XCS_WIRE_HDR, cap, p->stage, p->stage_len,
                                     p->level);
        uint64_t spent = now_ns() - t;

        if (p->trial) {
            /* The same frame at --level too: the trial compares the two
             * levels on the same bytes. */
            size_t low = ZSTD_compressCCtx(p->cctx, p->zbuf, cap, p->stage, p->stage_len,
                                           p->op->wire_level);
            p->trial_low += ZSTD_isError(low) ? p->stage_len : low;
            p->trial_high += ZSTD_isError(n) ? p->stage_len : n;
        }
        /* EWMA (1/8) of zstd's ns per MiB (frames differ in size); the
         * second sample sets it (the first pays for the context's tables). */
        spent = (spent << 20) / p->stage_len;
        if (p->comp_tries++ > 0) {
            p->ew_comp = p->have_comp ? p->ew_comp - p->ew_comp / 8 + spent / 8 : spent;
            p->have_comp = 1;
        }
        if (!ZSTD_isError(n) && n > 0 && n * 10 < p->stage_len * 9) {
            h.codec = XCS_WC_ZSTD;
            h.wire_len = (uint32_t)n;
            out = next; /* the frame; the stage keeps its buffer */
            next = NULL;
            p->not_worth = 0;
        } else if (++p->not_worth >= 2 && p->op->wire_compress == 2) {
            p->skip = 7;
            p->not_worth = 0;
        }
    }
#endif
    p->win_plain += p->stage_len;
    adapt(p);
    if (!out) { /* raw: the stage's buffer is the frame, the spare the new stage */
        out = p->stage_buf;
        p->stage_buf = next;
        p->stage = next + XCS_WIRE_HDR;
    }
    f->buf = out;
    f->len = XCS_WIRE_HDR + h.wire_len;
    xcs_wire_hdr_put(f->buf, &h);
    f->raw_len = h.raw_len;
    f->state = FR_QUEUED;
    f->ch = -1;
    p->frames++;
    if (h.codec == XCS_WC_ZSTD)
        p->frames_compressed++;
    p->next_seq++;
    p->stage_len = 0;
    p->next_z = -1;
    return 1;
}

/*
 * Splice (sender): when the next frame goes raw, its bytes stay in the
 * input pipe until channel i is free to take them; then whatever the pipe
 * holds (at most a frame) becomes the frame, and its header goes out
 * first.  1 a frame was cut, 0 not now, -1 the pump fails.
 */
static int splice_cut(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    struct sframe *f = &p->sf[p->next_seq % p->wf];
    int avail = 0;
    struct xcs_wire_hdr h = {XCS_WIRE_MAGIC, XCS_WT_DATA, XCS_WC_RAW, (uint16_t)i, 0, 0,
                             p->next_seq, 0};

    if (p->in_eof || p->next_seq - p->acked >= p->wf)
        return 0;
    if (ioctl(p->op->io_fd, FIONREAD, &avail) < 0)
        return fail(p, errno, "the plain stream's pipe: FIONREAD: %s", strerror(errno));
    if (avail <= 0) {
        /* Empty: is the writer gone (POLLHUP and nothing left)?  Else wait. */
        struct pollfd q = {p->op->io_fd, POLLIN, 0};
        if (poll(&q, 1, 0) == 1 && (q.revents & POLLHUP) && !(q.revents & POLLIN))
            p->in_eof = 1;
        return 0;
    }
    h.raw_len = h.wire_len = (uint32_t)avail < p->fmax ? (uint32_t)avail : p->fmax;
    xcs_wire_hdr_put(c->sp_hdr, &h);
    f->buf = NULL;
    f->len = XCS_WIRE_HDR + h.wire_len;
    f->raw_len = h.raw_len;
    f->state = FR_WRITING;
    f->ch = (int)i;
    c->cur = (int64_t)p->next_seq;
    c->cur_off = 0;
    c->sp = 1;
    p->spliced++;
    p->stream_bytes += h.raw_len;
    p->frames++;
    p->next_seq++;
    p->win_plain += h.raw_len;
    adapt(p);
    p->next_z = -1;
    return 1;
}

/*
 * Free the frames the receiver has (before ack_hi), up to the first one
 * still being written: a re-sent frame the receiver held already must
 * still go out whole (the channel is in the middle of it).
 */
static void release(struct pump *p)
{
    for (; p->acked < p->ack_hi; p->acked++) {
        struct sframe *f = &p->sf[p->acked % p->wf];
        if (f->state == FR_WRITING)
            break;
        buf_put(p, f->buf);
        memset(f, 0, sizeof(*f));
    }
}

/*
 * ACK, RESUME or END seq: the receiver has every frame before it.  Read on
 * different channels they may come out of order: an older one is stale.
 */
static int acked_to(struct pump *p, uint64_t seq, const char *what, unsigned i)
{
    if (seq > p->next_seq)
        return fail(p, EPROTO, "channel %u: %s of frame %llu, but we sent %llu", i, what,
                    (unsigned long long)seq, (unsigned long long)p->next_seq);
    if (seq > p->ack_hi)
        p->ack_hi = seq;
    release(p);
    return 1;
}

/*
 * Channel i's next header, read to its exact length (never a byte of what
 * follows) and checked against the types in `accept`: 2 complete (c->h),
 * 1 partial, 0 nothing to read now, -1 the pump fails.
 */
static int read_header(struct pump *p, unsigned i, unsigned accept)
{
    struct chan *c = &p->ch[i];
    char why[160];
    int r = chan_read(p, i, c->hdr, XCS_WIRE_HDR, &c->hdr_have);

    if (r <= 0)
        return r;
    if (c->hdr_have < XCS_WIRE_HDR)
        return 1;
    xcs_wire_hdr_get(c->hdr, &c->h);
    if (xcs_wire_check(&c->h, i, accept, p->fmax, xcs_wire_zstd_built(), why, sizeof(why)) < 0)
        return fail(p, EPROTO, "channel %u: %s", i, why);
    return 2;
}

/* Read the receiver's frames on channel i (headers only). */
static int sender_read(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    int moved = 0, r;

    while (c->fd >= 0 && c->end_seen == 0) {
        r = read_header(p, i, 1u << XCS_WT_ACK | 1u << XCS_WT_RESUME | 1u << XCS_WT_END);
        if (r <= 0)
            return r < 0 ? -1 : moved;
        moved = 1;
        if (r == 1)
            continue;
        c->hdr_have = 0;
        if (c->h.type == XCS_WT_RESUME) {
            if (!c->awaiting_resume)
                return fail(p, EPROTO, "channel %u: RESUME on a channel not resumed", i);
            if (acked_to(p, c->h.seq, "RESUME", i) < 0)
                return -1;
            c->awaiting_resume = 0;
            /* What went out on the lost channel and the receiver lacks: again. */
            requeue(p, i, p->ack_hi, 1);
        } else if (c->awaiting_resume) {
            return fail(p, EPROTO, "channel %u: %s before RESUME", i, xcs_wire_type_name(c->h.type));
        } else if (c->h.type == XCS_WT_ACK) {
            if (acked_to(p, c->h.seq, "ACK", i) < 0)
                return -1;
        } else {
            if (!c->end_sent || c->h.seq != p->next_seq || c->h.aux != p->stream_bytes)
                return fail(p, EPROTO, "channel %u: the receiver ended at frame %llu, %llu "
                            "bytes; we sent %llu frames, %llu bytes", i,
                            (unsigned long long)c->h.seq, (unsigned long long)c->h.aux,
                            (unsigned long long)p->next_seq,
                            (unsigned long long)p->stream_bytes);
            if (acked_to(p, c->h.seq, "END", i) < 0)
                return -1;
            c->end_seen = 1;
        }
    }
    return moved;
}

/* Input pipe -> the staging frame. */
static int sender_input(struct pump *p)
{
    int moved = 0;

    /* A spliced frame still leaving owns the pipe's first bytes: wait. */
    if (p->zc && p->ch[0].sp)
        return 0;
    if (p->stage_len == 0 && p->next_z < 0)
        p->next_z = want_compress(p);
    while (!p->in_eof && p->stage_len < p->fmax && p->next_seq - p->acked < p->wf &&
           !(p->zc && p->next_z == 0)) {
        ssize_t n = read(p->op->io_fd, p->stage + p->stage_len, p->fmax - p->stage_len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN) {
            p->in_dry = 1;
            break;
        }
        if (n < 0)
            return fail(p, errno, "reading the plain stream: %s", strerror(errno));
        if (n == 0)
            p->in_eof = 1;
        p->in_dry = 0;
        p->stage_len += (size_t)n;
        p->stream_bytes += (uint64_t)n;
        moved = 1;
    }
    return moved;
}

static int64_t next_queued(const struct pump *p);

/* Whether the channels have anything left to write. */
static int link_busy(const struct pump *p)
{
    for (unsigned i = 0; i < p->nch; i++)
        if (p->ch[i].fd >= 0 && (p->ch[i].cur >= 0 || p->ch[i].ctl_len))
            return 1;
    return next_queued(p) >= 0;
}

/* The lowest queued frame the receiver lacks, or -1. */
static int64_t next_queued(const struct pump *p)
{
    for (uint64_t s = p->ack_hi > p->acked ? p->ack_hi : p->acked; s < p->next_seq; s++)
        if (p->sf[s % p->wf].state == FR_QUEUED)
            return (int64_t)s;
    return -1;
}

static int sender_step(struct pump *p)
{
    int moved = 0, r;

    r = sender_input(p);
    if (r < 0)
        return -1;
    moved |= r;
    /*
     * A frame is cut when full, at EOF, or when the input has run dry and
     * the link idles (waiting for more would only delay the receiver) --
     * and only when no frame is still waiting for a channel.  The window
     * bounds what the receiver may lack (for a resume), not how far we run
     * ahead of the link: frames cut as fast as the helper writes (and zstd
     * compresses) queued up to the whole window, 64 MiB, so a live save's
     * rounds looked short while the link fell behind, and its final round
     * waited in the downtime behind that queue (~280 ms at 1 Gbit/s).  With
     * one frame queued, a full stage stops our reads and the helper feels
     * the link through its pipe, as it does without a pump.
     */
    if (p->stage_len && next_queued(p) < 0 &&
        (p->stage_len == p->fmax || p->in_eof || (p->in_dry && !link_busy(p)))) {
        if (make_frame(p) < 0)
            return -1;
        moved = 1;
    }
    for (unsigned i = 0; i < p->nch; i++) {
        struct chan *c = &p->ch[i];
        if (c->fd < 0)
            continue;
        r = sender_read(p, i);
        if (r < 0)
            return -1;
        moved |= r;
        if (c->fd < 0 || c->awaiting_resume)
            continue;
        if (c->cur < 0 && c->ctl_len) {
            r = flush_ctl(p, i);
            if (r < 0)
                return -1;
            moved |= r;
            continue;
        }
        if (c->cur < 0 && !c->end_sent && p->zc && p->next_z == 0 && p->stage_len == 0 &&
            next_queued(p) < 0) {
            r = splice_cut(p, i);
            if (r < 0)
                return -1;
            moved |= r;
        }
        if (c->cur < 0 && !c->end_sent) {
            int64_t s = next_queued(p);
            if (s >= 0) {
                struct sframe *f = &p->sf[(uint64_t)s % p->wf];
                f->state = FR_WRITING;
                f->ch = (int)i;
                xcs_put_le16(f->buf + 6, (uint16_t)i); /* the channel it goes out on */
                c->cur = s;
                c->cur_off = 0;
            }
        }
        while (c->fd >= 0 && c->cur >= 0) {
            struct sframe *f = &p->sf[(uint64_t)c->cur % p->wf];
            if (!c->sp)
                r = chan_write(p, i, f->buf, f->len, &c->cur_off, 1, 0);
            else if (c->cur_off < XCS_WIRE_HDR) /* corked: it leaves with the payload */
                r = chan_write(p, i, c->sp_hdr, XCS_WIRE_HDR, &c->cur_off, 1, 1);
            else
                r = chan_splice_out(p, i, f->len - c->cur_off);
            if (r < 0)
                return -1;
            if (r == 0)
                break;
            moved = 1;
            if (c->cur_off == f->len) {
                f->state = FR_WRITTEN;
                c->cur = -1;
                c->sp = 0;
                release(p);
            }
        }
    }
    /* Everything out: END on every live channel (not before its RESUME). */
    if (p->in_eof && p->stage_len == 0 && next_queued(p) < 0) {
        int all_written = 1;
        for (uint64_t s = p->ack_hi > p->acked ? p->ack_hi : p->acked; s < p->next_seq; s++)
            if (p->sf[s % p->wf].state != FR_WRITTEN)
                all_written = 0;
        for (unsigned i = 0; i < p->nch; i++)
            if (p->ch[i].cur >= 0)
                all_written = 0;
        for (unsigned i = 0; all_written && i < p->nch; i++) {
            struct chan *c = &p->ch[i];
            if (c->fd >= 0 && !c->end_sent && !c->awaiting_resume && c->cur < 0 &&
                !c->ctl_len) {
                queue_ctl(p, i, XCS_WT_END, p->next_seq, p->stream_bytes);
                c->end_sent = 1;
                moved = 1;
            }
        }
    }
    return moved;
}

static int sender_done(const struct pump *p)
{
    if (!p->in_eof || p->stage_len)
        return 0;
    for (unsigned i = 0; i < p->nch; i++)
        if (p->ch[i].fd < 0 || !p->ch[i].end_seen)
            return 0;
    return 1;
}

/* ------------------------------------------------------------ receiver */

/* Channel i's DATA header: 1 a frame we lack, 0 a duplicate, -1 the pump fails. */
static int data_wanted(struct pump *p, unsigned i)
{
    const struct xcs_wire_hdr *h = &p->ch[i].h;

    if (h->seq < p->next_exp)
        return 0; /* a duplicate after a resume: we have written it */
    if (h->seq >= p->next_exp + p->wf || (p->total != UINT64_MAX && h->seq >= p->total))
        return fail(p, EPROTO, "channel %u: DATA frame %llu outside the window %llu..%llu", i,
                    (unsigned long long)h->seq, (unsigned long long)p->next_exp,
                    (unsigned long long)(p->next_exp + p->wf - 1));
    return p->rf[h->seq % p->wf].data ? 0 : 1; /* held already: a duplicate after a resume */
}

/* A complete DATA frame on channel i (payload in c->payload). */
static int recv_data(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    struct xcs_wire_hdr *h = &c->h;
    struct rframe *f;
    char why[160];
    int r = data_wanted(p, i);

    if (r <= 0)
        return r < 0 ? -1 : 1;
    f = &p->rf[h->seq % p->wf];
    if (h->codec == XCS_WC_RAW) {
        /* The payload is the plain bytes (xcs_wire_check: wire_len ==
         * raw_len): the frame keeps its buffer, no copy. */
        f->data = c->payload;
        c->payload = NULL;
    } else {
        f->data = buf_get(p);
        if (!f->data)
            return fail(p, ENOMEM, "out of memory for a frame of %u bytes", h->raw_len);
        if (xcs_wire_unpack(h, c->payload, f->data, p->dctx, why, sizeof(why)) < 0) {
            buf_put(p, f->data);
            f->data = NULL;
            return fail(p, EPROTO, "channel %u: %s", i, why);
        }
    }
    f->len = h->raw_len;
    p->frames++;
    if (h->codec == XCS_WC_ZSTD)
        p->frames_compressed++;
    return 1;
}

static int recv_end(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];

    if (c->h.seq < p->next_exp || (p->total != UINT64_MAX &&
                                   (c->h.seq != p->total || c->h.aux != p->total_bytes)))
        return fail(p, EPROTO, "channel %u: END at frame %llu (%llu bytes) contradicts "
                    "what came before", i, (unsigned long long)c->h.seq,
                    (unsigned long long)c->h.aux);
    for (uint64_t s = c->h.seq; s < p->next_exp + p->wf && p->total == UINT64_MAX; s++)
        if (p->rf[s % p->wf].data && s >= c->h.seq)
            return fail(p, EPROTO, "channel %u: END at frame %llu, but frame %llu came",
                        i, (unsigned long long)c->h.seq, (unsigned long long)s);
    p->total = c->h.seq;
    p->total_bytes = c->h.aux;
    c->end_seen = 1;
    return 1;
}

/*
 * Whether the output waits for its reader with the frame it needs next in
 * hand: then no channel starts a new frame (one under way is read to its
 * end).  What the sender sends meanwhile waits in the socket buffers, as it
 * would without us, instead of in ours; and with one channel every raw frame
 * then comes next in order and is spliced.
 */
static int out_blocked(const struct pump *p)
{
    return p->rf[p->next_exp % p->wf].data || (p->splicing >= 0 && p->sp_out_full);
}

/* Read frames from channel i: each header, then its payload, exactly. */
static int receiver_read(struct pump *p, unsigned i)
{
    struct chan *c = &p->ch[i];
    int moved = 0, r;

    while (c->fd >= 0 && !c->end_seen && !(c->hdr_have == 0 && out_blocked(p))) {
        if (c->hdr_have < XCS_WIRE_HDR) {
            r = read_header(p, i, 1u << XCS_WT_DATA | 1u << XCS_WT_END);
            if (r <= 0)
                return r < 0 ? -1 : moved;
            moved = 1;
            if (r == 1)
                continue;
            if (c->h.type == XCS_WT_END) {
                c->hdr_have = 0;
                if (recv_end(p, i) < 0)
                    return -1;
                continue;
            }
            c->pay_have = 0;
            /* The next frame in order, raw, nothing else on its way out:
             * spliced into the output pipe (see the top). */
            if (p->zc && c->h.codec == XCS_WC_RAW && c->h.seq == p->next_exp &&
                p->splicing < 0) {
                r = data_wanted(p, i);
                if (r < 0)
                    return -1;
                c->sp = r;
                p->splicing = r ? (int)i : -1;
            }
            if (!c->sp) {
                /* Bounded: wire_len <= frame_max, checked above. */
                c->payload = buf_get(p);
                if (!c->payload)
                    return fail(p, ENOMEM, "out of memory for a frame of %u bytes",
                                c->h.wire_len);
            }
        }
        if (c->sp) {
            r = chan_splice_in(p, i);
            if (r <= 0)
                return r < 0 ? -1 : moved;
            moved = 1;
            if (c->pay_have < c->h.wire_len)
                continue;
            c->sp = 0;
            c->hdr_have = 0;
            p->splicing = -1;
            p->spliced++;
            p->frames++;
            p->next_exp++;
            p->stream_bytes += c->h.raw_len;
            continue;
        }
        r = chan_read(p, i, c->payload, c->h.wire_len, &c->pay_have);
        if (r <= 0)
            return r < 0 ? -1 : moved;
        moved = 1;
        if (c->pay_have < c->h.wire_len)
            continue;
        r = recv_data(p, i);
        buf_put(p, c->payload); /* NULL when the frame kept it */
        c->payload = NULL;
        c->hdr_have = 0;
        if (r < 0)
            return -1;
    }
    return moved;
}

static int write_all_fd(int fd, const uint8_t *b, size_t n)
{
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        b += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Frames in order -> the output pipe (and the tee). */
static int receiver_output(struct pump *p)
{
    int moved = 0;

    for (;;) {
        struct rframe *f = &p->rf[p->next_exp % p->wf];
        ssize_t w;
        if (!f->data)
            return moved;
        w = write(p->op->io_fd, f->data + p->out_off, f->len - p->out_off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            return moved;
        if (w < 0)
            return fail(p, errno == EPIPE ? EPIPE : errno, "writing the plain stream: %s",
                        strerror(errno));
        p->out_off += (size_t)w;
        moved = 1;
        if (p->out_off < f->len)
            continue;
        /* The tee is a file (--save-to): written in full, blocking. */
        if (p->op->wire_tee_fd >= 0 && write_all_fd(p->op->wire_tee_fd, f->data, f->len) < 0)
            return fail(p, errno, "writing the tee: %s", strerror(errno));
        p->stream_bytes += f->len;
        buf_put(p, f->data);
        f->data = NULL;
        p->out_off = 0;
        p->next_exp++;
    }
}

static int lowest_live(const struct pump *p)
{
    for (unsigned i = 0; i < p->nch; i++)
        if (p->ch[i].fd >= 0)
            return (int)i;
    return -1;
}

static int receiver_step(struct pump *p, uint64_t now)
{
    int moved = 0, r, lo;

    for (unsigned i = 0; i < p->nch; i++) {
        r = receiver_read(p, i);
        if (r < 0)
            return -1;
        moved |= r;
    }
    r = receiver_output(p);
    if (r < 0)
        return -1;
    moved |= r;
    if (!p->finishing && p->total != UINT64_MAX && p->next_exp == p->total) {
        int ends = 1;
        for (unsigned i = 0; i < p->nch; i++)
            if (p->ch[i].fd < 0 || !p->ch[i].end_seen)
                ends = 0;
        if (ends && p->stream_bytes != p->total_bytes)
            return fail(p, EPROTO, "END says %llu bytes, the frames held %llu",
                        (unsigned long long)p->total_bytes,
                        (unsigned long long)p->stream_bytes);
        if (ends) {
            p->finishing = 1;
            moved = 1;
        }
    }
    lo = lowest_live(p);
    if (!p->finishing && lo >= 0 && !p->ch[lo].ctl_len &&
        (p->stream_bytes - p->acked_bytes >= p->ack_every ||
         (p->stream_bytes > p->acked_bytes && now - p->last_ack >= ACK_NS) ||
         now - p->last_ack >= KEEPALIVE_NS)) {
        queue_ctl(p, (unsigned)lo, XCS_WT_ACK, p->next_exp, p->stream_bytes);
        p->acked_bytes = p->stream_bytes;
        p->last_ack = now;
        moved = 1;
    }
    for (unsigned i = 0; i < p->nch; i++) {
        struct chan *c = &p->ch[i];
        if (p->finishing && c->fd >= 0 && c->end_seen && !c->ctl_len && !c->end_sent) {
            queue_ctl(p, i, XCS_WT_END, p->total, p->total_bytes);
            c->end_sent = 1;
        }
        r = flush_ctl(p, i);
        if (r < 0)
            return -1;
        moved |= r;
    }
    return moved;
}

static int receiver_done(const struct pump *p)
{
    if (!p->finishing)
        return 0;
    for (unsigned i = 0; i < p->nch; i++)
        if (p->ch[i].fd < 0 || !p->ch[i].end_seen || !p->ch[i].end_sent ||
            p->ch[i].ctl_len)
            return 0;
    return 1;
}

/* ------------------------------------------------------------ raw (--raw) */

/* The plain stream as it is, on channel 0, under the cap: no frames, no peer pump. */
static int raw_step(struct pump *p, int *done)
{
    int moved = 0, r;

    if (p->stage_len == 0 && !p->in_eof) {
        uint64_t want = p->rate ? p->rate * CAP_STAGE_MS / 1000 : RAW_BUF;
        ssize_t n = read(p->op->io_fd, p->stage,
                         want > RAW_BUF ? RAW_BUF : want < MIN_WRITE ? MIN_WRITE : want);
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            return fail(p, errno, "reading the plain stream: %s", strerror(errno));
        if (n == 0)
            p->in_eof = 1;
        if (n > 0) {
            p->stage_len = (size_t)n;
            p->stream_bytes += (uint64_t)n;
            p->raw_off = 0;
        }
        moved |= n >= 0;
    }
    if (p->stage_len) {
        r = chan_write(p, 0, p->stage, p->stage_len, &p->raw_off, 1, 0);
        if (r < 0)
            return -1;
        if (p->raw_off == p->stage_len)
            p->stage_len = 0;
        moved |= r;
    }
    *done = p->in_eof && p->stage_len == 0;
    return moved;
}

/* ------------------------------------------------------------ the loop */

static int run(struct pump *p)
{
    const struct xcs_op *op = p->op;
    sigset_t during_poll;
    int done = 0;

    sigprocmask(SIG_SETMASK, NULL, &during_poll);
    sigdelset(&during_poll, SIGTERM);
    for (;;) {
        struct pollfd pfd[XCS_WIRE_MAX_CHANNELS + 4];
        int chan_slot[XCS_WIRE_MAX_CHANNELS + 4];
        nfds_t n = 0;
        uint64_t now, wake = UINT64_MAX, t;
        struct timespec ts;
        int step, r, waiting_out = 0;

        if (wire_stop)
            return fail(p, ECANCELED, "stopped by SIGTERM");
        now = now_ns();
        bucket_refill(p, now);
        if (op->wire_raw)
            step = raw_step(p, &done);
        else if (p->send)
            step = sender_step(p);
        else
            step = receiver_step(p, now);
        if (step < 0)
            return -1;
        if (!op->wire_raw)
            done = p->send ? sender_done(p) : receiver_done(p);
        if (done)
            return 0;
        if (now - p->last_stats >= STATS_NS)
            send_stats(p);
        if (step > 0)
            continue;

        /* Nothing moves: wait for something that can. */
        size_pipe(p);
        now = now_ns();
        if (check_lost(p, now, &wake) < 0)
            return -1;
        wake = wake < p->last_stats + STATS_NS ? wake : p->last_stats + STATS_NS;
        /* The next ACK is due only where one can go: with every channel
         * lost (waiting for replacements) it would be due at once, always,
         * and the loop would spin instead of polling the resume socket. */
        if (!p->send && lowest_live(p) >= 0)
            wake = wake < p->last_ack + ACK_NS ? wake : p->last_ack + ACK_NS;
        pfd[n].fd = STDIN_FILENO; /* wire_rate, or EOF: the parent has gone */
        pfd[n].events = POLLIN;
        chan_slot[n++] = -1;
        if (p->send && !p->in_eof && p->stage_len < (op->wire_raw ? 1 : p->fmax) &&
            (op->wire_raw || p->next_seq - p->acked < p->wf) &&
            /* spliced frames wait in the pipe: it matters only when empty */
            !(p->zc && p->ch[0].cur >= 0 && (p->ch[0].sp || p->next_z == 0))) {
            pfd[n].fd = op->io_fd;
            pfd[n].events = POLLIN;
            chan_slot[n++] = -1;
        }
        if (!p->send && out_blocked(p)) {
            pfd[n].fd = op->io_fd;
            pfd[n].events = POLLOUT;
            chan_slot[n++] = -1;
        }
        if (op->wire_resume_sock >= 0) {
            pfd[n].fd = op->wire_resume_sock;
            pfd[n].events = POLLIN;
            chan_slot[n++] = -2;
        }
        for (unsigned i = 0; i < p->nch; i++) {
            struct chan *c = &p->ch[i];
            short ev = 0;
            int out;
            if (c->fd < 0)
                continue;
            if (!c->end_seen && !op->wire_raw &&
                !(!p->send && (c->hdr_have == 0 || p->splicing == (int)i) && out_blocked(p)))
                ev |= POLLIN;
            out = c->ctl_len || c->cur >= 0 || (op->wire_raw && p->stage_len);
            if (p->send && !c->awaiting_resume && !c->end_sent && next_queued(p) >= 0)
                out = 1;
            if (out) {
                size_t want = c->ctl_len ? c->ctl_len - c->ctl_off : MIN_WRITE;
                t = p->send ? bucket_wait(p, want) : 0;
                if (t)
                    wake = wake < now + t ? wake : now + t;
                else
                    ev |= POLLOUT;
                waiting_out = 1;
                if (!c->stall_since)
                    c->stall_since = now;
                if (op->idle_ms && !t) {
                    uint64_t until = c->stall_since + (uint64_t)op->idle_ms * MS;
                    if (now >= until) {
                        char why[64];
                        snprintf(why, sizeof(why), "no progress for %u ms", op->idle_ms);
                        if (chan_lost(p, i, ETIMEDOUT, why) < 0)
                            return -1;
                        goto again;
                    }
                    wake = wake < until ? wake : until;
                }
            } else {
                c->stall_since = 0;
            }
            pfd[n].fd = c->fd;
            pfd[n].events = ev;
            chan_slot[n++] = (int)i;
        }
        /*
         * Silence: the receiver hears nothing at all (the sender's frames
         * stopped); the sender no acknowledgement (the receiver keeps one
         * coming every second): the channel of the oldest unacknowledged
         * frame is lost.
         */
        if (op->idle_ms && !op->wire_raw) {
            uint64_t until = p->last_rx + (uint64_t)op->idle_ms * MS;
            /* (A receiver whose output is blocked is not waiting for the sender.) */
            int silent = p->send ? p->acked < p->next_seq || (p->in_eof && !p->stage_len)
                                 : !out_blocked(p);
            if (!p->send && !silent)
                p->last_rx = now;
            if (silent && now >= until) {
                int who;
                char why[64];
                p->last_rx = now;
                if (!p->send) {
                    /*
                     * A silent link (cable pulled: no FIN, no RST) looks
                     * like this: without resume the end; with it, every
                     * live channel is lost and the sender's reconnections
                     * replace them (its own silence check finds them lost).
                     */
                    snprintf(why, sizeof(why), "nothing from the sender for %u ms",
                             op->idle_ms);
                    if (op->wire_resume_sock < 0)
                        return fail(p, ETIMEDOUT, "%s", why);
                    for (unsigned i = 0; i < p->nch; i++)
                        if (p->ch[i].fd >= 0 && chan_lost(p, i, ETIMEDOUT, why) < 0)
                            return -1;
                    continue;
                }
                who = p->acked < p->next_seq ? p->sf[p->acked % p->wf].ch : lowest_live(p);
                snprintf(why, sizeof(why), "no acknowledgement for %u ms", op->idle_ms);
                /* Lost already (only with resume: else the loss ended the
                 * pump): the replacement's deadline governs, not this. */
                if (who < 0 || p->ch[who].fd < 0)
                    continue;
                if (chan_lost(p, (unsigned)who, ETIMEDOUT, why) < 0)
                    return -1;
                continue;
            }
            if (silent)
                wake = wake < until ? wake : until;
        }
        if (wake <= now) {
            continue;
        }
        t = wake - now;
        ts.tv_sec = (time_t)(t / 1000000000u);
        ts.tv_nsec = (long)(t % 1000000000u);
        for (nfds_t k = 0; k < n; k++)
            pfd[k].revents = 0;
        r = ppoll(pfd, n, &ts, &during_poll);
        if (waiting_out || (p->send && !op->wire_raw && p->next_seq - p->acked >= p->wf))
            p->blocked_ns += now_ns() - now;
        else if (p->send)
            p->idle_ns += now_ns() - now; /* the helper between rounds: neither CPU nor link */
        if (r < 0 && errno != EINTR)
            return fail(p, errno, "ppoll: %s", strerror(errno));
        for (nfds_t k = 0; r > 0 && k < n; k++) {
            if (!pfd[k].revents)
                continue;
            if (pfd[k].fd == STDIN_FILENO) {
                if (read_parent(p) < 0)
                    return -1;
            } else if (chan_slot[k] == -2) {
                if (take_replacement(p) < 0)
                    return -1;
            }
            /* A channel's POLLERR/POLLHUP: its next send or recv reports which. */
        }
        continue;
again:;
    }
}

/* ------------------------------------------------------------ entry */

/* What the run cost this process: where a pump's time goes (debug). */
static void log_usage(const struct pump *p)
{
    struct rusage ru;

    if (getrusage(RUSAGE_SELF, &ru) < 0)
        return;
    xcs_log(XCS_LOG_DEBUG, 0, WIRE_CONTEXT,
            "%s: %llu bytes in %llu ms, %llu of %llu frames spliced; cpu %ld ms user, %ld ms "
            "system; %ld minor faults; %ld context switches (%ld involuntary)",
            p->send ? "wire-send" : "wire-recv", (unsigned long long)p->stream_bytes,
            (unsigned long long)((now_ns() - p->t0) / MS), (unsigned long long)p->spliced,
            (unsigned long long)p->frames,
            (long)(ru.ru_utime.tv_sec * 1000 + ru.ru_utime.tv_usec / 1000),
            (long)(ru.ru_stime.tv_sec * 1000 + ru.ru_stime.tv_usec / 1000), ru.ru_minflt,
            ru.ru_nvcsw + ru.ru_nivcsw, ru.ru_nivcsw);
}

int xcs_wire(const struct xcs_op *op)
{
    struct pump *p = NULL;
    int rc = -1, saved = 0, flags_set = 0;

    p = calloc(1, sizeof(*p));
    if (!p) {
        errno = ENOMEM;
        return -1;
    }
    p->op = op;
    p->send = op->wire == 1;
    p->nch = op->wire_nchan;
    p->fmax = op->wire_frame;
    /* >= 1: argv checked window >= frame; at most WINDOW_FRAMES (the scans are per frame) */
    p->wf = op->wire_window / op->wire_frame;
    if (p->wf > WINDOW_FRAMES)
        p->wf = WINDOW_FRAMES;
    p->total = UINT64_MAX;
    p->ack_every = op->wire_window / 2 < ACK_BYTES ? op->wire_window / 2 : ACK_BYTES;
    p->t0 = p->last_stats = p->last_rx = p->last_ack = p->bucket_t = now_ns();
    p->rate = op->wire_rate;
    p->tokens = (double)(p->rate ? burst(p) : 0);
    p->level = op->wire_level;
    p->zmode = 1; /* until a window says otherwise: nothing says the link is fast */
    p->settling = 1; /* the first window fills the buffers */
    p->probe_every = 4;
    p->win_t0 = p->t0;
    p->next_z = -1;
    p->splicing = -1;
    /* Splice needs no copy kept (resume re-sends, the tee writes it) and,
     * sending, one channel: the pipe is one queue, a frame at a time. */
    p->zc = !op->wire_copy && !op->wire_raw && op->wire_resume_sock < 0 &&
            (p->send ? p->nch == 1 : op->wire_tee_fd < 0);
    for (unsigned i = 0; i < p->nch; i++) {
        p->ch[i].fd = op->wire_chan[i];
        p->ch[i].cur = -1;
        p->ch[i].flags = -1;
    }

    /* SIGTERM sets a flag, seen at the next ppoll() at the latest. */
    if (xcs_sigterm_until_ppoll(wire_sigterm) < 0) {
        rc = fail(p, errno, "signals: %s", strerror(errno));
        goto out;
    }
    xcs_arm_parent_death();

    /*
     * fd trick: O_NONBLOCK on the plain-stream pipe belongs to its open
     * file description; ours is a copy of the parent's (which hands it to
     * us and does not use it meanwhile).  The flags are put back at the end.
     */
    p->in_flags = fcntl(op->io_fd, F_GETFL);
    if (p->in_flags < 0 || fcntl(op->io_fd, F_SETFL, p->in_flags | O_NONBLOCK) < 0) {
        rc = fail(p, errno, "O_NONBLOCK on the plain stream: %s", strerror(errno));
        goto out;
    }
    flags_set = 1;
    /*
     * fd trick, the same for the channels when splicing: splice() takes
     * a socket's blocking mode from its file description (there is no
     * MSG_DONTWAIT for it), shared with Python, which lends us the
     * sockets blocking and does not use them until we are done.
     */
    for (unsigned i = 0; p->zc && i < p->nch; i++) {
        int fl = fcntl(p->ch[i].fd, F_GETFL);
        if (fl < 0 || fcntl(p->ch[i].fd, F_SETFL, fl | O_NONBLOCK) < 0) {
            rc = fail(p, errno, "O_NONBLOCK on channel %u: %s", i, strerror(errno));
            goto out;
        }
        p->ch[i].flags = fl;
    }
    if (p->send) {
        p->stage_buf = op->wire_raw ? malloc(RAW_BUF) : buf_get(p);
        p->stage = p->stage_buf && !op->wire_raw ? p->stage_buf + XCS_WIRE_HDR : p->stage_buf;
        p->sf = calloc(p->wf, sizeof(*p->sf));
        if (!p->stage_buf || !p->sf) {
            rc = fail(p, ENOMEM, "out of memory for the send buffers");
            goto out;
        }
    } else {
        p->rf = calloc(p->wf, sizeof(*p->rf));
        if (!p->rf) {
            rc = fail(p, ENOMEM, "out of memory for the receive window");
            goto out;
        }
    }
#ifdef XCS_HAVE_ZSTD
    if (p->send && op->wire_compress) {
        p->cctx = ZSTD_createCCtx();
        /* Adaptive: room for the trial's frame at --level (adapt()). */
        p->zbuf = op->wire_compress == 2 ? malloc(p->fmax) : NULL;
        if (!p->cctx || (op->wire_compress == 2 && !p->zbuf)) {
            rc = fail(p, ENOMEM, "out of memory for zstd");
            goto out;
        }
    }
    if (!p->send) {
        p->dctx = ZSTD_createDCtx();
        if (!p->dctx) {
            rc = fail(p, ENOMEM, "out of memory for zstd");
            goto out;
        }
    }
#endif
    rc = run(p);
out:
    saved = errno;
    send_stats(p);
    log_usage(p);
    if (flags_set)
        (void)fcntl(op->io_fd, F_SETFL, p->in_flags);
    for (unsigned i = 0; i < p->nch; i++) {
        if (p->ch[i].flags >= 0 && p->ch[i].fd == op->wire_chan[i])
            (void)fcntl(p->ch[i].fd, F_SETFL, p->ch[i].flags);
        free(p->ch[i].payload);
        /* Our copies only: Python keeps its own and continues on channel 0. */
        if (p->ch[i].fd >= 0 && p->ch[i].fd != op->wire_chan[i])
            close(p->ch[i].fd);
    }
    for (uint64_t s = 0; p->sf && s < p->wf; s++)
        free(p->sf[s].buf);
    for (uint64_t s = 0; p->rf && s < p->wf; s++)
        free(p->rf[s].data);
#ifdef XCS_HAVE_ZSTD
    ZSTD_freeCCtx(p->cctx);
    ZSTD_freeDCtx(p->dctx);
#endif
    free(p->zbuf);
    free(p->sf);
    free(p->rf);
    free(p->stage_buf);
    while (p->pooled)
        free(p->pool[--p->pooled]);
    free(p);
    errno = saved;
    return rc;
}
