/*
 * engine_save.c - save a simulated domain as a libxc migration stream v3
 * (HVM shaped), optionally inside the libxl stream and the xl header.
 *
 * Stream written (plain):
 *   [xl header] [libxl hdr, LIBXC_CONTEXT]
 *   ihdr(v3) dhdr(HVM) X86_CPUID_POLICY X86_MSR_POLICY STATIC_DATA_END
 *   PAGE_DATA... X86_TSC_INFO
 *   HVM_CONTEXT HVM_PARAMS END
 *   [EMULATOR_CONTEXT, libxl END]
 * Remus: after the memory of each checkpoint the vCPU records, CHECKPOINT
 * and (wrapped) EMULATOR_CONTEXT + CHECKPOINT_END; no END at all, as a real
 * Remus sender: the stream ends when the sender stops (facts section 3.4).
 *
 * Pages go out with writev straight from the MAP_SHARED mapping of the sim
 * file: one record header + pfn array buffer, then the pages themselves,
 * adjacent pfns merged into one iovec.  No page is copied in user space.
 *
 * THE PAGE-LIFETIME RULE (vmsplice).  When io_fd is a pipe, pages go into
 * it with vmsplice: the pipe then holds references to the guest pages
 * themselves and the reader's read() (or splice into a file) is the only
 * copy.  The rule: the bytes a reader takes for a vmspliced page must be the
 * page's content in the domain the stream describes, or be superseded by a
 * later copy of the same page in the same stream.  How we guarantee it:
 *  1. A live round (precopy, the domain running): a page may change while
 *     its reference waits in the pipe, so the reader may get newer bytes, or
 *     a torn mix, exactly as writev's copy of a page the guest is writing
 *     would.  Either way the write that changed it came after this round
 *     fetched-and-cleared the dirty log (or it would have been sent after
 *     it), so it set the page's dirty bit again (simdom.c: the writer stores
 *     the page, then sets the bit; the saver exchanges the bitmap before
 *     reading), and a later round -- at the latest the stop-and-copy round
 *     -- sends the page again.  A pipe is FIFO and restore applies records
 *     in order, so that later copy is the one that stays.  This is the
 *     invariant precopy itself rests on; vmsplice only moves the moment of
 *     the read from send time to consume time.
 *  2. The stop-and-copy round and a non-live save: the pages are vmspliced
 *     only while THIS save holds the domain suspended (ctx->frozen: set
 *     after xcs_sim_set_state(SUSPENDED) returned, which waits out writers
 *     mid-page; the sim's writers check the state), so they cannot change
 *     until the save returns.  Remus never vmsplices: it resumes after every
 *     checkpoint and no later round may follow.  Record headers and pfn
 *     arrays always go with write (their buffer is reused for the next
 *     batch), so framing never depends on page contents.
 *  3. The save's end: the last pages of the final round -- at least one pipe
 *     capacity's worth (F_GETPIPE_SZ + 2 pages) -- and every record after
 *     them go with writev.  A pipe is FIFO, so once the unread bytes
 *     (FIONREAD) are no more than the bytes copied after the last vmsplice,
 *     every vmspliced byte has been read.  Before a save returns success it
 *     checks exactly that, and waits (200 us naps) when it does not hold
 *     (the pipe was enlarged by someone else mid-save, or the final round
 *     was smaller than the copied tail must be) -- never longer than writev
 *     would have blocked on a full pipe in the normal case.  So when the save
 *     returns success, the domain (which stays suspended) may be resumed,
 *     destroyed or rewritten by the toolstack: the pipe holds no reference
 *     to it any more.
 *  4. A save that fails sets the domain running again (it must not stay
 *     stopped) possibly with vmspliced pages unread.  Such a stream is
 *     already broken: every failure path leaves it without its final END
 *     (or libxl END), which every reader rejects, so changed bytes in a
 *     stream that will be refused cannot be restored.
 *  Limit: a reader that splice()s the pipe onward to a socket or another
 *  pipe (not into a file, which copies) carries the page references past
 *  point 3.  The restore engine (splice into the target file), libxl, cat
 *  and gzip (read) all copy.  The wire pump does splice raw frames onward
 *  (wire.c), so in a migration the references travel on: over the link,
 *  through the receiving pump's pipe, until the restore helper copies
 *  them into the target.  That holds for the same reason as point 2: the
 *  migration keeps the source suspended until the receiver says "domain
 *  received" (its helper has consumed the whole stream by then), and
 *  resumes it only when the migration failed, when the receiver's copy is
 *  discarded (migrate.py).  XCSAVE_NO_VMSPLICE=1 in the environment turns
 *  the path off (writev everywhere).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "simdom.h"
#include "stream_io.h"
#include "xcs_engine.h"
#include "xcsave_msgs.h" /* XCS_XEN_*: Xen's default policy (xcsave/defaults.py) */
/* A full PAGE_DATA record: header, pfns, pages (a multiple of 8: no padding) */
#define FULL_BATCH_BYTES \
    (XCS_PAGE_DATA_HDR_SIZE + (uint64_t)(8 + XCS_PAGE_SIZE) * XCS_MAX_BATCH_SIZE)
/* copy_threads: wake the main thread for progress every 64 MiB, not more
 * often: on a busy box each wake-up takes a CPU from a writer. */
#define COPY_WAKE_PAGES (16 * XCS_MAX_BATCH_SIZE)

struct save_ctx;

/* copy_threads: one thread's share of a round (see "parallel copy") */
struct copy_worker {
    struct copy_pool *pool;
    pthread_t tid;
    unsigned int idx;
    uint64_t lo, hi;     /* phase 1: pfns [lo, hi); phase 2: batches */
    uint64_t found;      /* phase 1: pfns to send, at pool->pfns + lo */
    uint64_t zeros;      /* phase 1: all-zero pages skipped */
    struct xcs_sim_holes holes; /* this thread's, pfns ascending */
    uint8_t hdr[XCS_PAGE_DATA_HDR_SIZE];
    struct iovec *iov;   /* 2 + XCS_MAX_BATCH_SIZE entries */
};

struct copy_pool {
    struct save_ctx *ctx;
    unsigned int n;         /* threads; 0 = io_fd does not fit, no pool */
    struct copy_worker *w;
    uint64_t *pfns;         /* nr_pages entries: the round's pfns */
    int phase;              /* 1: find the pfns, 2: write the batches */
    const uint64_t *bitmap; /* the round's set (NULL: every pfn) */
    uint64_t asks;          /* its pages, for the hole cursors (0: every pfn) */
    int skip_zero;
    uint64_t npages;        /* phase 2: pfns[0, npages) go out */
    uint64_t base;          /* file offset of the round's first byte */
    pthread_mutex_t lock;   /* guards running, pages_done and the error */
    pthread_cond_t news;    /* a batch went out, or a worker finished */
    unsigned int running;
    int stop;               /* atomic: an error happened, workers quit */
    uint64_t pages_done;    /* written in phase 2, for progress */
    uint64_t pages_told;    /* pages_done when the main thread was woken */
    int err;                /* the first error (errno), under lock */
    const char *err_what;
    unsigned int err_thread;
    uint64_t err_off;       /* file offset it happened at */
};

