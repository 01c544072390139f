/*
 * source.c - the one exact-read source (see source.h).
 */
#include "source.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codec.h"
#include "stream_io.h"

#define SRC_SCRATCH (1u << 20)

int xcs_source_open(struct xcs_source *s, int fd, unsigned int flags)
{
    struct stat st;
    off_t cur;
    void *m;

    memset(s, 0, sizeof(*s));
    s->fd = fd;
    if (!(flags & XCS_SOURCE_MAP))
        return 0;
    if (fstat(fd, &st) < 0)
        return -1;
    if (!S_ISREG(st.st_mode))
        return 0;
    cur = lseek(fd, 0, SEEK_CUR);
    if (cur < 0)
        return 0;
    s->mapped = 1;
    s->start = (uint64_t)cur;
    if (st.st_size <= cur)
        return 0; /* empty remainder: mapped mode with nothing mapped */
    m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        s->mapped = 0; /* e.g. a filesystem without mmap: read instead */
        return 0;
    }
    s->map = (const uint8_t *)m + cur;
    s->map_len = (size_t)(st.st_size - cur);
    /* The scanner touches headers only; the converter reads every page. */
    (void)madvise(m, (size_t)st.st_size,
                  (flags & XCS_SOURCE_SEQ) ? MADV_SEQUENTIAL : MADV_RANDOM);
    return 0;
}

void xcs_source_close(struct xcs_source *s)
{
    int saved = errno;

    if (s->map)
        munmap((void *)(s->map - s->start), (size_t)(s->start + s->map_len));
    if (s->mapped)
        (void)lseek(s->fd, (off_t)(s->start + s->off), SEEK_SET);
    if (s->relay_cap) {
        close(s->relay[0]);
        close(s->relay[1]);
        s->relay_cap = 0;
    }
    free(s->buf);
    free(s->scratch);
    s->map = NULL;
    s->buf = NULL;
    s->scratch = NULL;
    errno = saved;
}

/*
 * One read(2) of at most len bytes from the stream fd: EINTR, EAGAIN on a
 * non-blocking fd and the idle timeout handled (stream_io.c, the idle
 * timeout).  Returns the bytes read, 0 at EOF, -1 with errno.
 */
static ssize_t read_some(struct xcs_source *s, void *buf, size_t len)
{
    for (;;) {
        ssize_t r;

        if (xcs_idle_wait(s->fd) < 0)
            return -1;
        r = read(s->fd, buf, len);
        if (r > 0) {
            xcs_idle_progress(s->fd);
            return r;
        }
        if (r == 0)
            return 0;
        if (!xcs_io_again(s->fd, POLLIN))
            return -1;
    }
}

/* Exact-read mode: make n bytes available in buf (fewer at EOF). */
static int fill(struct xcs_source *s, size_t n)
{
    size_t avail = s->buf_tail - s->buf_head;

    if (avail >= n)
        return 0;
    if (s->buf_head && (s->buf_cap - s->buf_head < n)) {
        memmove(s->buf, s->buf + s->buf_head, avail);
        s->buf_head = 0;
        s->buf_tail = avail;
    }
    while (s->buf_tail - s->buf_head < n) {
        size_t want = n - (s->buf_tail - s->buf_head);
        ssize_t r;

        /*
         * n comes from a length field of the stream, which may lie: grow
         * the buffer only as bytes actually arrive (doubling when full), so
         * that a record header claiming gigabytes followed by EOF costs a
         * few KiB, not an allocation of the claimed size.
         */
        if (s->buf_tail == s->buf_cap) {
            size_t cap = s->buf_cap ? s->buf_cap * 2 : 4096;
            uint8_t *nb;

            nb = realloc(s->buf, cap);
            if (!nb)
                return -1;
            s->buf = nb;
            s->buf_cap = cap;
        }
        if (want > s->buf_cap - s->buf_tail)
            want = s->buf_cap - s->buf_tail;
        r = read_some(s, s->buf + s->buf_tail, want);
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        s->buf_tail += (size_t)r;
    }
    return 0;
}

