/*
 * walker.c - the one v2/v3 stream walker (see walker.h).
 *
 * Written from shared/specs/xen-migration-facts.md sections 3-4.  One pass,
 * record by record, with a small state machine per layer.  The two layers'
 * record numbers overlap, so the walker always knows which layer owns the
 * next record header.
 */
#include "walker.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define XS_MAX (64u << 20) /* xenstore data we are willing to hold */

enum { LX_MORE = -1, LX_END = 0, LX_CHECKPOINT = 1, LX_EOF = 2 };

/*----- errors and position -----*/

static int vbad(struct xcs_walker *w, int errnum, const char *fmt, va_list ap)
{
    struct xcs_stream_error *e = &w->err;

    if (e->reason[0])
        return XCS_WALK_INVALID; /* report the FIRST error only */
    e->offset = w->at_off;
    snprintf(e->layer, sizeof(e->layer), "%s", w->at_layer ? w->at_layer : "");
    e->rtype = w->at_type;
    e->has_rtype = w->at_has_type;
    snprintf(e->record, sizeof(e->record), "%s", w->at_name ? w->at_name : "");
    e->errnum = errnum;
    vsnprintf(e->reason, sizeof(e->reason), fmt, ap);
    return XCS_WALK_INVALID;
}

int xcs_walk_bad(struct xcs_walker *w, int errnum, const char *fmt, ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = vbad(w, errnum, fmt, ap);
    va_end(ap);
    return rc;
}

/* A format error (EINVAL), the common case. */
#define bad(w, ...) xcs_walk_bad((w), EINVAL, __VA_ARGS__)

int xcs_walk_io_error(struct xcs_walker *w, const char *what)
{
    int err = errno;
    char nb[32];

    if (!w->err.reason[0]) {
        snprintf(w->err.reason, sizeof(w->err.reason), "%s: %s (%s)", what,
                 strerror(err), xcs_errno_name(err, nb, sizeof(nb)));
        w->err.offset = w->in->off;
        snprintf(w->err.layer, sizeof(w->err.layer), "%s",
                 w->at_layer ? w->at_layer : "");
        snprintf(w->err.record, sizeof(w->err.record), "%s",
                 w->at_name ? w->at_name : "stream");
        w->err.errnum = err;
    }
    errno = err;
    return -1;
}

static void warn(struct xcs_walker *w, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void warn(struct xcs_walker *w, const char *fmt, ...)
{
    char text[400];
    va_list ap;

    if (!w->ops->on_warning)
        return;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    w->ops->on_warning(w, text);
}

static void at(struct xcs_walker *w, const char *layer, const char *name)
{
    w->at_off = w->in->off;
    w->at_layer = layer;
    w->at_name = name;
    w->at_has_type = 0;
    w->at_type = 0;
}

static void at_rec(struct xcs_walker *w, uint64_t off, const char *layer,
                   uint32_t type, const char *name)
{
    w->at_off = off;
    w->rec_off = off;
    w->at_layer = layer;
    w->at_type = type;
    w->at_has_type = 1;
    w->at_name = name;
}

int xcs_walk_pv(const struct xcs_walker *w)
{
    return w->dtype == XCS_DHDR_TYPE_X86_PV;
}

/*----- reading -----*/

/*
 * Consume exactly n bytes of `what` (or skip them: p NULL); a short stream
 * is invalid.
 */
static int need(struct xcs_walker *w, uint64_t n, const uint8_t **p, const char *what)
{
    return xcs_source_must(w->in, n, p, what);
}

/* The input's fault report (xcs_source_fault): into w->err. */
static int need_fault(void *w, int read_error, const char *why)
{
    return read_error ? xcs_walk_io_error(w, why) : xcs_walk_bad(w, EIO, "%s", why);
}

int xcs_walk_skip(struct xcs_walker *w, uint64_t n, const char *what)
{
    return need(w, n, NULL, what);
}

/* Body of a record (length + padding); the padding is zero (verifier). */
static int record_body(struct xcs_walker *w, uint32_t len, const uint8_t **p)
{
    uint32_t padded = xcs_rec_padded(len);
    int rc = need(w, padded, p, "record body");

    if (rc)
        return rc;
    if ((w->opts->flags & XCS_WALK_PADDING) && !xcs_zeros(*p + len, padded - len))
        return bad(w, "padding containing non-zero bytes");
    return 0;
}

/* A body nobody reads: skipped, its last padded word checked (verifier). */
static int skip_body(struct xcs_walker *w, uint32_t len, uint32_t from,
                     const char *what)
{
    const uint8_t *q;
    int rc;

    if (!(w->opts->flags & XCS_WALK_PADDING))
        return xcs_walk_skip(w, (uint64_t)xcs_rec_padded(len) - from, what);
    rc = xcs_walk_skip(w, (len & ~7u) - from, what);
    if (!rc && (len & 7)) {
        rc = need(w, 8, &q, what);
        if (!rc && !xcs_zeros(q + (len & 7), 8 - (len & 7)))
            rc = bad(w, "padding containing non-zero bytes");
    }
    return rc;
}

/* A fixed-size header of `layer`: where it starts, then its bytes. */
static int header(struct xcs_walker *w, const char *layer, const char *name,
                  size_t size, const uint8_t **p)
{
    at(w, layer, name);
    return need(w, size, p, name);
}

/* A header parser's verdict (codec.h: NULL, or why it is invalid). */
static int parsed(struct xcs_walker *w, const char *why)
{
    return why ? bad(w, "%s", why) : 0;
}

/*
 * Sets rc: read the `layer` header `name` (size bytes) and decode it into *h
 * with codec.h's PARSE.  Every fixed header the walker reads goes through
 * here; a macro because each codec parser takes its own struct.
 */
#define READ_HEADER(rc, w, layer, name, size, parse, h)                     \
    do {                                                                   \
        const uint8_t *hp_;                                                \
        char why_[XCS_WHY_LEN];                                            \
                                                                           \
        (rc) = header((w), (layer), (name), (size), &hp_);                 \
        if (!(rc))                                                         \
            (rc) = parsed((w), parse(hp_, (h), why_, sizeof(why_)));       \
    } while (0)

/* A record length over the restorer's cap (XCS_REC_LENGTH_MAX). */
static int over_cap(struct xcs_walker *w, uint32_t len, uint32_t cap)
{
    return xcs_walk_bad(w, EMSGSIZE, "record length %u exceeds %u: it exceeds "
                        "the restorer's limit", len, cap);
}

/*----- PAGE_DATA -----*/

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return (x > y) - (x < y);
}