struct save_ctx {
    const struct xcs_save_params *p;
    const struct xcs_engine_callbacks *cb;
    struct xcs_save_stats *st;
    struct xcs_sim_dom dom;
    struct xcs_sim_holes holes; /* the sequential path's, reset every round */
    int skip_zero;          /* this round skips all-zero pages (and holes) */
    struct xcs_writer w;
    uint64_t *dirty;        /* harvested log-dirty bitmap */
    uint8_t *batch;         /* rhdr, count, pfn[XCS_MAX_BATCH_SIZE] */
    uint64_t *batch_pfns;   /* inside batch */
    unsigned int batch_n;
    struct iovec *iov;      /* 1 + XCS_MAX_BATCH_SIZE entries */
    uint8_t *hvm_ctx;       /* HVM_CONTEXT body */
    uint32_t hvm_ctx_len;
    enum xcs_sim_state orig_state;
    int stopped;            /* this save suspended the domain */
    int logdirty;           /* this save enabled log-dirty */
    uint64_t t_suspend;
    uint64_t total_written; /* pages sent, all rounds */
    uint64_t round_sent;
    unsigned int round;     /* memory rounds started */
    int splice_ok;          /* io_fd is a pipe and vmsplice is allowed */
    int frozen;             /* suspended by this save: pages cannot change */
    uint64_t splice_below;  /* this round: vmsplice pfns below this */
    uint64_t splice_end;    /* w.bytes just after the last vmsplice */
    struct xcs_progress pr;
    struct copy_pool pool;  /* copy_threads > 1 on a regular file */
};

/*----- writing records -----*/

static int write_failed(struct save_ctx *ctx, const char *what)
{
    return xcs_fail(ctx->cb, errno, "writing %s at stream offset %llu: %s",
                    what, (unsigned long long)ctx->w.bytes, strerror(errno));
}

static int write_rec(struct save_ctx *ctx, uint32_t type, const void *body,
                     uint32_t len, const char *what)
{
    if (xcs_write_record(&ctx->w, type, body, len) < 0)
        return write_failed(ctx, what);
    return 0;
}

/*
 * Append iovecs for the pages of pfns[0, n) at iov[k]; returns the new
 * count.  Adjacent pfns are adjacent in the mapping: one iovec for a run
 * (merged only into iovecs this call appended).  With holes (a round that
 * sends all-zero pages too), a hole is sent from xcs_sim_zero_page: read
 * through the mapping it would become a page of the file.
 */
static int page_iovs(const struct xcs_sim_dom *dom, struct xcs_sim_holes *holes,
                     struct iovec *iov, int k, const uint64_t *pfns,
                     unsigned int n)
{
    int first = k;

    for (unsigned int i = 0; i < n; i++) {
        uint8_t *page = holes && xcs_sim_page_is_hole(holes, pfns[i])
                            ? (uint8_t *)xcs_sim_zero_page
                            : xcs_sim_page(dom, pfns[i]);
        struct iovec *last = &iov[k - 1];

        if (k > first && (uint8_t *)last->iov_base + last->iov_len == page) {
            last->iov_len += XCS_PAGE_SIZE;
        } else {
            iov[k].iov_base = page;
            iov[k].iov_len = XCS_PAGE_SIZE;
            k++;
        }
    }
    return k;
}

static int flush_batch(struct save_ctx *ctx)
{
    unsigned int n = ctx->batch_n;
    unsigned int m = 0; /* pages [0, m) are vmspliced */
    struct xcs_sim_holes *holes;
    int k, ks;

    if (n == 0)
        return 0;
    xcs_page_data_hdr_put(ctx->batch, n, n);
    ctx->iov[0].iov_base = ctx->batch;
    ctx->iov[0].iov_len = XCS_PAGE_DATA_HDR_SIZE + 8 * (size_t)n;
    /* pfns ascend within a round: a prefix of the batch (none unless
     * splice_ok: splice_below is 0 then) */
    while (m < n && ctx->batch_pfns[m] < ctx->splice_below)
        m++;
    /* the copied part starts a fresh iovec */
    holes = ctx->skip_zero ? NULL : &ctx->holes; /* else: none in the batch */
    ks = page_iovs(&ctx->dom, holes, ctx->iov, 1, ctx->batch_pfns, m);
    k = page_iovs(&ctx->dom, holes, ctx->iov, ks, ctx->batch_pfns + m, n - m);
    /* PAGE_DATA bodies are multiples of 8: no padding. */
    if (m == 0) {
        if (xcs_writev_all(&ctx->w, ctx->iov, k) < 0)
            return write_failed(ctx, "PAGE_DATA");
    } else {
        /* header + pfns copied, pages [0, m) by reference, the rest copied */
        if (xcs_writev_all(&ctx->w, ctx->iov, 1) < 0 ||
            xcs_vmsplice_all(&ctx->w, ctx->iov + 1, ks - 1) < 0)
            return write_failed(ctx, "PAGE_DATA (vmsplice)");
        ctx->splice_end = ctx->w.bytes;
        if (xcs_writev_all(&ctx->w, ctx->iov + ks, k - ks) < 0)
            return write_failed(ctx, "PAGE_DATA");
    }
    ctx->batch_n = 0;
    ctx->st->pages_sent += n;
    ctx->total_written += n;
    ctx->round_sent += n;
    return 0;
}

static int page_is_zero(const uint8_t *page)
{
    const uint64_t *w = (const uint64_t *)page;
    uint64_t acc = 0;

    if (w[0])
        return 0; /* most data pages answer here */
    for (size_t i = 0; i < XCS_PAGE_SIZE / 8; i += 8) {
        acc |= w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] |
               w[i + 6] | w[i + 7];
        if (acc)
            return 0;
    }
    return 1;
}

/* A page that reads as zeros: a hole (not touched: see simdom.h) or zeros. */
static int page_zero(const struct xcs_sim_dom *dom, struct xcs_sim_holes *holes,
                     uint64_t pfn)
{
    return xcs_sim_page_is_hole(holes, pfn) ||
           page_is_zero(xcs_sim_page(dom, pfn));
}

static int add_page(struct save_ctx *ctx, uint64_t pfn, int skip_zero)
{
    if (skip_zero && page_zero(&ctx->dom, &ctx->holes, pfn)) {
        ctx->st->zero_pages++;
        return 0;
    }
    ctx->batch_pfns[ctx->batch_n++] = pfn; /* pfn type NOTAB = 0 */
    if (ctx->batch_n == XCS_MAX_BATCH_SIZE)
        return flush_batch(ctx);
    return 0;
}

