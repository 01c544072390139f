/*
 * engine_restore.c - restore a simulated domain from a libxc migration
 * stream v2/v3 (HVM shaped), bare or inside the libxl stream / xl header.
 *
 * The stream fd is shared with the toolstack, so this reads exactly its own
 * bytes: a record header, then exactly the padded body, never past END (or
 * past the libxl END when wrapped).  A PAGE_DATA batch's pages go from the
 * stream to their places in the target without entering user space when the
 * stream is a file (copy_file_range) or a pipe (splice): one call per run of
 * adjacent pfns, one kernel copy.  From a socket they are read into one
 * reused buffer and written with pwrite, one call per run.  (readv straight
 * into a MAP_SHARED mapping of the target measured slower: each fresh tmpfs
 * page then costs a write fault, while pwrite and splice allocate in the
 * kernel; and a full filesystem becomes ENOSPC instead of SIGBUS.)
 *
 * The target is built under a temporary name next to the final path and
 * renamed into place only when the stream was complete and consistent, so a
 * failed restore leaves no half-built domain behind.  Pages sit at a fixed
 * offset in a sim file (simdom.c), so they can be written before the stream
 * reveals the domain's shape in HVM_CONTEXT; pages never sent stay holes of
 * the sparse file (zero), and the file gets its final size and header at the
 * end.
 *
 * Remus streams: the first checkpoint is applied as it arrives; every later
 * one is buffered whole, checked, and applied only once its CHECKPOINT (and,
 * wrapped, the libxl CHECKPOINT_END) has arrived.  When the stream then ends
 * or breaks, the restore fails over to the last complete checkpoint.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "private_file.h"
#include "simdom.h"
#include "source.h"
#include "stream_io.h"
#include "xcs_engine.h"
#include "xcs_format.h"

#define XL_OPTDATA_MAX (16u << 20) /* xl config: a few KiB in practice */

/* Why a libxc record loop returned. */
enum libxc_stop { STOP_END = 1, STOP_CHECKPOINT = 2 };

struct arena {
    uint8_t *data;
    size_t len, cap;
};

struct restore_ctx {
    const struct xcs_restore_params *p;
    const struct xcs_engine_callbacks *cb;
    struct xcs_restore_result *res;
    struct xcs_source r;     /* the stream, exact reads */
    char *partial;           /* temporary target path; NULL once renamed */
    int tfd;
    uint64_t max_pages;      /* pfn limit before HVM_CONTEXT */
    uint64_t max_pfn;
    int any_pages;

    unsigned int version;    /* image header version */
    int sde_seen;
    unsigned int policies;   /* CPUID (1) / MSR (2) policy records seen */
    int have_ctx;
    uint64_t nr_pages;
    unsigned int nr_vcpus;
    uint8_t *vcpus;          /* nr_vcpus contexts */

    uint64_t *pfns;          /* XCS_MAX_BATCH_SIZE */
    uint8_t *pages;          /* one batch's page data */
    const uint8_t *buf;      /* one record body, in the source's buffer */
    struct xcs_progress pr;

    int remus;
    int buffering;           /* inside a checkpoint after the first */

    int pv;                  /* foreign PV image (p->foreign only) */
    uint8_t *dm;             /* device model state to hand over (p->dm_path) */
    uint32_t dm_len;
    struct arena ckpt;       /* that checkpoint's records */
};

/*----- small helpers -----*/

static const char *rec_name(uint32_t type)
{
    static const char *const names[] = {
        "END", "PAGE_DATA", "X86_PV_INFO", "X86_PV_P2M_FRAMES",
        "X86_PV_VCPU_BASIC", "X86_PV_VCPU_EXTENDED", "X86_PV_VCPU_XSAVE",
        "SHARED_INFO", "X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS",
        "TOOLSTACK", "X86_PV_VCPU_MSRS", "VERIFY", "CHECKPOINT",
        "CHECKPOINT_DIRTY_PFN_LIST", "STATIC_DATA_END", "X86_CPUID_POLICY",
        "X86_MSR_POLICY"};

    if (type < sizeof(names) / sizeof(names[0]))
        return names[type];
    return "record";
}

static int read_failed(struct restore_ctx *ctx, const char *what, int eof)
{
    if (eof)
        return xcs_fail(ctx->cb, EIO,
                        "stream truncated at offset %llu reading %s",
                        (unsigned long long)ctx->r.off, what);
    return xcs_fail(ctx->cb, errno, "reading %s at offset %llu: %s", what,
                    (unsigned long long)ctx->r.off, strerror(errno));
}

static int read_exact(struct restore_ctx *ctx, void *buf, size_t len,
                      const char *what)
{
    int eof;

    if (xcs_source_read(&ctx->r, buf, len, &eof) < 0)
        return read_failed(ctx, what, eof);
    return 0;
}

/* Read a record header; lengths over the cap are refused here, first. */
static int read_rhdr(struct restore_ctx *ctx, uint32_t *type, uint32_t *len,
                     const char *layer)
{
    uint32_t h[2];

    if (read_exact(ctx, h, sizeof(h), layer) < 0)
        return -1;
    *type = h[0];
    *len = h[1];
    if (*len > XCS_REC_LENGTH_MAX)
        return xcs_fail(ctx->cb, EMSGSIZE,
                        "%s 0x%x at offset %llu: record length %u exceeds %u",
                        layer, *type, (unsigned long long)(ctx->r.off - 8),
                        *len, XCS_REC_LENGTH_MAX);
    return 0;
}

/* What a source call that returned r (1: EOF after got bytes) means. */
static int source_checked(struct restore_ctx *ctx, int r, uint64_t got,
                          const char *what)
{
    if (r > 0)
        errno = EIO;
    return r ? read_failed(ctx, what, r > 0 ? (got ? 2 : 1) : 0) : 0;
}

/*
 * Read a whole padded body; ctx->buf points at it until the next read.  The
 * source grows its buffer as the bytes arrive (source.c): a record length
 * is the stream's word (capped at XCS_REC_LENGTH_MAX, 128 MiB), and a header
 * claiming 128 MiB followed by EOF must cost a truncation error, not an
 * allocation of the claimed size (or ENOMEM under a memory limit).
 */
static int read_body(struct restore_ctx *ctx, uint32_t len, const char *what)
{
    size_t got = 0;
    int r = xcs_source_get(&ctx->r, xcs_rec_padded(len), &ctx->buf, &got);

    return source_checked(ctx, r, got, what);
}

/* Read and drop len bytes. */
static int skip_exact(struct restore_ctx *ctx, uint64_t len, const char *what)
{
    uint64_t got = 0;

    return source_checked(ctx, xcs_source_skip(&ctx->r, len, &got), got, what);
}

static int skip_body(struct restore_ctx *ctx, uint32_t len, const char *what)
{
    return skip_exact(ctx, xcs_rec_padded(len), what);
}

/*----- the target file -----*/

