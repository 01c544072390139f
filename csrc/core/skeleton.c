/*
 * skeleton.c - stream skeletons (see xcs_skeleton.h): one walker client for
 * both directions.  The walker reads the input (the stream, or a body)
 * through a mapped source; the client passes every byte it does not
 * replace straight from the mapping to the output, range by range, and
 * replaces each PAGE_DATA record's page bytes (make: pages -> digests;
 * inflate: digests -> pages).
 */
#include "xcs_skeleton.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "simdom.h"
#include "source.h"
#include "stream_io.h"

#define OUT_CHUNK (1u << 20) /* inflate: write in 1 MiB pieces */

/*----- pages and digests -----*/

/*
 * The all-zero page's digest: XXH64 (seed 0) of 4096 zero bytes, a
 * constant (tests/test_skeleton.py checks it against xcs_skel_digest).
 */
#define ZERO_DIGEST 0xac869b6f32d8bbdbull

uint64_t xcs_skel_digest(const uint8_t *page)
{
    return xcs_xxh64(page, XCS_PAGE_SIZE, 0);
}

void xcs_skel_page(uint64_t digest, uint8_t *page)
{
    uint64_t x = digest;

    if (digest == ZERO_DIGEST) {
        memset(page, 0, XCS_PAGE_SIZE);
        return;
    }
    /* splitmix64 seeded with the digest, one word at a time */
    for (size_t i = 0; i < XCS_PAGE_SIZE; i += 8) {
        uint64_t z = (x += 0x9e3779b97f4a7c15ull);

        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        xcs_put_le64(page + i, z ^ (z >> 31));
    }
}

/*----- the output -----*/

/*
 * Where the walk's output goes: a growing buffer (make's body, up to
 * XCS_SKEL_BODY_MAX), an fd written OUT_CHUNK at a time (inflate), or
 * nowhere (fd -1 without grow: only counted).
 */
struct sink {
    int grow;
    struct xcs_writer wr; /* wr.fd -1: count only */
    uint8_t *buf;
    size_t len, cap;
    uint64_t total;
};

static int sink_flush(struct sink *k)
{
    int r;

    if (k->grow || k->wr.fd < 0 || !k->len)
        return 0;
    r = xcs_write_all(&k->wr, k->buf, k->len);
    k->len = 0;
    return r;
}

/*
 * Room for n more bytes (n <= OUT_CHUNK unless growing): a pointer to
 * write them at, or NULL when they are only counted (*err 0) or on a
 * failure (*err -1, errno set).
 */
static uint8_t *sink_room(struct sink *k, size_t n, int *err)
{
    *err = 0;
    if (!k->grow && k->wr.fd < 0)
        return NULL;
    if (k->grow) {
        if (k->len + n > XCS_SKEL_BODY_MAX) {
            errno = EMSGSIZE;
            *err = -1;
            return NULL;
        }
        if (k->len + n > k->cap) {
            size_t cap = k->cap ? k->cap : OUT_CHUNK;
            uint8_t *nb;

            while (cap < k->len + n)
                cap *= 2;
            nb = realloc(k->buf, cap);
            if (!nb) {
                *err = -1;
                return NULL;
            }
            k->buf = nb;
            k->cap = cap;
        }
    } else {
        if (!k->buf) {
            k->buf = malloc(OUT_CHUNK);
            if (!k->buf) {
                *err = -1;
                return NULL;
            }
            k->cap = OUT_CHUNK;
        }
        if (k->len + n > k->cap && sink_flush(k) < 0) {
            *err = -1;
            return NULL;
        }
    }
    return k->buf + k->len;
}

/* The n bytes at room were written (or counted). */
static void sink_commit(struct sink *k, size_t n)
{
    if (k->grow || k->wr.fd >= 0)
        k->len += n;
    k->total += n;
}