/*
 * mm trick: sending a page (writev's copy, vmsplice's pin, the zero check)
 * faults a PTE for it into our MAP_SHARED mapping, and tearing down 1 GiB of
 * PTEs (munmap at the end, or exit) took ~90 ms on the test box: after the
 * stream's end, so inside a migration's downtime.  After each live round,
 * drop them with MADV_DONTNEED while the guest still runs: on a shared file
 * mapping that only unmaps (the pages stay in the file, later reads fault
 * them back), and pages already in a pipe hold their own references.  Then
 * only the last rounds' few PTEs are left for the final unmap.  Best effort.
 */
static void drop_ptes(struct save_ctx *ctx)
{
    (void)madvise(ctx->dom.pages, (size_t)ctx->dom.nr_pages * XCS_PAGE_SIZE,
                  MADV_DONTNEED);
}

/*
 * Page-lifetime rule, part 3: the pfn below which the final (frozen) round may
 * vmsplice, so that at least a pipe capacity plus two pages of the round's
 * last pages go by copy.  Scans down from the top for pages the round will
 * send; 0 (vmsplice nothing) for a round smaller than that.
 */
static uint64_t splice_limit(struct save_ctx *ctx, const uint64_t *bitmap,
                             uint64_t count, int skip_zero)
{
    long cap = xcs_pipe_capacity(ctx->w.fd);
    struct xcs_sim_holes holes;
    uint64_t want, got = 0;

    if (cap <= 0)
        return 0;
    want = (uint64_t)cap / XCS_PAGE_SIZE + 2;
    xcs_sim_holes_init(&holes, &ctx->dom, bitmap ? count : 0);
    for (uint64_t pfn = ctx->dom.nr_pages; pfn-- > 0;) {
        if (bitmap && !(bitmap[pfn / 64] & (1ULL << (pfn % 64))))
            continue;
        /*
         * Scanning down, lseek cannot help (it seeks up): a page not in
         * memory is not counted, hole or swapped out.  Not counting a page
         * the round does send only lowers the limit: more pages copied.
         */
        if (skip_zero && (!xcs_sim_page_resident(&holes, pfn) ||
                          page_is_zero(xcs_sim_page(&ctx->dom, pfn))))
            continue;
        if (++got >= want)
            return pfn;
    }
    return 0;
}

/* The first pfn in [pfn, end) of the round's set (every pfn when bitmap is
 * NULL), or end. */
static uint64_t next_pfn(const uint64_t *bitmap, uint64_t pfn, uint64_t end)
{
    if (!bitmap)
        return pfn;
    while (pfn < end) {
        uint64_t v = bitmap[pfn / 64] >> (pfn % 64);

        if (v) {
            pfn += (uint64_t)__builtin_ctzll(v);
            break;
        }
        pfn = (pfn | 63) + 1;
    }
    return pfn < end ? pfn : end;
}

/*----- parallel copy (copy_threads) -----*/

/*
 * A round's PAGE_DATA written by N threads into a regular file, byte for
 * byte what the sequential path writes:
 *  phase 1: each thread lists the pfns of its contiguous pfn range that the
 *    round sends (skipping all-zero pages exactly where add_page would);
 *    the main thread then packs the lists into one, in pfn order.
 *  Batching is that of the sequential path: batch b holds pages
 *    [b * XCS_MAX_BATCH_SIZE, ...) of the list, so every batch but the last
 *    is full and batch b starts FULL_BATCH_BYTES * b after the round's first
 *    byte: no other prefix sum is needed.
 *  phase 2: each thread pwritev's a contiguous share of the batches at
 *    those offsets; then the file position is set after the last one.
 * Progress comes from the main thread only (the helper's callbacks frame
 * messages on a pipe and are not thread-safe): workers wake it every
 * COPY_WAKE_PAGES pages and when they finish, and it reports
 * (xcs_progress_step rate-limits).  Errors: the first one wins
 * (errno, what, thread, offset), the others stop at their next batch, all
 * are joined, and the main thread reports it in one line.
 */

/*
 * fd trick: pwritev at computed offsets needs a regular file whose position
 * lseek can read and set, opened without O_APPEND (Linux appends O_APPEND
 * pwrites at the end whatever the offset).  Anything else (a pipe, socket,
 * tty) keeps the sequential path.
 */
static int copy_fd_fits(int fd)
{
    struct stat st;
    int fl;

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode))
        return 0;
    fl = fcntl(fd, F_GETFL);
    if (fl < 0 || (fl & O_APPEND))
        return 0;
    return lseek(fd, 0, SEEK_CUR) >= 0;
}

/* Record an error; the first one wins.  Called with pool->lock NOT held. */
static void copy_error(struct copy_pool *pool, int err, const char *what,
                       unsigned int thread, uint64_t off)
{
    pthread_mutex_lock(&pool->lock);
    if (!pool->err) {
        pool->err = err ? err : EIO;
        pool->err_what = what;
        pool->err_thread = thread;
        pool->err_off = off;
    }
    __atomic_store_n(&pool->stop, 1, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&pool->lock);
}

static void copy_find(struct copy_worker *w)
{
    struct copy_pool *pool = w->pool;
    const struct xcs_sim_dom *dom = &pool->ctx->dom;
    uint64_t *out = pool->pfns + w->lo;

    w->found = w->zeros = 0;
    xcs_sim_holes_init(&w->holes, dom, pool->asks);
    for (uint64_t pfn = next_pfn(pool->bitmap, w->lo, w->hi); pfn < w->hi;
         pfn = next_pfn(pool->bitmap, pfn + 1, w->hi)) {
        if (pool->skip_zero && page_zero(dom, &w->holes, pfn)) {
            w->zeros++;
            continue;
        }
        out[w->found++] = pfn;
    }
}

static void copy_write(struct copy_worker *w)
{
    struct copy_pool *pool = w->pool;
    const struct xcs_sim_dom *dom = &pool->ctx->dom;
    struct xcs_sim_holes *holes = pool->skip_zero ? NULL : &w->holes;

    xcs_sim_holes_init(&w->holes, dom, pool->asks);
    for (uint64_t b = w->lo; b < w->hi; b++) {
        uint64_t first = b * XCS_MAX_BATCH_SIZE;
        uint64_t left = pool->npages - first;
        unsigned int n = left < XCS_MAX_BATCH_SIZE ? (unsigned int)left
                                                   : XCS_MAX_BATCH_SIZE;
        uint64_t off = pool->base + b * FULL_BATCH_BYTES;
        int k;

        if (__atomic_load_n(&pool->stop, __ATOMIC_RELAXED))
            return;
        /* header, then the pfns straight from the packed list, then pages */
        xcs_page_data_hdr_put(w->hdr, n, n);
        w->iov[0].iov_base = w->hdr;
        w->iov[0].iov_len = XCS_PAGE_DATA_HDR_SIZE;
        w->iov[1].iov_base = pool->pfns + first;
        w->iov[1].iov_len = 8 * (size_t)n;
        k = page_iovs(dom, holes, w->iov, 2, pool->pfns + first, n);
        if (xcs_pwritev_all(pool->ctx->w.fd, w->iov, k, off) < 0) {
            copy_error(pool, errno, "writing PAGE_DATA", w->idx, off);
            return;
        }
        pthread_mutex_lock(&pool->lock);
        pool->pages_done += n;
        if (pool->pages_done - pool->pages_told >= COPY_WAKE_PAGES) {
            pool->pages_told = pool->pages_done;
            pthread_cond_signal(&pool->news);
        }
        pthread_mutex_unlock(&pool->lock);
    }
}