/* Duplicate pfns in one record (XTAB entries excepted). */
static int page_dups(struct xcs_walker *w, const uint8_t *words, uint32_t count)
{
    uint64_t prev = 0;
    int first = 1, sorted = 1;
    size_t n = 0;

    for (uint32_t i = 0; i < count; i++) {
        uint64_t v = xcs_get_le64(words + 8 * (size_t)i);
        uint64_t pfn = v & XCS_PAGE_DATA_PFN_MASK;

        if ((v >> 60) == 0xf)
            continue;
        if (!first && pfn <= prev) {
            sorted = 0;
            break;
        }
        prev = pfn;
        first = 0;
    }
    if (sorted)
        return 0; /* the common case: senders write ascending pfns */
    if (w->sortbuf_len < count) {
        uint64_t *nb = realloc(w->sortbuf, (size_t)count * sizeof(*nb));

        if (!nb)
            return xcs_walk_io_error(w, "malloc");
        w->sortbuf = nb;
        w->sortbuf_len = count;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t v = xcs_get_le64(words + 8 * (size_t)i);

        if ((v >> 60) != 0xf)
            w->sortbuf[n++] = v & XCS_PAGE_DATA_PFN_MASK;
    }
    qsort(w->sortbuf, n, sizeof(*w->sortbuf), cmp_u64);
    for (size_t i = 1; i < n; i++)
        if (w->sortbuf[i] == w->sortbuf[i - 1])
            return bad(w, "duplicate pfn 0x%llx in one record",
                       (unsigned long long)w->sortbuf[i]);
    return 0;
}