static int sink_put(struct sink *k, const uint8_t *p, size_t n)
{
    while (n) {
        size_t part = k->grow ? n : (n < OUT_CHUNK ? n : OUT_CHUNK);
        int err;
        uint8_t *room = sink_room(k, part, &err);

        if (err)
            return -1;
        if (room)
            memcpy(room, p, part);
        sink_commit(k, part);
        p += part;
        n -= part;
    }
    return 0;
}

/*----- the walker's client -----*/

struct skel {
    struct xcs_walker w;
    struct xcs_walk_opts wo;
    struct xcs_source src;
    int src_open;
    int inflate;
    const uint8_t *base;  /* the mapped input */
    uint64_t done;        /* input bytes passed on (or replaced) so far */
    struct sink out;
    struct xcs_skel_info *info;
};

/* A failure of our own (errno set), in the walker's error shape. */
static int fail(struct skel *s, const char *what)
{
    return xcs_walk_io_error(&s->w, what);
}

/* Offset of the record at input offset `off` in the stream. */
static uint64_t stream_offset(const struct skel *s, uint64_t off)
{
    const uint64_t grow = XCS_PAGE_SIZE - XCS_SKEL_DIGEST_LEN;

    return s->inflate ? off + s->info->pages * grow : off;
}

static int on_header(struct xcs_walker *w, const char *layer, uint32_t type,
                     uint32_t len)
{
    struct skel *s = w->data;
    struct xcs_skel_info *in = s->info;
    struct xcs_skel_record *r;

    if (in->nrecords == in->records_cap) {
        size_t cap = in->records_cap ? 2 * in->records_cap : 256;
        struct xcs_skel_record *nr;

        if (in->nrecords >= XCS_SKEL_RECORDS_MAX)
            return xcs_walk_bad(w, EMSGSIZE, "more than %u records: more than a "
                                "skeleton lists", XCS_SKEL_RECORDS_MAX);
        nr = realloc(in->records, cap * sizeof(*nr));
        if (!nr)
            return fail(s, "malloc");
        in->records = nr;
        in->records_cap = cap;
    }
    r = &in->records[in->nrecords++];
    memset(r, 0, sizeof(*r));
    r->offset = stream_offset(s, w->rec_off);
    r->type = type;
    r->length = len;
    r->layer = strcmp(layer, "libxc") ? XCS_SKEL_LIBXL : XCS_SKEL_LIBXC;
    return 0;
}

/* Pass the input's bytes up to the current offset on as they are. */
static int pass_on(struct skel *s, uint64_t upto)
{
    int rc = 0;

    if (upto > s->done && s->base) {
        rc = sink_put(&s->out, s->base + s->done, (size_t)(upto - s->done));
        s->done = upto;
    }
    return rc < 0 ? fail(s, s->inflate ? "write" : "skeleton body") : 0;
}

/*
 * A page batch's body, one way or the other: make reads pages and writes
 * their digests, inflate reads digests and writes their pages.
 */
struct pages_way {
    size_t in_len, out_len;         /* a page's input and output */
    const char *in_what, *out_what; /* for errors */
    uint64_t (*digest)(const uint8_t *in);     /* the page's digest from its input */
    void (*put)(uint64_t digest, uint8_t *out); /* its output */
};

static void put_digest(uint64_t digest, uint8_t *out)
{
    xcs_put_le64(out, digest);
}

static const struct pages_way making = {
    XCS_PAGE_SIZE, XCS_SKEL_DIGEST_LEN, "page data", "skeleton body",
    xcs_skel_digest, put_digest,
};
static const struct pages_way inflating = {
    XCS_SKEL_DIGEST_LEN, XCS_PAGE_SIZE, "page digests", "write",
    xcs_get_le64, xcs_skel_page,
};