static void *copy_main(void *arg)
{
    struct copy_worker *w = arg;
    struct copy_pool *pool = w->pool;

    if (pool->phase == 1)
        copy_find(w);
    else
        copy_write(w);
    pthread_mutex_lock(&pool->lock);
    pool->running--;
    pthread_cond_signal(&pool->news);
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

/*
 * Run one phase on every worker and wait for all of them, reporting
 * progress (phase 2) in between.  The ranges are set by the caller.
 */
static void copy_run(struct save_ctx *ctx, int phase, uint64_t done0)
{
    struct copy_pool *pool = &ctx->pool;
    unsigned int started = 0;
    sigset_t all, old;

    pool->phase = phase;
    pool->pages_done = pool->pages_told = 0;
    /*
     * Workers start with every signal blocked (they inherit the mask), so
     * that signals -- the helper's SIGTERM abort, which dup2()s over io_fd
     * to make the next write fail -- are handled by the main thread.
     */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (; started < pool->n; started++) {
        struct copy_worker *w = &pool->w[started];
        int r;

        pthread_mutex_lock(&pool->lock);
        pool->running++;
        pthread_mutex_unlock(&pool->lock);
        r = pthread_create(&w->tid, NULL, copy_main, w);
        if (r) {
            pthread_mutex_lock(&pool->lock);
            pool->running--;
            pthread_mutex_unlock(&pool->lock);
            copy_error(pool, r, "starting a copy thread", started,
                       pool->base);
            break;
        }
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);

    pthread_mutex_lock(&pool->lock);
    while (pool->running > 0) {
        uint64_t done;

        pthread_cond_wait(&pool->news, &pool->lock);
        done = pool->pages_done;
        if (phase == 2) {
            /* not under the lock: the callback may block on its pipe */
            pthread_mutex_unlock(&pool->lock);
            xcs_progress_step(&ctx->pr, done0 + done);
            pthread_mutex_lock(&pool->lock);
        }
    }
    pthread_mutex_unlock(&pool->lock);
    for (unsigned int i = 0; i < started; i++)
        pthread_join(pool->w[i].tid, NULL);
}

/*
 * One round through the pool; *visited = pfns of the set looked at (sent +
 * skipped as zero), as the sequential loop counts them for progress.
 */
static int copy_round(struct save_ctx *ctx, int skip_zero,
                      const uint64_t *bitmap, uint64_t count, uint64_t *visited)
{
    struct copy_pool *pool = &ctx->pool;
    uint64_t nr = ctx->dom.nr_pages, per, npages = 0, zeros = 0, nb, bytes;
    unsigned int n = pool->n;
    off_t pos;

    pos = lseek(ctx->w.fd, 0, SEEK_CUR);
    if (pos < 0)
        return write_failed(ctx, "PAGE_DATA (lseek)");
    pool->base = (uint64_t)pos;
    pool->bitmap = bitmap;
    pool->asks = bitmap ? count : 0;
    pool->skip_zero = skip_zero;
    pool->err = 0;
    __atomic_store_n(&pool->stop, 0, __ATOMIC_RELAXED);

    /* phase 1: contiguous pfn ranges, whole bitmap words each */
    per = ((nr + n - 1) / n + 63) & ~(uint64_t)63;
    for (unsigned int i = 0; i < n; i++) {
        pool->w[i].lo = (uint64_t)i * per < nr ? (uint64_t)i * per : nr;
        pool->w[i].hi = pool->w[i].lo + per < nr ? pool->w[i].lo + per : nr;
    }
    copy_run(ctx, 1, 0);
    if (pool->err)
        goto failed;
    for (unsigned int i = 0; i < n; i++) {
        memmove(pool->pfns + npages, pool->pfns + pool->w[i].lo,
                pool->w[i].found * sizeof(*pool->pfns));
        npages += pool->w[i].found;
        zeros += pool->w[i].zeros;
    }
    ctx->st->zero_pages += zeros;
    *visited = npages + zeros;

    /* phase 2: contiguous shares of the batches */
    pool->npages = npages;
    nb = (npages + XCS_MAX_BATCH_SIZE - 1) / XCS_MAX_BATCH_SIZE;
    for (unsigned int i = 0; i < n; i++) {
        pool->w[i].lo = nb * i / n;
        pool->w[i].hi = nb * (i + 1) / n;
    }
    copy_run(ctx, 2, zeros);
    if (pool->err)
        goto failed;
    bytes = nb ? (nb - 1) * FULL_BATCH_BYTES + XCS_PAGE_DATA_HDR_SIZE +
                     (8 + XCS_PAGE_SIZE) *
                         (npages - (nb - 1) * XCS_MAX_BATCH_SIZE)
               : 0;
    /*
     * fd trick: pwritev left the file position where the round started;
     * move it past the round, so that what follows -- our next record, or
     * libxl's through the same open file description -- comes right after.
     */
    if (lseek(ctx->w.fd, (off_t)(pool->base + bytes), SEEK_SET) < 0)
        return write_failed(ctx, "PAGE_DATA (lseek)");
    ctx->w.bytes += bytes;
    ctx->st->threaded_bytes += bytes;
    ctx->st->copy_threads = n;
    ctx->st->pages_sent += npages;
    ctx->total_written += npages;
    ctx->round_sent += npages;
    return 0;

failed:
    return xcs_fail(ctx->cb, pool->err,
                    "%s at stream offset %llu (copy thread %u of %u): %s",
                    pool->err_what,
                    (unsigned long long)(ctx->w.bytes + pool->err_off -
                                         pool->base),
                    pool->err_thread + 1, n, strerror(pool->err));
}

/*
 * Set up the pool once per save when copy_threads > 1 and io_fd fits;
 * pool->n stays 0 (sequential path) otherwise.
 */
static int copy_pool_init(struct save_ctx *ctx)
{
    struct copy_pool *pool = &ctx->pool;
    unsigned int n = ctx->p->copy_threads;

    if (n > XCS_MAX_COPY_THREADS)
        return xcs_fail(ctx->cb, EINVAL, "copy_threads %u is more than %d", n,
                        XCS_MAX_COPY_THREADS);
    if (n <= 1 || !copy_fd_fits(ctx->w.fd))
        return 0;
    pool->ctx = ctx;
    pool->pfns = malloc(sizeof(*pool->pfns) * ctx->dom.nr_pages);
    pool->w = calloc(n, sizeof(*pool->w));
    if (!pool->pfns || !pool->w)
        return xcs_fail(ctx->cb, ENOMEM, "allocating copy thread buffers");
    for (unsigned int i = 0; i < n; i++) {
        pool->w[i].pool = pool;
        pool->w[i].idx = i;
        pool->w[i].iov = malloc(sizeof(struct iovec) * (2 + XCS_MAX_BATCH_SIZE));
        if (!pool->w[i].iov)
            return xcs_fail(ctx->cb, ENOMEM, "allocating copy thread buffers");
    }
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->news, NULL);
    pool->n = n;
    return 0;
}

