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

#include "xcs_legacy.h"
#include "xcs_scan.h"

/*----- little-endian field access -----*/

static inline uint16_t le16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint32_t le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static inline uint64_t le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/*----- names -----*/

static const char *const libxc_names[XCS_REC_TYPE_COUNT] = {
    "END", "PAGE_DATA", "X86_PV_INFO", "X86_PV_P2M_FRAMES",
    "X86_PV_VCPU_BASIC", "X86_PV_VCPU_EXTENDED", "X86_PV_VCPU_XSAVE",
    "SHARED_INFO", "X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS", "TOOLSTACK",
    "X86_PV_VCPU_MSRS", "VERIFY", "CHECKPOINT", "CHECKPOINT_DIRTY_PFN_LIST",
    "STATIC_DATA_END", "X86_CPUID_POLICY", "X86_MSR_POLICY",
};

static const char *const libxl_names[XCS_LIBXL_REC_TYPE_COUNT] = {
    "END", "LIBXC_CONTEXT", "EMULATOR_XENSTORE_DATA", "EMULATOR_CONTEXT",
    "CHECKPOINT_END", "CHECKPOINT_STATE",
};

const char *xcs_libxc_rec_name(uint32_t type)
{
    if (type < XCS_REC_TYPE_COUNT)
        return libxc_names[type];
    return (type & XCS_REC_TYPE_OPTIONAL) ? "optional record" : "unknown record";
}

const char *xcs_libxl_rec_name(uint32_t type)
{
    if (type < XCS_LIBXL_REC_TYPE_COUNT)
        return libxl_names[type];
    return "unknown record";
}

const char *xcs_scan_fmt_name(enum xcs_scan_fmt fmt)
{
    switch (fmt) {
    case XCS_FMT_XL:
        return "xl";
    case XCS_FMT_LIBXL:
        return "libxl";
    case XCS_FMT_LIBXC:
        return "libxc";
    case XCS_FMT_LEGACY:
        return "legacy";
    case XCS_FMT_AUTO:
        break;
    }
    return "auto";
}

/*----- scanner state -----*/

#define SEEN_MAX_PFN (1ULL << 30) /* unique-page bitmap cap: 4 TiB of guest */
#define SEEN_CHUNK_SHIFT 15       /* pfns per bitmap chunk: 4 KiB of bits */
#define SEEN_CHUNKS (SEEN_MAX_PFN >> SEEN_CHUNK_SHIFT)
#define MAX_VCPUS 4096
#define XS_MAX (64u << 20)        /* xenstore data we are willing to hold */

struct where {
    uint64_t off;
    const char *layer;
    uint32_t type;
    int has_type;
    const char *name;
};

struct scan {
    struct xcs_source *in;
    const struct xcs_scan_opts *opts;
    struct xcs_scan_report *rep;
    struct where w;

    /* libxc layer */
    enum xcs_guest guest;
    uint32_t version;
    int sde;
    int pv_info;
    int p2m;
    int mandatory_done;
    int have_ctx, have_params, have_tsc, have_shinfo, have_basic;
    uint8_t vcpu_seen[MAX_VCPUS / 8];
    uint8_t hvm_cpu_seen[MAX_VCPUS / 8];
    uint64_t records_since_cp;

    /*
     * unique-page bitmap, two levels: a directory of SEEN_CHUNKS pointers
     * and 4 KiB chunks allocated as pfns in them are seen (see seen_mark)
     */
    uint64_t **seen;
    int seen_capped;

    uint64_t *sortbuf;
    size_t sortbuf_len;
};