/*
 * The target is ".<name>.partial.<pid>.<n>" beside the final path: the same
 * filesystem, so the final rename is atomic; hidden; unique per restore.
 * The name is a contract: a restorer killed by SIGKILL cannot remove its
 * partial file, and ".<name>.partial.<pid>.*" is swept once <pid> is gone.
 *
 * With build_only the toolstack chose the partial name (its own pid in it)
 * and passes it as sim_path: we build exactly that file and leave the
 * rename, the commit, to the toolstack (xcsave/api.py), which removes the
 * file itself if we die.
 */
static int target_create(struct restore_ctx *ctx)
{
    static unsigned int seq;
    const char *path = ctx->p->sim_path;
    const char *slash = strrchr(path, '/');
    int dirlen = slash ? (int)(slash - path + 1) : 0;
    unsigned int n = __atomic_add_fetch(&seq, 1, __ATOMIC_RELAXED);

    if (ctx->p->build_only)
        ctx->partial = strdup(path);
    else if (asprintf(&ctx->partial, "%.*s.%s.partial.%ld.%u", dirlen, path,
                      path + dirlen, (long)getpid(), n) < 0)
        ctx->partial = NULL;
    if (!ctx->partial)
        return xcs_fail(ctx->cb, ENOMEM, "allocating a path");
    ctx->tfd = xcs_create_private(ctx->partial, O_RDWR);
    if (ctx->tfd < 0) {
        int e = errno;

        free(ctx->partial);
        ctx->partial = NULL;
        return xcs_fail(ctx->cb, e, "creating the target domain beside %s: %s",
                        path, strerror(e));
    }
    return 0;
}

/* The pfns[i..end) run of adjacent data pages that starts at i. */
static uint32_t run_end(const uint64_t *pfns, uint32_t count, uint32_t i)
{
    uint64_t pfn = pfns[i] & XCS_PAGE_DATA_PFN_MASK;
    uint32_t j = i + 1;

    while (j < count && (pfns[j] >> 60) < 0xd &&
           (pfns[j] & XCS_PAGE_DATA_PFN_MASK) == pfn + (j - i))
        j++;
    return j;
}

static off_t target_off(uint64_t pfn)
{
    return (off_t)(XCS_SIM_HDR_SIZE +
                   ((pfn & XCS_PAGE_DATA_PFN_MASK) << XCS_PAGE_SHIFT));
}

/* Write a batch's data pages (packed in data) to their places in the target. */
static int write_pages(struct restore_ctx *ctx, const uint64_t *pfns,
                       uint32_t count, const uint8_t *data)
{
    for (uint32_t i = 0; i < count;) {
        uint32_t j;
        size_t len, done = 0;
        off_t off;

        if ((pfns[i] >> 60) >= 0xd) {
            i++; /* BROKEN, XALLOC, XTAB: no data */
            continue;
        }
        /* One pwrite per run of adjacent pfns. */
        j = run_end(pfns, count, i);
        len = (size_t)(j - i) * XCS_PAGE_SIZE;
        off = target_off(pfns[i]);
        while (done < len) {
            ssize_t r = pwrite(ctx->tfd, data + done, len - done,
                               off + (off_t)done);

            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0)
                return xcs_fail(ctx->cb, r < 0 ? errno : EIO,
                                "writing pfn 0x%llx to %s: %s",
                                (unsigned long long)(pfns[i] &
                                                     XCS_PAGE_DATA_PFN_MASK),
                                ctx->partial,
                                r < 0 ? strerror(errno) : "short write");
            done += (size_t)r;
        }
        data += len;
        i = j;
    }
    return 0;
}

/*
 * The batch's pages, still in the stream, moved by the kernel straight to
 * their places in the target (xcs_source_move: one copy, no user buffer).
 * Returns 1, having consumed nothing, when the stream fd does not allow it
 * (a socket): the caller reads the pages and writes them instead.
 */
static int move_pages(struct restore_ctx *ctx, const uint64_t *pfns,
                      uint32_t count, int ndata)
{
    int moved = 0; /* has this batch consumed stream bytes yet? */

    xcs_source_move_expect(&ctx->r, (uint64_t)ndata * XCS_PAGE_SIZE);
    for (uint32_t i = 0; i < count;) {
        uint32_t j;
        size_t len;
        int eof, rc;

        if ((pfns[i] >> 60) >= 0xd) {
            i++;
            continue;
        }
        j = run_end(pfns, count, i);
        len = (size_t)(j - i) * XCS_PAGE_SIZE;
        rc = xcs_source_move(&ctx->r, ctx->tfd, (uint64_t)target_off(pfns[i]),
                            len, &eof);
        if (rc < 0) {
            if (eof)
                return read_failed(ctx, "PAGE_DATA pages", eof);
            return xcs_fail(ctx->cb, errno,
                            "moving pfn 0x%llx from offset %llu to %s: %s",
                            (unsigned long long)(pfns[i] &
                                                 XCS_PAGE_DATA_PFN_MASK),
                            (unsigned long long)ctx->r.off, ctx->partial,
                            strerror(errno));
        }
        if (rc > 0) {
            if (!moved)
                return 1;
            /* Refused part way (never seen): this run the plain way. */
            if (read_exact(ctx, ctx->pages, len, "PAGE_DATA pages") < 0 ||
                write_pages(ctx, pfns + i, j - i, ctx->pages) < 0)
                return -1;
        }
        moved = 1;
        i = j;
    }
    return 0;
}

/* Write the device model's state to p->dm_path: temporary name, rename. */
static int handover_dm(struct restore_ctx *ctx)
{
    char *prefix = NULL;
    char *tmp = NULL;
    size_t done = 0;
    int fd = -1, rc = -1;

    if (asprintf(&prefix, "%s.partial.%ld.", ctx->p->dm_path,
                 (long)getpid()) < 0) {
        prefix = NULL;
        xcs_fail(ctx->cb, ENOMEM, "allocating a path");
        goto out;
    }
    /* An unguessable private name: nothing can be planted there first. */
    fd = xcs_create_private_temp(prefix, O_WRONLY, &tmp);
    if (fd < 0) {
        xcs_fail(ctx->cb, errno, "creating a temporary %s*: %s", prefix,
                 strerror(errno));
        goto out;
    }
    while (done < ctx->dm_len) {
        ssize_t r = write(fd, ctx->dm + done, ctx->dm_len - done);

        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            xcs_fail(ctx->cb, r < 0 ? errno : EIO, "writing %s: %s", tmp,
                     r < 0 ? strerror(errno) : "short write");
            goto out;
        }
        done += (size_t)r;
    }
    if (fsync(fd) < 0 || rename(tmp, ctx->p->dm_path) < 0) {
        xcs_fail(ctx->cb, errno, "saving %s: %s", ctx->p->dm_path,
                 strerror(errno));
        goto out;
    }
    xcs_logf(ctx->cb, XCS_LOG_DETAIL, -1, "device model state (%u bytes) "
             "handed over in %s", ctx->dm_len, ctx->p->dm_path);
    rc = 0;
out:
    if (fd >= 0)
        close(fd);
    if (rc < 0 && tmp)
        unlink(tmp);
    free(tmp);
    free(prefix);
    return rc;
}

