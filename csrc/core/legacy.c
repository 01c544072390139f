/*
 * legacy.c - the pre-4.6 legacy libxc stream reader and the legacy -> v3
 * converter (see xcs_legacy.h).  Written from shared/specs/
 * xen-migration-facts.md section 2 (layout), 2.6 (the 2013
 * LAST_CHECKPOINT fix) and 3 (the v3 / libxl records produced).
 *
 * Input layout (W = toolstack unsigned long, 4 or 8 bytes, little-endian):
 *
 *   ulong p2m_size
 *   PV:  [ulong ~0, u32 total, {char id[4]; u32 size; data}...]  extended info
 *        ulong p2m_frame_list[(p2m_size - 1) / (4096 / guest_width) + 1]
 *   BODY: chunks, int 0        TAIL: PV tail | HVM tail (+ qemu record)
 *   (Remus: BODY TAIL repeated)
 *
 * Output: [xl header] [libxl header, LIBXC_CONTEXT] image header (v3),
 * domain header (xen_major 0 = converted), [X86_PV_INFO] STATIC_DATA_END
 * [X86_PV_P2M_FRAMES] then records in input order, END (or CHECKPOINT),
 * then for libxl [EMULATOR_XENSTORE_DATA] [EMULATOR_CONTEXT] END (or
 * CHECKPOINT_END).  HVM_PARAMS merges the param chunks with the tail's
 * magic pfns and precedes HVM_CONTEXT, as the spec orders them.
 *
 * Page data is >99% of an image and needs no conversion, only a new record
 * header in front: it is moved fd to fd by the kernel where the fds allow
 * ("page data" below), so a conversion costs what copying the bytes costs.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "codec.h"
#include "stream_io.h"
#include "xcs_legacy.h"

#define OBUF_SIZE (256u << 10)
#define MAX_PARAMS 32
#define TOOLSTACK_MAX (16u << 20)   /* libxl's physmap blob is tiny */
#define EXTINFO_MAX (1u << 20)
#define XSAVE_MAX (1u << 20)
#define QEMU_MAX (1u << 30)         /* qemu record we are willing to hold */
#define XS_MAX (16u << 20)
#define UNMAPPED_MAX (1u << 24)
#define CONVERTER_VERSION 1         /* dhdr xen_minor for converted streams */

/* How page data gets from the input to the output (see choose_kcopy). */
enum kcopy {
    KCOPY_NONE = 0,      /* through memory: the mapping or a buffer, writev */
    KCOPY_CFR,           /* mapped file -> regular file: copy_file_range */
    KCOPY_SENDFILE,      /* mapped file -> pipe, socket, other file: sendfile */
    KCOPY_SPLICE         /* pipe -> anything: splice */
};

struct conv {
    struct xcs_source *in;
    int out_fd;                      /* < 0: check only */
    enum kcopy kcopy;
    const struct xcs_legacy_opts *o;
    struct xcs_legacy_stats *st;
    char *err;
    size_t errlen;

    unsigned int W;                  /* bytes per unsigned long */
    int pv;
    int libxl;

    uint8_t *obuf;
    size_t olen;

    /* where we are, for messages */
    uint64_t chunk_off;
    const char *chunk;

    /* PV */
    uint32_t vcpu_size;
    int extv;
    uint32_t xsave_len;
    uint64_t vcpumap[(XCS_LEGACY_MAX_VCPU_ID + 1) / 64];
    int vcpu_info_seen;

    /* per image */
    uint64_t params[MAX_PARAMS][2];
    unsigned int nparams;
    uint8_t *xs;
    size_t xs_len, xs_cap;
    int last_checkpoint;

    uint64_t *pfns;                  /* one batch, converted */
    uint64_t *sorted;
};

/*----- errors -----*/