static int bad(struct scan *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int bad(struct scan *s, const char *fmt, ...)
{
    struct xcs_scan_error *e = &s->rep->error;
    va_list ap;

    if (e->reason[0])
        return XCS_SCAN_INVALID; /* report the FIRST error only */
    e->offset = s->w.off;
    snprintf(e->layer, sizeof(e->layer), "%s", s->w.layer ? s->w.layer : "");
    e->rtype = s->w.type;
    e->has_rtype = s->w.has_type;
    snprintf(e->record, sizeof(e->record), "%s", s->w.name ? s->w.name : "");
    va_start(ap, fmt);
    vsnprintf(e->reason, sizeof(e->reason), fmt, ap);
    va_end(ap);
    return XCS_SCAN_INVALID;
}

static int io_error(struct scan *s, const char *what)
{
    int err = errno;
    char nb[32];

    snprintf(s->rep->error.reason, sizeof(s->rep->error.reason),
             "%s: %s (%s)", what, strerror(err), xcs_errno_name(err, nb, sizeof(nb)));
    s->rep->error.offset = s->in->off;
    errno = err;
    return -1;
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

static void at(struct scan *s, const char *layer, const char *name)
{
    s->w.off = s->in->off;
    s->w.layer = layer;
    s->w.name = name;
    s->w.has_type = 0;
    s->w.type = 0;
}

static void at_rec(struct scan *s, uint64_t off, const char *layer,
                   uint32_t type, const char *name)
{
    s->w.off = off;
    s->w.layer = layer;
    s->w.type = type;
    s->w.has_type = 1;
    s->w.name = name;
}

/* Consume exactly n bytes of `what`; a short stream is invalid. */
static int need(struct scan *s, size_t n, const uint8_t **p, const char *what)
{
    size_t got;
    int r = xcs_source_get(s->in, n, p, &got);

    if (r < 0)
        return io_error(s, "read");
    if (r > 0)
        return bad(s, "stream truncated: %zu of %zu bytes of %s", got, n, what);
    return 0;
}

static int skip(struct scan *s, uint64_t n, const char *what)
{
    uint64_t got;
    int r = xcs_source_skip(s->in, n, &got);

    if (r < 0)
        return io_error(s, "read");
    if (r > 0)
        return bad(s, "stream truncated: %llu of %llu bytes of %s",
                   (unsigned long long)got, (unsigned long long)n, what);
    return 0;
}

static int padding_ok(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return 0;
    return 1;
}

/* Body of a record (length + padding), checking the padding is zero. */
static int record_body(struct scan *s, uint32_t len, const uint8_t **p)
{
    uint32_t padded = xcs_rec_padded(len);
    int rc = need(s, padded, p, "record body");

    if (rc)
        return rc;
    if (!padding_ok(*p + len, padded - len))
        return bad(s, "padding containing non-zero bytes");
    return 0;
}

/*----- pages -----*/

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

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return (x > y) - (x < y);
}

/* Duplicate pfns in one record (XTAB entries excepted). */
static int page_dups(struct scan *s, const uint8_t *words, uint32_t count)
{
    uint64_t prev = 0;
    int first = 1, sorted = 1;
    size_t n = 0;

    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = le64(words + 8 * (size_t)i);
        uint64_t pfn = w & XCS_PAGE_DATA_PFN_MASK;

        if ((w >> 60) == 0xf)
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
    if (s->sortbuf_len < count) {
        uint64_t *nb = realloc(s->sortbuf, (size_t)count * sizeof(*nb));

        if (!nb)
            return io_error(s, "malloc");
        s->sortbuf = nb;
        s->sortbuf_len = count;
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = le64(words + 8 * (size_t)i);

        if ((w >> 60) != 0xf)
            s->sortbuf[n++] = w & XCS_PAGE_DATA_PFN_MASK;
    }
    qsort(s->sortbuf, n, sizeof(*s->sortbuf), cmp_u64);
    for (size_t i = 1; i < n; i++)
        if (s->sortbuf[i] == s->sortbuf[i - 1])
            return bad(s, "duplicate pfn 0x%llx in one record",
                       (unsigned long long)s->sortbuf[i]);
    return 0;
}

static int libxc_page_data(struct scan *s, uint32_t len)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p, *words;
    uint32_t count, res, npages = 0;
    uint64_t expect;
    int rc;

    if (len <= 8)
        return bad(s, "length %u: a PAGE_DATA record needs a header and a pfn", len);
    rc = need(s, 8, &p, "PAGE_DATA header");
    if (rc)
        return rc;
    count = le32(p);
    res = le32(p + 4);
    if (res)
        return bad(s, "reserved field set (0x%x)", res);
    if (count == 0)
        return bad(s, "count is 0");
    if ((uint64_t)count * 8 > len - 8)
        return bad(s, "count %u needs %llu bytes of pfns, the record has %u",
                   count, (unsigned long long)count * 8, len - 8);
    rc = need(s, (size_t)count * 8, &words, "PAGE_DATA pfns");
    if (rc)
        return rc;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = le64(words + 8 * (size_t)i);
        unsigned int type = (unsigned int)(w >> 60);

        if (w & XCS_PAGE_DATA_RSVD_MASK)
            return bad(s, "reserved bits set in pfn[%u]: 0x%016llx", i,
                       (unsigned long long)(w & XCS_PAGE_DATA_RSVD_MASK));
        if (type >= 5 && type <= 8)
            return bad(s, "invalid page type %u in pfn[%u] (0x%016llx)", type, i,
                       (unsigned long long)w);
        if (type < 0xd)
            npages++;
    }
    expect = 8 + (uint64_t)count * 8 + (uint64_t)npages * XCS_PAGE_SIZE;
    if (len != expect)
        return bad(s, "length %u, expected 8 + %llu + %llu = %llu for %u pfns "
                      "and %u pages", len, (unsigned long long)count * 8,
                   (unsigned long long)npages * XCS_PAGE_SIZE,
                   (unsigned long long)expect, count, npages);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = le64(words + 8 * (size_t)i);
        unsigned int type = (unsigned int)(w >> 60);
        uint64_t pfn = w & XCS_PAGE_DATA_PFN_MASK;

        if (s->guest == XCS_GUEST_PV && pfn > r->p2m_end_pfn && type != 0xf)
            return bad(s, "pfn 0x%llx (pfn[%u]) out of range: the P2M frames "
                          "cover pfns 0..0x%llx", (unsigned long long)pfn, i,
                       (unsigned long long)r->p2m_end_pfn);
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
    rc = page_dups(s, words, count);
    if (rc)
        return rc;
    r->pages += npages;
    if (count > r->max_batch)
        r->max_batch = count;
    return skip(s, (uint64_t)npages * XCS_PAGE_SIZE, "page data");
}