static int finalize(struct restore_ctx *ctx)
{
    struct xcs_sim_hdr lay;
    size_t vlen;
    ssize_t r;

    if (!ctx->have_ctx)
        return xcs_fail(ctx->cb, EINVAL, "stream ended without %s: the "
                        "domain's shape is unknown",
                        ctx->pv ? "vCPU state" : "HVM_CONTEXT");
    if (ctx->p->foreign) {
        /* Sized by its pages (or the caller's limit, checked per batch). */
        ctx->nr_pages = ctx->p->max_pages ? ctx->p->max_pages
                                          : (ctx->any_pages ? ctx->max_pfn + 1 : 1);
    }
    /* Final size (the vCPU and bitmap areas are holes: zero) and header. */
    if (xcs_sim_format_fd(ctx->tfd, ctx->nr_pages, ctx->nr_vcpus, 0,
                          XCS_SIM_PAUSED) < 0)
        return xcs_fail(ctx->cb, errno, "writing the domain header of %s: %s",
                        ctx->partial, strerror(errno));
    xcs_sim_layout(ctx->nr_pages, ctx->nr_vcpus, &lay);
    vlen = (size_t)ctx->nr_vcpus * XCS_SIM_VCPU_SIZE;
    r = pwrite(ctx->tfd, ctx->vcpus, vlen, (off_t)lay.vcpu_off);
    if (r < 0 || (size_t)r != vlen)
        return xcs_fail(ctx->cb, r < 0 ? errno : EIO,
                        "writing vCPU state to %s: %s", ctx->partial,
                        r < 0 ? strerror(errno) : "short write");
    if (ctx->p->dm_path && ctx->dm && handover_dm(ctx) < 0)
        return -1;
    if (!ctx->p->build_only && rename(ctx->partial, ctx->p->sim_path) < 0)
        return xcs_fail(ctx->cb, errno, "renaming %s to %s: %s", ctx->partial,
                        ctx->p->sim_path, strerror(errno));
    free(ctx->partial);
    ctx->partial = NULL;
    return 0;
}

/*----- PAGE_DATA -----*/

/*
 * Check a batch's pfn words against the format and the domain.  Returns the
 * number of pages that carry data, or -1.
 */
static int check_pfns(struct restore_ctx *ctx, const uint64_t *pfns,
                      uint32_t count, uint64_t rec_off, uint64_t *maxpfn)
{
    /* A sim image is sized by its HVM_CONTEXT; a foreign one only at the end. */
    uint64_t limit = ctx->have_ctx && !ctx->p->foreign ? ctx->nr_pages : ctx->max_pages;
    int ndata = 0;

    *maxpfn = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t pfn = pfns[i] & XCS_PAGE_DATA_PFN_MASK;
        unsigned int type = (unsigned int)(pfns[i] >> 60);

        if (pfns[i] & XCS_PAGE_DATA_RSVD_MASK)
            return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: "
                            "reserved bits set in pfn word 0x%016llx",
                            (unsigned long long)rec_off,
                            (unsigned long long)pfns[i]);
        if (type >= 5 && type <= 8)
            return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: "
                            "invalid page type %u for pfn 0x%llx",
                            (unsigned long long)rec_off, type,
                            (unsigned long long)pfn);
        if (type >= 0xd)
            continue; /* BROKEN, XALLOC, XTAB: no data */
        if (pfn >= limit)
            return xcs_fail(ctx->cb, ERANGE, "PAGE_DATA at offset %llu: pfn "
                            "0x%llx out of range (domain has %llu pages)",
                            (unsigned long long)rec_off,
                            (unsigned long long)pfn,
                            (unsigned long long)limit);
        if (pfn > *maxpfn)
            *maxpfn = pfn;
        ndata++;
    }
    return ndata;
}

static int check_batch_head(struct restore_ctx *ctx, uint32_t len,
                            uint32_t count, uint64_t rec_off)
{
    if (count == 0 || count > XCS_MAX_BATCH_SIZE)
        return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: batch of "
                        "%u pages (must be 1..%u)",
                        (unsigned long long)rec_off, count,
                        XCS_MAX_BATCH_SIZE);
    if (len < 8 + 8 * (uint64_t)count)
        return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: length %u "
                        "too short for %u pfns", (unsigned long long)rec_off,
                        len, count);
    return 0;
}

static int check_batch_len(struct restore_ctx *ctx, uint32_t len,
                           uint32_t count, int ndata, uint64_t rec_off)
{
    uint64_t want = 8 + 8 * (uint64_t)count + XCS_PAGE_SIZE * (uint64_t)ndata;

    if (len != want)
        return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: length "
                        "%u, expected %llu for %u pfns with %d data pages",
                        (unsigned long long)rec_off, len,
                        (unsigned long long)want, count, ndata);
    return 0;
}

static void note_pages(struct restore_ctx *ctx, uint64_t maxpfn, int ndata)
{
    if (ndata > 0 && (!ctx->any_pages || maxpfn > ctx->max_pfn))
        ctx->max_pfn = maxpfn;
    if (ndata > 0)
        ctx->any_pages = 1;
    ctx->res->pages_received += (uint64_t)ndata;
    xcs_progress_step(&ctx->pr, ctx->res->pages_received);
}

/* Direct PAGE_DATA: pfn array, then the pages, then out to the target. */
static int page_data_direct(struct restore_ctx *ctx, uint32_t len,
                            uint64_t rec_off)
{
    uint32_t head[2];
    uint64_t maxpfn;
    int ndata, rc;

    if (len < 8)
        return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: length %u "
                        "too short", (unsigned long long)rec_off, len);
    if (read_exact(ctx, head, sizeof(head), "PAGE_DATA") < 0 ||
        check_batch_head(ctx, len, head[0], rec_off) < 0 ||
        read_exact(ctx, ctx->pfns, 8 * (size_t)head[0], "PAGE_DATA pfns") < 0)
        return -1;
    ndata = check_pfns(ctx, ctx->pfns, head[0], rec_off, &maxpfn);
    if (ndata < 0 || check_batch_len(ctx, len, head[0], ndata, rec_off) < 0)
        return -1;
    if (ndata == 0)
        return 0;
    rc = move_pages(ctx, ctx->pfns, head[0], ndata);
    if (rc > 0 &&
        (read_exact(ctx, ctx->pages, (size_t)ndata * XCS_PAGE_SIZE,
                    "PAGE_DATA pages") < 0 ||
         write_pages(ctx, ctx->pfns, head[0], ctx->pages) < 0))
        rc = -1;
    if (rc < 0)
        return -1;
    note_pages(ctx, maxpfn, ndata);
    return 0;
}