static int fail(struct conv *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail(struct conv *c, int code, const char *fmt, ...)
{
    struct xcs_legacy_stats *st = c->st;
    va_list ap;

    if (st->err_reason[0])
        return code;
    va_start(ap, fmt);
    vsnprintf(st->err_reason, sizeof(st->err_reason), fmt, ap);
    va_end(ap);
    st->err_offset = c->chunk_off;
    snprintf(st->err_chunk, sizeof(st->err_chunk), "%s", c->chunk ? c->chunk : "");
    if (c->err && c->errlen)
        snprintf(c->err, c->errlen, "offset %llu, chunk %s: %s",
                 (unsigned long long)c->chunk_off, st->err_chunk, st->err_reason);
    return code;
}

static int io_fail(struct conv *c, const char *what)
{
    int e = errno;
    char nb[32];

    if (!c->st->err_reason[0]) {
        snprintf(c->st->err_reason, sizeof(c->st->err_reason), "%s: %s (%s)",
                 what, strerror(e), xcs_errno_name(e, nb, sizeof(nb)));
        c->st->err_offset = c->in->off;
        if (c->err && c->errlen)
            snprintf(c->err, c->errlen, "%s", c->st->err_reason);
    }
    errno = e;
    return XCS_LEGACY_EIO;
}

static void at(struct conv *c, const char *chunk)
{
    c->chunk_off = c->in->off;
    c->chunk = chunk;
}

/*----- input -----*/

/* Exactly n bytes of `what` (or skip them: p NULL); a short stream is bad. */
static int rd(struct conv *c, uint64_t n, const uint8_t **p, const char *what)
{
    return xcs_source_must(c->in, n, p, what);
}

/* The input's fault report (xcs_source_fault): into st, as EFORMAT or EIO. */
static int rd_fault(void *c, int read_error, const char *why)
{
    return read_error ? io_fail(c, why) : fail(c, XCS_LEGACY_EFORMAT, "%s", why);
}

static uint64_t ulong_at(const struct conv *c, const uint8_t *p)
{
    return c->W == 8 ? xcs_get_le64(p) : xcs_get_le32(p);
}

static int rd_ulong(struct conv *c, uint64_t *v, const char *what)
{
    const uint8_t *p;
    int rc = rd(c, c->W, &p, what);

    if (!rc)
        *v = ulong_at(c, p);
    return rc;
}

static int rd_u32(struct conv *c, uint32_t *v, const char *what)
{
    const uint8_t *p;
    int rc = rd(c, 4, &p, what);

    if (!rc)
        *v = xcs_get_le32(p);
    return rc;
}

/*
 * A u32 length ("<what> length") announcing `what`: outside [min, max] it is
 * "<what> of N bytes".  The caller reads or skips the data itself.
 */
static int rd_len(struct conv *c, uint32_t *len, uint32_t min, uint32_t max,
                  const char *lenwhat, const char *what)
{
    int rc = rd_u32(c, len, lenwhat);

    if (!rc && (*len < min || *len > max))
        rc = fail(c, XCS_LEGACY_EFORMAT, "%s of %u bytes", what, *len);
    return rc;
}

/*----- output -----*/

static int write_iov(struct conv *c, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        ssize_t r = writev(c->out_fd, iov, cnt);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            return io_fail(c, "write");
        }
        while (cnt > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

static int out_flush(struct conv *c)
{
    struct iovec iov;
    int rc;

    if (!c->olen)
        return 0;
    if (c->out_fd < 0) {
        c->olen = 0;
        return 0;
    }
    iov.iov_base = c->obuf;
    iov.iov_len = c->olen;
    rc = write_iov(c, &iov, 1);
    c->olen = 0;
    return rc;
}

/* Queue bytes; big ones go out in one writev with what is queued. */
static int out_put(struct conv *c, const void *p, size_t n)
{
    struct iovec iov[2];
    int rc;

    c->st->out_bytes += n;
    if (c->out_fd < 0 || n == 0)
        return 0;
    if (c->olen + n <= OBUF_SIZE) {
        memcpy(c->obuf + c->olen, p, n);
        c->olen += n;
        return 0;
    }
    iov[0].iov_base = c->obuf;
    iov[0].iov_len = c->olen;
    iov[1].iov_base = (void *)p;
    iov[1].iov_len = n;
    rc = write_iov(c, iov, 2);
    c->olen = 0;
    return rc;
}

static int out_pad(struct conv *c, uint64_t len)
{
    static const uint8_t zero[8];
    size_t pad = (size_t)((8 - (len & 7)) & 7);

    return out_put(c, zero, pad);
}

static int out_rhdr(struct conv *c, uint32_t type, uint64_t len)
{
    uint8_t h[8];

    if (len > UINT32_MAX)
        return fail(c, XCS_LEGACY_EFORMAT, "record of %llu bytes does not fit a "
                                           "v2 record", (unsigned long long)len);
    xcs_rhdr_put(h, type, (uint32_t)len);
    return out_put(c, h, 8);
}

/* A record from up to two pieces (a sub-header and a blob). */
static int out_rec(struct conv *c, uint32_t type, const void *a, size_t alen,
                   const void *b, size_t blen)
{
    int rc = out_rhdr(c, type, (uint64_t)alen + blen);

    if (!rc)
        rc = out_put(c, a, alen);
    if (!rc)
        rc = out_put(c, b, blen);
    if (!rc)
        rc = out_pad(c, (uint64_t)alen + blen);
    return rc;
}

static int out_vcpu(struct conv *c, uint32_t type, uint32_t id, const void *ctx, size_t len)
{
    uint32_t h[2] = {id, 0};

    return out_rec(c, type, h, sizeof(h), ctx, len);
}

/*----- xenstore data from libxl's toolstack blob -----*/

static int xs_add(struct conv *c, const char *s, size_t n)
{
    if (c->xs_len + n + 1 > XS_MAX)
        return fail(c, XCS_LEGACY_EFORMAT, "toolstack data yields more than %u "
                                           "bytes of xenstore data", XS_MAX);
    if (c->xs_len + n + 1 > c->xs_cap) {
        size_t cap = c->xs_cap ? c->xs_cap : 256;
        uint8_t *nb;

        while (cap < c->xs_len + n + 1)
            cap *= 2;
        nb = realloc(c->xs, cap);
        if (!nb)
            return io_fail(c, "malloc");
        c->xs = nb;
        c->xs_cap = cap;
    }
    memcpy(c->xs + c->xs_len, s, n);
    c->xs[c->xs_len + n] = 0;
    c->xs_len += n + 1;
    return 0;
}

/*
 * libxl's blob: u32 version (1), u32 count, then per entry
 * {u64 phys_offset, start_addr, size; u32 namelen; char name[namelen]}
 * plus 4 bytes of struct padding after the name from 64-bit toolstacks
 * (facts 2.3).  Keys: physmap/<phys_offset>/{start_addr,size,name}.
 */
static int parse_toolstack(struct conv *c, const uint8_t *d, uint32_t len)
{
    uint32_t ver, count, off = 8;
    char key[64], val[32];
    int rc;

    if (len < 8)
        return fail(c, XCS_LEGACY_EFORMAT, "toolstack data of %u bytes is too short", len);
    ver = xcs_get_le32(d);
    count = xcs_get_le32(d + 4);
    if (ver != 1)
        return fail(c, XCS_LEGACY_EFORMAT, "cannot decode libxl toolstack version %u", ver);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t phys, start, size;
        uint32_t namelen, extra = c->W == 8 ? 4 : 0;
        const char *name;

        if (len - off < 28)
            return fail(c, XCS_LEGACY_EFORMAT, "toolstack physmap entry %u truncated", i);
        phys = xcs_get_le64(d + off);
        start = xcs_get_le64(d + off + 8);
        size = xcs_get_le64(d + off + 16);
        namelen = xcs_get_le32(d + off + 24);
        off += 28;
        if (namelen == 0)
            return fail(c, XCS_LEGACY_EFORMAT, "toolstack physmap entry %u has no name", i);
        if ((uint64_t)namelen + extra > len - off)
            return fail(c, XCS_LEGACY_EFORMAT, "toolstack physmap name %u truncated", i);
        name = (const char *)d + off;
        if (name[namelen - 1] != 0)
            return fail(c, XCS_LEGACY_EFORMAT, "toolstack physmap name %u not NUL "
                                               "terminated", i);
        off += namelen + extra;
        snprintf(key, sizeof(key), "physmap/%llx/start_addr", (unsigned long long)phys);
        snprintf(val, sizeof(val), "%llx", (unsigned long long)start);
        rc = xs_add(c, key, strlen(key));
        rc = rc ? rc : xs_add(c, val, strlen(val));
        snprintf(key, sizeof(key), "physmap/%llx/size", (unsigned long long)phys);
        snprintf(val, sizeof(val), "%llx", (unsigned long long)size);
        rc = rc ? rc : xs_add(c, key, strlen(key));
        rc = rc ? rc : xs_add(c, val, strlen(val));
        snprintf(key, sizeof(key), "physmap/%llx/name", (unsigned long long)phys);
        rc = rc ? rc : xs_add(c, key, strlen(key));
        rc = rc ? rc : xs_add(c, name, strlen(name));
        if (rc)
            return rc;
    }
    return 0;
}

/*----- header -----*/

static int xl_header(struct conv *c)
{
    const uint8_t *p;
    uint8_t hdr[XCS_XL_HDR_SIZE];
    struct xcs_xl_hdr h;
    char why[XCS_WHY_LEN];
    int rc;

    at(c, "xl header");
    rc = rd(c, XCS_XL_HDR_SIZE, &p, "xl header");
    if (rc)
        return rc;
    if (xcs_xl_hdr_parse(p, &h, why, sizeof(why)))
        return fail(c, XCS_LEGACY_EFORMAT, "%s", why);
    if (h.mflags & XCS_XL_MFLAG_STREAMV2)
        return fail(c, XCS_LEGACY_EFORMAT, "the xl header says the stream is already v2");
    /* The same header says what follows is v2 now. */
    h.mflags |= XCS_XL_MFLAG_STREAMV2;
    xcs_xl_hdr_build(hdr, &h);
    if (c->o->out_xl_header) {
        rc = out_put(c, hdr, sizeof(hdr));
        if (rc)
            return rc;
    }
    if (h.optlen > XS_MAX)
        return fail(c, XCS_LEGACY_EFORMAT, "xl optional data of %u bytes", h.optlen);
    rc = rd(c, h.optlen, &p, "xl optional data");
    if (rc)
        return rc;
    return c->o->out_xl_header ? out_put(c, p, h.optlen) : 0;
}

static int out_headers(struct conv *c)
{
    uint8_t ih[XCS_IHDR_SIZE], dh[XCS_DHDR_SIZE];
    int rc;

    if (c->o->out_xl_header && !c->o->in_has_xl_header) {
        uint8_t hdr[XCS_XL_HDR_SIZE];
        const struct xcs_xl_hdr h = {XCS_XL_BYTEORDER, XCS_XL_MFLAG_STREAMV2, 0, 0};

        xcs_xl_hdr_build(hdr, &h);
        rc = out_put(c, hdr, sizeof(hdr));
        if (rc)
            return rc;
    }
    if (c->libxl) {
        uint8_t lh[XCS_LIBXL_HDR_SIZE];

        xcs_libxl_hdr_build(lh, XCS_LIBXL_OPT_LEGACY); /* little-endian, converted */
        rc = out_put(c, lh, sizeof(lh));
        rc = rc ? rc : out_rec(c, XCS_LIBXL_REC_LIBXC_CONTEXT, NULL, 0, NULL, 0);
        if (rc)
            return rc;
    }
    xcs_ihdr_build(ih);
    /* xen_major 0 marks a converted stream (the verifier tolerates its gaps). */
    xcs_dhdr_build(dh, c->pv ? XCS_DHDR_TYPE_X86_PV : XCS_DHDR_TYPE_X86_HVM, 0,
                   CONVERTER_VERSION);
    rc = out_put(c, ih, sizeof(ih));
    return rc ? rc : out_put(c, dh, sizeof(dh));
}

/* PV extended info; *first gets the first p2m frame if there was none. */
static int pv_extended_info(struct conv *c, int *have_first, uint64_t *first)
{
    struct xcs_legacy_report *lr = &c->st->legacy;
    uint64_t marker, all_ones = c->W == 8 ? UINT64_MAX : UINT32_MAX;
    uint32_t total, done = 0;
    int vcpu_seen = 0, rc;

    at(c, "extended info");
    rc = rd_ulong(c, &marker, "extended info marker");
    if (rc)
        return rc;
    if (marker != all_ones) {
        /* No extended info (oldest senders): the guest is as wide as the
         * toolstack, and this word was the first p2m frame. */
        *have_first = 1;
        *first = marker;
        lr->guest_width = c->W;
        lr->pt_levels = c->W == 8 ? 4 : 3;
        c->vcpu_size = c->W == 8 ? 0x1430 : 0xaf0;
        lr->vcpu_ctx_size = c->vcpu_size;
        goto pv_info;
    }
    rc = rd_len(c, &total, 0, EXTINFO_MAX, "extended info length", "extended info");
    if (rc)
        return rc;
    while (done < total) {
        const uint8_t *p;
        char id[5];
        uint32_t size;

        at(c, "extended info block");
        if (total - done < 8)
            return fail(c, XCS_LEGACY_EFORMAT, "extended info block header overruns "
                                               "the %u-byte extended info", total);
        rc = rd(c, 8, &p, "extended info block header");
        if (rc)
            return rc;
        memcpy(id, p, 4);
        id[4] = 0;
        size = xcs_get_le32(p + 4);
        done += 8;
        if (size > total - done)
            return fail(c, XCS_LEGACY_EFORMAT, "block \"%.4s\" of %u bytes overruns "
                                               "the extended info", id, size);
        rc = rd(c, size, &p, "extended info block");
        if (rc)
            return rc;
        done += size;
        if (!memcmp(id, "vcpu", 4)) {
            if (size == 0x1430) {
                lr->guest_width = 8;
                lr->pt_levels = 4;
            } else if (size == 0xaf0) {
                lr->guest_width = 4;
                lr->pt_levels = 3;
            } else {
                return fail(c, XCS_LEGACY_EFORMAT, "vcpu context of 0x%x bytes: "
                                                   "unknown guest width", size);
            }
            c->vcpu_size = lr->vcpu_ctx_size = size;
            vcpu_seen = 1;
        } else if (!memcmp(id, "extv", 4)) {
            c->extv = lr->extv = 1;
        } else if (!memcmp(id, "xcnt", 4)) {
            if (size < 4)
                return fail(c, XCS_LEGACY_EFORMAT, "xcnt block of %u bytes", size);
            c->xsave_len = lr->xsave_len = xcs_get_le32(p);
            if (c->xsave_len < 16 || c->xsave_len > XSAVE_MAX)
                return fail(c, XCS_LEGACY_EFORMAT, "xcnt xsave size %u", c->xsave_len);
        } else {
            return fail(c, XCS_LEGACY_EFORMAT, "unknown extended info block \"%s\"", id);
        }
    }
    if (!vcpu_seen)
        return fail(c, XCS_LEGACY_EFORMAT, "extended info without a \"vcpu\" block: "
                                           "guest width unknown");

pv_info:
    {
        uint8_t info[8] = {(uint8_t)lr->guest_width, (uint8_t)lr->pt_levels};

        return out_rec(c, XCS_REC_X86_PV_INFO, info, sizeof(info), NULL, 0);
    }
}

static int pv_p2m_frames(struct conv *c, int have_first, uint64_t first)
{
    uint64_t fpp = XCS_PAGE_SIZE / c->st->legacy.guest_width;
    uint64_t n = (c->st->legacy.p2m_size - 1) / fpp + 1, done = 0;
    uint32_t se[2] = {0, (uint32_t)(c->st->legacy.p2m_size - 1)};
    uint64_t buf[512];
    int rc;

    at(c, "p2m frame list");
    if (8 + n * 8 > XCS_REC_LENGTH_MAX)
        return fail(c, XCS_LEGACY_EFORMAT, "p2m_size 0x%llx needs a P2M frame record "
                                           "over the 128 MiB record limit",
                    (unsigned long long)c->st->legacy.p2m_size);
    rc = out_rhdr(c, XCS_REC_X86_PV_P2M_FRAMES, 8 + n * 8);
    rc = rc ? rc : out_put(c, se, sizeof(se));
    if (rc)
        return rc;
    if (have_first) {
        rc = out_put(c, &first, 8);
        done = 1;
    }
    while (!rc && done < n) {
        size_t k = n - done < 512 ? (size_t)(n - done) : 512;
        const uint8_t *p;

        rc = rd(c, k * c->W, &p, "p2m frame list");
        if (rc)
            return rc;
        for (size_t i = 0; i < k; i++)
            buf[i] = ulong_at(c, p + i * c->W);
        rc = out_put(c, buf, k * 8);
        done += k;
    }
    return rc;
}

/*----- body -----*/

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return (x > y) - (x < y);
}

