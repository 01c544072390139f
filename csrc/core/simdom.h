/*
 * simdom.h - simulated domains: guest memory, vCPU state and a log-dirty
 * bitmap in one shared file (docs/sim-format.md has the layout).
 *
 * A simulated domain stands in for a Xen guest.  Several processes map the
 * same file with MAP_SHARED: a workload ("vCPUs") writes pages through the
 * dirty log the way the hypervisor would, while the save engine suspends the
 * domain, harvests the dirty log and copies pages straight from the mapping.
 * All cross-process fields (state, log-dirty flag, counters, bitmap words)
 * are accessed with __atomic builtins; the memory-ordering rules are spelled
 * out next to each function in simdom.c.
 *
 * Conventions: 0 on success, -1 with errno set on failure.  These functions
 * never print; callers report.
 */
#ifndef XCS_SIMDOM_H
#define XCS_SIMDOM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define XCS_SIM_MAGIC "XCSIMDOM"       /* 8 bytes, no NUL on disk */
#define XCS_SIM_VERSION 1
#define XCS_SIM_HDR_SIZE 4096          /* the header page */
#define XCS_SIM_PAGE_SHIFT 12
#define XCS_SIM_PAGE_SIZE 4096u
#define XCS_SIM_VCPU_SIZE 512u         /* bytes of context per vCPU */
#define XCS_SIM_MAX_VCPUS 128u
#define XCS_SIM_MAX_PAGES (1ULL << 24) /* 64 GiB */

enum xcs_sim_state {
    XCS_SIM_RUNNING = 0,
    XCS_SIM_PAUSED = 1,
    XCS_SIM_SUSPENDED = 2
};

/*
 * The on-disk header (little-endian, at offset 0, padded to 4096 bytes).
 * Fields marked (atomic) are shared between processes and must only be
 * touched with __atomic builtins.
 */
struct xcs_sim_hdr {
    char magic[8];           /* XCS_SIM_MAGIC */
    uint32_t version;        /* XCS_SIM_VERSION */
    uint32_t hdr_size;       /* XCS_SIM_HDR_SIZE */
    uint64_t nr_pages;
    uint32_t page_shift;     /* 12 */
    uint32_t nr_vcpus;
    uint32_t vcpu_size;      /* XCS_SIM_VCPU_SIZE */
    uint32_t state;          /* (atomic) enum xcs_sim_state */
    uint32_t logdirty;       /* (atomic) 1 = writers set dirty bits */
    int32_t inflight;        /* (atomic) writers between state check and done */
    int64_t dirty_count;     /* (atomic) bits set; see simdom.c */
    uint64_t generation;     /* (atomic) bumped by every page write/state change */
    uint64_t pages_written;  /* (atomic) page writes since creation */
    uint64_t seed;           /* creation seed (informational) */
    uint64_t pages_off;      /* byte offset of page 0 (page aligned) */
    uint64_t vcpu_off;       /* byte offset of vCPU 0's context */
    uint64_t bitmap_off;     /* byte offset of the log-dirty bitmap */
    uint64_t bitmap_bytes;   /* whole u64 words, ceil(nr_pages / 64) * 8 */
    uint64_t file_size;
    uint32_t fill;           /* enum xcs_sim_fill it was created with (0: classic) */
    uint32_t throttle;       /* (atomic) percent of the guest's time taken away,
                                0..XCS_SIM_THROTTLE_MAX (0: none; was reserved) */
};

/*
 * What a new domain's pages hold, and what the workload writes into them
 * (docs/sim-format.md, "Contents of a new domain").  classic is the fill of
 * domains made before there was a choice (and of restored domains, whose
 * header field reads 0): its digests are unchanged.
 */
enum xcs_sim_fill {
    XCS_SIM_FILL_CLASSIC = 0, /* 25% zero, 10% template copies, 65% random */
    XCS_SIM_FILL_RANDOM = 1,  /* every page pseudo-random */
    XCS_SIM_FILL_ZERO = 2,    /* every page zero */
    XCS_SIM_FILL_TEXT = 3,    /* every page text-like ASCII */
    XCS_SIM_FILL_MIXED = 4,   /* like a real guest: 35/40/25 zero/compressible/random */
};
#define XCS_SIM_FILL_MAX XCS_SIM_FILL_MIXED
#define XCS_SIM_FILL_DOMAIN (-1) /* xcs_sim_dirty_run: the domain's own fill */

const char *xcs_sim_fill_name(enum xcs_sim_fill fill);
int xcs_sim_fill_parse(const char *name, enum xcs_sim_fill *out);

struct xcs_sim_dom {
    int fd;                  /* -1 when closed */
    void *map;               /* the whole file, MAP_SHARED */
    size_t map_len;
    struct xcs_sim_hdr *hdr; /* == map */
    uint8_t *pages;          /* page 0 */
    uint8_t *vcpus;          /* vCPU 0's context */
    uint64_t *bitmap;        /* log-dirty bitmap, bit (pfn % 64) of word pfn / 64 */
    uint64_t nr_pages;
    unsigned int nr_vcpus;
};