/* PAGE_DATA from memory (buffered checkpoint): check, and write if apply. */
static int page_data_mem(struct restore_ctx *ctx, const uint8_t *body,
                         uint32_t len, uint64_t rec_off, int apply)
{
    uint32_t count;
    const uint8_t *data;
    uint64_t maxpfn;
    int ndata;

    if (len < 8)
        return xcs_fail(ctx->cb, EINVAL, "PAGE_DATA at offset %llu: length %u "
                        "too short", (unsigned long long)rec_off, len);
    memcpy(&count, body, 4);
    if (check_batch_head(ctx, len, count, rec_off) < 0)
        return -1;
    memcpy(ctx->pfns, body + 8, 8 * (size_t)count); /* align the words */
    ndata = check_pfns(ctx, ctx->pfns, count, rec_off, &maxpfn);
    if (ndata < 0 || check_batch_len(ctx, len, count, ndata, rec_off) < 0)
        return -1;
    if (!apply || ndata == 0)
        return 0;
    data = body + 8 + 8 * (size_t)count;
    if (write_pages(ctx, ctx->pfns, count, data) < 0)
        return -1;
    note_pages(ctx, maxpfn, ndata);
    return 0;
}

/*----- HVM_CONTEXT, HVM_PARAMS -----*/

static int sim_hvm_context(struct restore_ctx *ctx, const uint8_t *body,
                           uint32_t len, uint64_t rec_off, int apply);

/*
 * Foreign images: vCPU v's sim state is the first XCS_SIM_VCPU_SIZE bytes of
 * the guest's own context for it, zero-padded (xcs_engine.h).
 */
static int foreign_vcpu(struct restore_ctx *ctx, unsigned int v,
                        const uint8_t *ctxt, uint32_t len, uint64_t rec_off)
{
    uint8_t *n;

    if (v >= XCS_SIM_MAX_VCPUS)
        return xcs_fail(ctx->cb, ERANGE, "vCPU %u at offset %llu: more than "
                        "%u vCPUs", v, (unsigned long long)rec_off,
                        XCS_SIM_MAX_VCPUS);
    if (v >= ctx->nr_vcpus) {
        n = realloc(ctx->vcpus, (size_t)(v + 1) * XCS_SIM_VCPU_SIZE);
        if (!n)
            return xcs_fail(ctx->cb, ENOMEM, "allocating vCPU state");
        memset(n + (size_t)ctx->nr_vcpus * XCS_SIM_VCPU_SIZE, 0,
               (size_t)(v + 1 - ctx->nr_vcpus) * XCS_SIM_VCPU_SIZE);
        ctx->vcpus = n;
        ctx->nr_vcpus = v + 1;
    }
    n = ctx->vcpus + (size_t)v * XCS_SIM_VCPU_SIZE;
    memset(n, 0, XCS_SIM_VCPU_SIZE);
    memcpy(n, ctxt, len < XCS_SIM_VCPU_SIZE ? len : XCS_SIM_VCPU_SIZE);
    ctx->have_ctx = 1;
    return 0;
}

static int hvm_context(struct restore_ctx *ctx, const uint8_t *body,
                       uint32_t len, uint64_t rec_off, int apply)
{
    if (ctx->p->foreign) {
        /* Opaque guest state: no sim record to size the domain by. */
        if (len == 0)
            return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu is "
                            "empty", (unsigned long long)rec_off);
        return apply ? foreign_vcpu(ctx, 0, body, len, rec_off) : 0;
    }
    return sim_hvm_context(ctx, body, len, rec_off, apply);
}

static int sim_hvm_context(struct restore_ctx *ctx, const uint8_t *body,
                           uint32_t len, uint64_t rec_off, int apply)
{
    const uint8_t *cpu[XCS_SIM_MAX_VCPUS] = {NULL};
    const uint8_t *p = body, *end = body + len;
    uint64_t nr_pages = 0;
    uint32_t nr_vcpus = 0;
    int have_sim = 0, have_end = 0;
    unsigned int ncpu = 0;
    uint8_t *vc;

    while (!have_end) {
        uint16_t code, inst;
        uint32_t dlen;

        if (end - p < XCS_HVM_DESC_SIZE)
            return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                            "truncated at byte %td",
                            (unsigned long long)rec_off, p - body);
        memcpy(&code, p, 2);
        memcpy(&inst, p + 2, 2);
        memcpy(&dlen, p + 4, 4);
        p += XCS_HVM_DESC_SIZE;
        if (dlen > (size_t)(end - p))
            return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                            "save record %u of %u bytes overruns the blob",
                            (unsigned long long)rec_off, code, dlen);
        switch (code) {
        case XCS_HVM_SAVE_END:
            have_end = 1;
            break;
        case XCS_HVM_SAVE_HEADER: {
            uint32_t magic = 0;

            if (dlen >= 4)
                memcpy(&magic, p, 4);
            if (dlen != XCS_HVM_HEADER_SIZE || magic != XCS_HVM_HEADER_MAGIC)
                return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                                "bad HVM save header",
                                (unsigned long long)rec_off);
            break;
        }
        case XCS_HVM_SAVE_SIM: {
            uint32_t ver, vsize, shift;

            if (dlen != XCS_HVM_SIM_SIZE || memcmp(p, XCS_HVM_SIM_MAGIC, 8))
                return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                                "bad sim record", (unsigned long long)rec_off);
            memcpy(&ver, p + 8, 4);
            memcpy(&vsize, p + 12, 4);
            memcpy(&nr_pages, p + 16, 8);
            memcpy(&nr_vcpus, p + 24, 4);
            memcpy(&shift, p + 28, 4);
            if (ver != 1 || vsize != XCS_SIM_VCPU_SIZE ||
                shift != XCS_PAGE_SHIFT || nr_pages == 0 || nr_vcpus == 0 ||
                nr_vcpus > XCS_SIM_MAX_VCPUS)
                return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                                "unsupported sim domain (version %u, %u-byte "
                                "vCPUs, %llu pages, %u vCPUs, page shift %u)",
                                (unsigned long long)rec_off, ver, vsize,
                                (unsigned long long)nr_pages, nr_vcpus, shift);
            have_sim = 1;
            break;
        }
        case XCS_HVM_SAVE_CPU:
            if (dlen != XCS_SIM_VCPU_SIZE || inst >= XCS_SIM_MAX_VCPUS ||
                cpu[inst])
                return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: "
                                "bad or duplicate CPU record %u",
                                (unsigned long long)rec_off, inst);
            cpu[inst] = p;
            ncpu++;
            break;
        default:
            break; /* other HVM state the sim does not model */
        }
        p += dlen;
    }
    if (!have_sim)
        return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: no sim "
                        "record (not a stream of a simulated domain)",
                        (unsigned long long)rec_off);
    if (ncpu != nr_vcpus)
        return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: %u CPU "
                        "records for %u vCPUs", (unsigned long long)rec_off,
                        ncpu, nr_vcpus);
    for (unsigned int v = 0; v < nr_vcpus; v++)
        if (!cpu[v])
            return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: no "
                            "CPU record for vCPU %u",
                            (unsigned long long)rec_off, v);
    if (nr_pages > ctx->max_pages)
        return xcs_fail(ctx->cb, ERANGE, "HVM_CONTEXT at offset %llu: the "
                        "stream's domain has %llu pages, more than the %llu "
                        "allowed", (unsigned long long)rec_off,
                        (unsigned long long)nr_pages,
                        (unsigned long long)ctx->max_pages);
    if (ctx->any_pages && ctx->max_pfn >= nr_pages)
        return xcs_fail(ctx->cb, ERANGE, "HVM_CONTEXT at offset %llu: the "
                        "stream sent pfn 0x%llx but the domain has %llu pages",
                        (unsigned long long)rec_off,
                        (unsigned long long)ctx->max_pfn,
                        (unsigned long long)nr_pages);
    if (ctx->have_ctx &&
        (nr_pages != ctx->nr_pages || nr_vcpus != ctx->nr_vcpus))
        return xcs_fail(ctx->cb, EINVAL, "HVM_CONTEXT at offset %llu: the "
                        "domain changed shape mid-stream",
                        (unsigned long long)rec_off);
    if (!apply)
        return 0;

    if (!ctx->vcpus) {
        ctx->vcpus = malloc((size_t)nr_vcpus * XCS_SIM_VCPU_SIZE);
        if (!ctx->vcpus)
            return xcs_fail(ctx->cb, ENOMEM, "allocating vCPU state");
    }
    vc = ctx->vcpus;
    for (unsigned int v = 0; v < nr_vcpus; v++, vc += XCS_SIM_VCPU_SIZE)
        memcpy(vc, cpu[v], XCS_SIM_VCPU_SIZE);
    ctx->nr_pages = nr_pages;
    ctx->nr_vcpus = nr_vcpus;
    ctx->have_ctx = 1;
    return 0;
}