int xcs_source_peek(struct xcs_source *s, size_t n, const uint8_t **p, size_t *got)
{
    if (s->mapped) {
        size_t left = s->map_len - (size_t)s->off;

        *p = s->map ? s->map + s->off : NULL;
        *got = n < left ? n : left;
        return 0;
    }
    if (fill(s, n) < 0)
        return -1;
    *p = s->buf + s->buf_head;
    *got = s->buf_tail - s->buf_head < n ? s->buf_tail - s->buf_head : n;
    return 0;
}

int xcs_source_get(struct xcs_source *s, size_t n, const uint8_t **p, size_t *got)
{
    size_t have;

    if (xcs_source_peek(s, n, p, &have) < 0)
        return -1;
    if (!s->mapped)
        s->buf_head += have;
    s->off += have;
    *got = have;
    return have == n ? 0 : 1;
}

/* Exact-read mode: hand out buffered bytes first; returns how many. */
static size_t take_buffered(struct xcs_source *s, uint8_t *to, size_t n)
{
    size_t avail = s->buf_tail - s->buf_head;
    size_t take = n < avail ? n : avail;

    if (to && take)
        memcpy(to, s->buf + s->buf_head, take);
    s->buf_head += take;
    s->off += take;
    return take;
}

/* xcs_source_must's reading: 0; 1 at EOF first (why set); -1 (errno). */
static int need(struct xcs_source *s, uint64_t n, const uint8_t **p,
                const char *what, char *why, size_t whylen)
{
    uint64_t got = 0;
    size_t part = 0;
    int r;

    if (p) {
        r = xcs_source_get(s, (size_t)n, p, &part);
        got = part;
    } else {
        r = xcs_source_skip(s, n, &got);
    }
    if (r > 0)
        snprintf(why, whylen, "stream truncated: %llu of %llu bytes of %s",
                 (unsigned long long)got, (unsigned long long)n, what);
    return r;
}

int xcs_source_must(struct xcs_source *s, uint64_t n, const uint8_t **p,
                    const char *what)
{
    char why[XCS_WHY_LEN];
    int r = need(s, n, p, what, why, sizeof(why));

    if (r < 0)
        return s->fault.report(s->fault.ctx, 1, "read");
    return r ? s->fault.report(s->fault.ctx, 0, why) : 0;
}

int xcs_source_skip(struct xcs_source *s, uint64_t n, uint64_t *got)
{
    uint64_t done;

    if (s->mapped) {
        uint64_t left = s->map_len - s->off;

        done = n < left ? n : left;
        s->off += done;
        *got = done;
        return done == n ? 0 : 1;
    }
    done = take_buffered(s, NULL, n < SIZE_MAX ? (size_t)n : SIZE_MAX);
    if (done < n && !s->scratch) {
        s->scratch = malloc(SRC_SCRATCH);
        if (!s->scratch) {
            *got = done;
            return -1;
        }
    }
    while (done < n) {
        size_t want = n - done < SRC_SCRATCH ? (size_t)(n - done) : SRC_SCRATCH;
        ssize_t r = read_some(s, s->scratch, want);

        if (r < 0) {
            *got = done;
            return -1;
        }
        if (r == 0)
            break;
        done += (uint64_t)r;
        s->off += (uint64_t)r;
    }
    *got = done;
    return done == n ? 0 : 1;
}

int xcs_source_read(struct xcs_source *s, void *buf, size_t len, int *eof)
{
    uint8_t *to = buf;
    size_t got = 0;

    *eof = 0;
    if (s->mapped) {
        const uint8_t *p;
        int r = xcs_source_get(s, len, &p, &got);

        if (got)
            memcpy(to, p, got);
        if (r > 0) {
            *eof = got ? 2 : 1;
            errno = EIO;
            return -1;
        }
        return r;
    }
    got = take_buffered(s, to, len);
    while (got < len) {
        ssize_t r = read_some(s, to + got, len - got);

        if (r < 0)
            return -1;
        if (r == 0) {
            *eof = got ? 2 : 1;
            errno = EIO;
            return -1;
        }
        got += (size_t)r;
        s->off += (uint64_t)r;
    }
    return 0;
}

