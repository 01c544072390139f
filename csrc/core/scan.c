/*
 * scan.c - the native stream scanner/verifier (see xcs_scan.h).
 *
 * Written from shared/specs/xen-migration-facts.md sections 2-4.  The scan
 * is one pass, record by record, with a small state machine per layer:
 *
 *   xl header -> libxl records -> (LIBXC_CONTEXT) libxc image -> libxl ...
 *
 * In a checkpointed stream the libxc layer hands the fd back at CHECKPOINT;
 * the libxl layer reads up to CHECKPOINT_END and hands it back again.  The
 * two layers' record numbers overlap, so the scanner always knows which
 * layer owns the next record header.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"
#include "walker.h"
#include "xcs_legacy.h"
#include "xcs_scan.h"

/*----- scanner state -----*/

#define SEEN_MAX_PFN (1ULL << 30) /* unique-page bitmap cap: 4 TiB of guest */
#define SEEN_CHUNK_SHIFT 15       /* pfns per bitmap chunk: 4 KiB of bits */
#define SEEN_CHUNKS (SEEN_MAX_PFN >> SEEN_CHUNK_SHIFT)

struct scan {
    struct xcs_source *in;
    const struct xcs_scan_opts *opts;
    struct xcs_scan_report *rep;
    struct xcs_walker w;       /* the v2/v3 layers (walker.c) */
    enum xcs_guest guest;

    uint8_t hvm_cpu_seen[XCS_WALK_MAX_VCPUS / 8];
    uint32_t hvm_vcpus;

    /*
     * unique-page bitmap, two levels: a directory of SEEN_CHUNKS pointers
     * and 4 KiB chunks allocated as pfns in them are seen (see seen_mark)
     */
    uint64_t **seen;
    int seen_capped;
};

/* Where the scan is, for an error outside the walker's layers. */
static void at(struct scan *s, const char *layer, const char *name)
{
    s->w.at_off = s->in->off;
    s->w.at_layer = layer;
    s->w.at_name = name;
    s->w.at_has_type = 0;
    s->w.at_type = 0;
}

static int io_error(struct scan *s, const char *what)
{
    return xcs_walk_io_error(&s->w, what);
}