/*----- other libxc records -----*/

static void count_hvm_cpus(struct scan *s, const uint8_t *p, uint32_t len)
{
    uint32_t off = 0;

    while (len - off >= 8) {
        uint16_t code = le16(p + off), inst = le16(p + off + 2);
        uint32_t dlen = le32(p + off + 4);

        if (code == 0)
            return;
        if (code == 2 && inst < MAX_VCPUS &&
            !(s->hvm_cpu_seen[inst / 8] & (1u << (inst % 8)))) {
            s->hvm_cpu_seen[inst / 8] |= (uint8_t)(1u << (inst % 8));
            if (s->guest == XCS_GUEST_HVM && s->rep->vcpus < MAX_VCPUS)
                s->rep->vcpus++;
        }
        if (dlen > len - off - 8) {
            warn(s, "HVM_CONTEXT descriptor at +%u overruns the record", off);
            return;
        }
        off += 8 + dlen;
    }
}

static int check_vcpu(struct scan *s, uint32_t type, const uint8_t *p, uint32_t len)
{
    uint32_t id, res;

    if (len < 8)
        return bad(s, "length %u: a vcpu record needs at least 8 bytes", len);
    id = le32(p);
    res = le32(p + 4);
    if (res)
        return bad(s, "reserved field set (0x%x)", res);
    if (id >= MAX_VCPUS)
        return bad(s, "vcpu id %u out of range (max %u)", id, MAX_VCPUS - 1);
    if (len == 8 && type != XCS_REC_X86_PV_VCPU_BASIC)
        warn(s, "%s for vcpu %u with zero content (tolerated, spec erratum 1)",
             xcs_libxc_rec_name(type), id);
    if (type == XCS_REC_X86_PV_VCPU_BASIC) {
        if (len == 8)
            return bad(s, "vcpu %u basic context is empty", id);
        s->have_basic = 1;
        if (!(s->vcpu_seen[id / 8] & (1u << (id % 8)))) {
            s->vcpu_seen[id / 8] |= (uint8_t)(1u << (id % 8));
            s->rep->vcpus++;
        }
    }
    return 0;
}

