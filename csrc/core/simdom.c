/*
 * simdom.c - simulated domains (see simdom.h and docs/sim-format.md).
 *
 * Memory ordering between the writer (workload, another process) and the
 * saver, both on the same MAP_SHARED file:
 *
 *  - Dirty log.  The writer stores the page, then does a seq_cst fence and
 *    reads the log-dirty flag; if set it ORs the bit in with release order.
 *    The saver exchanges bitmap words with 0 using acquire order and only
 *    then copies the pages it found, so it sees at least the contents that
 *    were there when the bit was set; a write that lands after the exchange
 *    sets the bit again and is sent in a later round.  Enabling stores the
 *    flag and does a seq_cst fence before the saver reads any page: with the
 *    writer's fence this is the store-buffering pattern, so a write that did
 *    not see the flag is visible to the first full pass.
 *
 *  - Stopping vCPUs.  The writer increments hdr->inflight (seq_cst), then
 *    loads the state (seq_cst) and writes only when running, decrementing
 *    inflight (release) once the page and its bit are done.  Leaving running
 *    stores the state (seq_cst) and waits for inflight to read 0 (acquire).
 *    Either the writer sees the new state, or the saver sees its increment
 *    and waits for it: after xcs_sim_set_state() returns no page changes.
 */
#include "simdom.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "private_file.h"

/* The header is an on-disk format (docs/sim-format.md): pin its layout. */
_Static_assert(offsetof(struct xcs_sim_hdr, nr_pages) == 16, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, state) == 36, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, dirty_count) == 48, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, file_size) == 112, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, fill) == 120, "sim header");
_Static_assert(sizeof(struct xcs_sim_hdr) == 128, "sim header");

/*----- PRNG: splitmix64 seeds xoshiro256+ (public-domain algorithms) -----*/

static inline uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

struct xoshiro {
    uint64_t s[4];
};

static void xoshiro_seed(struct xoshiro *x, uint64_t seed)
{
    uint64_t sm = seed;
    for (int i = 0; i < 4; i++)
        x->s[i] = splitmix64(&sm);
}