int xcs_source_at_eof(struct xcs_source *s)
{
    const uint8_t *p;
    size_t got = 0;

    if (xcs_source_peek(s, 1, &p, &got) < 0)
        return -1;
    return got == 0;
}

uint64_t xcs_source_remaining(const struct xcs_source *s)
{
    if (!s->mapped)
        return UINT64_MAX;
    return s->map_len - s->off;
}

size_t xcs_source_buffered(const struct xcs_source *s)
{
    return s->mapped ? 0 : s->buf_tail - s->buf_head;
}

void xcs_source_consumed(struct xcs_source *s, uint64_t n)
{
    s->off += n;
}

/*----- kernel moves -----*/

enum {
    MOVE_UNPROBED = 0,
    MOVE_COPY_RANGE,
    MOVE_SPLICE,
    MOVE_RELAY,
    MOVE_NONE
};

/*
 * fd trick: splice() cannot go from a socket straight into a file, but it
 * can go socket -> pipe (the pipe takes references to the socket buffer's
 * pages: no copy) and pipe -> file (the one copy, into the target's page
 * cache).  So a socket stream goes through a private pipe, the relay
 * (O_CLOEXEC, made on first use, closed by xcs_source_close), and costs
 * one copy where read() + pwrite() cost two.  Reading exactly our own bytes
 * still holds: splice(sock -> relay, n) never takes more than n bytes, and
 * n never exceeds what the caller announced (xcs_source_move_expect: the
 * batch's page bytes) or asked for.  Within a batch the relay is filled a
 * pipe's capacity at a time (one splice for many page runs) and emptied run
 * by run; it is only filled when empty, so that splice never waits on a
 * full pipe.
 */
void xcs_source_move_expect(struct xcs_source *s, uint64_t len)
{
    s->ahead = len;
}

/*
 * One kernel-side transfer of at most want stream bytes into `to` (at *o, or
 * at its own position when o is NULL: the relay), by the source's method.
 * It reads the stream at its file position (NULL offset) and advances it,
 * exactly like read(): the fd stays where the format says the next record
 * starts, for whoever reads after us.  Returns the bytes moved (s->off
 * advanced); 0 when the kernel cannot do it for these fds and `first` says
 * nothing of the caller's run has moved yet; -1 with errno (EIO, *eof = 2:
 * the stream ended inside a record, whose header has been read).
 */
static ssize_t stream_step(struct xcs_source *s, int to, loff_t *o,
                           size_t want, int first, int *eof)
{
    for (;;) {
        ssize_t n;

        if (xcs_idle_wait(s->fd) < 0)
            return -1;
        n = s->move == MOVE_COPY_RANGE
                ? copy_file_range(s->fd, NULL, to, o, want, 0)
                : splice(s->fd, NULL, to, o, want, SPLICE_F_MOVE);
        if (n > 0) {
            xcs_idle_progress(s->fd);
            s->off += (uint64_t)n;
            return n;
        }
        if (n == 0) {
            *eof = 2;
            errno = EIO;
            return -1;
        }
        if (xcs_io_again(s->fd, POLLIN))
            continue;
        return first && xcs_kernel_refused(errno) ? 0 : -1;
    }
}

/*
 * Open the relay, and probe that `to` takes splice: one byte of our own
 * (not the stream's) spliced to `to` at off, which the caller is about to
 * overwrite with the stream's bytes.  MOVE_NONE if either fails: the stream
 * is untouched and the caller reads and writes itself.
 */
static int relay_open(struct xcs_source *s, int to, uint64_t off)
{
    loff_t o = (loff_t)off;
    long cap;

    if (pipe2(s->relay, O_CLOEXEC) < 0)
        return MOVE_NONE;
    s->relay_cap = 1; /* open: xcs_source_close closes it */
    if (write(s->relay[1], "", 1) != 1 ||
        splice(s->relay[0], NULL, to, &o, 1, 0) != 1)
        return MOVE_NONE;
    /* a 1 MiB relay: a few splices per 4 MiB batch (see xcs_pipe_grow) */
    xcs_pipe_grow(s->relay[1]);
    cap = xcs_pipe_capacity(s->relay[1]);
    s->relay_cap = cap > 0 ? (size_t)cap : 65536;
    return MOVE_RELAY;
}