static void copy_pool_free(struct copy_pool *pool)
{
    if (pool->n) {
        pthread_cond_destroy(&pool->news);
        pthread_mutex_destroy(&pool->lock);
    }
    for (unsigned int i = 0; pool->w && i < pool->ctx->p->copy_threads; i++)
        free(pool->w[i].iov);
    free(pool->w);
    free(pool->pfns);
}

/*----- rounds -----*/

/*
 * One memory round: every page (bitmap NULL) or those set in bitmap.
 * skip_zero only for a first full pass (see send_zero_pages).
 */
static int send_pages(struct save_ctx *ctx, const uint64_t *bitmap,
                      uint64_t count, int skip_zero, const char *what)
{
    uint64_t nr = ctx->dom.nr_pages;
    uint64_t done = 0;
    unsigned int slot;

    ctx->round_sent = 0;
    ctx->skip_zero = skip_zero;
    /* What was a hole last round may have been written since. */
    xcs_sim_holes_init(&ctx->holes, &ctx->dom, bitmap ? count : 0);
    ctx->splice_below = !ctx->splice_ok ? 0
                        : ctx->frozen ? splice_limit(ctx, bitmap, count, skip_zero)
                                      : nr;
    xcs_progress_start(&ctx->pr, ctx->cb, count, "%s", what);
    if (ctx->pool.n && count >= XCS_COPY_MIN_PAGES) {
        if (copy_round(ctx, skip_zero, bitmap, count, &done) < 0)
            return -1;
    } else {
        for (uint64_t pfn = next_pfn(bitmap, 0, nr); pfn < nr;
             pfn = next_pfn(bitmap, pfn + 1, nr)) {
            if (add_page(ctx, pfn, skip_zero) < 0)
                return -1;
            xcs_progress_step(&ctx->pr, ++done);
        }
        if (flush_batch(ctx) < 0)
            return -1;
    }
    xcs_progress_end(&ctx->pr, done);
    if (!ctx->frozen)
        drop_ptes(ctx);

    slot = ctx->round < XCS_STATS_MAX_ROUNDS ? ctx->round
                                             : XCS_STATS_MAX_ROUNDS - 1;
    ctx->st->pages_per_round[slot] += ctx->round_sent;
    ctx->round++;
    ctx->st->rounds = ctx->round;
    return 0;
}

/* Take the dirty log and send what it names. */
static int send_dirty(struct save_ctx *ctx, const char *what)
{
    uint64_t n = xcs_sim_dirty_fetch_and_clear(&ctx->dom, ctx->dirty);

    return send_pages(ctx, ctx->dirty, n, 0, what);
}

/*----- headers -----*/

static int write_xl_header(struct save_ctx *ctx)
{
    char json[512];
    const char *cfg = ctx->p->xl_config;
    size_t cfg_len = ctx->p->xl_config_len;
    uint8_t hdr[XCS_XL_HDR_SIZE + 4];
    struct xcs_xl_hdr h = {XCS_XL_BYTEORDER, XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2,
                           0, 0};
    struct iovec iov[2];

    if (!cfg) {
        /* libxl_domain_config-shaped JSON; xl counts the trailing NUL. */
        int n = snprintf(json, sizeof(json),
                         "{\"c_info\":{\"type\":\"hvm\",\"name\":\"xcsave-sim\"},"
                         "\"b_info\":{\"max_vcpus\":%u,\"max_memkb\":%llu,"
                         "\"target_memkb\":%llu}}",
                         ctx->dom.nr_vcpus,
                         (unsigned long long)(ctx->dom.nr_pages * 4),
                         (unsigned long long)(ctx->dom.nr_pages * 4));
        cfg = json;
        cfg_len = (size_t)n + 1;
    }
    if (cfg_len > UINT32_MAX - 4)
        return xcs_fail(ctx->cb, EINVAL, "xl config of %zu bytes is too large",
                        cfg_len);
    h.optlen = (uint32_t)cfg_len + 4; /* optional data: u32 len + config */
    xcs_xl_hdr_build(hdr, &h);
    xcs_put_le32(hdr + XCS_XL_HDR_SIZE, (uint32_t)cfg_len);
    iov[0].iov_base = hdr;
    iov[0].iov_len = sizeof(hdr);
    iov[1].iov_base = (void *)cfg;
    iov[1].iov_len = cfg_len;
    if (xcs_writev_all(&ctx->w, iov, 2) < 0)
        return write_failed(ctx, "the xl header");
    return 0;
}

static int write_libxl_header(struct save_ctx *ctx)
{
    uint8_t hdr[XCS_LIBXL_HDR_SIZE];

    xcs_libxl_hdr_build(hdr, 0); /* little-endian, not legacy */
    if (xcs_write_all(&ctx->w, hdr, sizeof(hdr)) < 0)
        return write_failed(ctx, "the libxl header");
    /* The libxc image follows LIBXC_CONTEXT directly (length 0). */
    return write_rec(ctx, XCS_LIBXL_REC_LIBXC_CONTEXT, NULL, 0,
                     "LIBXC_CONTEXT");
}

/*
 * HVM static data, as Xen 4.17 writes it before STATIC_DATA_END: the
 * domain's CPUID policy (xen_cpuid_leaf_t {leaf, subleaf, a, b, c, d}) and
 * MSR policy (xen_msr_entry_t {idx, flags (MBZ), val}), little-endian.  The
 * sim has no CPU, so the policy is small and fixed: CPUID leaf 0 (max basic
 * leaf 1, vendor "XcsaveSimCPU"), leaf 1 (only the hypervisor bit, ECX
 * bit 31) and leaf 0x80000000 (no extended leaves); the two MSRs 4.17
 * serialises, MSR_INTEL_PLATFORM_INFO (0xce) and MSR_ARCH_CAPABILITIES
 * (0x10a), both 0.  Leaves without subleaves carry subleaf ~0, as Xen's.
 * Real Xen writes every leaf up to the host's max leaves (1416 bytes in
 * the lab): the CPUID record's length differs, the MSR record's (32)
 * matches.  The sim's restore records that it saw them
 * (static_data_done gets no MISSING bits) and sets nothing.
 */