static inline uint64_t xoshiro_next(struct xoshiro *x)
{
    uint64_t *s = x->s;
    uint64_t result = s[0] + s[3];
    uint64_t t = s[1] << 17;

    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform in [0, n) without a division (Lemire's multiply-shift). */
static inline uint64_t xoshiro_below(struct xoshiro *x, uint64_t n)
{
    return (uint64_t)(((unsigned __int128)xoshiro_next(x) * n) >> 64);
}

static void fill_random(uint8_t *dst, size_t len, uint64_t seed)
{
    struct xoshiro x;
    uint64_t *w = (uint64_t *)dst;

    xoshiro_seed(&x, seed);
    for (size_t i = 0; i < len / 8; i++)
        w[i] = xoshiro_next(&x);
}

/*----- XXH64 (the public xxHash64 algorithm, written from its spec) -----*/

#define XXH_P1 0x9e3779b185ebca87ULL
#define XXH_P2 0xc2b2ae3d27d4eb4fULL
#define XXH_P3 0x165667b19e3779f9ULL
#define XXH_P4 0x85ebca77c2b2ae63ULL
#define XXH_P5 0x27d4eb2f165667c5ULL

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian host: see xcs_format.h */
    return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t xxh_round(uint64_t acc, uint64_t in)
{
    acc += in * XXH_P2;
    acc = rotl64(acc, 31);
    return acc * XXH_P1;
}

static inline uint64_t xxh_merge(uint64_t acc, uint64_t v)
{
    acc ^= xxh_round(0, v);
    return acc * XXH_P1 + XXH_P4;
}

/*
 * Streaming XXH64: the same function over a buffer fed in pieces, so that
 * the digest can hash a hole as zeros from a small buffer without reading
 * it.  Stripes of 32 bytes go straight through the four lanes; a piece
 * that ends mid-stripe leaves its tail in buf.
 */
struct xxh64_state {
    uint64_t v[4];
    uint64_t total;
    uint64_t seed;
    uint8_t buf[32];
    size_t n; /* bytes in buf */
};

static void xxh64_init(struct xxh64_state *st, uint64_t seed)
{
    memset(st, 0, sizeof(*st));
    st->seed = seed;
    st->v[0] = seed + XXH_P1 + XXH_P2;
    st->v[1] = seed + XXH_P2;
    st->v[2] = seed;
    st->v[3] = seed - XXH_P1;
}

static inline void xxh64_stripe(uint64_t v[4], const uint8_t *p)
{
    v[0] = xxh_round(v[0], rd64(p));
    v[1] = xxh_round(v[1], rd64(p + 8));
    v[2] = xxh_round(v[2], rd64(p + 16));
    v[3] = xxh_round(v[3], rd64(p + 24));
}

static void xxh64_update(struct xxh64_state *st, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    const uint8_t *end = p + len;
    uint64_t v[4] = {st->v[0], st->v[1], st->v[2], st->v[3]};

    st->total += len;
    if (st->n) {
        size_t take = 32 - st->n < len ? 32 - st->n : len;

        memcpy(st->buf + st->n, p, take);
        st->n += take;
        p += take;
        if (st->n < 32)
            return;
        xxh64_stripe(v, st->buf);
        st->n = 0;
    }
    while ((size_t)(end - p) >= 32) {
        xxh64_stripe(v, p);
        p += 32;
    }
    memcpy(st->buf, p, (size_t)(end - p));
    st->n = (size_t)(end - p);
    memcpy(st->v, v, sizeof(v));
}

static uint64_t xxh64_final(const struct xxh64_state *st)
{
    const uint8_t *p = st->buf;
    const uint8_t *end = p + st->n;
    uint64_t h;

    if (st->total >= 32) {
        h = rotl64(st->v[0], 1) + rotl64(st->v[1], 7) + rotl64(st->v[2], 12) +
            rotl64(st->v[3], 18);
        for (int i = 0; i < 4; i++)
            h = xxh_merge(h, st->v[i]);
    } else {
        h = st->seed + XXH_P5;
    }
    h += st->total;
    while (p + 8 <= end) {
        h ^= xxh_round(0, rd64(p));
        h = rotl64(h, 27) * XXH_P1 + XXH_P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)rd32(p) * XXH_P1;
        h = rotl64(h, 23) * XXH_P2 + XXH_P3;
        p += 4;
    }
    while (p < end) {
        h ^= (*p) * XXH_P5;
        h = rotl64(h, 11) * XXH_P1;
        p++;
    }
    h ^= h >> 33;
    h *= XXH_P2;
    h ^= h >> 29;
    h *= XXH_P3;
    h ^= h >> 32;
    return h;
}

uint64_t xcs_xxh64(const void *buf, size_t len, uint64_t seed)
{
    struct xxh64_state st;

    xxh64_init(&st, seed);
    xxh64_update(&st, buf, len);
    return xxh64_final(&st);
}

/*----- layout -----*/

static uint64_t round_page(uint64_t v)
{
    return (v + XCS_SIM_PAGE_SIZE - 1) & ~(uint64_t)(XCS_SIM_PAGE_SIZE - 1);
}

void xcs_sim_layout(uint64_t nr_pages, unsigned int nr_vcpus,
                    struct xcs_sim_hdr *out)
{
    memset(out, 0, sizeof(*out));
    memcpy(out->magic, XCS_SIM_MAGIC, sizeof(out->magic));
    out->version = XCS_SIM_VERSION;
    out->hdr_size = XCS_SIM_HDR_SIZE;
    out->nr_pages = nr_pages;
    out->page_shift = XCS_SIM_PAGE_SHIFT;
    out->nr_vcpus = nr_vcpus;
    out->vcpu_size = XCS_SIM_VCPU_SIZE;
    /*
     * Pages come first, at a fixed offset, so that the restore engine can
     * write them before the stream has told it the domain's shape.
     */
    out->pages_off = XCS_SIM_HDR_SIZE;
    out->vcpu_off = out->pages_off + (nr_pages << XCS_SIM_PAGE_SHIFT);
    out->bitmap_off =
        out->vcpu_off + round_page((uint64_t)nr_vcpus * XCS_SIM_VCPU_SIZE);
    out->bitmap_bytes = (nr_pages + 63) / 64 * 8;
    out->file_size = out->bitmap_off + round_page(out->bitmap_bytes);
}

static int shape_ok(uint64_t nr_pages, unsigned int nr_vcpus)
{
    return nr_pages >= 1 && nr_pages <= XCS_SIM_MAX_PAGES && nr_vcpus >= 1 &&
           nr_vcpus <= XCS_SIM_MAX_VCPUS;
}

/*----- content -----*/

#define NR_TEMPLATES 8

void xcs_sim_fill_vcpu(uint8_t *blob, unsigned int vcpu, uint64_t seed)
{
    /* A recognisable head ("vcpu", id) then register-like noise. */
    fill_random(blob, XCS_SIM_VCPU_SIZE,
                seed ^ (0x7663707500000000ULL + vcpu));
    memcpy(blob, "VCPU", 4);
    memcpy(blob + 4, &vcpu, 4);
}

enum page_kind {
    PAGE_ZERO,
    PAGE_TEMPLATE, /* classic only: a copy of one of NR_TEMPLATES pages */
    PAGE_RANDOM,
    PAGE_TEXT,     /* ASCII words, spaces, punctuation, newlines */
    PAGE_PTABLE,   /* a page table: a run of present PTEs, the rest zero */
    PAGE_RECORDS,  /* an array of 64-byte kernel-like structures */
};

/* Which kind page pfn of a classic domain created from seed is, and its sub-seed. */
static enum page_kind page_kind(uint64_t seed, uint64_t pfn, uint64_t *sub)
{
    uint64_t s = seed ^ (pfn * 0xd1342543de82ef95ULL);
    uint64_t h = splitmix64(&s);
    unsigned int pct = (unsigned int)((h >> 32) % 100);

    *sub = h;
    if (pct < 25)
        return PAGE_ZERO;
    if (pct < 35) {
        *sub = (h & 0xffffffffu) % NR_TEMPLATES;
        return PAGE_TEMPLATE;
    }
    return PAGE_RANDOM;
}

/*
 * The mixed fill's rule (docs/sim-format.md): h = splitmix64 of
 * (seed ^ pfn * K), pct = (h >> 32) % 100: [0, 35) zero, [35, 49) text,
 * [49, 62) page table, [62, 75) records, [75, 100) random.  A page keeps its
 * class when the workload rewrites it, so the blend holds while it runs.
 */
static enum page_kind mixed_kind(uint64_t seed, uint64_t pfn, uint64_t *sub)
{
    uint64_t s = seed ^ (pfn * 0xa0761d6478bd642fULL) ^ 0x6d69786564000000ULL;
    uint64_t h = splitmix64(&s);
    unsigned int pct = (unsigned int)((h >> 32) % 100);

    *sub = h;
    if (pct < 35)
        return PAGE_ZERO;
    if (pct < 49)
        return PAGE_TEXT;
    if (pct < 62)
        return PAGE_PTABLE;
    if (pct < 75)
        return PAGE_RECORDS;
    return PAGE_RANDOM;
}

/* The kind of page pfn at creation under fill (classic: page_kind). */
static enum page_kind fill_kind(enum xcs_sim_fill fill, uint64_t seed,
                                uint64_t pfn, uint64_t *sub)
{
    uint64_t s = seed ^ (pfn * 0x9e3779b97f4a7c15ULL);

    switch (fill) {
    case XCS_SIM_FILL_CLASSIC:
        return page_kind(seed, pfn, sub);
    case XCS_SIM_FILL_MIXED:
        return mixed_kind(seed, pfn, sub);
    case XCS_SIM_FILL_ZERO:
        *sub = 0;
        return PAGE_ZERO;
    case XCS_SIM_FILL_TEXT:
        *sub = splitmix64(&s);
        return PAGE_TEXT;
    case XCS_SIM_FILL_RANDOM:
        break;
    }
    *sub = splitmix64(&s);
    return PAGE_RANDOM;
}

/* Common English words: text pages are drawn from them, frequent ones first. */
#define W(s) {s, sizeof(s) - 1}
static const struct word {
    char text[8]; /* copied whole: a constant-size memcpy, no call */
    size_t len;
} words[] = {
    W("the"), W("of"), W("and"), W("to"), W("a"), W("in"), W("is"), W("it"),
    W("that"), W("for"), W("was"), W("on"), W("are"), W("as"), W("with"),
    W("be"), W("at"), W("this"), W("have"), W("from"), W("or"), W("one"),
    W("had"), W("by"), W("word"), W("but"), W("not"), W("what"), W("all"),
    W("were"), W("we"), W("when"), W("your"), W("can"), W("said"), W("there"),
    W("use"), W("an"), W("each"), W("which"), W("she"), W("do"), W("how"),
    W("their"), W("if"), W("will"), W("up"), W("other"), W("about"), W("out"),
    W("many"), W("then"), W("them"), W("these"), W("so"), W("some"), W("her"),
    W("would"), W("make"), W("like"), W("him"), W("into"), W("time"),
    W("has"), W("look"), W("two"), W("more"), W("write"), W("go"), W("see"),
    W("number"), W("no"), W("way"), W("could"), W("people"), W("my"),
    W("than"), W("first"), W("water"), W("been"), W("call"), W("who"),
    W("oil"), W("its"), W("now"), W("find"), W("long"), W("down"), W("day"),
    W("did"), W("get"), W("come"), W("made"), W("may"), W("part"),
    W("memory"), W("page"), W("kernel"), W("server"), W("request"),
    W("error"), W("config"), W("value"), W("buffer"), W("process"),
    W("thread"), W("network"), W("device"), W("file"),
};
#undef W
#define NR_WORDS (sizeof(words) / sizeof(words[0]))

/*
 * Text: words (skewed to the frequent ones: the index is the smaller of
 * two draws), a space between them, ". " and a capital now and then, a
 * newline every 8-15 words, a 4-digit number every ~32 words.  Written
 * into a page plus slack, so that a word (8 bytes copied whatever its
 * length) never needs a bounds check.
 */
static void fill_text(uint8_t *dst, uint64_t sub)
{
    static const char digits[] = "0123456789";
    uint8_t buf[XCS_SIM_PAGE_SIZE + 32];
    struct xoshiro x;
    size_t at = 0;
    unsigned int line = 0;
    int capital = 1;

    xoshiro_seed(&x, sub);
    while (at < XCS_SIM_PAGE_SIZE) {
        uint64_t r = xoshiro_next(&x);
        uint64_t a = (r & 0xffff) * NR_WORDS >> 16;
        uint64_t b = ((r >> 16) & 0xffff) * NR_WORDS >> 16;
        uint64_t i = a < b ? a : b;
        size_t start = at;

        if (((r >> 32) & 31) == 0) {
            for (int d = 0; d < 4; d++)
                buf[at++] = (uint8_t)digits[(r >> (44 + 4 * d)) % 10];
        } else {
            memcpy(buf + at, words[i].text, sizeof(words[i].text));
            at += words[i].len;
        }
        if (capital && buf[start] >= 'a')
            buf[start] = (uint8_t)(buf[start] - 32);
        capital = ((r >> 37) & 15) == 0;
        if (capital)
            buf[at++] = '.';
        if (++line >= 8 + ((r >> 41) & 7)) {
            buf[at++] = '\n';
            line = 0;
        } else {
            buf[at++] = ' ';
        }
    }
    memcpy(dst, buf, XCS_SIM_PAGE_SIZE);
}

/*
 * A page table: 512 PTEs, a run of 1-128 present entries mapping
 * consecutive frames (flags 0x67, NX on some), every other entry zero.
 */
static void fill_ptable(uint8_t *dst, uint64_t sub)
{
    struct xoshiro x;
    uint64_t pte[XCS_SIM_PAGE_SIZE / 8] = {0};
    uint64_t n, start, frame, flags;

    xoshiro_seed(&x, sub);
    n = 1 + xoshiro_below(&x, 128);
    start = xoshiro_below(&x, XCS_SIM_PAGE_SIZE / 8 - n + 1);
    frame = xoshiro_below(&x, 1ULL << 24);
    flags = (xoshiro_next(&x) & 1) ? 0x8000000000000067ULL : 0x67ULL;
    for (uint64_t i = 0; i < n; i++)
        pte[start + i] = ((frame + i) << 12) | flags;
    memcpy(dst, pte, sizeof(pte));
}

static const char *const comms[] = {
    "systemd", "kworker/0:1", "sshd", "bash", "nginx", "postgres",
    "rcu_sched", "ksoftirqd/0", "journald", "python3", "cron", "dbus",
};

/*
 * 64 structures of 64 bytes, like a slab of kernel objects: u64 id
 * (consecutive), two pointers into one region (same high bits), u32
 * refcount (0-3), u32 flags (one of 4), a 16-byte name, 16 zero bytes.
 */
static void fill_records(uint8_t *dst, uint64_t sub)
{
    struct xoshiro x;
    uint64_t id, region;

    xoshiro_seed(&x, sub);
    id = xoshiro_below(&x, 1ULL << 20);
    region = 0xffff888000000000ULL | (xoshiro_below(&x, 1ULL << 12) << 28);
    memset(dst, 0, XCS_SIM_PAGE_SIZE);
    for (unsigned int i = 0; i < XCS_SIM_PAGE_SIZE / 64; i++) {
        uint8_t *rec = dst + i * 64;
        uint64_t r = xoshiro_next(&x);
        uint64_t p1 = region | ((r & 0xfffff) << 6);
        uint64_t p2 = region | (((r >> 20) & 0xfffff) << 6);
        uint32_t ref = (uint32_t)((r >> 40) & 3);
        uint32_t fl = 0x100u << ((r >> 42) & 3);
        const char *comm = comms[((r >> 44) & 0xffff) % (sizeof(comms) / sizeof(comms[0]))];
        uint64_t myid = id + i;

        memcpy(rec, &myid, 8);
        memcpy(rec + 8, &p1, 8);
        memcpy(rec + 16, &p2, 8);
        memcpy(rec + 24, &ref, 4);
        memcpy(rec + 28, &fl, 4);
        memcpy(rec + 32, comm, strlen(comm)); /* at most 15: NUL-padded */
    }
}

/* Write one page of that kind (not PAGE_TEMPLATE) from sub. */
static void fill_page(uint8_t *dst, enum page_kind kind, uint64_t sub)
{
    switch (kind) {
    case PAGE_ZERO:
        memset(dst, 0, XCS_SIM_PAGE_SIZE);
        break;
    case PAGE_TEXT:
        fill_text(dst, sub);
        break;
    case PAGE_PTABLE:
        fill_ptable(dst, sub);
        break;
    case PAGE_RECORDS:
        fill_records(dst, sub);
        break;
    case PAGE_TEMPLATE:
    case PAGE_RANDOM:
        fill_random(dst, XCS_SIM_PAGE_SIZE, sub);
        break;
    }
}

static const char *const fill_names[] = {
    [XCS_SIM_FILL_CLASSIC] = "classic",
    [XCS_SIM_FILL_RANDOM] = "random",
    [XCS_SIM_FILL_ZERO] = "zero",
    [XCS_SIM_FILL_TEXT] = "text",
    [XCS_SIM_FILL_MIXED] = "mixed",
};

const char *xcs_sim_fill_name(enum xcs_sim_fill fill)
{
    return (unsigned int)fill <= XCS_SIM_FILL_MAX ? fill_names[fill] : "unknown";
}

int xcs_sim_fill_parse(const char *name, enum xcs_sim_fill *out)
{
    for (unsigned int i = 0; i <= XCS_SIM_FILL_MAX; i++) {
        if (strcmp(name, fill_names[i]) == 0) {
            *out = (enum xcs_sim_fill)i;
            return 0;
        }
    }
    errno = EINVAL;
    return -1;
}

/*----- open/close/create -----*/

static int check_header(const struct xcs_sim_hdr *h, uint64_t st_size)
{
    struct xcs_sim_hdr want;

    if (memcmp(h->magic, XCS_SIM_MAGIC, sizeof(h->magic)) != 0 ||
        h->version != XCS_SIM_VERSION || h->hdr_size != XCS_SIM_HDR_SIZE ||
        h->page_shift != XCS_SIM_PAGE_SHIFT ||
        h->vcpu_size != XCS_SIM_VCPU_SIZE || !shape_ok(h->nr_pages, h->nr_vcpus))
        return -1;
    xcs_sim_layout(h->nr_pages, h->nr_vcpus, &want);
    if (h->pages_off != want.pages_off || h->vcpu_off != want.vcpu_off ||
        h->bitmap_off != want.bitmap_off ||
        h->bitmap_bytes != want.bitmap_bytes ||
        h->file_size != want.file_size || st_size < want.file_size)
        return -1;
    return 0;
}

void xcs_sim_close(struct xcs_sim_dom *dom)
{
    if (dom->map && dom->map != MAP_FAILED)
        munmap(dom->map, dom->map_len);
    if (dom->fd >= 0)
        close(dom->fd);
    memset(dom, 0, sizeof(*dom));
    dom->fd = -1;
}

int xcs_sim_map_fd(int fd, int flags, struct xcs_sim_dom *dom)
{
    struct xcs_sim_hdr hdr;
    struct stat st;
    int prot = (flags & XCS_SIM_RDONLY) ? PROT_READ : PROT_READ | PROT_WRITE;
    ssize_t n;
    int saved;
    int rc = -1;

    memset(dom, 0, sizeof(*dom));
    dom->fd = -1;
    dom->map = MAP_FAILED;

    n = pread(fd, &hdr, sizeof(hdr), 0);
    if (n < 0)
        goto out;
    if (fstat(fd, &st) < 0)
        goto out;
    if ((size_t)n != sizeof(hdr) || check_header(&hdr, (uint64_t)st.st_size)) {
        errno = EINVAL; /* not a (complete) simulated domain */
        goto out;
    }
    if (hdr.file_size > SIZE_MAX) {
        errno = EFBIG;
        goto out;
    }
    dom->fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (dom->fd < 0)
        goto out;
    dom->map_len = (size_t)hdr.file_size;
    dom->map = mmap(NULL, dom->map_len, prot, MAP_SHARED, dom->fd, 0);
    if (dom->map == MAP_FAILED)
        goto out;
    dom->hdr = dom->map;
    dom->nr_pages = hdr.nr_pages;
    dom->nr_vcpus = hdr.nr_vcpus;
    dom->pages = (uint8_t *)dom->map + hdr.pages_off;
    dom->vcpus = (uint8_t *)dom->map + hdr.vcpu_off;
    dom->bitmap = (uint64_t *)((uint8_t *)dom->map + hdr.bitmap_off);
    rc = 0;

out:
    if (rc) {
        saved = errno;
        xcs_sim_close(dom);
        errno = saved;
    }
    return rc;
}

int xcs_sim_open(const char *path, int flags, struct xcs_sim_dom *dom)
{
    int fd = -1;
    int saved;
    int rc = -1;

    fd = open(path, ((flags & XCS_SIM_RDONLY) ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0) {
        memset(dom, 0, sizeof(*dom));
        dom->fd = -1;
        goto out;
    }
    rc = xcs_sim_map_fd(fd, flags, dom);

out:
    saved = errno;
    if (fd >= 0)
        close(fd);
    errno = saved;
    return rc;
}

int xcs_sim_format_fd(int fd, uint64_t nr_pages, unsigned int nr_vcpus,
                      uint64_t seed, enum xcs_sim_state state)
{
    struct xcs_sim_hdr hdr;
    ssize_t r;

    if (!shape_ok(nr_pages, nr_vcpus)) {
        errno = EINVAL;
        return -1;
    }
    xcs_sim_layout(nr_pages, nr_vcpus, &hdr);
    hdr.seed = seed;
    hdr.state = (uint32_t)state;
    if (ftruncate(fd, (off_t)hdr.file_size) < 0)
        return -1;
    r = pwrite(fd, &hdr, sizeof(hdr), 0);
    if (r < 0)
        return -1;
    if ((size_t)r != sizeof(hdr)) {
        errno = EIO;
        return -1;
    }
    return 0;
}

#define CREATE_CHUNK_PAGES 16384u         /* 64 MiB between cancel checks */
#define RESERVE_CHUNK (256ULL << 20)      /* fallocate steps */

static int cancel_now(xcs_sim_cancel_fn cancelled, void *data)
{
    if (cancelled && cancelled(data)) {
        errno = EINTR;
        return 1;
    }
    return 0;
}

/*
 * Reserve [0, size) of fd: ENOSPC now rather than SIGBUS when a page of the
 * mapping is first written.  statfs first: a domain larger than the free
 * space is refused before anything is allocated (fallocate on tmpfs takes
 * pages until it fails, and a big one would press on all of RAM on the
 * way).  Then fallocate in steps, asking cancelled between them; a signal
 * interrupts a step (EINTR: tmpfs gives back what the step took) and the
 * next turn asks cancelled whether to go on.
 */
static int reserve(int fd, uint64_t size, xcs_sim_cancel_fn cancelled,
                   void *data)
{
    struct statvfs vfs;
    int emulate = 0;

    if (fstatvfs(fd, &vfs) == 0 && vfs.f_blocks) {
        uint64_t avail = geteuid() == 0 ? vfs.f_bfree : vfs.f_bavail;

        if (avail < size / vfs.f_frsize) {
            errno = ENOSPC;
            return -1;
        }
    }
    for (uint64_t off = 0; off < size;) {
        uint64_t len = size - off < RESERVE_CHUNK ? size - off : RESERVE_CHUNK;
        int r;

        if (cancel_now(cancelled, data))
            return -1;
        if (!emulate) {
            r = fallocate(fd, 0, (off_t)off, (off_t)len);
            if (r < 0 && errno == EOPNOTSUPP) {
                emulate = 1; /* a filesystem without fallocate: libc writes */
                continue;
            }
        } else {
            r = posix_fallocate(fd, (off_t)off, (off_t)len);
            if (r) {
                errno = r;
                r = -1;
            }
        }
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        off += len;
    }
    return 0;
}

int xcs_sim_create(const char *path, uint64_t nr_pages, unsigned int nr_vcpus,
                   uint64_t seed, enum xcs_sim_fill fill, int flags,
                   xcs_sim_cancel_fn cancelled, void *data)
{
    struct xcs_sim_dom dom = {.fd = -1};
    struct xcs_sim_hdr hdr;
    struct stat st;
    uint8_t *templates = NULL;
    char *prefix = NULL;
    char *tmp = NULL;
    int fd = -1;
    int saved;
    int rc = -1;

    if (!shape_ok(nr_pages, nr_vcpus) || (unsigned int)fill > XCS_SIM_FILL_MAX) {
        errno = EINVAL;
        goto out;
    }
    /* Not minutes of work for a rename that must fail (it still decides). */
    if (!(flags & XCS_SIM_CREATE_REPLACE) && lstat(path, &st) == 0) {
        errno = EEXIST;
        goto out;
    }
    /* Build under a private name, rename into place: never a half domain. */
    if (asprintf(&prefix, "%s.creating.%ld.", path, (long)getpid()) < 0) {
        prefix = NULL;
        errno = ENOMEM;
        goto out;
    }
    fd = xcs_create_private_temp(prefix, O_RDWR, &tmp);
    if (fd < 0)
        goto out;
    xcs_sim_layout(nr_pages, nr_vcpus, &hdr);
    if (xcs_sim_format_fd(fd, nr_pages, nr_vcpus, seed, XCS_SIM_RUNNING) < 0 ||
        reserve(fd, hdr.file_size, cancelled, data) < 0 ||
        xcs_sim_map_fd(fd, 0, &dom) < 0)
        goto out;
    dom.hdr->fill = (uint32_t)fill;

    templates = malloc(NR_TEMPLATES * XCS_SIM_PAGE_SIZE);
    if (!templates)
        goto out;
    for (unsigned int t = 0; t < NR_TEMPLATES; t++)
        fill_random(templates + t * XCS_SIM_PAGE_SIZE, XCS_SIM_PAGE_SIZE,
                    seed ^ (0x74706c0000000000ULL + t));
    for (uint64_t pfn = 0; pfn < nr_pages; pfn++) {
        uint64_t sub;

        if (pfn % CREATE_CHUNK_PAGES == 0 && cancel_now(cancelled, data))
            goto out;
        enum page_kind kind = fill_kind(fill, seed, pfn, &sub);

        if (kind == PAGE_ZERO)
            continue; /* reserved, never written: reads as 0 */
        if (kind == PAGE_TEMPLATE)
            memcpy(xcs_sim_page(&dom, pfn),
                   templates + sub * XCS_SIM_PAGE_SIZE, XCS_SIM_PAGE_SIZE);
        else
            fill_page(xcs_sim_page(&dom, pfn), kind, sub);
    }
    for (unsigned int v = 0; v < nr_vcpus; v++)
        xcs_sim_fill_vcpu(xcs_sim_vcpu(&dom, v), v, seed);

    /* The last chance to stop: after the rename the domain is there. */
    if (cancel_now(cancelled, data) ||
        xcs_rename_noreplace(tmp, path, flags & XCS_SIM_CREATE_REPLACE) < 0)
        goto out;
    rc = 0;

out:
    saved = errno;
    xcs_sim_close(&dom);
    if (fd >= 0)
        close(fd);
    if (rc && tmp)
        unlink(tmp);
    free(templates);
    free(tmp);
    free(prefix);
    errno = saved;
    return rc;
}

int xcs_sim_remove(const char *path)
{
    return unlink(path);
}

/*----- state -----*/

static const char *const state_names[] = {
    [XCS_SIM_RUNNING] = "running",
    [XCS_SIM_PAUSED] = "paused",
    [XCS_SIM_SUSPENDED] = "suspended",
};

const char *xcs_sim_state_name(enum xcs_sim_state st)
{
    if ((unsigned int)st < sizeof(state_names) / sizeof(state_names[0]))
        return state_names[st];
    return "invalid";
}

int xcs_sim_state_parse(const char *name, enum xcs_sim_state *out)
{
    for (unsigned int i = 0; i < sizeof(state_names) / sizeof(state_names[0]);
         i++) {
        if (strcmp(name, state_names[i]) == 0) {
            *out = (enum xcs_sim_state)i;
            return 0;
        }
    }
    errno = EINVAL;
    return -1;
}

enum xcs_sim_state xcs_sim_get_state(const struct xcs_sim_dom *dom)
{
    return (enum xcs_sim_state)__atomic_load_n(&dom->hdr->state,
                                               __ATOMIC_SEQ_CST);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ULL),
                          .tv_nsec = (long)(ns % 1000000000ULL)};

    while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
        ;
}

