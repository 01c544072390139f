/*
 * stream_io.c - complete writes, record framing, the idle timeout, logging
 * and progress shared by the engines; exact reads are source.c's.
 */
#include "stream_io.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/*----- logging -----*/

static void vlog(const struct xcs_engine_callbacks *cb,
                 enum xcs_log_level level, int errnoval, const char *fmt,
                 va_list ap)
{
    char msg[512];

    if (!cb || !cb->log)
        return;
    vsnprintf(msg, sizeof(msg), fmt, ap);
    cb->log(level, errnoval, msg, cb->data);
}

void xcs_logf(const struct xcs_engine_callbacks *cb, enum xcs_log_level level,
              int errnoval, const char *fmt, ...)
{
    va_list ap;
    int saved = errno;

    va_start(ap, fmt);
    vlog(cb, level, errnoval, fmt, ap);
    va_end(ap);
    errno = saved;
}

int xcs_fail(const struct xcs_engine_callbacks *cb, int errnum,
             const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vlog(cb, XCS_LOG_ERROR, errnum, fmt, ap);
    va_end(ap);
    errno = errnum;
    return -1;
}

uint64_t xcs_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

int xcs_engine_begin(uint64_t *t0, void *result, size_t size,
                     const struct xcs_engine_callbacks *cb,
                     const char *sim_path, int stream_type, enum xcs_fmt wrap)
{
    *t0 = xcs_now_ns();
    memset(result, 0, size);
    if (!sim_path || !*sim_path)
        return xcs_fail(cb, EINVAL, "no sim domain path given");
    if (stream_type != XCS_STREAM_PLAIN && stream_type != XCS_STREAM_REMUS)
        return xcs_fail(cb, EOPNOTSUPP, "stream type %d is not supported by "
                        "the sim engine", stream_type);
    if (!xcs_fmt_has_libxl(wrap) && wrap != XCS_FMT_LIBXC)
        return xcs_fail(cb, EINVAL, "unknown stream wrapping %d", (int)wrap);
    return 0;
}

/*----- progress -----*/

void xcs_progress_start(struct xcs_progress *pr,
                        const struct xcs_engine_callbacks *cb, uint64_t total,
                        const char *fmt, ...)
{
    va_list ap;

    memset(pr, 0, sizeof(*pr));
    pr->cb = cb;
    pr->total = total;
    va_start(ap, fmt);
    vsnprintf(pr->what, sizeof(pr->what), fmt, ap);
    va_end(ap);
    pr->last_ns = xcs_now_ns();
    if (cb && cb->progress)
        cb->progress(pr->what, 0, total, cb->data);
    pr->started = 1;
}

void xcs_progress_step(struct xcs_progress *pr, uint64_t done)
{
    uint64_t now;

    if (!pr->started || !pr->cb || !pr->cb->progress)
        return;
    if (done - pr->last_done < XCS_PROGRESS_PAGES)
        return;
    now = xcs_now_ns();
    if (now - pr->last_ns < XCS_PROGRESS_NS)
        return;
    pr->last_done = done;
    pr->last_ns = now;
    pr->cb->progress(pr->what, done, pr->total, pr->cb->data);
}

void xcs_progress_end(struct xcs_progress *pr, uint64_t done)
{
    if (!pr->started)
        return;
    /* Done is the total at the end: a total that was an estimate (a
     * restore's, see pages_at_most in engine_restore.c) ends at 100%. */
    if (pr->cb && pr->cb->progress)
        pr->cb->progress(pr->what, done, done, pr->cb->data);
    pr->started = 0;
}

/*----- the idle timeout -----*/

/*
 * Once set (xcs_stream_idle, from the helper's --idle-timeout-ms), a stream
 * fd that is a pipe or a socket may stay silent for at most idle_ms between
 * two transfers: a peer that stops sending (or stops reading) fails the
 * operation with ETIMEDOUT instead of holding us forever.  One fd per
 * process (the helper moves one stream), so plain statics; -1 = no limit.
 * Reads count only once the stream has started (idle_armed: after the
 * first byte), so a reader may wait for its writer to begin.
 */
static int idle_fd = -1;
static int idle_ms = -1;
static int idle_armed;
static int idle_sock; /* SO_RCVTIMEO/SO_SNDTIMEO are set on idle_fd */