static int check_mandatory(struct scan *s)
{
    if (s->mandatory_done)
        return 0;
    s->mandatory_done = 1;
    if (s->guest == XCS_GUEST_HVM) {
        if (!s->have_ctx)
            return bad(s, "HVM stream lacks the mandatory HVM_CONTEXT record");
        if (!s->have_params)
            return bad(s, "HVM stream lacks the mandatory HVM_PARAMS record");
        if (!s->have_tsc) {
            if (s->rep->xen_major != 0)
                return bad(s, "HVM stream lacks the mandatory X86_TSC_INFO record");
            warn(s, "no X86_TSC_INFO (tolerated: converted from a legacy stream)");
        }
    } else {
        if (!s->p2m)
            return bad(s, "PV stream lacks the mandatory X86_PV_P2M_FRAMES record");
        if (!s->have_shinfo)
            return bad(s, "PV stream lacks the mandatory SHARED_INFO record");
        if (!s->have_basic)
            return bad(s, "PV stream lacks a mandatory X86_PV_VCPU_BASIC record");
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
static int libxc_order(struct scan *s, uint32_t t)
{
    const char *name = xcs_libxc_rec_name(t);

    if (s->guest == XCS_GUEST_HVM && is_pv_only(t))
        return bad(s, "%s in an HVM stream (PV only)", name);
    if (s->guest == XCS_GUEST_PV &&
        (t == XCS_REC_HVM_CONTEXT || t == XCS_REC_HVM_PARAMS))
        return bad(s, "%s in a PV stream (HVM only)", name);
    if (s->guest == XCS_GUEST_PV && !s->pv_info && t != XCS_REC_X86_PV_INFO)
        return bad(s, "X86_PV_INFO must be the first record of a PV stream, "
                      "found %s", name);
    if (t == XCS_REC_STATIC_DATA_END) {
        if (s->version < 3)
            return bad(s, "STATIC_DATA_END in a v2 stream");
        if (s->sde)
            return bad(s, "second STATIC_DATA_END");
        return 0;
    }
    if (is_static(t)) {
        if (s->version >= 3 && s->sde)
            return bad(s, "%s after STATIC_DATA_END", name);
        if (s->version < 3 && t != XCS_REC_X86_PV_INFO)
            return bad(s, "%s in a v2 stream", name);
        return 0;
    }
    if (t == XCS_REC_TOOLSTACK || t == XCS_REC_CHECKPOINT_DIRTY_PFN_LIST)
        return 0; /* rejected by their own checks */
    /* Everything else is memory, register or control content. */
    if (s->version >= 3 && !s->sde)
        return bad(s, "%s before STATIC_DATA_END", name);
    if (s->version < 3)
        s->sde = 1; /* v2: implied by the first memory record (facts 3.1) */
    if (s->guest == XCS_GUEST_PV && !s->p2m &&
        (t == XCS_REC_PAGE_DATA || t == XCS_REC_X86_PV_VCPU_BASIC ||
         t == XCS_REC_X86_PV_VCPU_EXTENDED || t == XCS_REC_X86_PV_VCPU_XSAVE ||
         t == XCS_REC_X86_PV_VCPU_MSRS))
        return bad(s, "%s before X86_PV_P2M_FRAMES", name);
    return 0;
}

enum { LX_END = 0, LX_CHECKPOINT = 1, LX_EOF = 2 };

static int libxc_headers(struct scan *s)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    uint64_t marker;
    uint32_t id, res2;
    uint16_t opts, res1, pshift, dres;
    int rc;

    r->libxc = 1;
    r->libxc_offset = s->in->off;
    at(s, "libxc", "image header");
    rc = need(s, XCS_IHDR_SIZE, &p, "image header");
    if (rc)
        return rc;
    marker = xcs_get_be64(p);
    id = xcs_get_be32(p + 8);
    r->libxc_version = s->version = xcs_get_be32(p + 12);
    opts = xcs_get_be16(p + 16);
    res1 = xcs_get_be16(p + 18);
    res2 = xcs_get_be32(p + 20);
    r->libxc_options = opts;
    if (marker != XCS_IHDR_MARKER)
        return bad(s, "bad image marker 0x%016llx", (unsigned long long)marker);
    if (id != XCS_IHDR_ID)
        return bad(s, "bad image id 0x%08x (expected \"XENF\")", id);
    if (s->version < 2 || s->version > 3)
        return bad(s, "unknown image version %u (expected 2 or 3)", s->version);
    if (opts & ~XCS_IHDR_OPT_BIG_ENDIAN)
        return bad(s, "reserved bits set in image options: 0x%x",
                   opts & ~XCS_IHDR_OPT_BIG_ENDIAN);
    if (res1 || res2)
        return bad(s, "reserved fields set in image header: 0x%04x:0x%08x", res1, res2);
    if (opts & XCS_IHDR_OPT_BIG_ENDIAN)
        return bad(s, "big-endian image: not supported (x86 streams are little-endian)");

    at(s, "libxc", "domain header");
    rc = need(s, XCS_DHDR_SIZE, &p, "domain header");
    if (rc)
        return rc;
    id = le32(p);
    pshift = le16(p + 4);
    dres = le16(p + 6);
    r->xen_major = le32(p + 8);
    r->xen_minor = le32(p + 12);
    if (id != XCS_DHDR_TYPE_X86_PV && id != XCS_DHDR_TYPE_X86_HVM)
        return bad(s, "unknown domain type 0x%x", id);
    if (dres)
        return bad(s, "reserved field set in domain header: 0x%04x", dres);
    if (pshift != XCS_PAGE_SHIFT)
        return bad(s, "page_shift %u (expected 12)", pshift);
    s->guest = r->guest = (enum xcs_guest)id;
    return 0;
}

static int libxc_record(struct scan *s, uint32_t t, uint32_t len, int *how);

/*
 * libxc records until END (LX_END), CHECKPOINT (LX_CHECKPOINT, checkpointed
 * streams) or, after a complete checkpoint, EOF at a record boundary
 * (LX_EOF: the restorer fails over to the last checkpoint).
 */
static int libxc_records(struct scan *s, int *how)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    int rc;

    for (;;) {
        uint64_t off = s->in->off;
        uint32_t t, len;

        at(s, "libxc", "record header");
        if (s->opts->stream_type != XCS_STREAM_PLAIN && r->checkpoints > 0) {
            int e = xcs_source_at_eof(s->in);

            if (e < 0)
                return io_error(s, "read");
            if (e) {
                *how = LX_EOF;
                return 0;
            }
        }
        rc = need(s, XCS_RHDR_SIZE, &p, "record header");
        if (rc)
            return rc;
        t = le32(p);
        len = le32(p + 4);
        at_rec(s, off, "libxc", t, xcs_libxc_rec_name(t));
        s->records_since_cp++;
        if (len > XCS_REC_LENGTH_MAX)
            return bad(s, "length %u exceeds the restorer's limit of %u bytes",
                       len, XCS_REC_LENGTH_MAX);
        if (t & XCS_REC_TYPE_OPTIONAL) {
            /* Optional: skip, as libxc's restore does; padding still zero. */
            r->optional_count++;
            r->optional_bytes += len;
            rc = skip(s, len & ~7u, "optional record body");
            if (!rc && (len & 7)) {
                rc = need(s, 8, &p, "optional record body");
                if (!rc && !padding_ok(p + (len & 7), 8 - (len & 7)))
                    rc = bad(s, "padding containing non-zero bytes");
            }
            if (rc)
                return rc;
            continue;
        }
        if (t >= XCS_REC_TYPE_COUNT)
            return bad(s, "unknown mandatory record type 0x%x", t);
        r->libxc_count[t]++;
        r->libxc_bytes[t] += len;
        rc = libxc_order(s, t);
        if (rc)
            return rc;
        rc = libxc_record(s, t, len, how);
        if (rc || *how != -1)
            return rc;
    }
}