#define INFLIGHT_GIVE_UP_NS 1000000000ULL

int xcs_sim_set_state(struct xcs_sim_dom *dom, enum xcs_sim_state st)
{
    uint64_t start;

    if ((unsigned int)st > XCS_SIM_SUSPENDED) {
        errno = EINVAL;
        return -1;
    }
    __atomic_store_n(&dom->hdr->state, (uint32_t)st, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&dom->hdr->generation, 1, __ATOMIC_RELAXED);
    if (st == XCS_SIM_RUNNING)
        return 0;

    /* Wait for writers that passed their state check before our store. */
    start = now_ns();
    while (__atomic_load_n(&dom->hdr->inflight, __ATOMIC_ACQUIRE) > 0) {
        if (now_ns() - start > INFLIGHT_GIVE_UP_NS) {
            /*
             * One page write takes microseconds: a count stuck this long
             * belongs to a writer killed mid-write.  Forget it rather than
             * leave the domain impossible to suspend.
             */
            __atomic_store_n(&dom->hdr->inflight, 0, __ATOMIC_SEQ_CST);
            break;
        }
        sleep_ns(20000);
    }
    return 0;
}

/*----- dirty log -----*/

/*
 * The throttle is a plain word the toolstack stores and the workload loads
 * every slice: no ordering with anything else is needed (a slice late is
 * fine), relaxed atomics keep the access whole.
 */