int xcs_stream_idle(int fd, int ms, int may_reopen)
{
    struct stat st;

    if (ms <= 0 || fstat(fd, &st) < 0)
        return ms <= 0 ? 0 : -1;
    if (S_ISSOCK(st.st_mode)) {
        /*
         * fd trick: SO_RCVTIMEO/SO_SNDTIMEO make a blocking recv/send (and
         * splice from the socket) give up with EAGAIN after ms with nothing
         * moved, or return what moved so far: a code that blocks inside
         * its own reads (libxc, xen backend) is bounded too.  They are the
         * socket's options, shared with the toolstack, whose asyncio calls
         * are non-blocking and never wait, so it does not notice them.
         */
        struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};

        if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) < 0 ||
            setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) < 0)
            return -1;
        idle_sock = 1;
    } else if (S_ISFIFO(st.st_mode) && may_reopen &&
               (fcntl(fd, F_GETFL) & O_ACCMODE) == O_WRONLY) {
        /*
         * fd trick: a blocking write into a pipe sleeps until all of it fits,
         * however long the reader takes, and poll() first cannot say that
         * it will fit.  Opening /proc/self/fd/N gives a new open file
         * description of the same pipe, whose O_NONBLOCK is ours alone (the
         * toolstack's description is untouched); dup2 puts it at fd.  Every
         * write then returns what fitted or EAGAIN, and wait_ready polls with
         * the timeout.  Only our own engine's writers (xfer_all) handle
         * EAGAIN, hence may_reopen; reads need no trick: poll() before a read
         * is exact (idle_wait).  Failure (no reader: ENXIO) keeps fd as it is.
         */
        char path[64];
        int nfd;

        snprintf(path, sizeof(path), "/proc/self/fd/%d", fd);
        nfd = open(path, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
        if (nfd >= 0) {
            if (dup2(nfd, fd) < 0) {
                close(nfd);
                return -1;
            }
            close(nfd);
        }
    } else if (!S_ISFIFO(st.st_mode) && !S_ISCHR(st.st_mode)) {
        return 0; /* a regular file or a block device never keeps us waiting */
    }
    idle_fd = fd;
    idle_ms = ms;
    idle_armed = 0;
    return 0;
}

/* Whether fd's waits for events are bounded by the idle timeout now. */
static int idle_bounded(int fd, short events)
{
    return fd == idle_fd && (events != POLLIN || idle_armed);
}

/* After bytes came in on fd: the stream has started, reads are timed now. */
void xcs_idle_progress(int fd)
{
    if (fd == idle_fd)
        idle_armed = 1;
}

/*
 * Block in poll until fd is ready for events; with the idle timeout, at most
 * idle_ms (then ETIMEDOUT).  EINTR polls again for the time that is left.
 */
static int wait_ready(int fd, short events)
{
    struct pollfd pfd = {.fd = fd, .events = events};
    int bounded = idle_bounded(fd, events);
    uint64_t end = bounded ? xcs_now_ns() + (uint64_t)idle_ms * 1000000ULL : 0;
    int r;

    for (;;) {
        int wait = -1;

        if (bounded) {
            uint64_t now = xcs_now_ns();

            wait = now >= end ? 0 : (int)((end - now + 999999) / 1000000);
        }
        r = poll(&pfd, 1, wait);
        if (r > 0)
            return 0;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        if (errno != EINTR)
            return -1;
    }
}

/*
 * Before a read that would block: with the idle timeout, wait for input at
 * most idle_ms (ETIMEDOUT), so that a silent peer cannot hold a blocking
 * read forever.  One poll per read call (a record header, a batch), not per
 * page.  Without the timeout, or before the stream started, it does nothing.
 */
int xcs_idle_wait(int fd)
{
    return idle_bounded(fd, POLLIN) ? wait_ready(fd, POLLIN) : 0;
}

/*
 * The stream fd may be non-blocking: O_NONBLOCK lives in the open file
 * description, which an asyncio toolstack shares with us (its sockets and
 * pipes are all non-blocking).  EAGAIN then means "wait", not "fail": block
 * in poll until the fd is ready, as a blocking fd would have.
 *
 * After a failed read or write on fd: 1 when the call should simply be made
 * again (EINTR; EAGAIN once poll says the fd is ready), 0 when it failed.
 * EAGAIN from a blocking socket with SO_RCVTIMEO/SO_SNDTIMEO is the idle
 * timeout itself (ETIMEDOUT), once it applies.
 */
int xcs_io_again(int fd, short events)
{
    if (errno == EINTR)
        return 1;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
        return 0;
    if (idle_sock && idle_bounded(fd, events) &&
        !(fcntl(fd, F_GETFL) & O_NONBLOCK)) {
        errno = ETIMEDOUT;
        return 0;
    }
    return wait_ready(fd, events) == 0;
}

/*----- writing -----*/