/* xcs_sim_open flags. */
#define XCS_SIM_RDONLY 0x1   /* map read-only: digest/info only */

/* File layout for a domain of that shape: offsets as in struct xcs_sim_hdr. */
void xcs_sim_layout(uint64_t nr_pages, unsigned int nr_vcpus,
                    struct xcs_sim_hdr *out);

/* xcs_sim_create flags. */
#define XCS_SIM_CREATE_REPLACE 0x1 /* may replace a domain already at path */

/* Asked between steps of a long job: non-zero stops it (errno EINTR). */
typedef int (*xcs_sim_cancel_fn)(void *data);

/*
 * Create a domain file at path, filled deterministically from seed as fill
 * says (classic: about 25% zero pages, about 10% copies of a few template
 * pages, the rest pseudo-random; the others: enum xcs_sim_fill); vCPU
 * contexts derived from the seed.  State running, log-dirty off.
 *
 * Built in a private temporary beside path (private_file.h) whose whole
 * size is reserved first with fallocate: no space is ENOSPC before any page
 * is written, never a SIGBUS half way.  cancelled (may be NULL) is asked
 * between steps (every 64 MiB of pages, every 256 MiB reserved); when it
 * says stop, or anything fails, the temporary is removed and nothing is at
 * path that was not there before.  The temporary is renamed to path only if
 * nothing is there (EEXIST otherwise), unless flags has
 * XCS_SIM_CREATE_REPLACE.
 */
int xcs_sim_create(const char *path, uint64_t nr_pages, unsigned int nr_vcpus,
                   uint64_t seed, enum xcs_sim_fill fill, int flags,
                   xcs_sim_cancel_fn cancelled, void *data);

/*
 * Give the open, empty (or sparse) file fd the size and header of a domain of
 * that shape, leaving its pages as they are: the restore engine writes pages
 * first (they sit at the fixed offset XCS_SIM_HDR_SIZE whatever the shape)
 * and learns the shape only from HVM_CONTEXT.
 */
int xcs_sim_format_fd(int fd, uint64_t nr_pages, unsigned int nr_vcpus,
                      uint64_t seed, enum xcs_sim_state state);

/* Map the domain in fd (which stays the caller's: the mapping uses a dup). */
int xcs_sim_map_fd(int fd, int flags, struct xcs_sim_dom *dom);

/* Map an existing domain file; validates the header against the file size. */
int xcs_sim_open(const char *path, int flags, struct xcs_sim_dom *dom);
void xcs_sim_close(struct xcs_sim_dom *dom); /* idempotent */
int xcs_sim_remove(const char *path);

/*
 * Holes.  A page of a domain file that was never written (a hole of the
 * sparse file, or space fallocate reserved but nobody wrote) reads as
 * zeros -- but reading it through the MAP_SHARED mapping makes tmpfs
 * allocate it: a digest or a save of a sparse 64 GiB domain would fill
 * /dev/shm.  Readers ask a cursor first and read only pages that are there:
 * mincore() says which pages are in the page cache (reading those allocates
 * nothing); for the others lseek(SEEK_DATA) tells a hole (zeros, not to be
 * touched) from a page that is only swapped out (data).  Neither call
 * allocates.  One cursor per thread; cheapest when pfns ascend.
 */
#define XCS_SIM_HOLES_WINDOW 4096u /* pages per mincore() call */

struct xcs_sim_holes {
    const struct xcs_sim_dom *dom;
    uint64_t lo, hi;           /* vec holds pages [lo, hi) */
    uint64_t hole_lo, hole_hi; /* a known run of holes */
    uint32_t win;              /* pages per mincore() call */
    unsigned char vec[XCS_SIM_HOLES_WINDOW];
};

/*
 * A cursor for a walk that will ask about `asks` pages spread over the
 * domain (0: about all of them).  A mincore() costs about 0.1 us per page
 * of its window, so a sparse walk (under 1 page in 16: a late live round)
 * asks one page at a time; with 4096-page windows a few hundred scattered
 * pages of a 1 GiB domain cost ~30 ms, a whole round's time.
 */
void xcs_sim_holes_init(struct xcs_sim_holes *h, const struct xcs_sim_dom *dom,
                        uint64_t asks);

/*
 * Whether page pfn is a hole (reads as zeros; must not be touched), and in
 * *run_end the end of the run of pages of the same kind that pfn starts
 * (as far as the cursor knows: a run may continue past it).
 */
int xcs_sim_hole_run(struct xcs_sim_holes *h, uint64_t pfn, uint64_t *run_end);

static inline int xcs_sim_page_is_hole(struct xcs_sim_holes *h, uint64_t pfn)
{
    uint64_t end;

    return xcs_sim_hole_run(h, pfn, &end);
}

/*
 * Whether page pfn is in memory (mincore only, no lseek): 0 for a hole, and
 * also for a data page that is swapped out.  For estimates that must not
 * count a page they cannot be sure of.
 */