static int page_data(struct xcs_walker *w, uint32_t len)
{
    const uint8_t *p, *words;
    uint32_t count, res, npages = 0;
    uint64_t expect;
    int rc;

    if (len < 8)
        return bad(w, "length %u: a PAGE_DATA record needs a header and a pfn", len);
    rc = need(w, 8, &p, "PAGE_DATA header");
    if (rc)
        return rc;
    count = xcs_get_le32(p);
    res = xcs_get_le32(p + 4);
    if (res)
        return bad(w, "reserved field set (0x%x)", res);
    if (count == 0)
        return bad(w, "batch of 0 pages (count is 0)");
    if (w->opts->max_batch && count > w->opts->max_batch)
        return bad(w, "batch of %u pages (must be 1..%u)", count, w->opts->max_batch);
    if ((uint64_t)count * 8 > len - 8)
        return bad(w, "count %u needs %llu bytes of pfns, the record has %u",
                   count, (unsigned long long)count * 8, len - 8);
    rc = need(w, (size_t)count * 8, &words, "PAGE_DATA pfns");
    if (rc)
        return rc;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t v = xcs_get_le64(words + 8 * (size_t)i);
        unsigned int type = (unsigned int)(v >> 60);

        if (v & XCS_PAGE_DATA_RSVD_MASK)
            return bad(w, "reserved bits set in pfn[%u]: 0x%016llx", i,
                       (unsigned long long)(v & XCS_PAGE_DATA_RSVD_MASK));
        if (type >= 5 && type <= 8)
            return bad(w, "invalid page type %u in pfn[%u] (0x%016llx)", type, i,
                       (unsigned long long)v);
        if (type < 0xd)
            npages++;
    }
    expect = 8 + (uint64_t)count * 8 + (uint64_t)npages * XCS_PAGE_SIZE;
    if (len != expect)
        return bad(w, "length %u, expected %llu = 8 + %llu + %llu for %u pfns "
                      "and %u pages", len, (unsigned long long)expect,
                   (unsigned long long)count * 8,
                   (unsigned long long)npages * XCS_PAGE_SIZE, count, npages);
    if (xcs_walk_pv(w))
        for (uint32_t i = 0; i < count; i++) {
            uint64_t v = xcs_get_le64(words + 8 * (size_t)i);
            uint64_t pfn = v & XCS_PAGE_DATA_PFN_MASK;

            if (pfn > w->p2m_end_pfn && (v >> 60) != 0xf)
                return bad(w, "pfn 0x%llx (pfn[%u]) out of range: the P2M frames "
                              "cover pfns 0..0x%llx", (unsigned long long)pfn, i,
                           (unsigned long long)w->p2m_end_pfn);
        }
    if (w->opts->flags & XCS_WALK_DUPS) {
        rc = page_dups(w, words, count);
        if (rc)
            return rc;
    }
    /* The client consumes the pages: maps, moves, buffers or skips them. */
    if (w->ops->on_page_batch)
        return w->ops->on_page_batch(w, words, count, npages);
    return xcs_walk_skip(w, (uint64_t)npages * XCS_PAGE_SIZE, "page data");
}

/*----- other libxc records -----*/

static int check_vcpu(struct xcs_walker *w, uint32_t type, const uint8_t *p, uint32_t len)
{
    uint32_t id, res;

    if (len < 8)
        return bad(w, "length %u: a vcpu record needs at least 8 bytes", len);
    id = xcs_get_le32(p);
    res = xcs_get_le32(p + 4);
    if (res)
        return bad(w, "reserved field set (0x%x)", res);
    if (id >= XCS_WALK_MAX_VCPUS)
        return bad(w, "vcpu id %u out of range (max %u)", id, XCS_WALK_MAX_VCPUS - 1);
    if (len == 8 && type != XCS_REC_X86_PV_VCPU_BASIC)
        warn(w, "%s for vcpu %u with zero content (tolerated, spec erratum 1)",
             xcs_libxc_rec_name(type), id);
    if (type == XCS_REC_X86_PV_VCPU_BASIC) {
        if (len == 8)
            return bad(w, "vcpu %u basic context is empty", id);
        w->have_basic = 1;
        if (!(w->vcpu_seen[id / 8] & (1u << (id % 8)))) {
            w->vcpu_seen[id / 8] |= (uint8_t)(1u << (id % 8));
            w->vcpus++;
        }
    }
    return 0;
}

static int check_mandatory(struct xcs_walker *w)
{
    if (w->mandatory_done || !(w->opts->flags & XCS_WALK_MANDATORY))
        return 0;
    w->mandatory_done = 1;
    if (!xcs_walk_pv(w)) {
        if (!w->have_ctx)
            return bad(w, "HVM stream lacks the mandatory HVM_CONTEXT record");
        if (!w->have_params)
            return bad(w, "HVM stream lacks the mandatory HVM_PARAMS record");
        if (!w->have_tsc) {
            if (w->hdrs.dhdr.xen_major != 0)
                return bad(w, "HVM stream lacks the mandatory X86_TSC_INFO record");
            warn(w, "no X86_TSC_INFO (tolerated: converted from a legacy stream)");
        }
    } else {
        if (!w->p2m)
            return bad(w, "PV stream lacks the mandatory X86_PV_P2M_FRAMES record");
        if (!w->have_shinfo)
            return bad(w, "PV stream lacks the mandatory SHARED_INFO record");
        if (!w->have_basic)
            return bad(w, "PV stream lacks a mandatory X86_PV_VCPU_BASIC record");
    }
    return 0;
}

static int is_pv_only(uint32_t t)
{
    return t == XCS_REC_X86_PV_INFO || t == XCS_REC_X86_PV_P2M_FRAMES ||
           t == XCS_REC_X86_PV_VCPU_BASIC || t == XCS_REC_X86_PV_VCPU_EXTENDED ||
           t == XCS_REC_X86_PV_VCPU_XSAVE || t == XCS_REC_SHARED_INFO ||
           t == XCS_REC_X86_PV_VCPU_MSRS;
}

static int is_static(uint32_t t)
{
    return t == XCS_REC_X86_PV_INFO || t == XCS_REC_X86_CPUID_POLICY ||
           t == XCS_REC_X86_MSR_POLICY;
}