static void warn(struct scan *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void warn(struct scan *s, const char *fmt, ...)
{
    struct xcs_scan_report *r = s->rep;
    va_list ap;

    if (r->nr_warnings >= XCS_SCAN_MAX_WARNINGS)
        return;
    va_start(ap, fmt);
    vsnprintf(r->warnings[r->nr_warnings++], XCS_SCAN_WARNING_LEN, fmt, ap);
    va_end(ap);
}

/*----- the walker's client: counts, pages, vcpus -----*/

static void seen_mark(struct scan *s, uint64_t pfn)
{
    uint64_t *chunk;
    size_t bit;

    if (pfn >= SEEN_MAX_PFN) {
        if (!s->seen_capped)
            warn(s, "pfn 0x%llx is beyond the unique-page tracker (2^30); "
                    "pages_unique undercounts", (unsigned long long)pfn);
        s->seen_capped = 1;
        return;
    }
    /*
     * The pfn is the stream's word: a flat bitmap sized by the highest pfn
     * would let one 8-byte pfn cost 128 MiB.  Chunks are allocated only
     * where pfns are, so the tracker costs at most 4 KiB per pfn entry read
     * (plus the 256 KiB directory).
     */
    if (!s->seen) {
        s->seen = calloc(SEEN_CHUNKS, sizeof(*s->seen));
        if (!s->seen)
            goto oom;
    }
    chunk = s->seen[pfn >> SEEN_CHUNK_SHIFT];
    if (!chunk) {
        chunk = calloc((1u << SEEN_CHUNK_SHIFT) / 64, sizeof(*chunk));
        if (!chunk)
            goto oom;
        s->seen[pfn >> SEEN_CHUNK_SHIFT] = chunk;
    }
    bit = (size_t)(pfn & ((1u << SEEN_CHUNK_SHIFT) - 1));
    if (!(chunk[bit / 64] & (1ULL << (bit % 64)))) {
        chunk[bit / 64] |= 1ULL << (bit % 64);
        s->rep->pages_unique++;
    }
    return;
oom:
    if (!s->seen_capped)
        warn(s, "out of memory tracking unique pages");
    s->seen_capped = 1;
}

/* A checked batch: count it, and skip its pages (never touched when mapped). */
static int on_page_batch(struct xcs_walker *w, const uint8_t *words,
                         uint32_t count, uint32_t npages)
{
    struct scan *s = w->data;
    struct xcs_scan_report *r = s->rep;

    for (uint32_t i = 0; i < count; i++) {
        uint64_t v;
        unsigned int type;
        uint64_t pfn;

        memcpy(&v, words + 8 * (size_t)i, 8);
        type = (unsigned int)(v >> 60);
        pfn = v & XCS_PAGE_DATA_PFN_MASK;
        r->page_entries++;
        if (type == 0xf) {
            r->xtab++;
            continue;
        }
        if (type == 0xd)
            r->broken++;
        else if (type == 0xe)
            r->xalloc++;
        if (pfn < r->min_pfn)
            r->min_pfn = pfn;
        if (pfn > r->max_pfn)
            r->max_pfn = pfn;
        if (type < 0xd)
            seen_mark(s, pfn);
    }
    r->pages += npages;
    if (count > r->max_batch)
        r->max_batch = count;
    return xcs_walk_skip(w, (uint64_t)npages * XCS_PAGE_SIZE, "page data");
}

static void count_hvm_cpus(struct scan *s, const uint8_t *p, uint32_t len)
{
    uint32_t off = 0;

    while (len - off >= 8) {
        uint16_t code, inst;
        uint32_t dlen = xcs_get_le32(p + off + 4);

        memcpy(&code, p + off, 2);
        memcpy(&inst, p + off + 2, 2);
        if (code == 0)
            return;
        if (code == 2 && inst < XCS_WALK_MAX_VCPUS &&
            !(s->hvm_cpu_seen[inst / 8] & (1u << (inst % 8)))) {
            s->hvm_cpu_seen[inst / 8] |= (uint8_t)(1u << (inst % 8));
            s->hvm_vcpus++;
        }
        if (dlen > len - off - 8) {
            warn(s, "HVM_CONTEXT descriptor at +%u overruns the record", off);
            return;
        }
        off += 8 + dlen;
    }
}

static int on_record(struct xcs_walker *w, uint32_t t, const uint8_t *p,
                     uint32_t len)
{
    struct scan *s = w->data;

    if (t == XCS_REC_HVM_CONTEXT)
        count_hvm_cpus(s, p, len);
    else if (t == XCS_REC_HVM_PARAMS)
        s->rep->hvm_params += xcs_get_le32(p);
    return 0;
}

static void on_warning(struct xcs_walker *w, const char *text)
{
    warn(w->data, "%s", text);
}

static const struct xcs_walk_ops scan_ops = {
    .on_record = on_record,
    .on_page_batch = on_page_batch,
    .on_warning = on_warning,
};

/* What the walk found, into the report (also for an invalid stream). */
static void report_walk(struct scan *s)
{
    struct xcs_scan_report *r = s->rep;
    const struct xcs_walker *w = &s->w;

    r->xl = w->hdrs.xl;
    r->xl_mflags = w->hdrs.xl_hdr.mflags;
    r->xl_oflags = w->hdrs.xl_hdr.oflags;
    r->xl_optlen = w->hdrs.xl_hdr.optlen;
    r->xl_config_len = w->hdrs.xl_config_len;
    r->libxl = w->hdrs.libxl;
    r->libxl_version = w->hdrs.libxl_hdr.version;
    r->libxl_options = w->hdrs.libxl_hdr.options;
    memcpy(r->libxl_count, w->libxl_count, sizeof(r->libxl_count));
    memcpy(r->libxl_bytes, w->libxl_bytes, sizeof(r->libxl_bytes));
    r->libxc = w->hdrs.libxc;
    r->libxc_version = w->hdrs.ihdr.version;
    r->libxc_options = w->hdrs.ihdr.options;
    r->xen_major = w->hdrs.dhdr.xen_major;
    r->xen_minor = w->hdrs.dhdr.xen_minor;
    r->libxc_offset = w->libxc_offset;
    memcpy(r->libxc_count, w->libxc_count, sizeof(r->libxc_count));
    memcpy(r->libxc_bytes, w->libxc_bytes, sizeof(r->libxc_bytes));
    r->optional_count = w->optional_count;
    r->optional_bytes = w->optional_bytes;
    r->pv_width = w->pv_width;
    r->pv_levels = w->pv_levels;
    r->p2m_end_pfn = w->p2m_end_pfn;
    if (w->dtype)
        r->guest = (enum xcs_guest)w->dtype;
    r->vcpus = w->vcpus + s->hvm_vcpus;
    r->checkpoints = w->checkpoints;
    r->ended = w->ended;
    if (w->ended == 2)
        r->discarded_records = w->records_since_cp;
    r->qemu_trailer_len = w->qemu_trailer_len;
}

/*----- legacy (through legacy.c) -----*/

static void guess_legacy(struct scan *s, unsigned int *width, enum xcs_guest *guest)
{
    const uint8_t *p;
    size_t got;
    static const uint8_t ff[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

    if (xcs_source_peek(s->in, 16, &p, &got) < 0 || got < 8) {
        *width = *width ? *width : 64;
        *guest = *guest ? *guest : XCS_GUEST_HVM;
        return;
    }
    if (!*width) {
        /* facts 2: octets 4-7 are zero for 64-bit toolstacks (p2m_size < 2^32). */
        *width = xcs_get_le32(p + 4) == 0 ? 64 : 32;
        s->rep->legacy.width_guessed = 1;
    }
    if (!*guest) {
        /* PV images carry extended info, announced by an all-ones word. */
        if (*width == 64)
            *guest = (got >= 16 && !memcmp(p + 8, ff, 8)) ? XCS_GUEST_PV : XCS_GUEST_HVM;
        else
            *guest = !memcmp(p + 4, ff, 4) ? XCS_GUEST_PV : XCS_GUEST_HVM;
        s->rep->legacy.width_guessed = 1;
    }
}

static int legacy_stream(struct scan *s)
{
    struct xcs_scan_report *r = s->rep;
    struct xcs_legacy_stats st;
    struct xcs_legacy_opts lo;
    char err[400];
    int rc;

    memset(&lo, 0, sizeof(lo));
    memset(&st, 0, sizeof(st));
    lo.width = s->opts->legacy_width;
    lo.guest = s->opts->legacy_guest;
    lo.stream_type = s->opts->stream_type;
    lo.out_format = XCS_FMT_LIBXL;
    lo.stats = &st;
    guess_legacy(s, &lo.width, &lo.guest);
    r->guest = s->guest = lo.guest;
    rc = xcs_legacy_run(s->in, -1, &lo, err, sizeof(err));
    st.legacy.width_guessed = r->legacy.width_guessed;
    r->legacy = st.legacy;
    r->pages = st.pages;
    r->page_entries = st.page_entries;
    r->min_pfn = st.min_pfn;
    r->max_pfn = st.max_pfn;
    r->vcpus = st.vcpus;
    r->checkpoints = st.checkpoints;
    r->ended = st.failover ? 2 : 1;
    if (st.failover)
        warn(s, "%s", st.failover_reason);
    if (rc == 0) {
        if (r->legacy.unread_bytes && !(s->opts->flags & XCS_SCAN_ALLOW_TRAILING))
            warn(s, "%llu bytes after the legacy image (e.g. a toolstack record) "
                    "were not read", (unsigned long long)r->legacy.unread_bytes);
        return 0;
    }
    if (rc == XCS_LEGACY_EIO) {
        int e = errno;

        snprintf(s->w.err.reason, sizeof(s->w.err.reason), "%.300s", err);
        s->w.err.offset = st.err_offset;
        s->w.err.errnum = e;
        errno = e;
        return -1;
    }
    s->w.at_off = st.err_offset;
    s->w.at_layer = "legacy";
    s->w.at_name = st.err_chunk;
    s->w.at_has_type = 0;
    if (r->legacy.width_guessed)
        return xcs_walk_bad(&s->w, EINVAL, "%s (width %u and guest %s were "
                            "guessed; pass them explicitly)", st.err_reason,
                            lo.width, lo.guest == XCS_GUEST_PV ? "pv" : "hvm");
    return xcs_walk_bad(&s->w, EINVAL, "%s", st.err_reason);
}

/*----- entry point -----*/

static int detect(struct scan *s, enum xcs_fmt *fmt)
{
    const uint8_t *p;
    size_t got;

    at(s, "", "format detection");
    if (xcs_source_peek(s->in, XCS_FMT_SNIFF_LEN, &p, &got) < 0)
        return io_error(s, "read");
    *fmt = xcs_fmt_sniff(p, got, 0); /* got < XCS_FMT_SNIFF_LEN: the whole stream */
    if (*fmt == XCS_FMT_AUTO)
        return xcs_walk_bad(&s->w, EINVAL, "stream too short (%zu bytes) to be "
                            "any known format", got);
    return 0;
}

int xcs_scan_fd(int fd, const struct xcs_scan_opts *opts,
                struct xcs_scan_report *rep)
{
    struct xcs_walk_opts wo;
    struct xcs_source in;
    struct scan s;
    enum xcs_fmt fmt = opts->fmt;
    int in_open = 0, rc;

    memset(rep, 0, sizeof(*rep));
    memset(&s, 0, sizeof(s));
    memset(&wo, 0, sizeof(wo));
    rep->min_pfn = UINT64_MAX;
    rep->stream_type = opts->stream_type;
    s.in = &in;
    s.opts = opts;
    s.rep = rep;
    xcs_walk_attach(&s.w, &in, &wo, &scan_ops, &s);

    if (xcs_source_open(&in, fd, XCS_SOURCE_MAP) < 0) {
        snprintf(rep->error.reason, sizeof(rep->error.reason), "fstat: %s", strerror(errno));
        rc = -1;
        goto out;
    }
    in_open = 1;
    if (fmt == XCS_FMT_AUTO) {
        rc = detect(&s, &fmt);
        if (rc)
            goto out;
    }
    rep->format = fmt;
    switch (fmt) {
    case XCS_FMT_XL:
    case XCS_FMT_LIBXL:
    case XCS_FMT_LIBXC:
        wo.start = fmt;
        wo.stream_type = opts->stream_type;
        wo.flags = XCS_WALK_PADDING | XCS_WALK_DUPS | XCS_WALK_MANDATORY;
        if (!(opts->flags & XCS_SCAN_ALLOW_TRAILING))
            wo.flags |= XCS_WALK_TRAILING;
        rc = xcs_walk(&s.w);
        report_walk(&s);
        if (!rc && s.w.xl_legacy)
            rc = legacy_stream(&s);
        break;
    case XCS_FMT_LEGACY:
        rc = legacy_stream(&s);
        break;
    default:
        at(&s, "", "format detection");
        rc = xcs_walk_bad(&s.w, EINVAL, "no format to scan");
        break;
    }

out:
    if (s.w.err.reason[0])
        rep->error = s.w.err;
    if (rep->min_pfn == UINT64_MAX)
        rep->min_pfn = 0;
    if (in_open) {
        rep->bytes = in.off;
        xcs_source_close(&in);
    }
    if (s.seen)
        for (size_t i = 0; i < SEEN_CHUNKS; i++)
            free(s.seen[i]);
    free(s.seen);
    xcs_walk_release(&s.w);
    rep->valid = rc == 0;
    return rc;
}
