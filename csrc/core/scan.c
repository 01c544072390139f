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
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codec.h"
#include "xcs_legacy.h"
#include "xcs_scan.h"

/*----- input source -----*/

#define SRC_SCRATCH (1u << 20)

int xcs_src_open(struct xcs_src *s, int fd, int seq)
{
    struct stat st;
    off_t cur;
    void *m;

    memset(s, 0, sizeof(*s));
    s->fd = fd;
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
    (void)madvise(m, (size_t)st.st_size, seq ? MADV_SEQUENTIAL : MADV_RANDOM);
    return 0;
}

void xcs_src_close(struct xcs_src *s)
{
    int saved = errno;

    if (s->map)
        munmap((void *)(s->map - s->start), (size_t)(s->start + s->map_len));
    if (s->mapped)
        (void)lseek(s->fd, (off_t)(s->start + s->pos), SEEK_SET);
    free(s->buf);
    free(s->scratch);
    s->map = NULL;
    s->buf = NULL;
    s->scratch = NULL;
    errno = saved;
}

/* Exact-read mode: make n bytes available in buf (fewer at EOF). */
static int src_fill(struct xcs_src *s, size_t n)
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
        r = read(s->fd, s->buf + s->buf_tail, want);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            break;
        s->buf_tail += (size_t)r;
    }
    return 0;
}

int xcs_src_peek(struct xcs_src *s, size_t n, const uint8_t **p, size_t *got)
{
    if (s->mapped) {
        size_t left = s->map_len - (size_t)s->pos;

        *p = s->map ? s->map + s->pos : NULL;
        *got = n < left ? n : left;
        return 0;
    }
    if (src_fill(s, n) < 0)
        return -1;
    *p = s->buf + s->buf_head;
    *got = s->buf_tail - s->buf_head < n ? s->buf_tail - s->buf_head : n;
    return 0;
}

int xcs_src_get(struct xcs_src *s, size_t n, const uint8_t **p, size_t *got)
{
    size_t have;

    if (xcs_src_peek(s, n, p, &have) < 0)
        return -1;
    if (!s->mapped)
        s->buf_head += have;
    s->pos += have;
    *got = have;
    return have == n ? 0 : 1;
}

int xcs_src_skip(struct xcs_src *s, uint64_t n, uint64_t *got)
{
    uint64_t done = 0;

    if (s->mapped) {
        uint64_t left = s->map_len - s->pos;

        done = n < left ? n : left;
        s->pos += done;
        *got = done;
        return done == n ? 0 : 1;
    }
    {
        size_t avail = s->buf_tail - s->buf_head;
        size_t take = n < avail ? (size_t)n : avail;

        s->buf_head += take;
        done = take;
    }
    if (done < n && !s->scratch) {
        s->scratch = malloc(SRC_SCRATCH);
        if (!s->scratch)
            return -1;
    }
    while (done < n) {
        size_t want = n - done < SRC_SCRATCH ? (size_t)(n - done) : SRC_SCRATCH;
        ssize_t r = read(s->fd, s->scratch, want);

        if (r < 0) {
            if (errno == EINTR)
                continue;
            s->pos += done;
            return -1;
        }
        if (r == 0)
            break;
        done += (uint64_t)r;
    }
    s->pos += done;
    *got = done;
    return done == n ? 0 : 1;
}

int xcs_src_at_eof(struct xcs_src *s)
{
    const uint8_t *p;
    size_t got;

    if (xcs_src_peek(s, 1, &p, &got) < 0)
        return -1;
    return got == 0;
}

uint64_t xcs_src_remaining(const struct xcs_src *s)
{
    if (!s->mapped)
        return UINT64_MAX;
    return s->map_len - s->pos;
}

size_t xcs_src_buffered(const struct xcs_src *s)
{
    return s->mapped ? 0 : s->buf_tail - s->buf_head;
}

void xcs_src_consumed(struct xcs_src *s, uint64_t n)
{
    s->pos += n;
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
    struct xcs_src *in;
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
    s->rep->error.offset = s->in->pos;
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
    s->w.off = s->in->pos;
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
    int r = xcs_src_get(s->in, n, p, &got);

    if (r < 0)
        return io_error(s, "read");
    if (r > 0)
        return bad(s, "stream truncated: %zu of %zu bytes of %s", got, n, what);
    return 0;
}

static int skip(struct scan *s, uint64_t n, const char *what)
{
    uint64_t got;
    int r = xcs_src_skip(s->in, n, &got);

    if (r < 0)
        return io_error(s, "read");
    if (r > 0)
        return bad(s, "stream truncated: %llu of %llu bytes of %s",
                   (unsigned long long)got, (unsigned long long)n, what);
    return 0;
}