/* Order, guest-type and stream-type rules that depend only on the type. */
static int libxc_order(struct xcs_walker *w, uint32_t t)
{
    const char *name = xcs_libxc_rec_name(t);
    int pv = xcs_walk_pv(w);

    if (!pv && is_pv_only(t))
        return bad(w, "%s is not valid in an HVM stream (PV only)", name);
    if (pv && (t == XCS_REC_HVM_CONTEXT || t == XCS_REC_HVM_PARAMS))
        return bad(w, "%s is not valid in a PV stream (HVM only)", name);
    if (pv && !w->pv_info && t != XCS_REC_X86_PV_INFO)
        return bad(w, "X86_PV_INFO must be the first record of a PV stream, "
                      "found %s", name);
    if (t == XCS_REC_STATIC_DATA_END) {
        if (w->hdrs.ihdr.version < 3)
            return bad(w, "STATIC_DATA_END in a v2 stream");
        if (w->sde)
            return bad(w, "second STATIC_DATA_END");
        return 0;
    }
    if (is_static(t)) {
        if (w->hdrs.ihdr.version >= 3 && w->sde)
            return bad(w, "%s after STATIC_DATA_END", name);
        if (w->hdrs.ihdr.version < 3 && t != XCS_REC_X86_PV_INFO)
            return bad(w, "%s in a v2 stream", name);
        return 0;
    }
    if (t == XCS_REC_TOOLSTACK || t == XCS_REC_CHECKPOINT_DIRTY_PFN_LIST)
        return 0; /* rejected by their own checks */
    /* Everything else is memory, register or control content. */
    if (w->hdrs.ihdr.version >= 3 && !w->sde)
        return bad(w, "%s before STATIC_DATA_END", name);
    if (w->hdrs.ihdr.version < 3 && !w->sde) {
        /* v2: implied by the first memory record (facts 3.1) */
        w->sde = 1;
        if (w->ops->on_record) {
            int rc = w->ops->on_record(w, XCS_REC_STATIC_DATA_END, NULL, 0);

            if (rc)
                return rc;
        }
    }
    if (pv && !w->p2m &&
        (t == XCS_REC_PAGE_DATA || t == XCS_REC_X86_PV_VCPU_BASIC ||
         t == XCS_REC_X86_PV_VCPU_EXTENDED || t == XCS_REC_X86_PV_VCPU_XSAVE ||
         t == XCS_REC_X86_PV_VCPU_MSRS))
        return bad(w, "%s before X86_PV_P2M_FRAMES", name);
    return 0;
}