/* Consume n bytes from the front of *iov (count *iovcnt), in place. */
static void iov_advance(struct iovec **iov, int *iovcnt, size_t n)
{
    while (n > 0 && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++;
        (*iovcnt)--;
    }
    if (n > 0) {
        (*iov)->iov_base = (uint8_t *)(*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

enum xfer { XFER_WRITEV, XFER_VMSPLICE, XFER_PWRITEV };

/*
 * The one write loop: push all of iov[0..iovcnt) into fd with writev,
 * vmsplice or pwritev (at off, advancing), looping over short transfers
 * (pipe, socket, signal, a full disk's last bytes), EINTR and EAGAIN (see
 * xcs_io_again), split at IOV_MAX.  *done counts what went out, also on
 * failure.
 */
static int xfer_all(int fd, enum xfer how, struct iovec *iov, int iovcnt,
                    uint64_t off, uint64_t *done)
{
    while (iovcnt > 0) {
        int cnt = iovcnt > IOV_MAX ? IOV_MAX : iovcnt;
        ssize_t r;

        /* Skip drained entries so that no call ever sees a zero count. */
        if (iov->iov_len == 0) {
            iov++;
            iovcnt--;
            continue;
        }
        if (how == XFER_VMSPLICE)
            r = vmsplice(fd, iov, (unsigned long)cnt, 0);
        else if (how == XFER_PWRITEV)
            r = pwritev(fd, iov, cnt, (off_t)(off + *done));
        else
            r = writev(fd, iov, cnt);
        if (r < 0) {
            if (xcs_io_again(fd, POLLOUT))
                continue;
            return -1;
        }
        if (r == 0) {
            errno = EIO; /* not expected from a write; never spin */
            return -1;
        }
        *done += (uint64_t)r;
        iov_advance(&iov, &iovcnt, (size_t)r);
    }
    return 0;
}

int xcs_writev_all(struct xcs_writer *w, struct iovec *iov, int iovcnt)
{
    return xfer_all(w->fd, XFER_WRITEV, iov, iovcnt, 0, &w->bytes);
}

int xcs_write_all(struct xcs_writer *w, const void *buf, size_t len)
{
    struct iovec iov = {.iov_base = (void *)buf, .iov_len = len};

    return xcs_writev_all(w, &iov, 1);
}

int xcs_write_record(struct xcs_writer *w, uint32_t type, const void *body,
                     uint32_t len)
{
    static const uint8_t zeros[XCS_REC_ALIGN];
    uint8_t hdr[XCS_RHDR_SIZE];
    struct iovec iov[3] = {
        {.iov_base = hdr, .iov_len = sizeof(hdr)},
        {.iov_base = (void *)body, .iov_len = len},
        {.iov_base = (void *)zeros, .iov_len = xcs_rec_padded(len) - len},
    };

    xcs_rhdr_put(hdr, type, len);
    return xcs_writev_all(w, iov, 3);
}

/*
 * fd trick: a 64 KiB default pipe makes writer and reader switch every 16
 * pages; at 1 MiB a 4 MiB batch takes a handful of switches, which halved a
 * 1 GiB save into "| cat" on a loaded two-CPU box.  The pipe is shared with
 * the toolstack, but capacity is invisible to both ends' data and ordering;
 * F_SETPIPE_SZ may fail (EPERM above /proc/sys/fs/pipe-max-size or the
 * per-user quota, EBUSY) and then the pipe stays as it was.
 */
void xcs_pipe_grow(int fd)
{
    struct stat st;
    int r;

    if (fstat(fd, &st) < 0 || !S_ISFIFO(st.st_mode))
        return;
    r = fcntl(fd, F_GETPIPE_SZ);
    if (r >= 0 && r < XCS_PIPE_SIZE)
        (void)fcntl(fd, F_SETPIPE_SZ, XCS_PIPE_SIZE);
}

/*
 * fd trick: vmsplice(2) without SPLICE_F_GIFT puts references to the caller's
 * pages into the pipe; the reader's read() copies out of them.  One copy
 * instead of writev's two (user -> pipe buffer -> reader).  The caller owns
 * the page-lifetime rule (engine_save.c).  Short transfers (pipe full, a
 * signal) and EAGAIN on a non-blocking pipe are handled as in writev_all.
 */
int xcs_vmsplice_all(struct xcs_writer *w, struct iovec *iov, int iovcnt)
{
    uint64_t n = 0;
    int r = xfer_all(w->fd, XFER_VMSPLICE, iov, iovcnt, 0, &n);

    w->bytes += n;
    w->spliced += n;
    return r;
}

/*
 * fd trick: pwritev(2) writes at an explicit offset and leaves the file
 * position alone, so several threads can fill disjoint parts of one regular
 * file at once through one fd (engine_save.c, copy_threads).  The caller
 * sets the position afterwards.
 */
int xcs_pwritev_all(int fd, struct iovec *iov, int iovcnt, uint64_t off)
{
    uint64_t n = 0;

    return xfer_all(fd, XFER_PWRITEV, iov, iovcnt, off, &n);
}

long xcs_pipe_capacity(int fd)
{
    struct stat st;

    if (fstat(fd, &st) < 0 || !S_ISFIFO(st.st_mode))
        return -1;
    return (long)fcntl(fd, F_GETPIPE_SZ);
}

/* FIONREAD works on either end of a pipe: both share the one buffer ring. */
long xcs_pipe_unread(int fd)
{
    int n = 0;

    if (ioctl(fd, FIONREAD, &n) < 0)
        return -1;
    return n;
}

int xcs_kernel_refused(int err)
{
    return err == EINVAL || err == EXDEV || err == EOPNOTSUPP ||
           err == ENOSYS || err == EBADF;
}