/*----- page data -----*/

/*
 * Choose how page data moves (once; env XCSAVE_NO_SPLICE=1: never by the
 * kernel).  Every method reads exactly the bytes asked for, as the
 * buffered path does, so nothing past the image is consumed:
 *
 * - a mapped (regular) input file is read at explicit offsets (start +
 *   pos), leaving its fd offset alone as the mapping does.  Into a regular
 *   file copy_file_range (a reflink where the filesystem shares extents; on
 *   tmpfs an in-kernel copy); into anything else sendfile, which for a pipe
 *   hands the reader page-cache pages by reference: the reader sees the
 *   input file's bytes as they are when it reads them (a saved image is not
 *   rewritten in place; if it were, the buffered path is the one to use).
 * - a pipe input is spliced onward (pipe -> pipe moves the buffers).  Only
 *   in a plain stream: a checkpointed one must end at a record edge when a
 *   later checkpoint is cut short, and a pipe cannot tell beforehand that
 *   the page data is all there (a mapped file can: it is checked first).
 *
 * Anything else (sockets in, check-only mode) goes through memory.  A
 * kernel that refuses a method for these fds (EINVAL, EXDEV, ...) drops the
 * converter to the next one for the rest of the run.
 */
static void choose_kcopy(struct conv *c)
{
    const char *no = getenv("XCSAVE_NO_SPLICE");
    struct stat in_st, out_st;

    c->kcopy = KCOPY_NONE;
    if (c->out_fd < 0 || (no && *no && strcmp(no, "0") != 0))
        return;
    if (fstat(c->out_fd, &out_st) < 0 || fstat(c->in->fd, &in_st) < 0)
        return; /* the first write or read will say why */
    if (c->in->mapped)
        c->kcopy = S_ISREG(out_st.st_mode) ? KCOPY_CFR : KCOPY_SENDFILE;
    else if (S_ISFIFO(in_st.st_mode) && c->o->stream_type == XCS_STREAM_PLAIN)
        c->kcopy = KCOPY_SPLICE;
}

