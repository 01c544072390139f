/*
 * stream_io.h - what the save and restore engines share: complete (v)writes
 * on the stream fd, record framing, the idle timeout, logging and progress
 * helpers.  Reading is source.h's (the one exact-read source).
 *
 * Nothing here buffers: the stream fd is shared with the toolstack (libxl
 * reads its own records before and after ours).
 */
#ifndef XCS_STREAM_IO_H
#define XCS_STREAM_IO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "xcs_engine.h"

/*----- logging -----*/

void xcs_logf(const struct xcs_engine_callbacks *cb, enum xcs_log_level level,
              int errnoval, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/*
 * Log an error (level ERROR, with errnum) and leave errno = errnum.  Always
 * returns -1 so that callers can write "return xcs_fail(...)".
 */
int xcs_fail(const struct xcs_engine_callbacks *cb, int errnum,
             const char *fmt, ...) __attribute__((format(printf, 3, 4)));

uint64_t xcs_now_ns(void);

/*
 * The start both engine entry points share: *t0 = now (the result's
 * duration_ns is measured from it), the caller's result (size bytes, never
 * NULL) zeroed, then the parameters both check: a sim domain path, a plain
 * or remus stream, and a wrapping the engines write and read (xl, libxl or a
 * bare libxc image).  0, or -1 via xcs_fail.
 */
int xcs_engine_begin(uint64_t *t0, void *result, size_t size,
                     const struct xcs_engine_callbacks *cb,
                     const char *sim_path, int stream_type, enum xcs_fmt wrap);

/*----- progress, rate-limited -----*/

/*
 * Reports at the first and last call of a phase, and in between only when
 * both XCS_PROGRESS_PAGES pages and XCS_PROGRESS_NS have passed, so that a
 * fast copy does not flood the helper's control pipe.
 */
#define XCS_PROGRESS_PAGES 1024
#define XCS_PROGRESS_NS 50000000ULL

struct xcs_progress {
    const struct xcs_engine_callbacks *cb;
    char what[48];
    uint64_t total;
    uint64_t last_done;
    uint64_t last_ns;
    int started;
};

void xcs_progress_start(struct xcs_progress *pr,
                        const struct xcs_engine_callbacks *cb, uint64_t total,
                        const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
void xcs_progress_step(struct xcs_progress *pr, uint64_t done);
void xcs_progress_end(struct xcs_progress *pr, uint64_t done);

/*----- writing -----*/

struct xcs_writer {
    int fd;
    uint64_t bytes;   /* written so far */
    uint64_t spliced; /* of which vmspliced (xcs_vmsplice_all) */
};

/*
 * Write all of iov[0..iovcnt) to fd: loops over short writes and EINTR and
 * splits at IOV_MAX.  iov is consumed (advanced in place).
 */
int xcs_writev_all(struct xcs_writer *w, struct iovec *iov, int iovcnt);
int xcs_write_all(struct xcs_writer *w, const void *buf, size_t len);

/* Header + body + zero padding to 8 bytes, in one writev. */
int xcs_write_record(struct xcs_writer *w, uint32_t type, const void *body,
                     uint32_t len);

/*
 * If fd is a pipe smaller than XCS_PIPE_SIZE, try to enlarge it.  Best
 * effort, never shrinks; see stream_io.c for why this is safe on a shared fd.
 */
#define XCS_PIPE_SIZE (1 << 20)
void xcs_pipe_grow(int fd);

/*
 * vmsplice: map user pages into a pipe instead of copying them (the reader's
 * read() is then the only copy).  The pipe holds references to the pages
 * themselves, so they must not change until the reader has consumed them:
 * see engine_save.c ("the page-lifetime rule") for when that holds.
 *
 * xcs_vmsplice_all: like xcs_writev_all, for a pipe fd only; counts the bytes
 * in w->bytes and w->spliced.  xcs_pipe_capacity: the pipe's size in bytes,
 * or -1 if fd is no pipe.  xcs_pipe_unread: bytes in the pipe not yet read
 * (FIONREAD), or -1.
 */
int xcs_vmsplice_all(struct xcs_writer *w, struct iovec *iov, int iovcnt);
long xcs_pipe_capacity(int fd);
/*
 * Write all of iov at file offset off (regular files), looping like
 * xcs_writev_all; the fd's position does not move.  Safe to call from
 * several threads at once on disjoint ranges.
 */
int xcs_pwritev_all(int fd, struct iovec *iov, int iovcnt, uint64_t off);
long xcs_pipe_unread(int fd);

/*
 * The idle timeout: from now on a transfer on fd (a pipe or a socket; a
 * regular file is left alone) that makes no progress for ms milliseconds
 * fails with ETIMEDOUT -- reads once the first byte has come in, writes
 * always.  may_reopen: fd is written only by this engine's writers, so the
 * write end of a pipe may be made non-blocking privately (stream_io.c).
 * Returns 0, or -1 with errno.  Process-wide: the helper's one stream.
 */
int xcs_stream_idle(int fd, int ms, int may_reopen);

/*----- for readers (source.c) -----*/

/*
 * Before a read that would block: with the idle timeout, wait for input at
 * most its ms (ETIMEDOUT); without it, or before the stream started, 0 at
 * once.  After bytes came in: xcs_idle_progress (the stream has started).
 */
int xcs_idle_wait(int fd);
void xcs_idle_progress(int fd);
/*
 * After a failed read or write on fd: 1 when the call should be made again
 * (EINTR; EAGAIN once poll says fd is ready for events), 0 when it failed
 * (errno; ETIMEDOUT for the idle timeout).
 */
int xcs_io_again(int fd, short events);
/*
 * After copy_file_range/sendfile/splice failed with err: 1 when that means
 * "not for this pair of fds" (EINVAL, EXDEV, EOPNOTSUPP, ENOSYS, O_APPEND's
 * EBADF), so the caller should move the bytes another way.
 */
int xcs_kernel_refused(int err);

#endif /* XCS_STREAM_IO_H */