/* The body's format; *how = LX_END / LX_CHECKPOINT when the image stops. */
static int libxc_check(struct xcs_walker *w, uint32_t t, const uint8_t *p,
                       uint32_t len, int *how)
{
    switch (t) {
    case XCS_REC_END:
        if (len)
            return bad(w, "END with length %u", len);
        if (w->hdrs.ihdr.version >= 3 && !w->sde)
            return bad(w, "no STATIC_DATA_END in a v3 stream");
        *how = LX_END;
        return check_mandatory(w);

    case XCS_REC_X86_PV_INFO:
        if (w->pv_info)
            return bad(w, "second X86_PV_INFO");
        if (len != 8)
            return bad(w, "length %u (expected 8)", len);
        if (p[0] != 4 && p[0] != 8)
            return bad(w, "guest width %u (expected 4 or 8)", p[0]);
        if (p[1] != 3 && p[1] != 4)
            return bad(w, "pagetable levels %u (expected 3 or 4)", p[1]);
        if (!xcs_zeros(p + 2, 6))
            return bad(w, "reserved bytes set");
        if ((p[0] == 8) != (p[1] == 4))
            return bad(w, "guest width %u with %u pagetable levels (64-bit guests "
                          "use 4, 32-bit PAE guests 3)", p[0], p[1]);
        w->pv_info = 1;
        w->pv_width = p[0];
        w->pv_levels = p[1];
        return 0;

    case XCS_REC_X86_PV_P2M_FRAMES: {
        uint32_t start, endp, fpp;
        uint64_t need_frames, have;

        if (len < 8 || len % 8)
            return bad(w, "length %u (expected at least 8, a multiple of 8)", len);
        start = xcs_get_le32(p);
        endp = xcs_get_le32(p + 4);
        if (start > endp)
            return bad(w, "start pfn 0x%x after end pfn 0x%x", start, endp);
        fpp = XCS_PAGE_SIZE / w->pv_width;
        need_frames = endp / fpp - start / fpp + 1;
        have = (len - 8) / 8;
        if (have < need_frames)
            return bad(w, "%llu frames cannot cover pfns 0x%x..0x%x (%llu needed)",
                       (unsigned long long)have, start, endp,
                       (unsigned long long)need_frames);
        if (!w->p2m || endp > w->p2m_end_pfn)
            w->p2m_end_pfn = endp;
        w->p2m = 1;
        return 0;
    }

    case XCS_REC_X86_PV_VCPU_BASIC:
    case XCS_REC_X86_PV_VCPU_EXTENDED:
    case XCS_REC_X86_PV_VCPU_XSAVE:
    case XCS_REC_X86_PV_VCPU_MSRS:
        return check_vcpu(w, t, p, len);

    case XCS_REC_SHARED_INFO:
        if (len != XCS_PAGE_SIZE)
            return bad(w, "length %u (expected 4096)", len);
        w->have_shinfo = 1;
        return 0;

    case XCS_REC_X86_TSC_INFO:
        if (len != 24)
            return bad(w, "length %u (expected 24)", len);
        if (xcs_get_le32(p + 20))
            return bad(w, "reserved field set (0x%x)", xcs_get_le32(p + 20));
        w->have_tsc = 1;
        return 0;

    case XCS_REC_HVM_CONTEXT:
        if (len == 0)
            return bad(w, "empty HVM context");
        w->have_ctx = 1;
        return 0;

    case XCS_REC_HVM_PARAMS: {
        uint32_t count;

        if (len < 8)
            return bad(w, "length %u (expected at least 8)", len);
        count = xcs_get_le32(p);
        if (xcs_get_le32(p + 4))
            return bad(w, "reserved field set (0x%x)", xcs_get_le32(p + 4));
        if ((uint64_t)8 + (uint64_t)count * 16 != len)
            return bad(w, "length %u, expected 8 + 16 * %u", len, count);
        if (count == 0)
            warn(w, "HVM_PARAMS with no entries (tolerated, spec erratum 1)");
        w->have_params = 1;
        return 0;
    }

    case XCS_REC_TOOLSTACK:
        return bad(w, "deprecated TOOLSTACK record (no v2 restorer accepts it)");

    case XCS_REC_VERIFY:
        if (len)
            return bad(w, "VERIFY with length %u", len);
        return 0;

    case XCS_REC_CHECKPOINT:
        if (len)
            return bad(w, "CHECKPOINT with length %u", len);
        if (w->opts->stream_type == XCS_STREAM_PLAIN)
            return bad(w, "CHECKPOINT in a plain stream, a non-checkpointed one "
                          "(pass the stream type remus or colo for a "
                          "checkpointed stream)");
        *how = LX_CHECKPOINT;
        return check_mandatory(w);

    case XCS_REC_CHECKPOINT_DIRTY_PFN_LIST:
        return bad(w, "CHECKPOINT_DIRTY_PFN_LIST belongs on the COLO back "
                      "channel, not in a migration stream");

    case XCS_REC_STATIC_DATA_END:
        if (len)
            return bad(w, "STATIC_DATA_END with length %u", len);
        w->sde = 1;
        return 0;

    case XCS_REC_X86_CPUID_POLICY:
        if (len < 24 || len % 24)
            return bad(w, "length %u (expected a non-zero multiple of 24)", len);
        return 0;

    case XCS_REC_X86_MSR_POLICY:
        if (len < 16 || len % 16)
            return bad(w, "length %u (expected a non-zero multiple of 16)", len);
        for (uint32_t i = 0; i < len; i += 16)
            if (xcs_get_le32(p + i + 4))
                return bad(w, "MSR entry %u has flags 0x%x (must be zero)",
                           i / 16, xcs_get_le32(p + i + 4));
        return 0;
    }
    return bad(w, "unhandled record type 0x%x", t);
}

static int libxc_headers(struct xcs_walker *w)
{
    int rc;

    w->hdrs.libxc = 1;
    w->libxc_offset = w->in->off;
    READ_HEADER(rc, w, "libxc", "image header", XCS_IHDR_SIZE, xcs_ihdr_parse, &w->hdrs.ihdr);
    if (!rc)
        READ_HEADER(rc, w, "libxc", "domain header", XCS_DHDR_SIZE, xcs_dhdr_parse,
                    &w->hdrs.dhdr);
    if (rc)
        return rc;
    w->dtype = w->hdrs.dhdr.type;
    return w->ops->on_image ? w->ops->on_image(w) : 0;
}

/*
 * The next record header of a layer.  may_end: after a complete checkpoint,
 * EOF here ends the stream (LX_EOF) instead of truncating it.
 */