static int libxc_record(struct scan *s, uint32_t t, uint32_t len, int *how)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    int rc;

    *how = -1;
    if (t == XCS_REC_PAGE_DATA)
        return libxc_page_data(s, len);
    rc = record_body(s, len, &p);
    if (rc)
        return rc;

    switch (t) {
    case XCS_REC_END:
        if (len)
            return bad(s, "END with length %u", len);
        if (s->version >= 3 && !s->sde)
            return bad(s, "no STATIC_DATA_END in a v3 stream");
        rc = check_mandatory(s);
        if (rc)
            return rc;
        *how = LX_END;
        return 0;

    case XCS_REC_X86_PV_INFO:
        if (s->pv_info)
            return bad(s, "second X86_PV_INFO");
        if (len != 8)
            return bad(s, "length %u (expected 8)", len);
        if (p[0] != 4 && p[0] != 8)
            return bad(s, "guest width %u (expected 4 or 8)", p[0]);
        if (p[1] != 3 && p[1] != 4)
            return bad(s, "pagetable levels %u (expected 3 or 4)", p[1]);
        if (!padding_ok(p + 2, 6))
            return bad(s, "reserved bytes set");
        if ((p[0] == 8) != (p[1] == 4))
            return bad(s, "guest width %u with %u pagetable levels (64-bit guests "
                          "use 4, 32-bit PAE guests 3)", p[0], p[1]);
        s->pv_info = 1;
        r->pv_width = p[0];
        r->pv_levels = p[1];
        return 0;

    case XCS_REC_X86_PV_P2M_FRAMES: {
        uint32_t start, endp, fpp;
        uint64_t need_frames, have;

        if (len < 8 || len % 8)
            return bad(s, "length %u (expected at least 8, a multiple of 8)", len);
        start = le32(p);
        endp = le32(p + 4);
        if (start > endp)
            return bad(s, "start pfn 0x%x after end pfn 0x%x", start, endp);
        fpp = XCS_PAGE_SIZE / r->pv_width;
        need_frames = endp / fpp - start / fpp + 1;
        have = (len - 8) / 8;
        if (have < need_frames)
            return bad(s, "%llu frames cannot cover pfns 0x%x..0x%x (%llu needed)",
                       (unsigned long long)have, start, endp,
                       (unsigned long long)need_frames);
        if (!s->p2m || endp > r->p2m_end_pfn)
            r->p2m_end_pfn = endp;
        s->p2m = 1;
        return 0;
    }

    case XCS_REC_X86_PV_VCPU_BASIC:
    case XCS_REC_X86_PV_VCPU_EXTENDED:
    case XCS_REC_X86_PV_VCPU_XSAVE:
    case XCS_REC_X86_PV_VCPU_MSRS:
        return check_vcpu(s, t, p, len);

    case XCS_REC_SHARED_INFO:
        if (len != XCS_PAGE_SIZE)
            return bad(s, "length %u (expected 4096)", len);
        s->have_shinfo = 1;
        return 0;

    case XCS_REC_X86_TSC_INFO:
        if (len != 24)
            return bad(s, "length %u (expected 24)", len);
        if (le32(p + 20))
            return bad(s, "reserved field set (0x%x)", le32(p + 20));
        s->have_tsc = 1;
        return 0;

    case XCS_REC_HVM_CONTEXT:
        if (len == 0)
            return bad(s, "empty HVM context");
        s->have_ctx = 1;
        count_hvm_cpus(s, p, len);
        return 0;

    case XCS_REC_HVM_PARAMS: {
        uint32_t count;

        if (len < 8)
            return bad(s, "length %u (expected at least 8)", len);
        count = le32(p);
        if (le32(p + 4))
            return bad(s, "reserved field set (0x%x)", le32(p + 4));
        if ((uint64_t)8 + (uint64_t)count * 16 != len)
            return bad(s, "length %u, expected 8 + 16 * %u", len, count);
        if (count == 0)
            warn(s, "HVM_PARAMS with no entries (tolerated, spec erratum 1)");
        r->hvm_params += count;
        s->have_params = 1;
        return 0;
    }

    case XCS_REC_TOOLSTACK:
        return bad(s, "deprecated TOOLSTACK record (no v2 restorer accepts it)");

    case XCS_REC_VERIFY:
        if (len)
            return bad(s, "VERIFY with length %u", len);
        return 0;

    case XCS_REC_CHECKPOINT:
        if (len)
            return bad(s, "CHECKPOINT with length %u", len);
        if (s->opts->stream_type == XCS_STREAM_PLAIN)
            return bad(s, "CHECKPOINT in a plain stream (pass the stream type "
                          "remus or colo for a checkpointed stream)");
        rc = check_mandatory(s);
        if (rc)
            return rc;
        *how = LX_CHECKPOINT;
        return 0;

    case XCS_REC_CHECKPOINT_DIRTY_PFN_LIST:
        return bad(s, "CHECKPOINT_DIRTY_PFN_LIST belongs on the COLO back "
                      "channel, not in a migration stream");

    case XCS_REC_STATIC_DATA_END:
        if (len)
            return bad(s, "STATIC_DATA_END with length %u", len);
        s->sde = 1;
        return 0;

    case XCS_REC_X86_CPUID_POLICY:
        if (len < 24 || len % 24)
            return bad(s, "length %u (expected a non-zero multiple of 24)", len);
        return 0;

    case XCS_REC_X86_MSR_POLICY:
        if (len < 16 || len % 16)
            return bad(s, "length %u (expected a non-zero multiple of 16)", len);
        for (uint32_t i = 0; i < len; i += 16)
            if (le32(p + i + 4))
                return bad(s, "MSR entry %u has flags 0x%x (must be zero)",
                           i / 16, le32(p + i + 4));
        return 0;
    }
    return bad(s, "unhandled record type 0x%x", t);
}