/*
 * Move n bytes of page data from the input to the output, after the queued
 * record header.  The caller has checked that a mapped file holds them
 * (page_batch); a pipe that ends first is a truncation, found on the way
 * (plain streams only, where it is fatal: no failover needs a record edge).
 */
static int out_page_data(struct conv *c, size_t n)
{
    const uint8_t *p;
    size_t done = 0;
    int rc;

    if (n == 0)
        return 0;
    if (c->kcopy != KCOPY_NONE) {
        rc = out_flush(c); /* the record header first, in order */
        if (rc)
            return rc;
    }
    while (done < n && c->kcopy != KCOPY_NONE) {
        size_t want = n - done;
        ssize_t r;

        if (c->kcopy == KCOPY_CFR) {
            loff_t off = (loff_t)(c->in->start + c->in->off);

            r = copy_file_range(c->in->fd, &off, c->out_fd, NULL, want, 0);
        } else if (c->kcopy == KCOPY_SENDFILE) {
            off_t off = (off_t)(c->in->start + c->in->off);

            r = sendfile(c->out_fd, c->in->fd, &off, want);
        } else {
            size_t buffered = xcs_source_buffered(c->in);

            if (buffered) { /* bytes already read: pass them on first */
                want = buffered < want ? buffered : want;
                rc = rd(c, want, &p, "page data");
                rc = rc ? rc : out_put(c, p, want);
                rc = rc ? rc : out_flush(c);
                if (rc)
                    return rc;
                done += want;
                continue;
            }
            r = splice(c->in->fd, NULL, c->out_fd, NULL, want, 0);
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (!xcs_kernel_refused(errno))
                return io_fail(c, c->kcopy == KCOPY_CFR ? "copy_file_range"
                                  : c->kcopy == KCOPY_SENDFILE ? "sendfile" : "splice");
            /* the next method, the rest of the run */
            c->kcopy = c->kcopy == KCOPY_CFR ? KCOPY_SENDFILE : KCOPY_NONE;
            continue;
        }
        if (r == 0 && c->in->mapped) { /* shrank under us: not the stream's fault */
            errno = EIO;
            return io_fail(c, "input file shrank during the conversion");
        }
        if (r == 0)
            return fail(c, XCS_LEGACY_EFORMAT, "stream truncated: %zu of %zu bytes of "
                                               "page data", done, n);
        xcs_source_consumed(c->in, (uint64_t)r);
        c->st->out_bytes += (uint64_t)r;
        c->st->kernel_copied_bytes += (uint64_t)r;
        done += (size_t)r;
    }
    if (done == n)
        return 0;
    rc = rd(c, n - done, &p, "page data"); /* through memory */
    return rc ? rc : out_put(c, p, n - done);
}