static int record_header(struct xcs_walker *w, int may_end, const char *layer,
                         uint32_t *t, uint32_t *len)
{
    uint64_t off = w->in->off;
    const uint8_t *p;
    int rc;

    at(w, layer, "record header");
    if (may_end && w->checkpoints > 0) {
        int e = xcs_source_at_eof(w->in);

        if (e < 0)
            return xcs_walk_io_error(w, "read");
        if (e)
            return LX_EOF;
    }
    rc = need(w, XCS_RHDR_SIZE, &p, "record header");
    if (rc)
        return rc;
    *t = xcs_get_le32(p);
    *len = xcs_get_le32(p + 4);
    at_rec(w, off, layer, *t, strcmp(layer, "libxc") ? xcs_libxl_rec_name(*t)
                                                       : xcs_libxc_rec_name(*t));
    w->records_since_cp++;
    return w->ops->on_header ? w->ops->on_header(w, layer, *t, *len) : 0;
}

/*
 * libxc records until END (LX_END), CHECKPOINT (LX_CHECKPOINT, checkpointed
 * streams) or, after a complete checkpoint, EOF at a record boundary
 * (LX_EOF: the restorer fails over to the last checkpoint).
 */
static int libxc_records(struct xcs_walker *w, int *how)
{
    const uint8_t *p;
    int rc;

    for (;;) {
        uint32_t t, len;

        *how = LX_MORE;
        rc = record_header(w, w->opts->stream_type != XCS_STREAM_PLAIN,
                           "libxc", &t, &len);
        if (rc == LX_EOF)
            *how = LX_EOF;
        if (rc)
            return rc == LX_EOF ? 0 : rc;
        if (len > XCS_REC_LENGTH_MAX)
            return over_cap(w, len, XCS_REC_LENGTH_MAX);
        if (t & XCS_REC_TYPE_OPTIONAL) {
            /* Optional: skip, as libxc's restore does. */
            w->optional_count++;
            w->optional_bytes += len;
            rc = skip_body(w, len, 0, "optional record body");
            if (rc)
                return rc;
            continue;
        }
        if (t >= XCS_REC_TYPE_COUNT)
            return bad(w, "unknown mandatory record type 0x%x", t);
        w->libxc_count[t]++;
        w->libxc_bytes[t] += len;
        rc = libxc_order(w, t);
        if (rc)
            return rc;
        if (t == XCS_REC_PAGE_DATA) {
            rc = page_data(w, len);
        } else {
            rc = record_body(w, len, &p);
            if (!rc)
                rc = libxc_check(w, t, p, len, how);
            if (!rc && w->ops->on_record)
                rc = w->ops->on_record(w, t, p, len);
        }
        if (rc || *how != LX_MORE)
            return rc;
    }
}

/* A checkpoint is complete (CHECKPOINT, or CHECKPOINT_END when wrapped). */
static int checkpoint(struct xcs_walker *w)
{
    w->checkpoints++;
    w->records_since_cp = 0;
    return w->ops->on_checkpoint ? w->ops->on_checkpoint(w) : 0;
}

/* EOF at a record boundary after a complete checkpoint: failover. */
static void ended_in_checkpoint(struct xcs_walker *w, int always)
{
    w->ended = 2;
    if (always || w->records_since_cp)
        warn(w, "stream ends inside checkpoint %u: a restore fails over "
                "to checkpoint %u", w->checkpoints + 1, w->checkpoints);
}

/*----- trailing bytes -----*/

static int check_trailing(struct xcs_walker *w, int libxc_outer)
{
    const uint8_t *p;
    size_t got;
    int e;

    if (!(w->opts->flags & XCS_WALK_TRAILING))
        return 0;
    at(w, w->hdrs.libxc && libxc_outer ? "libxc" : "libxl", "trailing data");
    if (libxc_outer && !xcs_walk_pv(w)) {
        /*
         * Xen's convert-legacy-stream appends the legacy qemu record
         * ("DeviceModelRecord0002", u32 length, data) after a bare libxc
         * image.  Accept exactly that, ending at EOF.
         */
        if (xcs_source_peek(w->in, XCS_LEGACY_QEMU_SIG_LEN + 4, &p, &got) < 0)
            return xcs_walk_io_error(w, "read");
        if (got == XCS_LEGACY_QEMU_SIG_LEN + 4 &&
            !memcmp(p, XCS_LEGACY_QEMU_SIG_0002, XCS_LEGACY_QEMU_SIG_LEN)) {
            uint32_t qlen = xcs_get_le32(p + XCS_LEGACY_QEMU_SIG_LEN);
            int rc;

            w->at_name = "qemu record after END";
            rc = xcs_walk_skip(w, XCS_LEGACY_QEMU_SIG_LEN + 4 + (uint64_t)qlen,
                               "qemu record");
            if (rc)
                return rc;
            w->qemu_trailer_len = qlen;
            at(w, "libxc", "trailing data");
        }
    }
    /* The one read past the stream: a byte after the outermost END? */
    e = xcs_source_at_eof(w->in);
    if (e < 0)
        return xcs_walk_io_error(w, "read");
    if (!e) {
        uint64_t left = xcs_source_remaining(w->in);

        if (left != UINT64_MAX)
            return bad(w, "%llu bytes after END", (unsigned long long)left);
        return bad(w, "bytes after END");
    }
    return 0;
}