static int pass_pages(struct skel *s, uint32_t npages, const struct pages_way *way)
{
    const uint8_t *p;
    int err, rc;

    rc = xcs_source_must(&s->src, (uint64_t)npages * way->in_len, &p, way->in_what);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < npages; i++) {
        uint64_t d = way->digest(p + (size_t)i * way->in_len);
        uint8_t *room = sink_room(&s->out, way->out_len, &err);

        if (err)
            return fail(s, way->out_what);
        if (room) /* NULL: an inflate that only walks */
            way->put(d, room);
        sink_commit(&s->out, way->out_len);
        s->info->zero_pages += d == ZERO_DIGEST;
    }
    return 0;
}

static int on_page_batch(struct xcs_walker *w, const uint8_t *pfns, uint32_t count,
                         uint32_t npages)
{
    struct skel *s = w->data;
    struct xcs_skel_record *r = &s->info->records[s->info->nrecords - 1];
    int rc;

    (void)pfns;
    r->count = count;
    r->pages = npages;
    rc = pass_on(s, s->src.off); /* the header and the pfn words */
    if (!rc)
        rc = pass_pages(s, npages, s->inflate ? &inflating : &making);
    if (rc)
        return rc;
    s->done = s->src.off;
    s->info->pages += npages;
    return 0;
}

/* The libxc image starts: its offset in the stream. */
static int on_image(struct xcs_walker *w)
{
    struct skel *s = w->data;

    s->info->libxc_offset = stream_offset(s, w->libxc_offset);
    return 0;
}

/* What the walk found, into info (also for an invalid stream). */
static void report(struct skel *s)
{
    s->info->hdrs = s->w.hdrs;
    s->info->checkpoints = s->w.checkpoints;
    s->info->ended = s->w.ended;
    s->info->err = s->w.err;
}

static const struct xcs_walk_ops skel_ops = {
    .on_image = on_image,
    .on_header = on_header,
    .on_page_batch = on_page_batch,
};

/*
 * The walk over s->src (opened, mapped) from format fmt, and everything
 * after the outermost END passed on as it is.
 */
static int walk(struct skel *s, enum xcs_fmt fmt, enum xcs_stream_type type)
{
    int rc;

    s->base = s->src.map;
    s->wo.start = fmt;
    s->wo.stream_type = type;
    xcs_walk_attach(&s->w, &s->src, &s->wo, &skel_ops, s);
    s->info->fmt = fmt;
    rc = xcs_walk(&s->w);
    if (!rc && s->w.xl_legacy)
        rc = xcs_walk_bad(&s->w, EINVAL, "the xl header announces a legacy "
                          "(pre-4.6) stream: skeletons are of v2/v3 streams");
    if (!rc) {
        s->info->trailing = s->src.map_len - s->src.off;
        rc = pass_on(s, s->src.map_len);
    }
    if (!rc && sink_flush(&s->out) < 0)
        rc = fail(s, "write");
    report(s);
    return rc;
}

/* The walker's error shape for a failure before the walk (errno set). */
static int early_error(struct xcs_skel_info *info, const char *what)
{
    int err = errno;
    char nb[32];

    snprintf(info->err.reason, sizeof(info->err.reason), "%s: %s (%s)", what,
             strerror(err), xcs_errno_name(err, nb, sizeof(nb)));
    info->err.errnum = err;
    errno = err;
    return -1;
}

/*
 * A client over fd, mapped (why: what to say of an fd that cannot be).
 * *sp is set even on failure (skel_close it), NULL only when out of memory.
 */
static int skel_open(struct skel **sp, int fd, struct xcs_skel_info *info,
                     const char *why)
{
    struct skel *s = calloc(1, sizeof(*s));

    *sp = s;
    if (!s)
        return early_error(info, "malloc");
    s->info = info;
    s->out.wr.fd = -1;
    if (xcs_source_open(&s->src, fd, XCS_SOURCE_MAP | XCS_SOURCE_SEQ) < 0)
        return early_error(info, "fstat");
    s->src_open = 1;
    if (!s->src.mapped) {
        /* A pipe, or a file that cannot be mapped: the walk would not see
         * the bytes it passes on. */
        errno = EINVAL;
        return early_error(info, why);
    }
    return 0;
}