static int hvm_params(struct restore_ctx *ctx, const uint8_t *body,
                      uint32_t len, uint64_t rec_off, int apply)
{
    uint32_t count;

    if (len == 0)
        return 0; /* Xen 4.6-4.8 could send an empty one (spec erratum) */
    if (len < 8)
        return xcs_fail(ctx->cb, EINVAL, "HVM_PARAMS at offset %llu: length "
                        "%u too short", (unsigned long long)rec_off, len);
    memcpy(&count, body, 4);
    if (len != 8 + 16 * (uint64_t)count)
        return xcs_fail(ctx->cb, EINVAL, "HVM_PARAMS at offset %llu: length "
                        "%u for %u entries", (unsigned long long)rec_off, len,
                        count);
    if (!apply)
        return 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t idx, val;

        memcpy(&idx, body + 8 + 16 * (size_t)i, 8);
        memcpy(&val, body + 16 + 16 * (size_t)i, 8);
        if (idx == XCS_HVM_PARAM_STORE_PFN)
            ctx->res->store_gfn = val;
        else if (idx == XCS_HVM_PARAM_CONSOLE_PFN)
            ctx->res->console_gfn = val;
    }
    return 0;
}

/*----- libxc records -----*/

static int static_data_end(struct restore_ctx *ctx)
{
    unsigned int missing = 0;

    ctx->sde_seen = 1;
    if (!(ctx->policies & 1))
        missing |= 1; /* XGR_SDD_MISSING_CPUID */
    if (!(ctx->policies & 2))
        missing |= 2; /* XGR_SDD_MISSING_MSR */
    if (ctx->cb->static_data_done &&
        ctx->cb->static_data_done(missing, ctx->cb->data) != 0)
        return xcs_fail(ctx->cb, EIO, "static_data_done callback failed");
    return 0;
}

/*
 * Everything but PAGE_DATA bodies in direct mode: body in memory.  With
 * apply 0 only checks (a buffered checkpoint is checked whole first).
 */
static int libxc_record_mem(struct restore_ctx *ctx, uint32_t type,
                            const uint8_t *body, uint32_t len,
                            uint64_t rec_off, int apply)
{
    switch (type) {
    case XCS_REC_PAGE_DATA:
        return page_data_mem(ctx, body, len, rec_off, apply);
    case XCS_REC_X86_TSC_INFO:
        if (len != 24)
            return xcs_fail(ctx->cb, EINVAL, "X86_TSC_INFO at offset %llu: "
                            "length %u, expected 24",
                            (unsigned long long)rec_off, len);
        return 0; /* the sim has no TSC to set */
    case XCS_REC_HVM_CONTEXT:
        return hvm_context(ctx, body, len, rec_off, apply);
    case XCS_REC_HVM_PARAMS:
        return hvm_params(ctx, body, len, rec_off, apply);
    case XCS_REC_VERIFY:
        return 0; /* later memory records repeat pages: harmless here */
    default:
        return xcs_fail(ctx->cb, EINVAL, "%s at offset %llu is not valid here",
                        rec_name(type), (unsigned long long)rec_off);
    }
}

static int buffer_record(struct restore_ctx *ctx, uint32_t type, uint32_t len,
                         uint64_t rec_off)
{
    struct arena *a = &ctx->ckpt;
    size_t need = 16 + (size_t)xcs_rec_padded(len), got = 16;
    uint8_t *slot;

    /*
     * The arena grows as the record's bytes arrive (as read_body does), so
     * that what a lying length costs is what the stream actually sent.
     */
    for (;;) {
        size_t room = a->cap - a->len, upto;

        if (room < need && room <= got) { /* full: double it */
            size_t ncap = a->cap ? 2 * a->cap : (1u << 20);
            uint8_t *n = realloc(a->data, ncap);

            if (!n)
                return xcs_fail(ctx->cb, ENOMEM, "buffering a checkpoint of "
                                "%zu bytes", a->len + got);
            a->data = n;
            a->cap = ncap;
            room = ncap - a->len;
        }
        upto = need < room ? need : room;
        if (upto > got &&
            read_exact(ctx, a->data + a->len + got, upto - got,
                       rec_name(type)) < 0)
            return -1;
        got = upto;
        if (got == need)
            break;
    }
    slot = a->data + a->len;
    memcpy(slot, &type, 4);
    memcpy(slot + 4, &len, 4);
    memcpy(slot + 8, &rec_off, 8);
    /* Check now: a bad record spoils this checkpoint, not the domain. */
    if (libxc_record_mem(ctx, type, slot + 16, len, rec_off, 0) < 0)
        return -1;
    a->len += need;
    return 0;
}

/* The buffered checkpoint is complete: apply it (it was checked). */
static int apply_checkpoint(struct restore_ctx *ctx)
{
    struct arena *a = &ctx->ckpt;
    size_t off = 0;

    while (off < a->len) {
        uint32_t type, len;
        uint64_t rec_off;

        memcpy(&type, a->data + off, 4);
        memcpy(&len, a->data + off + 4, 4);
        memcpy(&rec_off, a->data + off + 8, 8);
        if (libxc_record_mem(ctx, type, a->data + off + 16, len, rec_off,
                             1) < 0)
            return -1;
        off += 16 + xcs_rec_padded(len);
    }
    a->len = 0;
    return 0;
}