/* Body of a record (length + padding), checking the padding is zero. */
static int record_body(struct scan *s, uint32_t len, const uint8_t **p)
{
    uint32_t padded = xcs_rec_padded(len);
    int rc = need(s, padded, p, "record body");

    if (rc)
        return rc;
    if (!xcs_zeros(*p + len, padded - len))
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
        uint64_t w = xcs_get_le64(words + 8 * (size_t)i);
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
        uint64_t w = xcs_get_le64(words + 8 * (size_t)i);

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
    count = xcs_get_le32(p);
    res = xcs_get_le32(p + 4);
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
        uint64_t w = xcs_get_le64(words + 8 * (size_t)i);
        unsigned int type = xcs_pfn_type(w);

        if (w & XCS_PAGE_DATA_RSVD_MASK)
            return bad(s, "reserved bits set in pfn[%u]: 0x%016llx", i,
                       (unsigned long long)(w & XCS_PAGE_DATA_RSVD_MASK));
        if (!xcs_pfn_type_valid(type))
            return bad(s, "invalid page type %u in pfn[%u] (0x%016llx)", type, i,
                       (unsigned long long)w);
        if (xcs_pfn_type_has_data(type))
            npages++;
    }
    expect = 8 + (uint64_t)count * 8 + (uint64_t)npages * XCS_PAGE_SIZE;
    if (len != expect)
        return bad(s, "length %u, expected 8 + %llu + %llu = %llu for %u pfns "
                      "and %u pages", len, (unsigned long long)count * 8,
                   (unsigned long long)npages * XCS_PAGE_SIZE,
                   (unsigned long long)expect, count, npages);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t w = xcs_get_le64(words + 8 * (size_t)i);
        unsigned int type = xcs_pfn_type(w);
        uint64_t pfn = xcs_pfn_of(w);

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
        if (xcs_pfn_type_has_data(type))
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
        uint16_t code = xcs_get_le16(p + off), inst = xcs_get_le16(p + off + 2);
        uint32_t dlen = xcs_get_le32(p + off + 4);

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
    id = xcs_get_le32(p);
    res = xcs_get_le32(p + 4);
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
    struct xcs_ihdr ih;
    struct xcs_dhdr dh;
    char why[XCS_WHY_LEN];
    int rc;

    r->libxc = 1;
    r->libxc_offset = s->in->pos;
    at(s, "libxc", "image header");
    rc = need(s, XCS_IHDR_SIZE, &p, "image header");
    if (rc)
        return rc;
    rc = xcs_ihdr_parse(p, &ih, why, sizeof(why)) ? bad(s, "%s", why) : 0;
    r->libxc_version = s->version = ih.version;
    r->libxc_options = ih.options;
    if (rc)
        return rc;

    at(s, "libxc", "domain header");
    rc = need(s, XCS_DHDR_SIZE, &p, "domain header");
    if (rc)
        return rc;
    rc = xcs_dhdr_parse(p, &dh, why, sizeof(why)) ? bad(s, "%s", why) : 0;
    r->xen_major = dh.xen_major;
    r->xen_minor = dh.xen_minor;
    if (rc)
        return rc;
    s->guest = r->guest = (enum xcs_guest)dh.type;
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
        uint64_t off = s->in->pos;
        uint32_t t, len;

        at(s, "libxc", "record header");
        if (s->opts->stream_type != XCS_STREAM_PLAIN && r->checkpoints > 0) {
            int e = xcs_src_at_eof(s->in);

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
        t = xcs_get_le32(p);
        len = xcs_get_le32(p + 4);
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
                if (!rc && !xcs_zeros(p + (len & 7), 8 - (len & 7)))
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
        if (!xcs_zeros(p + 2, 6))
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
        start = xcs_get_le32(p);
        endp = xcs_get_le32(p + 4);
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
        if (xcs_get_le32(p + 20))
            return bad(s, "reserved field set (0x%x)", xcs_get_le32(p + 20));
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
        count = xcs_get_le32(p);
        if (xcs_get_le32(p + 4))
            return bad(s, "reserved field set (0x%x)", xcs_get_le32(p + 4));
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
            if (xcs_get_le32(p + i + 4))
                return bad(s, "MSR entry %u has flags 0x%x (must be zero)",
                           i / 16, xcs_get_le32(p + i + 4));
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
        if (xcs_src_peek(s->in, XCS_LEGACY_QEMU_SIG_LEN + 4, &p, &got) < 0)
            return io_error(s, "read");
        if (got == XCS_LEGACY_QEMU_SIG_LEN + 4 &&
            !memcmp(p, XCS_LEGACY_QEMU_SIG_0002, XCS_LEGACY_QEMU_SIG_LEN)) {
            uint32_t qlen = xcs_get_le32(p + XCS_LEGACY_QEMU_SIG_LEN);
            int rc;

            s->w.name = "qemu record after END";
            rc = skip(s, XCS_LEGACY_QEMU_SIG_LEN + 4 + (uint64_t)qlen, "qemu record");
            if (rc)
                return rc;
            r->qemu_trailer_len = qlen;
            at(s, "libxc", "trailing data");
        }
    }
    e = xcs_src_at_eof(s->in);
    if (e < 0)
        return io_error(s, "read");
    if (!e) {
        uint64_t left = xcs_src_remaining(s->in);

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
    id = xcs_get_le32(p);
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
        if (xcs_get_le32(*p) > XCS_EMULATOR_QEMU_UPSTREAM)
            return bad(s, "unknown emulator id 0x%x", xcs_get_le32(*p));
        rc = skip(s, (len & ~7u) - 8, "emulator context");
        if (!rc && (len & 7)) {
            rc = need(s, 8, &q, "emulator context");
            if (!rc && !xcs_zeros(q + (len & 7), 8 - (len & 7)))
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
    struct xcs_libxl_hdr lh;
    char why[XCS_WHY_LEN];
    int libxc_seen = 0, libxc_done = 0, in_cp = 0, how, rc;

    r->libxl = 1;
    at(s, "libxl", "libxl header");
    rc = need(s, XCS_LIBXL_HDR_SIZE, &p, "libxl header");
    if (rc)
        return rc;
    rc = xcs_libxl_hdr_parse(p, &lh, why, sizeof(why)) ? bad(s, "%s", why) : 0;
    if (lh.ident == XCS_LIBXL_IDENT) { /* the report shows a libxl header's fields */
        r->libxl_version = lh.version;
        r->libxl_options = lh.options;
    }
    if (rc)
        return rc;

    for (;;) {
        uint64_t off = s->in->pos;
        uint32_t t, len;

        at(s, "libxl", "record header");
        if (in_cp && r->checkpoints > 0) {
            int e = xcs_src_at_eof(s->in);

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
        t = xcs_get_le32(p);
        len = xcs_get_le32(p + 4);
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
            if (xcs_get_le32(p) > 3)
                return bad(s, "unknown checkpoint state %u", xcs_get_le32(p));
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

    if (xcs_src_peek(s->in, 16, &p, &got) < 0 || got < 8) {
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

static int xl_header(struct scan *s, enum xcs_fmt *inner)
{
    struct xcs_scan_report *r = s->rep;
    const uint8_t *p;
    struct xcs_xl_hdr h;
    char why[XCS_WHY_LEN];
    int rc;

    r->xl = 1;
    at(s, "xl", "xl header");
    rc = need(s, XCS_XL_HDR_SIZE, &p, "xl header");
    if (rc)
        return rc;
    rc = xcs_xl_hdr_parse(p, &h, why, sizeof(why)) ? bad(s, "%s", why) : 0;
    if (!memcmp(p, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN)) { /* the report shows an xl header's fields */
        r->xl_mflags = h.mflags;
        r->xl_oflags = h.oflags;
        r->xl_optlen = h.optlen;
    }
    if (rc)
        return rc;
    if (h.optlen >= 4) {
        rc = need(s, 4, &p, "xl config length");
        if (rc)
            return rc;
        r->xl_config_len = xcs_get_le32(p);
        if (xcs_xl_config_check(&h, r->xl_config_len, why, sizeof(why)))
            return bad(s, "%s", why);
        rc = skip(s, h.optlen - 4, "xl optional data");
    } else {
        rc = skip(s, h.optlen, "xl optional data");
    }
    if (rc)
        return rc;
    *inner = (h.mflags & XCS_XL_MFLAG_STREAMV2) ? XCS_FMT_LIBXL : XCS_FMT_LEGACY;
    return 0;
}

/*----- entry point -----*/

static int detect(struct scan *s, enum xcs_fmt *fmt)
{
    const uint8_t *p;
    size_t got;

    at(s, "", "format detection");
    if (xcs_src_peek(s->in, XCS_FMT_SNIFF_LEN, &p, &got) < 0)
        return io_error(s, "read");
    *fmt = xcs_fmt_sniff(p, got, 0); /* got < XCS_FMT_SNIFF_LEN: the whole stream */
    if (*fmt == XCS_FMT_AUTO)
        return bad(s, "stream too short (%zu bytes) to be any known format", got);
    return 0;
}

int xcs_scan_fd(int fd, const struct xcs_scan_opts *opts,
                struct xcs_scan_report *rep)
{
    struct xcs_src in;
    struct scan s;
    enum xcs_fmt fmt = opts->fmt;
    int in_open = 0, rc;

    memset(rep, 0, sizeof(*rep));
    memset(&s, 0, sizeof(s));
    rep->min_pfn = UINT64_MAX;
    rep->stream_type = opts->stream_type;
    s.in = &in;
    s.opts = opts;
    s.rep = rep;

    if (xcs_src_open(&in, fd, 0) < 0) {
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
        rep->bytes = in.pos;
        xcs_src_close(&in);
    }
    if (s.seen)
        for (size_t i = 0; i < SEEN_CHUNKS; i++)
            free(s.seen[i]);
    free(s.seen);
    free(s.sortbuf);
    rep->valid = rc == 0;
    return rc;
}
