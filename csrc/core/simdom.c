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
#include <time.h>
#include <unistd.h>

/* The header is an on-disk format (docs/sim-format.md): pin its layout. */
_Static_assert(offsetof(struct xcs_sim_hdr, nr_pages) == 16, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, state) == 36, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, dirty_count) == 48, "sim header");
_Static_assert(offsetof(struct xcs_sim_hdr, file_size) == 112, "sim header");
_Static_assert(sizeof(struct xcs_sim_hdr) == 120, "sim header");

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

uint64_t xcs_xxh64(const void *buf, size_t len, uint64_t seed)
{
    const uint8_t *p = buf;
    const uint8_t *end = p + len;
    uint64_t h;

    if (len >= 32) {
        uint64_t v1 = seed + XXH_P1 + XXH_P2;
        uint64_t v2 = seed + XXH_P2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - XXH_P1;
        const uint8_t *limit = end - 32;

        do {
            v1 = xxh_round(v1, rd64(p));
            v2 = xxh_round(v2, rd64(p + 8));
            v3 = xxh_round(v3, rd64(p + 16));
            v4 = xxh_round(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + XXH_P5;
    }
    h += (uint64_t)len;
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

enum page_kind { PAGE_ZERO, PAGE_TEMPLATE, PAGE_RANDOM };

/* Which kind page pfn of a domain created from seed is, and its sub-seed. */
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
    int mflags = MAP_SHARED | ((flags & XCS_SIM_POPULATE) ? MAP_POPULATE : 0);
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
    dom->map = mmap(NULL, dom->map_len, prot, mflags, dom->fd, 0);
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

int xcs_sim_create(const char *path, uint64_t nr_pages, unsigned int nr_vcpus,
                   uint64_t seed)
{
    struct xcs_sim_dom dom = {.fd = -1};
    uint8_t *templates = NULL;
    char *tmp = NULL;
    int fd = -1;
    int saved;
    int rc = -1;

    if (!shape_ok(nr_pages, nr_vcpus)) {
        errno = EINVAL;
        goto out;
    }
    /* Build under a private name, rename into place: never a half domain. */
    if (asprintf(&tmp, "%s.creating.%ld", path, (long)getpid()) < 0) {
        tmp = NULL;
        errno = ENOMEM;
        goto out;
    }
    fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0)
        goto out;
    if (xcs_sim_format_fd(fd, nr_pages, nr_vcpus, seed, XCS_SIM_RUNNING) < 0)
        goto out;
    if (xcs_sim_map_fd(fd, 0, &dom) < 0)
        goto out;

    templates = malloc(NR_TEMPLATES * XCS_SIM_PAGE_SIZE);
    if (!templates)
        goto out;
    for (unsigned int t = 0; t < NR_TEMPLATES; t++)
        fill_random(templates + t * XCS_SIM_PAGE_SIZE, XCS_SIM_PAGE_SIZE,
                    seed ^ (0x74706c0000000000ULL + t));
    for (uint64_t pfn = 0; pfn < nr_pages; pfn++) {
        uint64_t sub;

        switch (page_kind(seed, pfn, &sub)) {
        case PAGE_ZERO:
            break; /* the new file is sparse: left untouched it reads 0 */
        case PAGE_TEMPLATE:
            memcpy(xcs_sim_page(&dom, pfn),
                   templates + sub * XCS_SIM_PAGE_SIZE, XCS_SIM_PAGE_SIZE);
            break;
        case PAGE_RANDOM:
            fill_random(xcs_sim_page(&dom, pfn), XCS_SIM_PAGE_SIZE, sub);
            break;
        }
    }
    for (unsigned int v = 0; v < nr_vcpus; v++)
        xcs_sim_fill_vcpu(xcs_sim_vcpu(&dom, v), v, seed);

    if (rename(tmp, path) < 0)
        goto out;
    rc = 0;

out:
    saved = errno;
    xcs_sim_close(&dom);
    if (fd >= 0)
        close(fd);
    if (rc && tmp && fd >= 0)
        unlink(tmp);
    free(templates);
    free(tmp);
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

void xcs_sim_write_page(struct xcs_sim_dom *dom, uint64_t pfn, uint64_t seed)
{
    uint64_t bit = 1ULL << (pfn % 64);
    uint64_t old;

    fill_random(xcs_sim_page(dom, pfn), XCS_SIM_PAGE_SIZE,
                seed ^ (pfn * 0x9e3779b97f4a7c15ULL));
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
                         uint64_t count)
{
    int wrote = 0;

    __atomic_add_fetch(&dom->hdr->inflight, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&dom->hdr->state, __ATOMIC_SEQ_CST) == XCS_SIM_RUNNING) {
        xcs_sim_write_page(dom, pfn, seed);
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
                          double duration_s, uint64_t seed)
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
    if (xcs_sim_open(path, 0, &dom) < 0)
        goto out;
    xoshiro_seed(&rng, seed ^ 0x6469727479000000ULL);
    start = last = now_ns();
    end = start + (uint64_t)(duration_s * 1e9);

    for (now = start; now < end; now = now_ns()) {
        uint64_t budget;

        if (xcs_sim_get_state(&dom) != XCS_SIM_RUNNING) {
            /* A stopped guest does not catch up on the time it lost. */
            credit = 0.0;
            last = now;
            sleep_ns(SLICE_NS);
            continue;
        }
        if (rate_pages_per_s) {
            credit += (double)(now - last) * 1e-9 * (double)rate_pages_per_s;
            /* At most ~10 slices' worth at once after a long stall. */
            if (credit > (double)rate_pages_per_s / 100.0 + 1.0)
                credit = (double)rate_pages_per_s / 100.0 + 1.0;
            budget = (uint64_t)credit;
        } else {
            budget = UNPACED_CHUNK;
        }
        last = now;
        for (uint64_t i = 0; i < budget; i++) {
            uint64_t pfn = xoshiro_below(&rng, dom.nr_pages);

            if (!guarded_write(&dom, pfn, seed + (uint64_t)written,
                               (uint64_t)written + 1))
                break;
            written++;
            if (rate_pages_per_s)
                credit -= 1.0;
        }
        if (rate_pages_per_s)
            sleep_ns(SLICE_NS);
    }
    rc = written;

out:
    xcs_sim_close(&dom);
    return rc;
}

/*----- digest -----*/

void xcs_sim_digest(const struct xcs_sim_dom *dom,
                    uint8_t out[XCS_SIM_DIGEST_SIZE])
{
    uint64_t d[4];
    uint64_t shape[4] = {dom->nr_pages, XCS_SIM_PAGE_SHIFT, dom->nr_vcpus,
                         XCS_SIM_VCPU_SIZE};

    d[0] = xcs_xxh64(dom->pages, (size_t)(dom->nr_pages << XCS_SIM_PAGE_SHIFT),
                     0);
    d[1] = xcs_xxh64(dom->vcpus, (size_t)dom->nr_vcpus * XCS_SIM_VCPU_SIZE, 0);
    d[2] = xcs_xxh64(shape, sizeof(shape), 0);
    d[3] = xcs_xxh64(d, 3 * sizeof(uint64_t), 0);
    memcpy(out, d, sizeof(d)); /* little-endian u64s */
}
