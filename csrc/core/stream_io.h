/*
 * stream_io.h - what the save and restore engines share: exact reads and
 * complete (v)writes on the stream fd, record framing, logging and progress
 * helpers, and the layout of the sim HVM_CONTEXT blob.
 *
 * Nothing here buffers: the stream fd is shared with the toolstack (libxl
 * reads its own records before and after ours), so every read asks for
 * exactly the bytes the format says come next.
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

/*----- reading -----*/

struct xcs_reader {
    int fd;
    uint64_t off; /* stream offset of the next byte */
    int move;     /* xcs_move_exact's method for fd; 0 = not probed yet */
    uint64_t moved; /* of off: bytes xcs_move_exact moved kernel-side */
    /* socket streams: a private pipe the bytes go through (stream_io.c) */
    int relay[2];
    size_t relay_cap;  /* its capacity; 0 = no relay open */
    size_t relay_fill; /* stream bytes in it, not yet moved out */
    uint64_t ahead;    /* bytes announced by xcs_move_expect, not yet pulled */
};

/* Close what xcs_move_exact opened for r (nothing for files and pipes). */
void xcs_reader_release(struct xcs_reader *r);
/*
 * The next len stream bytes are all to be moved by xcs_move_exact (one
 * PAGE_DATA batch's pages, run by run): from a socket they may then be
 * pulled into the relay a pipe's capacity at a time instead of run by run.
 */
void xcs_move_expect(struct xcs_reader *r, uint64_t len);

/*
 * Read exactly len bytes (loops over short reads and EINTR).  Returns 0, or
 * -1 with errno set: EIO with *eof set when the stream ended first (*eof is
 * 1 when it ended before the first byte, 2 when it ended part way).
 */
int xcs_read_exact(struct xcs_reader *r, void *buf, size_t len, int *eof);
/* The same for a scatter list (consumed in place). */
int xcs_readv_exact(struct xcs_reader *r, struct iovec *iov, int iovcnt,
                    size_t len, int *eof);
/*
 * Move exactly len stream bytes into the file `to` at offset off without
 * passing them through user space: copy_file_range() when the stream is a
 * regular file, splice() when it is a pipe, splice() through a private pipe
 * when it is a socket (the kernel copies once, straight into the target's
 * page cache).  Returns 0; -1 with errno set (EIO and *eof as
 * xcs_read_exact when the stream ended first); or 1, having consumed
 * nothing, when the kernel cannot do it for these fds (a socket type
 * without splice, a filesystem without it): the caller then reads and
 * writes itself, and every later call returns 1 at once.
 */
int xcs_move_exact(struct xcs_reader *r, int to, uint64_t off, size_t len,
                   int *eof);
/*
 * After copy_file_range/sendfile/splice failed with err: 1 when that means
 * "not for this pair of fds" (EINVAL, EXDEV, EOPNOTSUPP, ENOSYS, O_APPEND's
 * EBADF), so the caller should move the bytes another way.
 */
int xcs_kernel_refused(int err);
/* Read and drop len bytes. */
int xcs_skip_exact(struct xcs_reader *r, uint64_t len, int *eof);

/*----- the sim HVM_CONTEXT blob -----*/

/*
 * HVM_CONTEXT carries a Xen-shaped HVM save image: a sequence of
 * {u16 typecode; u16 instance; u32 length} descriptors, each followed by
 * length bytes, ending with typecode 0.  The engine writes HEADER (1), one
 * sim record (XCS_HVM_SAVE_SIM) with the domain's shape, one CPU record (2)
 * per vCPU holding its context blob, and END.  docs/sim-format.md.
 */
#define XCS_HVM_SAVE_END 0
#define XCS_HVM_SAVE_HEADER 1
#define XCS_HVM_SAVE_CPU 2
#define XCS_HVM_SAVE_SIM 0x78 /* xcsave private; Xen's codes stay small */
#define XCS_HVM_DESC_SIZE 8
#define XCS_HVM_HEADER_MAGIC 0x54381286U
#define XCS_HVM_HEADER_SIZE 24 /* magic, version, changeset, cpuid, gtsc_khz */
#define XCS_HVM_SIM_MAGIC "XCSIMHVM"
#define XCS_HVM_SIM_SIZE 32    /* magic[8], version, vcpu_size, nr_pages, nr_vcpus, page_shift */

/* The emulator blob carried by EMULATOR_CONTEXT in libxl-wrapped streams. */
#define XCS_SIM_EMU_MAGIC "XCSIMEMU"

#endif /* XCS_STREAM_IO_H */