/*----- trailing bytes -----*/

static int check_trailing(struct scan *s, int libxc_outer)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    size_t got;
    int e;

    if (s->opts->flags & XCS_SCAN_ALLOW_TRAILING)
        return 0;
    at(s, r->libxc && libxc_outer ? "libxc" : "libxl", "trailing data");
    if (libxc_outer && s->guest == XCS_GUEST_HVM) {
        /*
         * Xen's convert-legacy-stream appends the legacy qemu record
         * ("DeviceModelRecord0002", u32 length, data) after a bare libxc
         * image.  Accept exactly that, ending at EOF.
         */
        if (xcs_source_peek(s->in, XCS_LEGACY_QEMU_SIG_LEN + 4, &p, &got) < 0)
            return io_error(s, "read");
        if (got == XCS_LEGACY_QEMU_SIG_LEN + 4 &&
            !memcmp(p, XCS_LEGACY_QEMU_SIG_0002, XCS_LEGACY_QEMU_SIG_LEN)) {
            uint32_t qlen = le32(p + XCS_LEGACY_QEMU_SIG_LEN);
            int rc;

            s->w.name = "qemu record after END";
            rc = skip(s, XCS_LEGACY_QEMU_SIG_LEN + 4 + (uint64_t)qlen, "qemu record");
            if (rc)
                return rc;
            r->qemu_trailer_len = qlen;
            at(s, "libxc", "trailing data");
        }
    }
    e = xcs_source_at_eof(s->in);
    if (e < 0)
        return io_error(s, "read");
    if (!e) {
        uint64_t left = xcs_source_remaining(s->in);

        if (left != UINT64_MAX)
            return bad(s, "%llu bytes after END", (unsigned long long)left);
        return bad(s, "bytes after END");
    }
    return 0;
}

/*----- libxl layer -----*/

static int check_emulator(struct scan *s, uint32_t t, const uint8_t *p, uint32_t len)
{
    uint32_t id;

    if (len < 8)
        return bad(s, "length %u: an emulator record needs at least 8 bytes", len);
    id = le32(p);
    if (id > XCS_EMULATOR_QEMU_UPSTREAM)
        return bad(s, "unknown emulator id 0x%x", id);
    if (t == XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA && len > 8) {
        const uint8_t *d = p + 8;
        uint32_t n = len - 8, strings = 0;

        if (d[n - 1] != 0)
            return bad(s, "xenstore data not NUL terminated");
        for (uint32_t i = 0; i < n; i++)
            strings += d[i] == 0;
        if (strings % 2)
            return bad(s, "odd number of xenstore strings (%u): expected an even "
                          "number (key/value pairs)", strings);
    }
    return 0;
}

/* A libxl record whose body we need only in part: emulator context. */
static int libxl_body(struct scan *s, uint32_t t, uint32_t len, const uint8_t **p)
{
    uint32_t padded = xcs_rec_padded(len);
    const uint8_t *q;
    int rc;

    if (t == XCS_LIBXL_REC_EMULATOR_CONTEXT && len > 64) {
        /* Only the 8-byte emulator header and the padding matter. */
        rc = need(s, 8, p, "emulator header");
        if (rc)
            return rc;
        if (le32(*p) > XCS_EMULATOR_QEMU_UPSTREAM)
            return bad(s, "unknown emulator id 0x%x", le32(*p));
        rc = skip(s, (len & ~7u) - 8, "emulator context");
        if (!rc && (len & 7)) {
            rc = need(s, 8, &q, "emulator context");
            if (!rc && !padding_ok(q + (len & 7), 8 - (len & 7)))
                rc = bad(s, "padding containing non-zero bytes");
        }
        *p = NULL;
        return rc;
    }
    if (t == XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA && padded > XS_MAX)
        return bad(s, "xenstore data of %u bytes: larger than this checker's "
                      "%u-byte limit", len, XS_MAX);
    return record_body(s, len, p);
}