int xcs_sim_page_resident(struct xcs_sim_holes *h, uint64_t pfn);

/* A page of zeros, for a reader to use in place of a hole. */
extern const uint8_t xcs_sim_zero_page[XCS_SIM_PAGE_SIZE];

static inline uint8_t *xcs_sim_page(const struct xcs_sim_dom *dom,
                                    uint64_t pfn)
{
    return dom->pages + (pfn << XCS_SIM_PAGE_SHIFT);
}

static inline uint8_t *xcs_sim_vcpu(const struct xcs_sim_dom *dom,
                                    unsigned int vcpu)
{
    return dom->vcpus + (size_t)vcpu * XCS_SIM_VCPU_SIZE;
}

enum xcs_sim_state xcs_sim_get_state(const struct xcs_sim_dom *dom);

/*
 * Set the state.  Leaving "running" waits until no writer is between its
 * state check and the end of its write (bounded: a writer that died
 * mid-write is forgotten after about one second), so once this returns no
 * page changes until the domain runs again.
 */
int xcs_sim_set_state(struct xcs_sim_dom *dom, enum xcs_sim_state st);
const char *xcs_sim_state_name(enum xcs_sim_state st);
int xcs_sim_state_parse(const char *name, enum xcs_sim_state *out);

/*
 * The throttle (auto-converge): the percent of its time the guest is kept
 * from running, 0..XCS_SIM_THROTTLE_MAX.  xcs_sim_dirty_run reads it every
 * slice.  Files made before the field read 0 (it was reserved, written 0).
 * set: EINVAL for a percent above the maximum.  get: the stored value, which
 * a damaged or newer file may hold above the maximum (the caller refuses it).
 */
#define XCS_SIM_THROTTLE_MAX 99u
int xcs_sim_set_throttle(struct xcs_sim_dom *dom, unsigned int percent);
unsigned int xcs_sim_get_throttle(const struct xcs_sim_dom *dom);

/* Log-dirty: enable clears the bitmap; disable stops writers setting bits. */
void xcs_sim_logdirty_enable(struct xcs_sim_dom *dom);
void xcs_sim_logdirty_disable(struct xcs_sim_dom *dom);
int xcs_sim_logdirty_enabled(const struct xcs_sim_dom *dom);

/* Number of set bits now, without clearing (exact; O(nr_pages / 64)). */
uint64_t xcs_sim_dirty_popcount(const struct xcs_sim_dom *dom);

/*
 * Atomically take the dirty log: each bitmap word is exchanged with 0 and
 * stored into out (bitmap_bytes long).  Returns the number of pages taken.
 */
uint64_t xcs_sim_dirty_fetch_and_clear(struct xcs_sim_dom *dom, uint64_t *out);

/*
 * Write one page like a guest vCPU: content of the kind fill gives page pfn
 * (classic and random: pseudo-random; mixed: the class the page was created
 * with), fresh from (seed, pfn), then the dirty bit if log-dirty is on.
 * Does not check the state: see xcs_sim_dirty_run for the guarded writer.
 */
void xcs_sim_write_page(struct xcs_sim_dom *dom, uint64_t pfn, uint64_t seed,
                        enum xcs_sim_fill fill);

/*
 * The workload: write pages of the domain at path at rate_pages_per_s
 * (0 = as fast as possible) for duration_s seconds, paced in 1 ms slices,
 * never while the domain is not running, with content of the kind fill says
 * (XCS_SIM_FILL_DOMAIN: the fill the domain was created with).  It honours
 * the throttle, read every slice: paced, the rate is scaled by
 * (100 - throttle) / 100; unpaced, it sleeps that share of each slice.
 * Returns the number of pages written, or -1 with errno set (EINVAL: a bad
 * fill, or a throttle above XCS_SIM_THROTTLE_MAX in the header).
 */
int64_t xcs_sim_dirty_run(const char *path, uint64_t rate_pages_per_s,
                          double duration_s, uint64_t seed, int fill);

#define XCS_SIM_DIGEST_SIZE 32

/*
 * Digest of memory + vCPU state + shape: four little-endian u64s
 * [XXH64(pages), XXH64(vcpu contexts), XXH64(shape), XXH64(first three)]
 * (docs/sim-format.md).  Independent of state and the dirty log.  Holes are
 * hashed as the zeros they read as, without touching them (see "Holes").
 */
void xcs_sim_digest(const struct xcs_sim_dom *dom,
                    uint8_t out[XCS_SIM_DIGEST_SIZE]);

/* XXH64 of a buffer (the public xxHash64 algorithm). */
uint64_t xcs_xxh64(const void *buf, size_t len, uint64_t seed);

/* Fill a vCPU context blob as xcs_sim_create does (exported for tests). */
void xcs_sim_fill_vcpu(uint8_t *blob, unsigned int vcpu, uint64_t seed);

#ifdef __cplusplus
}
#endif

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

#endif /* XCS_SIMDOM_H */