static int read_image_header(struct restore_ctx *ctx)
{
    uint8_t b[XCS_IHDR_SIZE + XCS_DHDR_SIZE];
    uint8_t *d = b + XCS_IHDR_SIZE;
    uint64_t start = ctx->r.off;
    uint32_t type, major, minor;
    uint16_t opts, shift;

    if (read_exact(ctx, b, sizeof(b), "the libxc image header") < 0)
        return -1;
    if (xcs_get_be64(b) != XCS_IHDR_MARKER || xcs_get_be32(b + 8) != XCS_IHDR_ID)
        return xcs_fail(ctx->cb, EINVAL, "no libxc image at offset %llu "
                        "(bad marker or id)", (unsigned long long)start);
    ctx->version = xcs_get_be32(b + 12);
    if (ctx->version < XCS_IHDR_VERSION_2 || ctx->version > XCS_IHDR_VERSION_3)
        return xcs_fail(ctx->cb, EINVAL, "libxc image version %u unsupported "
                        "(2 or 3)", ctx->version);
    opts = xcs_get_be16(b + 16);
    if (opts & XCS_IHDR_OPT_BIG_ENDIAN)
        return xcs_fail(ctx->cb, EINVAL, "big-endian libxc image unsupported");
    memcpy(&type, d, 4);
    memcpy(&shift, d + 4, 2);
    memcpy(&major, d + 8, 4);
    memcpy(&minor, d + 12, 4);
    if (type == XCS_DHDR_TYPE_X86_PV && ctx->p->foreign)
        ctx->pv = 1;
    else if (type != XCS_DHDR_TYPE_X86_HVM)
        return xcs_fail(ctx->cb, EINVAL, "domain type %u: the sim engine "
                        "restores HVM-shaped streams (type 2)%s", type,
                        ctx->p->foreign ? " and PV ones (type 1)" : " only");
    if (shift != XCS_PAGE_SHIFT)
        return xcs_fail(ctx->cb, EINVAL, "page shift %u unsupported (12)",
                        shift);
    xcs_logf(ctx->cb, XCS_LOG_DETAIL, -1, "libxc image v%u from Xen %u.%u",
             ctx->version, major, minor);
    return 0;
}

/*
 * Read libxc records until END, or CHECKPOINT in a Remus stream.  Returns
 * STOP_END / STOP_CHECKPOINT, or -1.
 */
static int libxc_records(struct restore_ctx *ctx)
{
    for (;;) {
        uint32_t type, len;
        uint64_t rec_off = ctx->r.off;

        if (read_rhdr(ctx, &type, &len, "libxc record") < 0)
            return -1;
        switch (type) {
        case XCS_REC_END:
            /*
             * END has no body.  A length here was neither read nor skipped,
             * so a libxl layer after the image would have read it as its
             * next record: refuse it, as the verifier does ("END with
             * length").  Found by test_hostile's bit flips.
             */
            if (len)
                return xcs_fail(ctx->cb, EINVAL, "END at offset %llu: length "
                                "%u, expected 0", (unsigned long long)rec_off,
                                len);
            return STOP_END;
        case XCS_REC_CHECKPOINT:
            if (!ctx->remus)
                return xcs_fail(ctx->cb, EINVAL, "CHECKPOINT at offset %llu: "
                                "found a checkpoint in a non-checkpointed "
                                "stream", (unsigned long long)rec_off);
            if (len && skip_body(ctx, len, "CHECKPOINT") < 0)
                return -1;
            return STOP_CHECKPOINT;
        case XCS_REC_STATIC_DATA_END:
            if (ctx->version < XCS_IHDR_VERSION_3 || ctx->sde_seen)
                return xcs_fail(ctx->cb, EINVAL, "STATIC_DATA_END at offset "
                                "%llu unexpected", (unsigned long long)rec_off);
            if ((len && skip_body(ctx, len, "STATIC_DATA_END") < 0) ||
                static_data_end(ctx) < 0)
                return -1;
            continue;
        case XCS_REC_X86_CPUID_POLICY:
        case XCS_REC_X86_MSR_POLICY:
            if (ctx->sde_seen)
                return xcs_fail(ctx->cb, EINVAL, "%s at offset %llu after "
                                "STATIC_DATA_END", rec_name(type),
                                (unsigned long long)rec_off);
            ctx->policies |= type == XCS_REC_X86_CPUID_POLICY ? 1 : 2;
            if (skip_body(ctx, len, rec_name(type)) < 0) /* no CPU to set */
                return -1;
            continue;
        case XCS_REC_PAGE_DATA:
        case XCS_REC_X86_TSC_INFO:
        case XCS_REC_HVM_CONTEXT:
        case XCS_REC_HVM_PARAMS:
        case XCS_REC_VERIFY:
            break;
        case XCS_REC_X86_PV_VCPU_BASIC:
            if (!ctx->pv)
                goto not_here;
            if (len < 8 || read_body(ctx, len, "X86_PV_VCPU_BASIC") < 0)
                return len < 8 ? xcs_fail(ctx->cb, EINVAL, "X86_PV_VCPU_BASIC "
                                          "at offset %llu: length %u",
                                          (unsigned long long)rec_off, len)
                               : -1;
            {
                uint32_t vcpu;

                memcpy(&vcpu, ctx->buf, 4);
                if (foreign_vcpu(ctx, vcpu, ctx->buf + 8, len - 8, rec_off) < 0)
                    return -1;
            }
            continue;
        case XCS_REC_X86_PV_INFO:
        case XCS_REC_X86_PV_P2M_FRAMES:
        case XCS_REC_X86_PV_VCPU_EXTENDED:
        case XCS_REC_X86_PV_VCPU_XSAVE:
        case XCS_REC_X86_PV_VCPU_MSRS:
        case XCS_REC_SHARED_INFO:
            if (!ctx->pv)
                goto not_here;
            /* PV machinery the sim does not model (no p2m, no shared page). */
            if (skip_body(ctx, len, rec_name(type)) < 0)
                return -1;
            continue;
        default:
        not_here:
            if (type & XCS_REC_TYPE_OPTIONAL) {
                xcs_logf(ctx->cb, XCS_LOG_DEBUG, -1, "ignoring optional "
                         "record 0x%x at offset %llu", type,
                         (unsigned long long)rec_off);
                if (skip_body(ctx, len, "an optional record") < 0)
                    return -1;
                continue;
            }
            if (type < XCS_REC_TYPE_COUNT)
                return xcs_fail(ctx->cb, EINVAL, "%s at offset %llu is not "
                                "valid in an %s stream", rec_name(type),
                                (unsigned long long)rec_off,
                                ctx->pv ? "PV" : "HVM");
            return xcs_fail(ctx->cb, EINVAL, "unknown mandatory record type "
                            "0x%x at offset %llu", type,
                            (unsigned long long)rec_off);
        }

        /* Memory and register records: static data must be over. */
        if (!ctx->sde_seen) {
            if (ctx->version >= XCS_IHDR_VERSION_3)
                return xcs_fail(ctx->cb, EINVAL, "%s at offset %llu before "
                                "STATIC_DATA_END", rec_name(type),
                                (unsigned long long)rec_off);
            if (static_data_end(ctx) < 0) /* v2: implied here */
                return -1;
        }
        if (ctx->buffering) {
            if (buffer_record(ctx, type, len, rec_off) < 0)
                return -1;
        } else if (type == XCS_REC_PAGE_DATA) {
            if (page_data_direct(ctx, len, rec_off) < 0)
                return -1;
        } else {
            if (read_body(ctx, len, rec_name(type)) < 0 ||
                libxc_record_mem(ctx, type, ctx->buf, len, rec_off, 1) < 0)
                return -1;
        }
    }
}