static int relay_move(struct xcs_source *s, int to, uint64_t off, size_t len,
                      int fresh, int *eof)
{
    size_t got = 0;

    while (got < len) {
        size_t k;

        if (s->relay_fill == 0) {
            uint64_t want = s->ahead > len - got ? s->ahead : len - got;
            ssize_t n;

            if (want > s->relay_cap)
                want = s->relay_cap;
            /* the relay is empty: nothing of this run moved yet? */
            n = stream_step(s, s->relay[1], NULL, (size_t)want,
                            fresh && got == 0, eof);
            if (n == 0) { /* a socket type without splice */
                s->move = MOVE_NONE;
                return 1;
            }
            if (n < 0)
                return -1;
            s->relay_fill = (size_t)n;
            s->ahead -= s->ahead < (uint64_t)n ? s->ahead : (uint64_t)n;
        }
        k = s->relay_fill < len - got ? s->relay_fill : len - got;
        while (k > 0) {
            loff_t o = (loff_t)(off + got);
            ssize_t m = splice(s->relay[0], NULL, to, &o, k, SPLICE_F_MOVE);

            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0) {
                if (m == 0) /* cannot happen: the relay holds k bytes */
                    errno = EIO;
                return -1;
            }
            k -= (size_t)m;
            got += (size_t)m;
            s->relay_fill -= (size_t)m;
            s->moved += (uint64_t)m;
        }
    }
    return 0;
}

/* Bytes a peek left in the buffer go out first, with pwrite. */
static int flush_buffered(struct xcs_source *s, int to, uint64_t *off,
                          size_t *len)
{
    while (*len && xcs_source_buffered(s)) {
        size_t avail = xcs_source_buffered(s);
        size_t k = avail < *len ? avail : *len;
        ssize_t w = pwrite(to, s->buf + s->buf_head, k, (off_t)*off);

        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            if (w == 0)
                errno = EIO;
            return -1;
        }
        take_buffered(s, NULL, (size_t)w);
        *off += (uint64_t)w;
        *len -= (size_t)w;
    }
    return 0;
}

int xcs_source_move(struct xcs_source *s, int to, uint64_t off, size_t len,
                    int *eof)
{
    size_t got = 0;
    int fresh = xcs_source_buffered(s) == 0; /* nothing consumed yet */

    *eof = 0;
    if (s->move == MOVE_UNPROBED) {
        const char *no = getenv("XCSAVE_NO_SPLICE");
        struct stat st;

        s->move = MOVE_NONE;
        if (!s->mapped && !(no && *no && strcmp(no, "0") != 0) &&
            fstat(s->fd, &st) == 0)
            s->move = S_ISREG(st.st_mode)    ? MOVE_COPY_RANGE
                      : S_ISFIFO(st.st_mode) ? MOVE_SPLICE
                      : S_ISSOCK(st.st_mode) ? relay_open(s, to, off)
                                             : MOVE_NONE;
    }
    if (s->move == MOVE_NONE)
        return 1;
    if (flush_buffered(s, to, &off, &len) < 0)
        return -1;
    if (s->move == MOVE_RELAY)
        return relay_move(s, to, off, len, fresh, eof);
    while (got < len && s->move != MOVE_NONE) {
        loff_t o = (loff_t)(off + got);
        ssize_t n = stream_step(s, to, &o, len - got, fresh && got == 0, eof);

        if (n == 0) { /* the kernel cannot do it for this pair of fds */
            s->move = MOVE_NONE;
            break;
        }
        if (n < 0)
            return -1;
        got += (size_t)n;
        s->moved += (uint64_t)n;
    }
    return s->move == MOVE_NONE ? 1 : 0;
}