#define NO_SUBLEAF 0xffffffffu /* XEN_CPUID_NO_SUBLEAF */
static const uint32_t sim_cpuid[][6] = {
    {0x0, NO_SUBLEAF, 1, 0x61736358 /* "Xcsa" */, 0x5550436d /* "mCPU" */,
     0x69536576 /* "veSi" */},
    {0x1, NO_SUBLEAF, 0, 0, 0x80000000u, 0},
    {0x80000000u, NO_SUBLEAF, 0x80000000u, 0, 0, 0},
};
static const uint32_t sim_msr_idx[] = {0xce, 0x10a};

static int write_policies(struct save_ctx *ctx)
{
    uint8_t cpuid[sizeof(sim_cpuid)];
    uint8_t msr[16 * (sizeof(sim_msr_idx) / sizeof(sim_msr_idx[0]))];
    int rc;

    for (size_t i = 0; i < sizeof(sim_cpuid) / sizeof(sim_cpuid[0]); i++)
        for (size_t j = 0; j < 6; j++)
            xcs_put_le32(cpuid + 24 * i + 4 * j, sim_cpuid[i][j]);
    memset(msr, 0, sizeof(msr)); /* flags MBZ, values 0 */
    for (size_t i = 0; i < sizeof(sim_msr_idx) / sizeof(sim_msr_idx[0]); i++)
        xcs_put_le32(msr + 16 * i, sim_msr_idx[i]);
    rc = write_rec(ctx, XCS_REC_X86_CPUID_POLICY, cpuid, sizeof(cpuid),
                   "X86_CPUID_POLICY");
    if (rc)
        return rc;
    return write_rec(ctx, XCS_REC_X86_MSR_POLICY, msr, sizeof(msr),
                     "X86_MSR_POLICY");
}

static int write_image_header(struct save_ctx *ctx)
{
    uint8_t buf[XCS_IHDR_SIZE + XCS_DHDR_SIZE];
    int rc;

    xcs_ihdr_build(buf);
    xcs_dhdr_build(buf + XCS_IHDR_SIZE, XCS_DHDR_TYPE_X86_HVM, 4, 17);
    if (xcs_write_all(&ctx->w, buf, sizeof(buf)) < 0)
        return write_failed(ctx, "the image header");
    rc = write_policies(ctx);
    if (rc)
        return rc;
    return write_rec(ctx, XCS_REC_STATIC_DATA_END, NULL, 0, "STATIC_DATA_END");
}

static int write_emulator_context(struct save_ctx *ctx)
{
    uint8_t body[8 + 24];
    uint32_t emu[2] = {XCS_EMULATOR_QEMU_UPSTREAM, 0};
    uint32_t vcpus = ctx->dom.nr_vcpus, zero = 0;

    /* A stand-in for qemu's device state: small and deterministic. */
    memcpy(body, emu, sizeof(emu));
    memcpy(body + 8, XCS_SIM_EMU_MAGIC, 8);
    memcpy(body + 16, &ctx->dom.nr_pages, 8);
    memcpy(body + 24, &vcpus, 4);
    memcpy(body + 28, &zero, 4);
    return write_rec(ctx, XCS_LIBXL_REC_EMULATOR_CONTEXT, body, sizeof(body),
                     "EMULATOR_CONTEXT");
}

/*----- end of checkpoint: TSC, HVM context, params -----*/

static uint8_t *put_desc(uint8_t *p, uint16_t code, uint16_t inst,
                         uint32_t len)
{
    memcpy(p, &code, 2);
    memcpy(p + 2, &inst, 2);
    memcpy(p + 4, &len, 4);
    return p + XCS_HVM_DESC_SIZE;
}

static int build_hvm_ctx(struct save_ctx *ctx)
{
    unsigned int nv = ctx->dom.nr_vcpus;
    uint32_t len = XCS_HVM_DESC_SIZE + XCS_HVM_HEADER_SIZE +
                   XCS_HVM_DESC_SIZE + XCS_HVM_SIM_SIZE +
                   nv * (XCS_HVM_DESC_SIZE + XCS_SIM_VCPU_SIZE) +
                   XCS_HVM_DESC_SIZE;

    ctx->hvm_ctx = calloc(1, len);
    if (!ctx->hvm_ctx)
        return xcs_fail(ctx->cb, ENOMEM, "allocating HVM_CONTEXT");
    ctx->hvm_ctx_len = len;
    return 0;
}

/* Fill HVM_CONTEXT from the vCPU blobs as they are now (domain stopped). */
static void fill_hvm_ctx(struct save_ctx *ctx)
{
    uint8_t *p = ctx->hvm_ctx;
    uint32_t magic = XCS_HVM_HEADER_MAGIC, one = 1, zero = 0;
    uint32_t khz = 2000000, vsize = XCS_SIM_VCPU_SIZE, shift = XCS_PAGE_SHIFT;
    uint32_t nv = ctx->dom.nr_vcpus;
    uint64_t changeset = 0;

    p = put_desc(p, XCS_HVM_SAVE_HEADER, 0, XCS_HVM_HEADER_SIZE);
    memcpy(p, &magic, 4);
    memcpy(p + 4, &one, 4);
    memcpy(p + 8, &changeset, 8);
    memcpy(p + 16, &zero, 4);
    memcpy(p + 20, &khz, 4);
    p += XCS_HVM_HEADER_SIZE;

    p = put_desc(p, XCS_HVM_SAVE_SIM, 0, XCS_HVM_SIM_SIZE);
    memcpy(p, XCS_HVM_SIM_MAGIC, 8);
    memcpy(p + 8, &one, 4);
    memcpy(p + 12, &vsize, 4);
    memcpy(p + 16, &ctx->dom.nr_pages, 8);
    memcpy(p + 24, &nv, 4);
    memcpy(p + 28, &shift, 4);
    p += XCS_HVM_SIM_SIZE;

    for (unsigned int v = 0; v < nv; v++) {
        p = put_desc(p, XCS_HVM_SAVE_CPU, (uint16_t)v, XCS_SIM_VCPU_SIZE);
        memcpy(p, xcs_sim_vcpu(&ctx->dom, v), XCS_SIM_VCPU_SIZE);
        p += XCS_SIM_VCPU_SIZE;
    }
    put_desc(p, XCS_HVM_SAVE_END, 0, 0);
}