/*----- libxl and xl layers -----*/

static int read_xl_header(struct restore_ctx *ctx)
{
    uint8_t b[XCS_XL_HDR_SIZE];
    uint32_t v[4];

    if (read_exact(ctx, b, sizeof(b), "the xl header") < 0)
        return -1;
    if (memcmp(b, XCS_XL_MAGIC, XCS_XL_MAGIC_LEN) != 0)
        return xcs_fail(ctx->cb, EINVAL, "not an xl savefile (bad magic)");
    memcpy(v, b + XCS_XL_MAGIC_LEN, sizeof(v));
    if (v[0] != XCS_XL_BYTEORDER)
        return xcs_fail(ctx->cb, EINVAL, "xl savefile of another byte order "
                        "(0x%08x)", v[0]);
    if (!(v[1] & XCS_XL_MFLAG_STREAMV2))
        return xcs_fail(ctx->cb, EINVAL, "xl savefile carries a legacy "
                        "(pre-4.6) stream: convert it first");
    if (v[1] & ~(XCS_XL_MFLAG_JSON | XCS_XL_MFLAG_STREAMV2))
        return xcs_fail(ctx->cb, EINVAL, "xl savefile has unknown mandatory "
                        "flags 0x%x", v[1]);
    if (v[3] > XL_OPTDATA_MAX)
        return xcs_fail(ctx->cb, EMSGSIZE, "xl optional data of %u bytes "
                        "exceeds %u", v[3], XL_OPTDATA_MAX);
    /* The domain config is the toolstack's business, not ours. */
    if (v[3] && skip_exact(ctx, v[3], "the xl config") < 0)
        return -1;
    return 0;
}

static int read_libxl_header(struct restore_ctx *ctx)
{
    uint8_t b[XCS_LIBXL_HDR_SIZE];
    uint32_t opts;

    if (read_exact(ctx, b, sizeof(b), "the libxl header") < 0)
        return -1;
    if (xcs_get_be64(b) != XCS_LIBXL_IDENT)
        return xcs_fail(ctx->cb, EINVAL, "not a libxl stream (bad ident)");
    if (xcs_get_be32(b + 8) != XCS_LIBXL_VERSION)
        return xcs_fail(ctx->cb, EINVAL, "libxl stream version %u "
                        "unsupported (2)", xcs_get_be32(b + 8));
    opts = xcs_get_be32(b + 12);
    if (opts & XCS_LIBXL_OPT_BIG_ENDIAN)
        return xcs_fail(ctx->cb, EINVAL, "big-endian libxl stream unsupported");
    if (opts & ~(XCS_LIBXL_OPT_BIG_ENDIAN | XCS_LIBXL_OPT_LEGACY))
        return xcs_fail(ctx->cb, EINVAL, "libxl stream has unknown options "
                        "0x%x", opts);
    return 0;
}

/*
 * libxl records after the libxc image (or after its CHECKPOINT): emulator
 * state is skipped (the sim has no device model); returns the type that
 * ends this stretch: END, LIBXC_CONTEXT or CHECKPOINT_END.
 */
static int libxl_records(struct restore_ctx *ctx, int *stop)
{
    for (;;) {
        uint32_t type, len;
        uint64_t rec_off = ctx->r.off;

        if (read_rhdr(ctx, &type, &len, "libxl record") < 0)
            return -1;
        switch (type) {
        case XCS_LIBXL_REC_END:
        case XCS_LIBXL_REC_LIBXC_CONTEXT:
        case XCS_LIBXL_REC_CHECKPOINT_END:
            if (len != 0)
                return xcs_fail(ctx->cb, EINVAL, "libxl record %u at offset "
                                "%llu: length %u, expected 0", type,
                                (unsigned long long)rec_off, len);
            *stop = (int)type;
            return 0;
        case XCS_LIBXL_REC_EMULATOR_XENSTORE_DATA:
        case XCS_LIBXL_REC_EMULATOR_CONTEXT:
            if (len < 8)
                return xcs_fail(ctx->cb, EINVAL, "emulator record at offset "
                                "%llu: length %u too short",
                                (unsigned long long)rec_off, len);
            if (type == XCS_LIBXL_REC_EMULATOR_CONTEXT && ctx->p->dm_path) {
                /* Keep it for hand-over (length capped by read_rhdr). */
                if (read_body(ctx, len, "EMULATOR_CONTEXT") < 0)
                    return -1;
                free(ctx->dm);
                ctx->dm = malloc(len - 8 ? len - 8 : 1);
                if (!ctx->dm)
                    return xcs_fail(ctx->cb, ENOMEM, "keeping %u bytes of "
                                    "device model state", len - 8);
                memcpy(ctx->dm, ctx->buf + 8, len - 8);
                ctx->dm_len = len - 8;
                continue;
            }
            /* The sim has no device model: nothing else to apply. */
            if (skip_body(ctx, len, "an emulator record") < 0)
                return -1;
            continue;
        default:
            return xcs_fail(ctx->cb, EINVAL, "libxl record type %u at offset "
                            "%llu not valid here", type,
                            (unsigned long long)rec_off);
        }
    }
}

/*----- checkpoints -----*/

/* A checkpoint is complete: apply it, count it, ask whether to go on. */
static int checkpoint_done(struct restore_ctx *ctx, int *stop_now)
{
    int r;

    *stop_now = 0;
    if (ctx->buffering && apply_checkpoint(ctx) < 0)
        return -1;
    if (!ctx->have_ctx)
        return xcs_fail(ctx->cb, EINVAL, "checkpoint %u without HVM_CONTEXT",
                        ctx->res->checkpoints + 1);
    ctx->res->checkpoints++;
    ctx->buffering = 1;
    if (!ctx->cb->restore_checkpoint)
        return 0;
    r = ctx->cb->restore_checkpoint(ctx->cb->data);
    if (r == XCS_CHECKPOINT_FAILOVER)
        *stop_now = 1;
    else if (r != XCS_CHECKPOINT_SUCCESS)
        return xcs_fail(ctx->cb, ECANCELED, "restore_checkpoint callback "
                        "failed (%d)", r);
    return 0;
}

/*
 * The Remus loop from after the image header: checkpoints until the stream
 * ends.  Reading errors after a complete checkpoint mean failover.
 */