static int page_batch(struct conv *c, int count)
{
    struct xcs_legacy_stats *st = c->st;
    const uint8_t *p;
    uint32_t kept = 0, ndata = 0;
    int sorted = 1, rc;

    if (count > XCS_LEGACY_MAX_BATCH)
        return fail(c, XCS_LEGACY_EFORMAT, "Max batch size exceeded (%d)", count);
    rc = rd(c, (size_t)count * c->W, &p, "pfn types");
    if (rc)
        return rc;
    for (int i = 0; i < count; i++) {
        uint64_t v = ulong_at(c, p + (size_t)i * c->W);
        uint32_t type = (uint32_t)(v >> 28) & 0xf, pfn = (uint32_t)v & XCS_PFINFO_PFN_MASK;

        if (v >> 32)
            return fail(c, XCS_LEGACY_EFORMAT, "pfn_type[%d] 0x%llx has bits above 31 "
                                               "set", i, (unsigned long long)v);
        if (v == XCS_PFINFO_XTAB)
            continue; /* XTAB for pfn 0: padding the sender leaves; no data */
        if (type >= 5 && type <= 8)
            return fail(c, XCS_LEGACY_EFORMAT, "invalid page type 0x%x in "
                                               "pfn_type[%d]", type, i);
        if (pfn >= st->legacy.p2m_size)
            return fail(c, XCS_LEGACY_EFORMAT, "pfn 0x%x in pfn_type[%d] out of range "
                                               "(p2m_size 0x%llx)", pfn, i,
                        (unsigned long long)st->legacy.p2m_size);
        if (kept && pfn <= (c->pfns[kept - 1] & XCS_PAGE_DATA_PFN_MASK))
            sorted = 0;
        c->pfns[kept++] = ((uint64_t)type << 60) | pfn;
        if (type < 0xd) {
            ndata++;
            if (pfn < st->min_pfn)
                st->min_pfn = pfn;
            if (pfn > st->max_pfn)
                st->max_pfn = pfn;
        }
    }
    if (!sorted) {
        for (uint32_t i = 0; i < kept; i++)
            c->sorted[i] = c->pfns[i] & XCS_PAGE_DATA_PFN_MASK;
        qsort(c->sorted, kept, sizeof(*c->sorted), cmp_u64);
        for (uint32_t i = 1; i < kept; i++)
            if (c->sorted[i] == c->sorted[i - 1])
                return fail(c, XCS_LEGACY_EFORMAT, "duplicate pfn 0x%llx in one batch",
                            (unsigned long long)c->sorted[i]);
    }
    /*
     * Read the pages, or for the kernel's copy check that a mapped file has
     * them all: a truncation fails here, before this record's header is
     * queued, so that a Remus failover's output ends at a record edge.
     */
    if (!kept || c->out_fd < 0 || c->kcopy == KCOPY_NONE ||
        (c->in->mapped && xcs_source_remaining(c->in) < (uint64_t)ndata * XCS_PAGE_SIZE)) {
        rc = rd(c, (size_t)ndata * XCS_PAGE_SIZE, &p, "page data");
        if (rc)
            return rc;
    }
    if (kept) {
        uint8_t hdr[XCS_PAGE_DATA_HDR_SIZE];

        xcs_page_data_hdr_put(hdr, kept, ndata);
        rc = out_put(c, hdr, sizeof(hdr));
        rc = rc ? rc : out_put(c, c->pfns, (size_t)kept * 8);
        if (!rc && c->out_fd >= 0 && c->kcopy != KCOPY_NONE)
            rc = out_page_data(c, (size_t)ndata * XCS_PAGE_SIZE);
        else if (!rc)
            rc = out_put(c, p, (size_t)ndata * XCS_PAGE_SIZE);
        if (rc)
            return rc;
    }
    st->legacy.batches++;
    st->page_entries += kept;
    st->pages += ndata;
    return 0;
}

static void add_param(struct conv *c, uint64_t index, uint64_t value)
{
    for (unsigned int i = 0; i < c->nparams; i++)
        if (c->params[i][0] == index) {
            c->params[i][1] = value;
            return;
        }
    if (c->nparams < MAX_PARAMS) {
        c->params[c->nparams][0] = index;
        c->params[c->nparams][1] = value;
        c->nparams++;
    }
}

static int param_index(int id)
{
    switch (id) {
    case XCS_LEGACY_HVM_IDENT_PT:
        return XCS_HVM_PARAM_IDENT_PT;
    case XCS_LEGACY_HVM_VM86_TSS:
        return XCS_HVM_PARAM_VM86_TSS;
    case XCS_LEGACY_HVM_CONSOLE_PFN:
        return XCS_HVM_PARAM_CONSOLE_PFN;
    case XCS_LEGACY_HVM_ACPI_IOPORTS_LOCATION:
        return XCS_HVM_PARAM_ACPI_IOPORTS_LOCATION;
    case XCS_LEGACY_HVM_VIRIDIAN:
        return XCS_HVM_PARAM_VIRIDIAN;
    case XCS_LEGACY_HVM_GENERATION_ID_ADDR:
        return XCS_HVM_PARAM_VM_GENERATION_ID_ADDR;
    case XCS_LEGACY_HVM_PAGING_RING_PFN:
        return XCS_HVM_PARAM_PAGING_RING_PFN;
    case XCS_LEGACY_HVM_ACCESS_RING_PFN:
        return XCS_HVM_PARAM_MONITOR_RING_PFN;
    case XCS_LEGACY_HVM_SHARING_RING_PFN:
        return XCS_HVM_PARAM_SHARING_RING_PFN;
    case XCS_LEGACY_HVM_IOREQ_SERVER_PFN:
        return XCS_HVM_PARAM_IOREQ_SERVER_PFN;
    case XCS_LEGACY_HVM_NR_IOREQ_SERVER_PAGES:
        return XCS_HVM_PARAM_NR_IOREQ_SERVER_PAGES;
    default:
        return -1;
    }
}

static const char *unsupported_why(int id)
{
    switch (id) {
    case XCS_LEGACY_ENABLE_VERIFY_MODE:
        return "debug verify-mode streams are not converted";
    case XCS_LEGACY_TMEM:
    case XCS_LEGACY_TMEM_EXTRA:
        return "transcendent memory has no v2 record";
    case XCS_LEGACY_COMPRESSED_DATA:
    case XCS_LEGACY_ENABLE_COMPRESSION:
        return "Remus checkpoint compression has no v2 equivalent";
    default:
        return NULL;
    }
}