int xcs_sim_set_throttle(struct xcs_sim_dom *dom, unsigned int percent)
{
    if (percent > XCS_SIM_THROTTLE_MAX) {
        errno = EINVAL;
        return -1;
    }
    __atomic_store_n(&dom->hdr->throttle, percent, __ATOMIC_RELAXED);
    return 0;
}

unsigned int xcs_sim_get_throttle(const struct xcs_sim_dom *dom)
{
    return __atomic_load_n(&dom->hdr->throttle, __ATOMIC_RELAXED);
}

void xcs_sim_logdirty_enable(struct xcs_sim_dom *dom)
{
    uint64_t words = dom->hdr->bitmap_bytes / 8;

    __atomic_store_n(&dom->hdr->logdirty, 1, __ATOMIC_SEQ_CST);
    /* Pairs with the writer's fence in xcs_sim_write_page (see top). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    for (uint64_t w = 0; w < words; w++)
        __atomic_store_n(&dom->bitmap[w], 0, __ATOMIC_RELAXED);
    __atomic_store_n(&dom->hdr->dirty_count, 0, __ATOMIC_SEQ_CST);
}

void xcs_sim_logdirty_disable(struct xcs_sim_dom *dom)
{
    __atomic_store_n(&dom->hdr->logdirty, 0, __ATOMIC_SEQ_CST);
}

int xcs_sim_logdirty_enabled(const struct xcs_sim_dom *dom)
{
    return (int)__atomic_load_n(&dom->hdr->logdirty, __ATOMIC_SEQ_CST);
}

uint64_t xcs_sim_dirty_popcount(const struct xcs_sim_dom *dom)
{
    uint64_t words = dom->hdr->bitmap_bytes / 8;
    uint64_t n = 0;

    for (uint64_t w = 0; w < words; w++)
        n += (uint64_t)__builtin_popcountll(
            __atomic_load_n(&dom->bitmap[w], __ATOMIC_RELAXED));
    return n;
}

uint64_t xcs_sim_dirty_fetch_and_clear(struct xcs_sim_dom *dom, uint64_t *out)
{
    uint64_t words = dom->hdr->bitmap_bytes / 8;
    uint64_t n = 0;

    for (uint64_t w = 0; w < words; w++) {
        uint64_t v = 0;

        /* Skip clean words without dirtying their cache lines. */
        if (__atomic_load_n(&dom->bitmap[w], __ATOMIC_RELAXED))
            v = __atomic_exchange_n(&dom->bitmap[w], 0, __ATOMIC_ACQUIRE);
        out[w] = v;
        n += (uint64_t)__builtin_popcountll(v);
    }
    __atomic_sub_fetch(&dom->hdr->dirty_count, (int64_t)n, __ATOMIC_RELAXED);
    return n;
}

