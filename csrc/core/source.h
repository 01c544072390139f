/*
 * source.h - the one exact-read source every stream reader reads through:
 * the verifier (scan.c), the legacy reader/converter (legacy.c) and the
 * restore engine (engine_restore.c).
 *
 * Two modes, chosen at open:
 *
 *  - mapped (XCS_SOURCE_MAP and fd is a regular file): the file from its
 *    current offset is mapped, bytes are handed out as pointers into the
 *    mapping, so page data is never touched when it is only verified or
 *    skipped; the fd's offset is set just after the consumed bytes at close;
 *  - exact reads (pipes, sockets, and regular files without
 *    XCS_SOURCE_MAP): every read asks for exactly the bytes the caller needs
 *    next, never more, because the stream fd is shared with the toolstack
 *    (libxl reads its own records before and after ours).  Bytes peeked at
 *    (xcs_source_peek, xcs_source_at_eof) are kept and handed out first.
 *    The one read past the stream there is, is the verifier's one-byte probe
 *    for trailing bytes after the outermost END (scan.c, check_trailing).
 *
 * Both grow their buffer the same way (source.c, fill): only as the bytes
 * arrive, so that a length field that lies costs what the stream actually
 * sent, not an allocation of the claimed size.  Reads honour the helper's
 * idle timeout (stream_io.h, xcs_stream_idle) and non-blocking fds.
 *
 * Kernel moves (exact-read mode): xcs_source_move copies stream bytes into
 * a file at an offset without passing them through user space
 * (copy_file_range from a regular file, splice from a pipe, splice through a
 * private relay pipe from a socket).
 *
 * Conventions: 0 on success, -1 with errno set; "got" counts report what
 * was consumed when the stream ended first.
 */
#ifndef XCS_SOURCE_H
#define XCS_SOURCE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XCS_SOURCE_MAP 0x1u /* map a regular file (else exact reads) */
#define XCS_SOURCE_SEQ 0x2u /* mapped: every byte will be read (madvise) */

/*
 * Who hears of a short or failed exact read (xcs_source_must), set by the
 * reader before it reads: report(ctx, 1, "read") on a read error (errno
 * set), report(ctx, 0, why) when the stream ends first, why being "stream
 * truncated: G of N bytes of <what>".  It returns the reader's error code.
 */
struct xcs_source_fault {
    int (*report)(void *ctx, int read_error, const char *why);
    void *ctx;
};

struct xcs_source {
    int fd;
    uint64_t off;        /* stream bytes consumed since open */

    /* mapped mode */
    int mapped;          /* regular file read through the mapping below */
    const uint8_t *map;  /* mapping of [start, EOF), NULL when empty */
    size_t map_len;
    uint64_t start;      /* fd offset at open */

    /* exact-read mode */
    uint8_t *buf;        /* bytes read but not consumed (and bodies got) */
    size_t buf_cap;
    size_t buf_head;
    size_t buf_tail;
    uint8_t *scratch;    /* discard buffer for skips */

    /* kernel moves */
    int move;            /* method for fd; 0 = not probed yet */
    uint64_t moved;      /* of off: bytes moved kernel-side */
    int relay[2];        /* socket streams: a private pipe (source.c) */
    size_t relay_cap;    /* its capacity; 0 = no relay open */
    size_t relay_fill;   /* stream bytes in it, not yet moved out */
    uint64_t ahead;      /* bytes announced by xcs_source_move_expect */
    struct xcs_source_fault fault; /* set by the reader (walker, legacy) */
};

/* Open a source over fd (not owned); flags XCS_SOURCE_*. */
int xcs_source_open(struct xcs_source *s, int fd, unsigned int flags);
/*
 * Release buffers, mapping and relay; a mapped file's fd offset is left just
 * after the consumed bytes.  errno is preserved.
 */
void xcs_source_close(struct xcs_source *s);

/*
 * Consume up to n bytes and point *p at them (valid until the next call).
 * Returns 0 when all n bytes were had, 1 on EOF first (*got says how many
 * were consumed), -1 on a read error (errno).
 */
int xcs_source_get(struct xcs_source *s, size_t n, const uint8_t **p, size_t *got);
/*
 * For readers that need all n bytes: xcs_source_get (p set) or, with p NULL,
 * xcs_source_skip.  0, or what s->fault.report returned: the one path
 * from a short or failed read to a reader's error record (the walker's and
 * the legacy converter's).
 */
int xcs_source_must(struct xcs_source *s, uint64_t n, const uint8_t **p,
                    const char *what);
/* Look at up to n bytes without consuming them; *got may be < n at EOF. */
int xcs_source_peek(struct xcs_source *s, size_t n, const uint8_t **p, size_t *got);
/* Consume n bytes without looking at them; 1 on EOF first (*got). */
int xcs_source_skip(struct xcs_source *s, uint64_t n, uint64_t *got);
/*
 * Copy exactly len bytes into buf.  Returns 0, or -1 with errno: EIO with
 * *eof set when the stream ended first (1 before the first byte, 2 part way).
 */
int xcs_source_read(struct xcs_source *s, void *buf, size_t len, int *eof);
/* 1 at EOF, 0 if a byte follows (kept for the next call), -1 error. */
int xcs_source_at_eof(struct xcs_source *s);
/* Bytes left before EOF for a mapped file, UINT64_MAX if unknown. */
uint64_t xcs_source_remaining(const struct xcs_source *s);
/* Exact-read mode: bytes read from the fd but not consumed yet. */
size_t xcs_source_buffered(const struct xcs_source *s);
/*
 * The caller consumed n bytes straight from the fd (copy_file_range,
 * sendfile, splice): a mapped file at offset start + off, given explicitly
 * (its fd offset is not moved); otherwise from the fd's own position, with
 * nothing buffered.
 */
void xcs_source_consumed(struct xcs_source *s, uint64_t n);

/*
 * The next len stream bytes are all to be moved by xcs_source_move (one
 * PAGE_DATA batch's pages, run by run): from a socket they may then be
 * pulled into the relay a pipe's capacity at a time instead of run by run.
 */
void xcs_source_move_expect(struct xcs_source *s, uint64_t len);
/*
 * Move exactly len stream bytes into the file `to` at offset off without
 * passing them through user space (exact-read mode; bytes already buffered
 * are written first).  Returns 0; -1 with errno set (EIO and *eof as
 * xcs_source_read when the stream ended first); or 1, having consumed
 * nothing, when the kernel cannot do it for these fds (a socket type
 * without splice, a filesystem without it, XCSAVE_NO_SPLICE=1): the caller
 * then reads and writes itself, and every later call returns 1 at once.
 */
int xcs_source_move(struct xcs_source *s, int to, uint64_t off, size_t len, int *eof);

#ifdef __cplusplus
}
#endif

#endif /* XCS_SOURCE_H */