static int remus_stream(struct restore_ctx *ctx)
{
    int wrapped = ctx->p->wrap >= XCS_WRAP_LIBXL;

    for (;;) {
        int stop, stop_now, r;

        r = libxc_records(ctx);
        if (r == STOP_CHECKPOINT && wrapped) {
            if (libxl_records(ctx, &stop) < 0)
                r = -1;
            else if (stop != XCS_LIBXL_REC_CHECKPOINT_END)
                r = xcs_fail(ctx->cb, EINVAL, "libxl %s where CHECKPOINT_END "
                             "was expected", stop ? "LIBXC_CONTEXT" : "END");
        }
        if (r == STOP_CHECKPOINT) {
            if (checkpoint_done(ctx, &stop_now) < 0)
                return -1;
            if (stop_now)
                return 0;
            continue;
        }
        if (r == STOP_END) {
            /*
             * A clean END: the sender says what came since the last
             * CHECKPOINT is its final, consistent state (a converted legacy
             * stream ends so after the image carrying LAST_CHECKPOINT).
             * Commit it, and read the libxl layer to its END: exactly the
             * stream, nothing after it.
             */
            if (!ctx->buffering || ctx->ckpt.len) {
                /* The first image was applied as it came; later ones buffered. */
                if (ctx->buffering && apply_checkpoint(ctx) < 0)
                    return -1;
                ctx->res->checkpoints++;
            }
            if (wrapped) {
                if (libxl_records(ctx, &stop) < 0)
                    return -1;
                if (stop != XCS_LIBXL_REC_END)
                    return xcs_fail(ctx->cb, EINVAL, "libxl %s after the final "
                                    "libxc END", stop ? "LIBXC_CONTEXT or "
                                    "CHECKPOINT_END" : "END");
            }
            return ctx->res->checkpoints ? 0
                                         : xcs_fail(ctx->cb, EINVAL, "checkpointed "
                                                    "stream ended before its first "
                                                    "checkpoint");
        }
        if (ctx->res->checkpoints == 0)
            return r < 0 ? -1
                         : xcs_fail(ctx->cb, EINVAL, "checkpointed stream "
                                    "ended before its first checkpoint");
        /* EOF or a broken checkpoint: the last complete one stands. */
        xcs_logf(ctx->cb, XCS_LOG_NOTICE, -1, "stream ended: failing over to "
                 "checkpoint %u (%zu buffered bytes dropped)",
                 ctx->res->checkpoints, ctx->ckpt.len);
        ctx->ckpt.len = 0;
        return 0;
    }
}

/*----- whole restore -----*/

static int restore_image(struct restore_ctx *ctx)
{
    int r;

    if (read_image_header(ctx) < 0)
        return -1;
    if (ctx->remus)
        return remus_stream(ctx);
    r = libxc_records(ctx);
    return r < 0 ? -1 : 0;
}

static int restore_stream(struct restore_ctx *ctx)
{
    int stop;

    if (ctx->p->wrap == XCS_WRAP_XL && read_xl_header(ctx) < 0)
        return -1;
    if (ctx->p->wrap == XCS_WRAP_LIBXC)
        return restore_image(ctx);
    if (read_libxl_header(ctx) < 0 || libxl_records(ctx, &stop) < 0)
        return -1;
    if (stop != XCS_LIBXL_REC_LIBXC_CONTEXT)
        return xcs_fail(ctx->cb, EINVAL, "libxl stream has no libxc image "
                        "(LIBXC_CONTEXT) before its %s",
                        stop ? "CHECKPOINT_END" : "END");
    if (restore_image(ctx) < 0)
        return -1;
    if (ctx->remus)
        return 0; /* the stream ended inside remus_stream */
    if (libxl_records(ctx, &stop) < 0)
        return -1;
    if (stop != XCS_LIBXL_REC_END)
        return xcs_fail(ctx->cb, EINVAL, "libxl stream: %s after the libxc "
                        "image", stop == XCS_LIBXL_REC_LIBXC_CONTEXT
                                     ? "a second LIBXC_CONTEXT"
                                     : "CHECKPOINT_END in a plain stream");
    return 0;
}

int xcs_engine_restore(const struct xcs_restore_params *p,
                       const struct xcs_engine_callbacks *cb,
                       struct xcs_restore_result *res)
{
    struct restore_ctx ctx;
    struct xcs_restore_result dummy;
    uint64_t t0 = xcs_now_ns();
    int saved;
    int rc = -1;

    memset(&ctx, 0, sizeof(ctx));
    ctx.tfd = -1;
    ctx.p = p;
    ctx.cb = cb;
    ctx.res = res ? res : &dummy;
    memset(ctx.res, 0, sizeof(*ctx.res));
    ctx.remus = p->stream_type == XCS_STREAM_REMUS;
    ctx.max_pages = p->max_pages && p->max_pages < XCS_SIM_MAX_PAGES
                        ? p->max_pages
                        : XCS_SIM_MAX_PAGES;

    if (!p->sim_path || !*p->sim_path) {
        xcs_fail(cb, EINVAL, "no sim domain path given");
        goto out;
    }
    if (p->stream_type != XCS_STREAM_PLAIN && !ctx.remus) {
        xcs_fail(cb, EOPNOTSUPP, "stream type %d is not supported by the sim "
                 "engine", p->stream_type);
        goto out;
    }
    if ((unsigned int)p->wrap > XCS_WRAP_XL) {
        xcs_fail(cb, EINVAL, "unknown stream wrapping %d", (int)p->wrap);
        goto out;
    }
    ctx.pfns = malloc(8 * XCS_MAX_BATCH_SIZE);
    ctx.pages = malloc((size_t)XCS_PAGE_SIZE * XCS_MAX_BATCH_SIZE);
    if (!ctx.pfns || !ctx.pages) {
        xcs_fail(cb, ENOMEM, "allocating restore buffers");
        goto out;
    }
    /* Exact reads even from a regular file: the fd offset must follow. */
    if (xcs_source_open(&ctx.r, p->io_fd, 0) < 0) {
        xcs_fail(cb, errno, "opening the stream: %s", strerror(errno));
        goto out;
    }
    xcs_pipe_grow(p->io_fd);
    if (target_create(&ctx) < 0)
        goto out;
    xcs_progress_start(&ctx.pr, cb, 0, "Restoring frames");
    if (restore_stream(&ctx) < 0 || finalize(&ctx) < 0)
        goto out;
    xcs_progress_end(&ctx.pr, ctx.res->pages_received);
    xcs_logf(cb, XCS_LOG_DETAIL, -1, "restored sim domain %s: %llu pages, "
             "%u vcpus", p->sim_path, (unsigned long long)ctx.nr_pages,
             ctx.nr_vcpus);
    rc = 0;

out:
    saved = errno;
    if (ctx.tfd >= 0)
        close(ctx.tfd);
    if (ctx.partial) {
        /* No half-built domain: the partial file goes with the failure. */
        unlink(ctx.partial);
        free(ctx.partial);
    }
    ctx.res->bytes_read = ctx.r.off;
    ctx.res->kernel_moved_bytes = ctx.r.moved;
    xcs_source_close(&ctx.r);
    ctx.res->duration_ns = xcs_now_ns() - t0;
    free(ctx.ckpt.data);
    free(ctx.dm);
    free(ctx.vcpus);
    free(ctx.pages);
    free(ctx.pfns);
    errno = saved;
    return rc;
}