void xcs_sim_write_page(struct xcs_sim_dom *dom, uint64_t pfn, uint64_t seed,
                        enum xcs_sim_fill fill)
{
    uint64_t bit = 1ULL << (pfn % 64);
    uint64_t sub = seed ^ (pfn * 0x9e3779b97f4a7c15ULL);
    uint64_t ignored, old;
    enum page_kind kind = PAGE_RANDOM; /* classic and random: as ever */

    if (fill == XCS_SIM_FILL_ZERO || fill == XCS_SIM_FILL_TEXT)
        kind = fill_kind(fill, 0, 0, &ignored);
    else if (fill == XCS_SIM_FILL_MIXED) /* the class it was created with */
        kind = mixed_kind(__atomic_load_n(&dom->hdr->seed, __ATOMIC_RELAXED),
                          pfn, &ignored);
    fill_page(xcs_sim_page(dom, pfn), kind, sub);
    /* Page stores before the flag load: pairs with logdirty_enable. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&dom->hdr->logdirty, __ATOMIC_RELAXED)) {
        old = __atomic_fetch_or(&dom->bitmap[pfn / 64], bit, __ATOMIC_RELEASE);
        if (!(old & bit))
            __atomic_add_fetch(&dom->hdr->dirty_count, 1, __ATOMIC_RELAXED);
    }
    __atomic_add_fetch(&dom->hdr->pages_written, 1, __ATOMIC_RELAXED);
    __atomic_add_fetch(&dom->hdr->generation, 1, __ATOMIC_RELAXED);
}

/* One guarded guest write; 0 if the domain is not running. */
static int guarded_write(struct xcs_sim_dom *dom, uint64_t pfn, uint64_t seed,
                         enum xcs_sim_fill fill, uint64_t count)
{
    int wrote = 0;