static int end_of_checkpoint(struct save_ctx *ctx)
{
    uint64_t nr = ctx->dom.nr_pages;
    uint8_t tsc[24];
    uint32_t mode = 0, khz = 2000000, inc = 0, res = 0;
    uint64_t nsec;
    /* {index, value}; the magic pfns sit at the top of guest memory. */
    struct {
        uint64_t idx, val;
    } cand[] = {
        {XCS_HVM_PARAM_STORE_PFN, nr - 1},
        {XCS_HVM_PARAM_IOREQ_PFN, nr >= 3 ? nr - 3 : 0},
        {XCS_HVM_PARAM_BUFIOREQ_PFN, nr >= 4 ? nr - 4 : 0},
        {XCS_HVM_PARAM_CONSOLE_PFN, nr >= 2 ? nr - 2 : 0},
        {XCS_HVM_PARAM_ACPI_IOPORTS_LOCATION, 1},
    };
    uint8_t params[8 + sizeof(cand)];
    uint32_t count = 0;

    /* Guest time: derived from the domain so equal domains save equal. */
    nsec = __atomic_load_n(&ctx->dom.hdr->generation, __ATOMIC_RELAXED) * 1000;
    memcpy(tsc, &mode, 4);
    memcpy(tsc + 4, &khz, 4);
    memcpy(tsc + 8, &nsec, 8);
    memcpy(tsc + 16, &inc, 4);
    memcpy(tsc + 20, &res, 4);
    if (write_rec(ctx, XCS_REC_X86_TSC_INFO, tsc, sizeof(tsc),
                  "X86_TSC_INFO") < 0)
        return -1;

    fill_hvm_ctx(ctx);
    if (write_rec(ctx, XCS_REC_HVM_CONTEXT, ctx->hvm_ctx, ctx->hvm_ctx_len,
                  "HVM_CONTEXT") < 0)
        return -1;

    for (size_t i = 0; i < sizeof(cand) / sizeof(cand[0]); i++) {
        if (!cand[i].val)
            continue; /* like libxc: non-zero params only */
        memcpy(params + 8 + 16 * count, &cand[i], 16);
        count++;
    }
    memcpy(params, &count, 4);
    memset(params + 4, 0, 4);
    return write_rec(ctx, XCS_REC_HVM_PARAMS, params, 8 + 16 * count,
                     "HVM_PARAMS");
}

/*----- domain control -----*/

static int suspend_domain(struct save_ctx *ctx)
{
    ctx->t_suspend = xcs_now_ns();
    /* From here a failure must set the source running again. */
    ctx->stopped = 1;
    if (ctx->cb->suspend && !ctx->cb->suspend(ctx->cb->data))
        return xcs_fail(ctx->cb, EIO, "guest did not suspend");
    /*
     * The glue's suspend callback normally did this already; doing it here
     * too (idempotent) makes the final round consistent whatever the
     * callback did, and waits out writers caught mid-page.
     */
    if (xcs_sim_set_state(&ctx->dom, XCS_SIM_SUSPENDED) < 0)
        return xcs_fail(ctx->cb, errno, "suspending the sim domain: %s",
                        strerror(errno));
    ctx->frozen = 1; /* page-lifetime rule: pages fixed from here */
    xcs_logf(ctx->cb, XCS_LOG_DETAIL, -1, "Domain now suspended");
    return 0;
}

static int resume_domain(struct save_ctx *ctx)
{
    ctx->frozen = 0;
    if (ctx->cb->postcopy && ctx->cb->postcopy(ctx->cb->data) <= 0)
        return xcs_fail(ctx->cb, EIO, "postcopy callback failed");
    if (xcs_sim_set_state(&ctx->dom, XCS_SIM_RUNNING) < 0)
        return xcs_fail(ctx->cb, errno, "resuming the sim domain: %s",
                        strerror(errno));
    ctx->stopped = 0;
    return 0;
}

static int policy(struct save_ctx *ctx, unsigned int iteration)
{
    struct xcs_precopy_stats s = {
        .iteration = iteration,
        .total_written = ctx->total_written,
        .dirty_count = (int64_t)xcs_sim_dirty_popcount(&ctx->dom),
    };
    unsigned int max_iters =
        ctx->p->max_iters ? ctx->p->max_iters : XCS_XEN_MAX_ITERS;
    unsigned int threshold = ctx->p->dirty_threshold
                                 ? ctx->p->dirty_threshold
                                 : XCS_XEN_DIRTY_THRESHOLD;

    if (ctx->cb->precopy_policy)
        return ctx->cb->precopy_policy(s, ctx->cb->data);
    /* xg_sr_save.c's simple_precopy_policy, with our knobs. */
    if (s.dirty_count < (int64_t)threshold || iteration >= max_iters)
        return XCS_POLICY_STOP_AND_COPY;
    return XCS_POLICY_CONTINUE_PRECOPY;
}

/*----- the memory of the first checkpoint -----*/

/*
 * Round 0 sends every page; the policy is then asked before each further
 * round with the round about to start (1 first).  STOP_AND_COPY suspends at
 * once and sends the final round.  (libxc also asks before round 0 and sends
 * one more live round after a stop.)
 */
static int send_memory_live(struct save_ctx *ctx)
{
    char what[40];
    int skip_zero = !ctx->p->send_zero_pages;

    if (send_pages(ctx, NULL, ctx->dom.nr_pages, skip_zero,
                   "Frames iteration 0") < 0)
        return -1;
    for (unsigned int it = 1;; it++) {
        int decision = policy(ctx, it);

        if (decision == XCS_POLICY_ABORT) {
            xcs_logf(ctx->cb, XCS_LOG_NOTICE, -1,
                     "precopy policy aborted the save before iteration %u",
                     it);
            return xcs_fail(ctx->cb, ECANCELED,
                            "save aborted by the precopy policy");
        }
        if (decision != XCS_POLICY_CONTINUE_PRECOPY)
            break;
        snprintf(what, sizeof(what), "Frames iteration %u", it);
        if (send_dirty(ctx, what) < 0)
            return -1;
    }
    if (suspend_domain(ctx) < 0)
        return -1;
    snprintf(what, sizeof(what), "Frames iteration %u", ctx->round);
    return send_dirty(ctx, what);
}

static int send_memory_nonlive(struct save_ctx *ctx)
{
    if (suspend_domain(ctx) < 0)
        return -1;
    if (ctx->logdirty)
        /* Remus: only writes after the coming resume count. */
        xcs_sim_dirty_fetch_and_clear(&ctx->dom, ctx->dirty);
    return send_pages(ctx, NULL, ctx->dom.nr_pages, !ctx->p->send_zero_pages,
                      "Frames");
}

/*----- whole save -----*/

/*
 * Page-lifetime rule, part 3 (end): return only once every vmspliced byte
 * has been read, i.e. the unread bytes all belong to the copied tail.  The
 * copied tail is at least the pipe's capacity, so this holds at once unless
 * the pipe grew mid-save or the final round was smaller than that tail (its
 * earlier, live rounds were vmspliced); then nap until the reader catches up
 * or goes away (POLLERR: no reader left, nobody can see the pages).
 */
static void wait_spliced_read(struct save_ctx *ctx)
{
    uint64_t copied = ctx->w.bytes - ctx->splice_end;
    int waited = 0;

    for (;;) {
        long unread = xcs_pipe_unread(ctx->w.fd);
        struct pollfd pfd = {.fd = ctx->w.fd, .events = 0};
        struct timespec nap = {.tv_sec = 0, .tv_nsec = 200000};

        if (unread < 0 || (uint64_t)unread <= copied)
            break;
        if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLERR | POLLHUP)))
            break;
        waited = 1;
        nanosleep(&nap, NULL);
    }
    if (waited)
        xcs_logf(ctx->cb, XCS_LOG_DEBUG, -1,
                 "waited for the reader to consume the vmspliced pages");
}