static int libxl_stream(struct scan *s)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    int libxc_seen = 0, libxc_done = 0, in_cp = 0, how, rc;

    r->libxl = 1;
    at(s, "libxl", "libxl header");
    rc = need(s, XCS_LIBXL_HDR_SIZE, &p, "libxl header");
    if (rc)
        return rc;
    if (xcs_get_be64(p) != XCS_LIBXL_IDENT)
        return bad(s, "bad libxl ident 0x%016llx (expected \"LibxlFmt\")",
                   (unsigned long long)xcs_get_be64(p));
    r->libxl_version = xcs_get_be32(p + 8);
    r->libxl_options = xcs_get_be32(p + 12);
    if (r->libxl_version != XCS_LIBXL_VERSION)
        return bad(s, "unknown libxl version %u (expected 2)", r->libxl_version);
    if (r->libxl_options & ~(XCS_LIBXL_OPT_BIG_ENDIAN | XCS_LIBXL_OPT_LEGACY))
        return bad(s, "reserved bits set in libxl options: 0x%x",
                   r->libxl_options & ~(XCS_LIBXL_OPT_BIG_ENDIAN | XCS_LIBXL_OPT_LEGACY));
    if (r->libxl_options & XCS_LIBXL_OPT_BIG_ENDIAN)
        return bad(s, "big-endian libxl stream: not supported");

    for (;;) {
        uint64_t off = s->in->off;
        uint32_t t, len;

        at(s, "libxl", "record header");
        if (in_cp && r->checkpoints > 0) {
            int e = xcs_source_at_eof(s->in);

            if (e < 0)
                return io_error(s, "read");
            if (e) {
                r->ended = 2;
                r->discarded_records = s->records_since_cp;
                warn(s, "stream ends inside checkpoint %u: a restore fails over "
                        "to checkpoint %u", r->checkpoints + 1, r->checkpoints);
                return 0;
            }
        }
        rc = need(s, XCS_RHDR_SIZE, &p, "record header");
        if (rc)
            return rc;
        t = le32(p);
        len = le32(p + 4);
        at_rec(s, off, "libxl", t, xcs_libxl_rec_name(t));
        s->records_since_cp++;
        if (t >= XCS_LIBXL_REC_TYPE_COUNT)
            return bad(s, "unknown libxl record type 0x%x%s", t,
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
            return bad(s, "length 0x%x: no record can be that long", len);
        r->libxl_count[t]++;
        r->libxl_bytes[t] += len;
        rc = libxl_body(s, t, len, &p);
        if (rc)
            return rc;

        switch (t) {
        case XCS_LIBXL_REC_END:
            if (len)
                return bad(s, "END with length %u", len);
            if (!libxc_seen)
                return bad(s, "END without a LIBXC_CONTEXT record: no libxc image");
            if (in_cp)
                return bad(s, "END inside a checkpoint (expected CHECKPOINT_END)");
            if (!libxc_done)
                return bad(s, "END before the libxc image ended");
            r->ended = 1;
            return check_trailing(s, 0);

        case XCS_LIBXL_REC_LIBXC_CONTEXT:
            if (len)
                return bad(s, "LIBXC_CONTEXT with length %u", len);
            if (libxc_seen)
                return bad(s, "second LIBXC_CONTEXT");
            libxc_seen = 1;
            rc = libxc_headers(s);
            if (rc)
                return rc;
            goto run_libxc;

        case XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA:
        case XCS_LIBXL_REC_EMULATOR_CONTEXT:
            if (p) {
                rc = check_emulator(s, t, p, len);
                if (rc)
                    return rc;
            }
            continue;

        case XCS_LIBXL_REC_CHECKPOINT_END:
            if (len)
                return bad(s, "CHECKPOINT_END with length %u", len);
            if (s->opts->stream_type == XCS_STREAM_PLAIN)
                return bad(s, "CHECKPOINT_END in a plain stream");
            if (!in_cp)
                return bad(s, "CHECKPOINT_END without a libxc CHECKPOINT before it");
            in_cp = 0;
            r->checkpoints++;
            s->records_since_cp = 0;
            goto run_libxc; /* the libxc layer owns the fd again */

        case XCS_LIBXL_REC_CHECKPOINT_STATE:
            if (len == 0)
                return bad(s, "empty CHECKPOINT_STATE");
            if (s->opts->stream_type != XCS_STREAM_COLO)
                return bad(s, "CHECKPOINT_STATE outside a COLO stream");
            if (len != 8)
                return bad(s, "length %u (expected 8)", len);
            if (le32(p) > 3)
                return bad(s, "unknown checkpoint state %u", le32(p));
            continue;
        }
        return bad(s, "unhandled libxl record type %u", t);

    run_libxc:
        rc = libxc_records(s, &how);
        if (rc)
            return rc;
        if (how == LX_END) {
            libxc_done = 1;
        } else if (how == LX_CHECKPOINT) {
            in_cp = 1;
        } else {
            r->ended = 2;
            r->discarded_records = s->records_since_cp;
            if (s->records_since_cp)
                warn(s, "stream ends inside checkpoint %u: a restore fails over "
                        "to checkpoint %u", r->checkpoints + 1, r->checkpoints);
            return 0;
        }
    }
}