    __atomic_add_fetch(&dom->hdr->inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&dom->hdr->state, __ATOMIC_SEQ_CST) == XCS_SIM_RUNNING) {
        xcs_sim_write_page(dom, pfn, seed, fill);
        /* vCPU state moves too: a tick in the context of one vCPU. */
        __atomic_store_n((uint64_t *)(xcs_sim_vcpu(dom, (unsigned int)(
                                          pfn % dom->nr_vcpus)) + 8),
                         count, __ATOMIC_RELAXED);
        wrote = 1;
    }
    __atomic_sub_fetch(&dom->hdr->inflight, 1, __ATOMIC_RELEASE);
    return wrote;
}

#define SLICE_NS 1000000ULL
#define UNPACED_CHUNK 256

int64_t xcs_sim_dirty_run(const char *path, uint64_t rate_pages_per_s,
                          double duration_s, uint64_t seed, int fill)
{
    struct xcs_sim_dom dom = {.fd = -1};
    struct xoshiro rng;
    uint64_t start, end, last, now;
    double credit = 0.0;
    int64_t written = 0;
    int64_t rc = -1;

    if (!(duration_s >= 0.0) || duration_s > 1e6) {
        errno = EINVAL;
        goto out;
    }
    if (fill < XCS_SIM_FILL_DOMAIN || fill > XCS_SIM_FILL_MAX) {
        errno = EINVAL;
        goto out;
    }
    if (xcs_sim_open(path, 0, &dom) < 0)
        goto out;
    if (fill == XCS_SIM_FILL_DOMAIN)
        fill = (int)dom.hdr->fill;
    if (fill > XCS_SIM_FILL_MAX) { /* a header from a newer xcsave */
        errno = EINVAL;
        goto out;
    }
    xoshiro_seed(&rng, seed ^ 0x6469727479000000ULL);
    start = last = now_ns();
    end = start + (uint64_t)(duration_s * 1e9);

    for (now = start; now < end; now = now_ns()) {
        uint64_t budget;
        unsigned int throttle = xcs_sim_get_throttle(&dom);
        double share;

        if (throttle > XCS_SIM_THROTTLE_MAX) { /* a damaged (or newer) header */
            errno = EINVAL;
            goto out;
        }
        share = (double)(100u - throttle) / 100.0; /* of the time it runs */
        if (xcs_sim_get_state(&dom) != XCS_SIM_RUNNING) {
            /* A stopped guest does not catch up on the time it lost. */
            credit = 0.0;
            last = now;
            sleep_ns(SLICE_NS);
            continue;
        }
        if (rate_pages_per_s) {
            double rate = (double)rate_pages_per_s * share;

            credit += (double)(now - last) * 1e-9 * rate;
            /* At most ~10 slices' worth at once after a long stall. */
            if (credit > rate / 100.0 + 1.0)
                credit = rate / 100.0 + 1.0;
            budget = (uint64_t)credit;
        } else {
            budget = UNPACED_CHUNK;
        }
        last = now;
        for (uint64_t i = 0; i < budget; i++) {
            uint64_t pfn = xoshiro_below(&rng, dom.nr_pages);

            if (!guarded_write(&dom, pfn, seed + (uint64_t)written,
                               (enum xcs_sim_fill)fill, (uint64_t)written + 1))
                break;
            written++;
            if (rate_pages_per_s)
                credit -= 1.0;
        }
        if (rate_pages_per_s) {
            sleep_ns(SLICE_NS);
        } else if (throttle) {
            /* Unpaced and throttled: the chunk took the running share of
             * this slice; sleep the rest (throttle percent of it). */
            uint64_t ran = now_ns() - now;

            sleep_ns((uint64_t)((double)ran * (double)throttle / (double)(100u - throttle)));
        }
    }
    rc = written;

out:
    xcs_sim_close(&dom);
    return rc;
}