/*----- libxl layer -----*/

static int check_emulator(struct xcs_walker *w, uint32_t t, const uint8_t *p, uint32_t len)
{
    uint32_t id;

    if (len < 8)
        return bad(w, "length %u too short: an emulator record needs at least "
                      "8 bytes", len);
    id = xcs_get_le32(p);
    if (id > XCS_EMULATOR_QEMU_UPSTREAM)
        return bad(w, "unknown emulator id 0x%x", id);
    if (t == XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA && len > 8) {
        const uint8_t *d = p + 8;
        uint32_t n = len - 8, strings = 0;

        if (d[n - 1] != 0)
            return bad(w, "xenstore data not NUL terminated");
        for (uint32_t i = 0; i < n; i++)
            strings += d[i] == 0;
        if (strings % 2)
            return bad(w, "odd number of xenstore strings (%u): expected an even "
                          "number (key/value pairs)", strings);
    }
    return 0;
}

/* A libxl record's body; an emulator context may be read in part only. */
static int libxl_body(struct xcs_walker *w, uint32_t t, uint32_t len, const uint8_t **p)
{
    uint32_t padded = xcs_rec_padded(len);
    int rc;

    if (t == XCS_LIBXL_REC_EMULATOR_CONTEXT && len > 64 &&
        !(w->opts->flags & XCS_WALK_EMU_BODY)) {
        /* Only the 8-byte emulator header and the padding matter. */
        rc = need(w, 8, p, "emulator header");
        if (rc)
            return rc;
        if (xcs_get_le32(*p) > XCS_EMULATOR_QEMU_UPSTREAM)
            return bad(w, "unknown emulator id 0x%x", xcs_get_le32(*p));
        *p = NULL;
        return skip_body(w, len, 8, "emulator context");
    }
    if (t == XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA && padded > XS_MAX)
        return xcs_walk_bad(w, EMSGSIZE, "xenstore data of %u bytes: larger "
                            "than this checker's %u-byte limit", len, XS_MAX);
    return record_body(w, len, p);
}

static int libxl_stream(struct xcs_walker *w)
{
    const uint8_t *p;
    int libxc_seen = 0, libxc_done = 0, in_cp = 0, how, rc;

    w->hdrs.libxl = 1;
    READ_HEADER(rc, w, "libxl", "libxl header", XCS_LIBXL_HDR_SIZE, xcs_libxl_hdr_parse,
                &w->hdrs.libxl_hdr);
    if (rc)
        return rc;
    for (;;) {
        uint32_t t, len;

        rc = record_header(w, in_cp, "libxl", &t, &len);
        if (rc == LX_EOF)
            ended_in_checkpoint(w, 1);
        if (rc)
            return rc == LX_EOF ? 0 : rc;
        if (t >= XCS_LIBXL_REC_TYPE_COUNT)
            return bad(w, "unknown libxl record type 0x%x: not valid here%s", t,
                       (t & XCS_REC_TYPE_OPTIONAL)
                           ? " (libxl has no optional records: it rejects any unknown type)"
                           : "");
        /*
         * libxl has no length cap of its own (the libxc layer's is
         * XCS_REC_LENGTH_MAX), but a record is padded to 8 bytes: a length
         * whose padding overflows 32 bits cannot be one, and would wrap the
         * padded size to 0 (a 4 GiB read past the body, found by fuzz_scan).
         */
        if (len > UINT32_MAX - (XCS_REC_ALIGN - 1))
            return bad(w, "length 0x%x: no record can be that long", len);
        if (w->opts->libxl_len_max && len > w->opts->libxl_len_max)
            return over_cap(w, len, w->opts->libxl_len_max);
        w->libxl_count[t]++;
        w->libxl_bytes[t] += len;
        rc = libxl_body(w, t, len, &p);
        if (rc)
            return rc;

        switch (t) {
        case XCS_LIBXL_REC_END:
            if (len)
                return bad(w, "END with length %u", len);
            if (!libxc_seen)
                return bad(w, "END without a LIBXC_CONTEXT record: no libxc image");
            if (in_cp)
                return bad(w, "END inside a checkpoint (expected CHECKPOINT_END)");
            if (!libxc_done)
                return bad(w, "END before the libxc image ended");
            w->ended = 1;
            return check_trailing(w, 0);

        case XCS_LIBXL_REC_LIBXC_CONTEXT:
            if (len)
                return bad(w, "LIBXC_CONTEXT with length %u", len);
            if (libxc_seen)
                return bad(w, "second LIBXC_CONTEXT");
            libxc_seen = 1;
            rc = libxc_headers(w);
            if (rc)
                return rc;
            goto run_libxc;

        case XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA:
        case XCS_LIBXL_REC_EMULATOR_CONTEXT:
            if (p) {
                rc = check_emulator(w, t, p, len);
                if (rc)
                    return rc;
            }
            if (w->ops->on_libxl_record) {
                rc = w->ops->on_libxl_record(w, t, p, len);
                if (rc)
                    return rc;
            }
            continue;

        case XCS_LIBXL_REC_CHECKPOINT_END:
            if (len)
                return bad(w, "CHECKPOINT_END with length %u", len);
            if (w->opts->stream_type == XCS_STREAM_PLAIN)
                return bad(w, "CHECKPOINT_END in a plain stream");
            if (!in_cp)
                return bad(w, "CHECKPOINT_END without a libxc CHECKPOINT before it");
            in_cp = 0;
            rc = checkpoint(w);
            if (rc)
                return rc;
            goto run_libxc; /* the libxc layer owns the fd again */

        case XCS_LIBXL_REC_CHECKPOINT_STATE:
            if (len == 0)
                return bad(w, "empty CHECKPOINT_STATE");
            if (w->opts->stream_type != XCS_STREAM_COLO)
                return bad(w, "CHECKPOINT_STATE outside a COLO stream");
            if (len != 8)
                return bad(w, "length %u (expected 8)", len);
            if (xcs_get_le32(p) > 3)
                return bad(w, "unknown checkpoint state %u", xcs_get_le32(p));
            continue;
        }
        return bad(w, "unhandled libxl record type %u", t);

    run_libxc:
        rc = libxc_records(w, &how);
        if (rc)
            return rc;
        if (how == LX_END) {
            libxc_done = 1;
        } else if (how == LX_CHECKPOINT) {
            in_cp = 1;
        } else {
            ended_in_checkpoint(w, 0);
            return 0;
        }
    }
}