static int body(struct conv *c)
{
    struct xcs_legacy_stats *st = c->st;
    int rc;

    for (;;) {
        const uint8_t *p;
        int id, pidx;

        at(c, "chunk header");
        rc = rd(c, 4, &p, "chunk id");
        if (rc)
            return rc;
        memcpy(&id, p, 4);
        c->chunk = xcs_legacy_chunk_name(id);
        if (id > 0) {
            rc = page_batch(c, id);
            if (rc)
                return rc;
            continue;
        }
        if (id > -XCS_LEGACY_NR_CHUNKS)
            st->legacy.chunks[-id]++;
        if (id == 0)
            return 0;
        if (unsupported_why(id))
            return fail(c, XCS_LEGACY_EUNSUP, "cannot convert chunk %s (%d): %s",
                        xcs_legacy_chunk_name(id), id, unsupported_why(id));
        pidx = param_index(id);
        if (pidx >= 0) {
            rc = rd(c, 12, &p, xcs_legacy_chunk_name(id));
            if (rc)
                return rc;
            if (c->pv)
                return fail(c, XCS_LEGACY_EFORMAT, "HVM-only chunk in a PV stream");
            add_param(c, (uint64_t)pidx, xcs_get_le64(p + 4));
            continue;
        }
        switch (id) {
        case XCS_LEGACY_VCPU_INFO: {
            int max_id;

            rc = rd(c, 4, &p, "max vcpu id");
            if (rc)
                return rc;
            memcpy(&max_id, p, 4);
            if (max_id < 0 || max_id > XCS_LEGACY_MAX_VCPU_ID)
                return fail(c, XCS_LEGACY_EFORMAT, "max vcpu id %d out of range "
                                                   "(0..%d)", max_id, XCS_LEGACY_MAX_VCPU_ID);
            rc = rd(c, (size_t)(max_id / 64 + 1) * 8, &p, "vcpu map");
            if (rc)
                return rc;
            memset(c->vcpumap, 0, sizeof(c->vcpumap));
            memcpy(c->vcpumap, p, (size_t)(max_id / 64 + 1) * 8);
            /* bits above max_id are not vcpus */
            if ((max_id + 1) % 64)
                c->vcpumap[max_id / 64] &= (1ULL << ((max_id + 1) % 64)) - 1;
            c->vcpu_info_seen = 1;
            break;
        }
        case XCS_LEGACY_TSC_INFO: {
            uint32_t t[6];
            uint64_t nsec;

            rc = rd(c, 20, &p, "TSC info");
            if (rc)
                return rc;
            memcpy(&nsec, p + 4, 8);
            t[0] = xcs_get_le32(p);      /* mode */
            t[1] = xcs_get_le32(p + 12); /* khz */
            memcpy(&t[2], &nsec, 8);
            t[4] = xcs_get_le32(p + 16); /* incarnation */
            t[5] = 0;
            rc = out_rec(c, XCS_REC_X86_TSC_INFO, t, sizeof(t), NULL, 0);
            if (rc)
                return rc;
            break;
        }
        case XCS_LEGACY_LAST_CHECKPOINT:
            /*
             * The 2013 rule: only a checkpointed stream gives -9 meaning.
             * In a plain stream the image ends at its tail regardless.
             */
            st->legacy.last_checkpoint_seen = 1;
            if (c->o->stream_type != XCS_STREAM_PLAIN)
                c->last_checkpoint = 1;
            break;
        case XCS_LEGACY_TOOLSTACK: {
            uint32_t len;

            rc = rd_len(c, &len, 0, TOOLSTACK_MAX, "toolstack length",
                        "toolstack data");
            if (!rc)
                rc = rd(c, len, &p, "toolstack data");
            if (rc)
                return rc;
            st->legacy.toolstack_bytes += len;
            if (c->libxl && len) {
                c->xs_len = 0; /* the latest blob describes the physmap */
                rc = parse_toolstack(c, p, len);
                if (rc)
                    return rc;
            }
            break;
        }
        default:
            return fail(c, XCS_LEGACY_EFORMAT, "unknown chunk id %d", id);
        }
    }
}

/*----- tails -----*/

static int online(const struct conv *c, unsigned int v)
{
    return (c->vcpumap[v / 64] >> (v % 64)) & 1;
}

static int pv_tail(struct conv *c)
{
    struct xcs_legacy_stats *st = c->st;
    const uint8_t *p;
    uint32_t nr;
    int rc;

    at(c, "PV tail");
    rc = rd_u32(c, &nr, "unmapped pfn count");
    if (rc)
        return rc;
    if (nr > UNMAPPED_MAX || nr > st->legacy.p2m_size)
        return fail(c, XCS_LEGACY_EFORMAT, "%u unmapped pfns (p2m_size 0x%llx)", nr,
                    (unsigned long long)st->legacy.p2m_size);
    rc = rd(c, (uint64_t)nr * c->W, NULL, "unmapped pfns"); /* no v2 meaning */
    if (rc)
        return rc;
    st->vcpus = 0;
    for (unsigned int v = 0; v <= XCS_LEGACY_MAX_VCPU_ID; v++) {
        if (!online(c, v))
            continue;
        st->vcpus++;
        at(c, "PV tail vcpu context");
        rc = rd(c, c->vcpu_size, &p, "vcpu context");
        rc = rc ? rc : out_vcpu(c, XCS_REC_X86_PV_VCPU_BASIC, v, p, c->vcpu_size);
        if (rc)
            return rc;
        if (c->extv) {
            rc = rd(c, 128, &p, "extended vcpu context");
            rc = rc ? rc : out_vcpu(c, XCS_REC_X86_PV_VCPU_EXTENDED, v, p, 128);
            if (rc)
                return rc;
        }
        if (c->xsave_len) {
            uint64_t size;

            rc = rd(c, 16, &p, "xsave header");
            if (rc)
                return rc;
            size = xcs_get_le64(p + 8);
            if (size != c->xsave_len - 16)
                return fail(c, XCS_LEGACY_EFORMAT, "vcpu %u xsave size %llu, the xcnt "
                                                   "block says %u", v,
                            (unsigned long long)size, c->xsave_len - 16);
            rc = rd(c, (size_t)size, &p, "xsave area");
            rc = rc ? rc : out_vcpu(c, XCS_REC_X86_PV_VCPU_XSAVE, v, p, (size_t)size);
            if (rc)
                return rc;
        }
    }
    at(c, "PV tail shared info");
    rc = rd(c, XCS_PAGE_SIZE, &p, "shared info");
    return rc ? rc : out_rec(c, XCS_REC_SHARED_INFO, p, XCS_PAGE_SIZE, NULL, 0);
}

/* HVM tail up to (not including) the qemu record. */
static int hvm_tail(struct conv *c)
{
    const uint8_t *p;
    uint64_t magic[3];
    uint32_t len, h[2];
    int rc;

    at(c, "HVM tail magic pfns");
    rc = rd(c, 24, &p, "magic pfns");
    if (rc)
        return rc;
    memcpy(magic, p, sizeof(magic));
    add_param(c, XCS_HVM_PARAM_IOREQ_PFN, magic[0]);
    add_param(c, XCS_HVM_PARAM_BUFIOREQ_PFN, magic[1]);
    add_param(c, XCS_HVM_PARAM_STORE_PFN, magic[2]);
    h[0] = c->nparams;
    h[1] = 0;
    rc = out_rec(c, XCS_REC_HVM_PARAMS, h, sizeof(h), c->params, (size_t)c->nparams * 16);
    if (rc)
        return rc;
    at(c, "HVM tail context");
    rc = rd_len(c, &len, 1, XCS_REC_LENGTH_MAX, "HVM context length", "HVM context");
    if (!rc)
        rc = rd(c, len, &p, "HVM context");
    if (rc)
        return rc;
    {
        /* vcpus: CPU (typecode 2) save descriptors */
        uint32_t off = 0;

        c->st->vcpus = 0;
        while (len - off >= 8) {
            uint16_t code;
            uint32_t dlen = xcs_get_le32(p + off + 4);

            memcpy(&code, p + off, 2);
            if (code == 0 || dlen > len - off - 8)
                break;
            if (code == 2)
                c->st->vcpus++;
            off += 8 + dlen;
        }
    }
    return out_rec(c, XCS_REC_HVM_CONTEXT, p, len, NULL, 0);
}