/*----- holes -----*/

const uint8_t xcs_sim_zero_page[XCS_SIM_PAGE_SIZE];

void xcs_sim_holes_init(struct xcs_sim_holes *h, const struct xcs_sim_dom *dom,
                        uint64_t asks)
{
    h->dom = dom;
    h->lo = h->hi = 0;
    h->hole_lo = h->hole_hi = 0;
    h->win = asks && asks < dom->nr_pages / 16 ? 1 : XCS_SIM_HOLES_WINDOW;
}

/* vec for the aligned window of pages that holds pfn. */
static void holes_window(struct xcs_sim_holes *h, uint64_t pfn)
{
    const struct xcs_sim_dom *dom = h->dom;

    h->lo = pfn - pfn % h->win;
    h->hi = h->lo + h->win < dom->nr_pages ? h->lo + h->win : dom->nr_pages;
    /*
     * mm trick: mincore() on a shared file mapping reports whether each
     * page is in the file's page cache (ours or anyone's), without
     * faulting anything in.  If it fails, every page counts as absent and
     * lseek decides, page by page.
     */
    if (mincore(xcs_sim_page(dom, h->lo),
                (size_t)(h->hi - h->lo) << XCS_SIM_PAGE_SHIFT, h->vec) < 0)
        memset(h->vec, 0, sizeof(h->vec));
}