static void skel_close(struct skel *s)
{
    if (!s)
        return;
    if (s->src_open)
        xcs_source_close(&s->src);
    xcs_walk_release(&s->w);
    free(s->out.buf);
    free(s);
}

int xcs_skel_make(int in_fd, enum xcs_fmt fmt, enum xcs_stream_type type,
                  uint8_t **body, size_t *body_len, struct xcs_skel_info *info)
{
    struct skel *s = NULL;
    int rc;

    *body = NULL;
    *body_len = 0;
    memset(info, 0, sizeof(*info));
    rc = skel_open(&s, in_fd, info, "not a regular file (a skeleton is made of a saved image)");
    if (rc)
        goto out;
    s->out.grow = 1;
    info->stream_size = s->src.map_len;
    info->stream_xxh64 = s->src.map ? xcs_xxh64(s->src.map, s->src.map_len, 0)
                                    : xcs_xxh64("", 0, 0);
    if (fmt == XCS_FMT_AUTO)
        fmt = xcs_fmt_sniff(s->src.map, s->src.map_len, 0);
    if (fmt != XCS_FMT_XL && fmt != XCS_FMT_LIBXL && fmt != XCS_FMT_LIBXC) {
        s->w.at_layer = "";
        s->w.at_name = "format detection";
        rc = xcs_walk_bad(&s->w, EINVAL, fmt == XCS_FMT_LEGACY
                          ? "not an xl, libxl or libxc stream (a legacy stream "
                            "has no skeleton: convert it first)"
                          : "too short for a stream");
        info->err = s->w.err;
        goto out;
    }
    rc = walk(s, fmt, type);
    if (rc)
        goto out;
    info->body_size = s->out.total;
    *body = s->out.buf;
    *body_len = s->out.len;
    s->out.buf = NULL;
out:
    skel_close(s);
    return rc;
}

/* The body in a memfd: the source reads a mapped regular file. */
static int body_fd(const uint8_t *body, size_t len)
{
    struct xcs_writer wr = {.fd = -1};
    int fd = memfd_create("xcsave-skeleton", MFD_CLOEXEC);

    if (fd < 0)
        return -1;
    wr.fd = fd;
    if (xcs_write_all(&wr, body, len) < 0 || lseek(fd, 0, SEEK_SET) < 0) {
        int err = errno;

        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

int xcs_skel_inflate(const uint8_t *body, size_t body_len, enum xcs_fmt fmt,
                     enum xcs_stream_type type, int out_fd,
                     struct xcs_skel_info *info)
{
    struct skel *s = NULL;
    int fd = -1, rc;

    memset(info, 0, sizeof(*info));
    info->body_size = body_len;
    if (body_len > XCS_SKEL_BODY_MAX) {
        errno = EMSGSIZE;
        rc = early_error(info, "skeleton body");
        goto out;
    }
    if (fmt != XCS_FMT_XL && fmt != XCS_FMT_LIBXL && fmt != XCS_FMT_LIBXC) {
        errno = EINVAL;
        rc = early_error(info, "format");
        goto out;
    }
    fd = body_fd(body, body_len);
    if (fd < 0) {
        rc = early_error(info, "memfd");
        goto out;
    }
    rc = skel_open(&s, fd, info, "mmap of the skeleton body");
    if (rc)
        goto out;
    s->inflate = 1;
    s->out.wr.fd = out_fd;
    rc = walk(s, fmt, type);
    info->stream_size = s->out.total;
out:
    skel_close(s);
    if (fd >= 0)
        close(fd);
    return rc;
}

void xcs_skel_info_release(struct xcs_skel_info *info)
{
    free(info->records);
    info->records = NULL;
    info->nrecords = info->records_cap = 0;
}