struct qemu {
    const uint8_t *data;
    uint8_t *owned;     /* xend form: read to EOF into this */
    uint64_t len;
    int to_eof;
};

static int read_qemu(struct conv *c, struct qemu *q)
{
    struct xcs_legacy_report *lr = &c->st->legacy;
    const uint8_t *p;
    char sig[XCS_LEGACY_QEMU_SIG_LEN + 1];
    int rc;

    at(c, "qemu record");
    rc = rd(c, XCS_LEGACY_QEMU_SIG_LEN, &p, "qemu signature");
    if (rc)
        return rc;
    memcpy(sig, p, XCS_LEGACY_QEMU_SIG_LEN);
    sig[XCS_LEGACY_QEMU_SIG_LEN] = 0;
    if (!memcmp(sig, XCS_LEGACY_QEMU_SIG_0002, XCS_LEGACY_QEMU_SIG_LEN) ||
        !memcmp(sig, XCS_LEGACY_QEMU_SIG_REMUS, XCS_LEGACY_QEMU_SIG_LEN)) {
        uint32_t len;

        snprintf(lr->qemu_sig, sizeof(lr->qemu_sig), "%s", sig);
        rc = rd_len(c, &len, 0, QEMU_MAX, "qemu record length", "qemu record");
        if (!rc)
            rc = rd(c, len, &q->data, "qemu record");
        if (rc)
            return rc;
        q->len = len;
        lr->qemu_len = len;
        return 0;
    }
    if (!memcmp(sig, XCS_LEGACY_QEMU_SIG_XEND, XCS_LEGACY_QEMU_SIG_LEN)) {
        /* xend / libxl <= 4.0: qemu data runs to EOF, with no length. */
        size_t cap = 0;

        snprintf(lr->qemu_sig, sizeof(lr->qemu_sig), "%s", sig);
        q->to_eof = 1;
        for (;;) {
            size_t got;
            int r = xcs_source_get(c->in, 1u << 20, &p, &got);

            if (r < 0)
                return io_fail(c, "read");
            if (q->len + got > QEMU_MAX)
                return fail(c, XCS_LEGACY_EFORMAT, "qemu record over %u bytes", QEMU_MAX);
            if (q->len + got > cap) {
                uint8_t *nb;

                cap = cap ? cap : (1u << 20);
                while (cap < q->len + got)
                    cap *= 2;
                nb = realloc(q->owned, cap);
                if (!nb)
                    return io_fail(c, "malloc");
                q->owned = nb;
            }
            memcpy(q->owned + q->len, p, got);
            q->len += got;
            if (r > 0)
                break;
        }
        q->data = q->owned;
        lr->qemu_len = q->len;
        if (q->len < 4 || memcmp(q->data, "QEVM", 4))
            return fail(c, XCS_LEGACY_EFORMAT, "the qemu data after \"%s\" does not "
                                               "start with \"QEVM\"", sig);
        return 0;
    }
    for (int i = 0; i < XCS_LEGACY_QEMU_SIG_LEN; i++)
        if (sig[i] < 0x20 || sig[i] > 0x7e)
            sig[i] = '?';
    return fail(c, XCS_LEGACY_EFORMAT, "unrecognised qemu signature \"%s\"", sig);
}

/* libxl records closing one image: [xenstore] [emulator] END/CHECKPOINT_END */
static int out_libxl_tail(struct conv *c, const struct qemu *q, int final)
{
    uint32_t emu[2] = {XCS_EMULATOR_UNKNOWN, 0};
    int rc = 0;

    if (c->xs_len)
        rc = out_rec(c, XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA, emu, sizeof(emu),
                     c->xs, c->xs_len);
    if (!rc && q && !c->o->skip_qemu)
        rc = out_rec(c, XCS_LIBXL_REC_EMULATOR_CONTEXT, emu, sizeof(emu),
                     q->data, (size_t)q->len);
    if (!rc)
        rc = out_rec(c, final ? XCS_LIBXL_REC_END : XCS_LIBXL_REC_CHECKPOINT_END,
                     NULL, 0, NULL, 0);
    return rc;
}

/* One BODY + TAIL; *final says whether the stream ends here. */
static int image(struct conv *c, int *final)
{
    struct qemu q;
    int rc;

    memset(&q, 0, sizeof(q));
    c->nparams = 0;
    rc = body(c);
    if (rc)
        goto out;
    if (c->pv) {
        rc = pv_tail(c);
    } else {
        rc = hvm_tail(c);
        if (!rc)
            rc = read_qemu(c, &q); /* always read: skip_qemu only drops it */
    }
    if (rc)
        goto out;
    c->st->legacy.images++;
    *final = c->last_checkpoint || q.to_eof;
    rc = out_rec(c, *final ? XCS_REC_END : XCS_REC_CHECKPOINT, NULL, 0, NULL, 0);
    if (rc)
        goto out;
    if (c->libxl) {
        rc = out_libxl_tail(c, c->pv ? NULL : &q, *final);
    } else if (!c->pv && *final && !c->o->skip_qemu) {
        /* As Xen's converter: the legacy qemu record follows the image. */
        uint32_t len = (uint32_t)q.len;

        rc = out_put(c, XCS_LEGACY_QEMU_SIG_0002, XCS_LEGACY_QEMU_SIG_LEN);
        rc = rc ? rc : out_put(c, &len, 4);
        rc = rc ? rc : out_put(c, q.data, (size_t)q.len);
    }
    if (!rc && !*final)
        c->st->checkpoints++;
    if (!rc)
        rc = out_flush(c); /* a complete image is on the wire */

out:
    free(q.owned);
    return rc;
}

/*----- entry points -----*/