static int libxc_stream(struct xcs_walker *w)
{
    int how, rc;

    rc = libxc_headers(w);
    if (rc)
        return rc;
    for (;;) {
        rc = libxc_records(w, &how);
        if (rc)
            return rc;
        if (how == LX_END) {
            w->ended = 1;
            return check_trailing(w, 1);
        }
        if (how == LX_EOF) {
            ended_in_checkpoint(w, 0);
            return 0;
        }
        /* No libxl layer: the next checkpoint's records follow directly. */
        rc = checkpoint(w);
        if (rc)
            return rc;
    }
}

/*----- xl header -----*/

static int xl_header(struct xcs_walker *w)
{
    char why[XCS_WHY_LEN];
    const struct xcs_xl_hdr *h = &w->hdrs.xl_hdr;
    const uint8_t *p;
    uint32_t max = w->opts->xl_optdata_max;
    int rc;

    w->hdrs.xl = 1;
    READ_HEADER(rc, w, "xl", "xl header", XCS_XL_HDR_SIZE, xcs_xl_hdr_parse, &w->hdrs.xl_hdr);
    if (rc)
        return rc;
    if (max && h->optlen > max)
        return xcs_walk_bad(w, EMSGSIZE, "xl optional data of %u bytes "
                            "exceeds %u", h->optlen, max);
    if (h->optlen >= 4) {
        rc = need(w, 4, &p, "xl config length");
        if (rc)
            return rc;
        w->hdrs.xl_config_len = xcs_get_le32(p);
        if (xcs_xl_config_check(h, w->hdrs.xl_config_len, why, sizeof(why)))
            return bad(w, "%s", why);
        rc = xcs_walk_skip(w, h->optlen - 4, "xl optional data");
    } else {
        rc = xcs_walk_skip(w, h->optlen, "xl optional data");
    }
    if (rc)
        return rc;
    w->xl_legacy = !(h->mflags & XCS_XL_MFLAG_STREAMV2);
    return 0;
}

/*----- entry point -----*/

void xcs_walk_attach(struct xcs_walker *w, struct xcs_source *in,
                     const struct xcs_walk_opts *opts, const struct xcs_walk_ops *ops,
                     void *data)
{
    w->in = in;
    w->opts = opts;
    w->ops = ops;
    w->data = data;
}

int xcs_walk(struct xcs_walker *w)
{
    int rc;

    w->in->fault = (struct xcs_source_fault){need_fault, w};
    switch (w->opts->start) {
    case XCS_FMT_XL:
        rc = xl_header(w);
        if (rc || w->xl_legacy)
            return rc;
        return libxl_stream(w);
    case XCS_FMT_LIBXL:
        return libxl_stream(w);
    case XCS_FMT_LIBXC:
        return libxc_stream(w);
    default:
        break;
    }
    at(w, "", "format detection");
    return bad(w, "no format to walk");
}

void xcs_walk_release(struct xcs_walker *w)
{
    free(w->sortbuf);
    w->sortbuf = NULL;
    w->sortbuf_len = 0;
}