static int write_checkpoint_tail(struct save_ctx *ctx)
{
    if (write_rec(ctx, XCS_REC_CHECKPOINT, NULL, 0, "CHECKPOINT") < 0)
        return -1;
    if (xcs_fmt_has_libxl(ctx->p->wrap)) {
        if (write_emulator_context(ctx) < 0 ||
            write_rec(ctx, XCS_LIBXL_REC_CHECKPOINT_END, NULL, 0,
                      "CHECKPOINT_END") < 0)
            return -1;
    }
    return 0;
}

static int remus_loop(struct save_ctx *ctx)
{
    unsigned int total = ctx->p->checkpoints ? ctx->p->checkpoints : 1;

    for (unsigned int cp = 1;; cp++) {
        if (end_of_checkpoint(ctx) < 0 || write_checkpoint_tail(ctx) < 0)
            return -1;
        ctx->st->downtime_ns = xcs_now_ns() - ctx->t_suspend;
        xcs_logf(ctx->cb, XCS_LOG_DETAIL, -1, "checkpoint %u sent", cp);
        if (resume_domain(ctx) < 0)
            return -1;
        if (cp >= total)
            break;
        if (ctx->cb->checkpoint && ctx->cb->checkpoint(ctx->cb->data) <= 0)
            break;
        if (ctx->p->interval_ms) {
            struct timespec ts = {
                .tv_sec = ctx->p->interval_ms / 1000,
                .tv_nsec = (long)(ctx->p->interval_ms % 1000) * 1000000L};

            while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
                ;
        }
        if (suspend_domain(ctx) < 0 ||
            send_dirty(ctx, "Checkpointed save") < 0)
            return -1;
    }
    return 0;
}

int xcs_engine_save(const struct xcs_save_params *p,
                    const struct xcs_engine_callbacks *cb,
                    struct xcs_save_stats *stats)
{
    struct save_ctx ctx = {.dom.fd = -1, .p = p, .cb = cb, .st = stats,
                           .w.fd = p->io_fd};
    uint64_t t0;
    int remus = p->stream_type == XCS_STREAM_REMUS;
    int saved;
    int rc = -1;

    if (xcs_engine_begin(&t0, stats, sizeof(*stats), cb, p->sim_path,
                         p->stream_type, p->wrap) < 0)
        goto out;
    if (xcs_sim_open(p->sim_path, 0, &ctx.dom) < 0) {
        xcs_fail(cb, errno, "opening sim domain %s: %s", p->sim_path,
                 strerror(errno));
        goto out;
    }
    ctx.orig_state = xcs_sim_get_state(&ctx.dom);
    xcs_pipe_grow(p->io_fd);
    {
        const char *no = getenv("XCSAVE_NO_VMSPLICE");

        ctx.splice_ok = !remus && xcs_pipe_capacity(p->io_fd) > 0 &&
                        !(no && *no && strcmp(no, "0") != 0);
    }
    ctx.dirty = malloc(ctx.dom.hdr->bitmap_bytes);
    ctx.batch = malloc(XCS_PAGE_DATA_HDR_SIZE + 8 * XCS_MAX_BATCH_SIZE);
    ctx.iov = malloc(sizeof(*ctx.iov) * (1 + XCS_MAX_BATCH_SIZE));
    if (!ctx.dirty || !ctx.batch || !ctx.iov) {
        xcs_fail(cb, ENOMEM, "allocating save buffers");
        goto out;
    }
    ctx.batch_pfns = (uint64_t *)(ctx.batch + XCS_PAGE_DATA_HDR_SIZE);
    if (build_hvm_ctx(&ctx) < 0 || copy_pool_init(&ctx) < 0)
        goto out;
    xcs_logf(cb, XCS_LOG_DETAIL, -1,
             "saving sim domain %s: %llu pages, %u vcpus, %s%s", p->sim_path,
             (unsigned long long)ctx.dom.nr_pages, ctx.dom.nr_vcpus,
             p->live ? "live" : "non-live", remus ? ", remus" : "");

    if (p->wrap == XCS_FMT_XL && write_xl_header(&ctx) < 0)
        goto out;
    if (xcs_fmt_has_libxl(p->wrap) && write_libxl_header(&ctx) < 0)
        goto out;
    if (write_image_header(&ctx) < 0)
        goto out;

    if (p->live || remus) {
        xcs_sim_logdirty_enable(&ctx.dom);
        ctx.logdirty = 1;
    }
    if (p->live ? send_memory_live(&ctx) : send_memory_nonlive(&ctx))
        goto out;

    if (remus) {
        if (remus_loop(&ctx) < 0)
            goto out;
    } else {
        if (end_of_checkpoint(&ctx) < 0 ||
            write_rec(&ctx, XCS_REC_END, NULL, 0, "END") < 0)
            goto out;
        if (xcs_fmt_has_libxl(p->wrap) &&
            (write_emulator_context(&ctx) < 0 ||
             write_rec(&ctx, XCS_LIBXL_REC_END, NULL, 0, "libxl END") < 0))
            goto out;
        ctx.st->downtime_ns = xcs_now_ns() - ctx.t_suspend;
    }
    if (ctx.w.spliced)
        wait_spliced_read(&ctx);
    xcs_logf(cb, XCS_LOG_DETAIL, -1, "End of stream");
    rc = 0;

out:
    saved = errno;
    if (ctx.dom.hdr) {
        if (ctx.logdirty)
            xcs_sim_logdirty_disable(&ctx.dom);
        if (rc && ctx.stopped) {
            /* The source must not stay stopped by a save that failed. */
            xcs_sim_set_state(&ctx.dom, ctx.orig_state);
            xcs_logf(cb, XCS_LOG_NOTICE, -1,
                     "save failed: sim domain %s is %s again", p->sim_path,
                     xcs_sim_state_name(ctx.orig_state));
        }
    }
    ctx.st->bytes_written = ctx.w.bytes;
    ctx.st->spliced_bytes = ctx.w.spliced;
    if (ctx.w.spliced)
        xcs_logf(cb, XCS_LOG_DEBUG, -1, "vmspliced %llu of %llu bytes",
                 (unsigned long long)ctx.w.spliced,
                 (unsigned long long)ctx.w.bytes);
    if (ctx.st->threaded_bytes)
        xcs_logf(cb, XCS_LOG_DETAIL, -1,
                 "copy threads: %u threads wrote %llu of %llu bytes",
                 ctx.st->copy_threads,
                 (unsigned long long)ctx.st->threaded_bytes,
                 (unsigned long long)ctx.w.bytes);
    ctx.st->duration_ns = xcs_now_ns() - t0;
    copy_pool_free(&ctx.pool);
    xcs_sim_close(&ctx.dom);
    free(ctx.hvm_ctx);
    free(ctx.iov);
    free(ctx.batch);
    free(ctx.dirty);
    errno = saved;
    return rc;
}