static int check_opts(struct conv *c)
{
    const struct xcs_legacy_opts *o = c->o;

    c->chunk = "options";
    if (o->width != 32 && o->width != 64)
        return fail(c, XCS_LEGACY_EARG, "width must be 32 or 64, not %u", o->width);
    if (o->guest != XCS_GUEST_PV && o->guest != XCS_GUEST_HVM)
        return fail(c, XCS_LEGACY_EARG, "guest type must be pv or hvm");
    if (o->out_format != XCS_FMT_LIBXC && o->out_format != XCS_FMT_LIBXL)
        return fail(c, XCS_LEGACY_EARG, "output format must be libxc or libxl");
    if (o->stream_type != XCS_STREAM_PLAIN && o->stream_type != XCS_STREAM_REMUS)
        return fail(c, XCS_LEGACY_EARG, "legacy streams are plain or remus, not colo");
    if (o->out_xl_header && o->out_format != XCS_FMT_LIBXL)
        return fail(c, XCS_LEGACY_EARG, "an xl header announces a libxl stream: "
                                        "use the libxl output format with it");
    if (c->out_fd >= 0 && o->guest == XCS_GUEST_HVM &&
        o->stream_type != XCS_STREAM_PLAIN && o->out_format == XCS_FMT_LIBXC &&
        !o->skip_qemu)
        return fail(c, XCS_LEGACY_EARG, "a bare libxc image has no place for each "
                                        "checkpoint's qemu record: use the libxl "
                                        "output format or skip qemu");
    return 0;
}

int xcs_legacy_run(struct xcs_source *in, int out_fd, const struct xcs_legacy_opts *opts,
                   char *err, size_t errlen)
{
    struct xcs_legacy_stats local;
    const struct xcs_source_fault prev = in->fault;
    struct conv c;
    int have_first = 0, final = 0, rc;
    uint64_t first = 0;

    memset(&c, 0, sizeof(c));
    memset(&local, 0, sizeof(local));
    c.in = in;
    /* in reports to c until the run ends, then to its previous reader */
    in->fault = (struct xcs_source_fault){rd_fault, &c};
    c.out_fd = out_fd;
    c.o = opts;
    c.st = opts->stats ? opts->stats : &local;
    memset(c.st, 0, sizeof(*c.st));
    c.st->min_pfn = UINT64_MAX;
    c.err = err;
    c.errlen = errlen;
    if (err && errlen)
        err[0] = 0;
    c.W = opts->width / 8;
    c.pv = opts->guest == XCS_GUEST_PV;
    c.libxl = opts->out_format == XCS_FMT_LIBXL;
    c.st->legacy.width = opts->width;

    rc = check_opts(&c);
    if (rc)
        goto out;
    choose_kcopy(&c);
    c.obuf = malloc(OBUF_SIZE);
    c.pfns = malloc(XCS_LEGACY_MAX_BATCH * sizeof(*c.pfns));
    c.sorted = malloc(XCS_LEGACY_MAX_BATCH * sizeof(*c.sorted));
    if (!c.obuf || !c.pfns || !c.sorted) {
        rc = io_fail(&c, "malloc");
        goto out;
    }
    if (opts->in_has_xl_header) {
        rc = xl_header(&c);
        if (rc)
            goto out;
    }
    at(&c, "p2m_size");
    rc = rd_ulong(&c, &c.st->legacy.p2m_size, "p2m_size");
    if (rc)
        goto out;
    if (c.st->legacy.p2m_size == 0 || c.st->legacy.p2m_size > UINT32_MAX) {
        rc = fail(&c, XCS_LEGACY_EFORMAT, "p2m_size 0x%llx is implausible (wrong "
                                          "width or not a legacy stream?)",
                  (unsigned long long)c.st->legacy.p2m_size);
        goto out;
    }
    rc = out_headers(&c);
    if (rc)
        goto out;
    if (c.pv) {
        rc = pv_extended_info(&c, &have_first, &first);
        if (rc)
            goto out;
    }
    rc = out_rec(&c, XCS_REC_STATIC_DATA_END, NULL, 0, NULL, 0);
    if (!rc && c.pv)
        rc = pv_p2m_frames(&c, have_first, first);
    if (rc)
        goto out;
    /* Without VCPU_INFO the legacy restorer assumed vcpu 0 alone. */
    c.vcpumap[0] = 1;

    for (;;) {
        /* The 2013 rule: a plain stream is one image from the start. */
        c.last_checkpoint = opts->stream_type == XCS_STREAM_PLAIN;
        rc = image(&c, &final);
        if (rc == XCS_LEGACY_EFORMAT && c.st->legacy.images > 0) {
            /* Remus: a later checkpoint cut short; the restorer would fail
             * over to the last complete one.  Output ends at a record edge. */
            c.st->failover = 1;
            snprintf(c.st->failover_reason, sizeof(c.st->failover_reason),
                     "checkpoint %u unreadable (offset %llu, chunk %.40s: %.250s); "
                     "the last complete one is checkpoint %u",
                     c.st->legacy.images + 1, (unsigned long long)c.st->err_offset,
                     c.st->err_chunk, c.st->err_reason, c.st->legacy.images);
            memset(c.st->err_reason, 0, sizeof(c.st->err_reason));
            c.st->err_chunk[0] = 0;
            if (err && errlen)
                err[0] = 0;
            rc = out_flush(&c);
            break;
        }
        if (rc || final)
            break;
        at(&c, "chunk header");
        rc = xcs_source_at_eof(in);
        if (rc < 0) {
            rc = io_fail(&c, "read");
            break;
        }
        if (rc) {
            rc = 0; /* Remus sender went away between checkpoints */
            break;
        }
        rc = 0;
    }
    if (!rc)
        rc = out_flush(&c);
    if (!rc && xcs_source_remaining(in) != UINT64_MAX)
        c.st->legacy.unread_bytes = xcs_source_remaining(in);

out:
    in->fault = prev;
    c.st->in_bytes = in->off;
    if (c.st->min_pfn == UINT64_MAX)
        c.st->min_pfn = 0;
    free(c.obuf);
    free(c.pfns);
    free(c.sorted);
    free(c.xs);
    return rc;
}

int xcs_legacy_convert(int in_fd, int out_fd, const struct xcs_legacy_opts *opts,
                       char *err, size_t errlen)
{
    struct xcs_source in;
    int rc;

    if (xcs_source_open(&in, in_fd, XCS_SOURCE_MAP | XCS_SOURCE_SEQ) < 0) {
        int e = errno;
        char nb[32];

        if (err && errlen)
            snprintf(err, errlen, "fstat: %s (%s)", strerror(e),
                     xcs_errno_name(e, nb, sizeof(nb)));
        errno = e;
        return XCS_LEGACY_EIO;
    }
    rc = xcs_legacy_run(&in, out_fd, opts, err, errlen);
    xcs_source_close(&in);
    return rc;
}