static int libxc_stream(struct scan *s)
{
    struct xcs_scan_report *r = s->rep;
    int how, rc;

    rc = libxc_headers(s);
    if (rc)
        return rc;
    for (;;) {
        rc = libxc_records(s, &how);
        if (rc)
            return rc;
        if (how == LX_END) {
            r->ended = 1;
            return check_trailing(s, 1);
        }
        if (how == LX_EOF) {
            r->ended = 2;
            r->discarded_records = s->records_since_cp;
            if (s->records_since_cp)
                warn(s, "stream ends inside checkpoint %u: a restore fails over "
                        "to checkpoint %u", r->checkpoints + 1, r->checkpoints);
            return 0;
        }
        /* No libxl layer: the next checkpoint's records follow directly. */
        r->checkpoints++;
        s->records_since_cp = 0;
    }
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
        *width = le32(p + 4) == 0 ? 64 : 32;
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
    lo.out_format = XCS_LEGACY_OUT_LIBXL;
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

        snprintf(r->error.reason, sizeof(r->error.reason), "%.300s", err);
        r->error.offset = st.err_offset;
        errno = e;
        return -1;
    }
    s->w.off = st.err_offset;
    s->w.layer = "legacy";
    s->w.name = st.err_chunk;
    s->w.has_type = 0;
    if (r->legacy.width_guessed)
        return bad(s, "%s (width %u and guest %s were guessed; pass them "
                      "explicitly)", st.err_reason, lo.width,
                   lo.guest == XCS_GUEST_PV ? "pv" : "hvm");
    return bad(s, "%s", st.err_reason);
}

/*----- xl header -----*/

static int xl_header(struct scan *s, enum xcs_scan_fmt *inner)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    uint32_t order;
    int rc;

    r->xl = 1;
    at(s, "xl", "xl header");
    rc = need(s, XCS_XL_HDR_SIZE, &p, "xl header");
    if (rc)
        return rc;
    if (memcmp(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN))
        return bad(s, "bad xl magic");
    order = le32(p + 32);
    r->xl_mflags = le32(p + 36);
    r->xl_oflags = le32(p + 40);
    r->xl_optlen = le32(p + 44);
    if (order != XCS_XL_BYTEORDER)
        return bad(s, "byte order word 0x%08x: written by a host of another "
                      "byte order", order);
    if (r->xl_mflags & ~(XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2))
        return bad(s, "unknown mandatory flags 0x%x",
                   r->xl_mflags & ~(XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2));
    if (r->xl_optlen >= 4) {
        rc = need(s, 4, &p, "xl config length");
        if (rc)
            return rc;
        r->xl_config_len = le32(p);
        if (r->xl_config_len > r->xl_optlen - 4)
            return bad(s, "config length %u overruns the optional data (%u bytes)",
                       r->xl_config_len, r->xl_optlen);
        rc = skip(s, r->xl_optlen - 4, "xl optional data");
    } else {
        rc = skip(s, r->xl_optlen, "xl optional data");
    }
    if (rc)
        return rc;
    *inner = (r->xl_mflags & XCS_XL_MFLAG_STREAMV2) ? XCS_FMT_LIBXL : XCS_FMT_LEGACY;
    return 0;
}

/*----- entry point -----*/

static int detect(struct scan *s, enum xcs_scan_fmt *fmt)
{
    static const uint8_t ff[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    const uint8_t *p;
    size_t got;

    at(s, "", "format detection");
    if (xcs_source_peek(s->in, XCS_XL_MAGIC_LEN, &p, &got) < 0)
        return io_error(s, "read");
    if (got == XCS_XL_MAGIC_LEN && !memcmp(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN))
        *fmt = XCS_FMT_XL;
    else if (got >= 8 && xcs_get_be64(p) == XCS_LIBXL_IDENT)
        *fmt = XCS_FMT_LIBXL;
    else if (got >= 8 && !memcmp(p, ff, 8))
        *fmt = XCS_FMT_LIBXC;
    else if (got >= 8)
        *fmt = XCS_FMT_LEGACY; /* no magic: the legacy heuristics decide */
    else
        return bad(s, "stream too short (%zu bytes) to be any known format", got);
    return 0;
}

int xcs_scan_fd(int fd, const struct xcs_scan_opts *opts,
                struct xcs_scan_report *rep)
{
    struct xcs_source in;
    struct scan s;
    enum xcs_scan_fmt fmt = opts->fmt;
    int in_open = 0, rc;

    memset(rep, 0, sizeof(*rep));
    memset(&s, 0, sizeof(s));
    rep->min_pfn = UINT64_MAX;
    rep->stream_type = opts->stream_type;
    s.in = &in;
    s.opts = opts;
    s.rep = rep;

    if (xcs_source_open(&in, fd, XCS_SOURCE_MAP) < 0) {
        s.in = NULL;
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
    if (fmt == XCS_FMT_XL) {
        rc = xl_header(&s, &fmt);
        if (rc)
            goto out;
    }
    switch (fmt) {
    case XCS_FMT_LIBXL:
        rc = libxl_stream(&s);
        break;
    case XCS_FMT_LIBXC:
        rc = libxc_stream(&s);
        break;
    case XCS_FMT_LEGACY:
        rc = legacy_stream(&s);
        break;
    default:
        rc = bad(&s, "no format to scan");
        break;
    }

out:
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
    free(s.sortbuf);
    rep->valid = rc == 0;
    return rc;
}