int xcs_sim_page_resident(struct xcs_sim_holes *h, uint64_t pfn)
{
    if (pfn < h->lo || pfn >= h->hi)
        holes_window(h, pfn);
    return h->vec[pfn - h->lo] & 1;
}

int xcs_sim_hole_run(struct xcs_sim_holes *h, uint64_t pfn, uint64_t *run_end)
{
    const struct xcs_sim_dom *dom = h->dom;
    uint64_t base = (uint64_t)(dom->pages - (const uint8_t *)dom->map);
    uint64_t end, dpfn;
    off_t d;

    if (pfn >= h->hole_lo && pfn < h->hole_hi) {
        *run_end = h->hole_hi;
        return 1;
    }
    if (xcs_sim_page_resident(h, pfn)) {
        end = pfn + 1;
        while (end < h->hi && (h->vec[end - h->lo] & 1))
            end++;
        *run_end = end;
        return 0;
    }
    /*
     * Not in memory: a hole, or a page swapped out.  SEEK_DATA from its
     * offset answers (the fd's offset moves; nobody reads through it).
     */
    d = lseek(dom->fd, (off_t)(base + (pfn << XCS_SIM_PAGE_SHIFT)), SEEK_DATA);
    if (d < 0 && errno == ENXIO) {
        dpfn = dom->nr_pages; /* no data up to the end of the file */
    } else if (d < 0) {
        *run_end = pfn + 1; /* no SEEK_DATA here: read it */
        return 0;
    } else {
        /* A page with any data in it is data: round down. */
        dpfn = ((uint64_t)d - base) >> XCS_SIM_PAGE_SHIFT;
        if (dpfn > dom->nr_pages)
            dpfn = dom->nr_pages;
    }
    if (dpfn <= pfn) {
        *run_end = pfn + 1;
        return 0;
    }
    h->hole_lo = pfn;
    h->hole_hi = dpfn;
    *run_end = dpfn;
    return 1;
}

/*----- digest -----*/

void xcs_sim_digest(const struct xcs_sim_dom *dom,
                    uint8_t out[XCS_SIM_DIGEST_SIZE])
{
    struct xcs_sim_holes holes;
    struct xxh64_state st;
    uint64_t d[4];
    uint64_t shape[4] = {dom->nr_pages, XCS_SIM_PAGE_SHIFT, dom->nr_vcpus,
                         XCS_SIM_VCPU_SIZE};

    /* Data runs from the mapping, holes as the zeros they read as. */
    xxh64_init(&st, 0);
    xcs_sim_holes_init(&holes, dom, 0);
    for (uint64_t pfn = 0, end; pfn < dom->nr_pages; pfn = end) {
        if (!xcs_sim_hole_run(&holes, pfn, &end)) {
            xxh64_update(&st, xcs_sim_page(dom, pfn),
                         (size_t)(end - pfn) << XCS_SIM_PAGE_SHIFT);
            continue;
        }
        for (uint64_t p = pfn; p < end; p++)
            xxh64_update(&st, xcs_sim_zero_page, XCS_SIM_PAGE_SIZE);
    }
    d[0] = xxh64_final(&st);
    d[1] = xcs_xxh64(dom->vcpus, (size_t)dom->nr_vcpus * XCS_SIM_VCPU_SIZE, 0);
    d[2] = xcs_xxh64(shape, sizeof(shape), 0);
    d[3] = xcs_xxh64(d, 3 * sizeof(uint64_t), 0);
    memcpy(out, d, sizeof(d)); /* little-endian u64s */
}
