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

#include "codec.h"
#include "private_file.h"
#include "simdom.h"
#include "source.h"
#include "stream_io.h"
#include "walker.h"
#include "xcs_engine.h"

#define XL_OPTDATA_MAX (16u << 20) /* xl config: a few KiB in practice */

struct arena {
    uint8_t *data;
    size_t len, cap;
};

struct restore_ctx {
    const struct xcs_restore_params *p;
    const struct xcs_engine_callbacks *cb;
    struct xcs_restore_result *res;
    struct xcs_source r;     /* the stream, exact reads */
    struct xcs_walker w;     /* its layers and order rules (walker.c) */
    struct xcs_walk_opts wo;
    char *partial;           /* temporary target path; NULL once renamed */
    int tfd;
    uint64_t max_pages;      /* pfn limit before HVM_CONTEXT */
    uint64_t max_pfn;
    int any_pages;

    unsigned int policies;   /* CPUID (1) / MSR (2) policy records seen */
    int have_ctx;
    uint64_t nr_pages;
    unsigned int nr_vcpus;
    uint8_t *vcpus;          /* nr_vcpus contexts */

    uint64_t *pfns;          /* XCS_MAX_BATCH_SIZE */
    uint8_t *pages;          /* one batch's page data */
    struct xcs_progress pr;

    int remus;
    int buffering;           /* inside a checkpoint after the first */
    int fatal;               /* an error no failover may hide */

    int pv;                  /* foreign PV image (p->foreign only) */
    uint8_t *dm;             /* device model state to hand over (p->dm_path) */
    uint32_t dm_len;
    struct arena ckpt;       /* that checkpoint's records */
};

/*----- small helpers -----*/

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

/* The walker's error (the one shape) as the restore's one line. */
static int walk_failed(struct restore_ctx *ctx)
{
    const struct xcs_stream_error *e = &ctx->w.err;

    if (!e->reason[0])
        return -1; /* the restore's own error, already reported */
    return xcs_fail(ctx->cb, e->errnum ? e->errnum : EINVAL,
                    "%s at offset %llu: %s", e->record[0] ? e->record : e->layer,
                    (unsigned long long)e->offset, e->reason);
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

/*
 * The progress bar's total before the domain's size is known (that comes
 * with HVM_CONTEXT, at the stream's end): for a regular file, the pages its
 * remaining bytes could hold -- every page costs its 4096 bytes and an
 * 8-byte pfn, so no stream holds more and the bar never passes 100%; the
 * end sets done as the total.  0 (unknown) for a pipe or socket.
 */
static uint64_t pages_at_most(int fd)
{
    struct stat st;
    off_t at = lseek(fd, 0, SEEK_CUR);

    if (at < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || st.st_size <= at)
        return 0;
    return (uint64_t)(st.st_size - at) / (XCS_PAGE_SIZE + 8);
}

/*----- PAGE_DATA -----*/

/*
 * Check a batch's pfns (their format is the walker's) against the domain.
 * Returns the number of pages that carry data, or -1.
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

        if ((pfns[i] >> 60) >= 0xd)
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

static void note_pages(struct restore_ctx *ctx, uint64_t maxpfn, int ndata)
{
    if (ndata > 0 && (!ctx->any_pages || maxpfn > ctx->max_pfn))
        ctx->max_pfn = maxpfn;
    if (ndata > 0)
        ctx->any_pages = 1;
    ctx->res->pages_received += (uint64_t)ndata;
    xcs_progress_step(&ctx->pr, ctx->res->pages_received);
}

/* Direct PAGE_DATA: the pfns are checked, the pages go to the target. */
static int page_data_direct(struct restore_ctx *ctx, uint32_t count,
                            uint64_t rec_off)
{
    uint64_t maxpfn;
    int ndata, rc;

    ndata = check_pfns(ctx, ctx->pfns, count, rec_off, &maxpfn);
    if (ndata <= 0)
        return ndata;
    rc = move_pages(ctx, ctx->pfns, count, ndata);
    if (rc > 0 &&
        (read_exact(ctx, ctx->pages, (size_t)ndata * XCS_PAGE_SIZE,
                    "PAGE_DATA pages") < 0 ||
         write_pages(ctx, ctx->pfns, count, ctx->pages) < 0))
        rc = -1;
    if (rc < 0)
        return -1;
    note_pages(ctx, maxpfn, ndata);
    return 0;
}

/* PAGE_DATA from memory (buffered checkpoint): check, and write if apply. */
static int page_data_mem(struct restore_ctx *ctx, const uint8_t *body,
                         uint64_t rec_off, int apply)
{
    uint32_t count;
    const uint8_t *data;
    uint64_t maxpfn;
    int ndata;

    memcpy(&count, body, 4);
    memcpy(ctx->pfns, body + 8, 8 * (size_t)count); /* align the words */
    ndata = check_pfns(ctx, ctx->pfns, count, rec_off, &maxpfn);
    if (ndata < 0 || !apply || ndata == 0)
        return ndata < 0 ? -1 : 0;
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

/* The store and console pfns (the walker checked len == 8 + 16 * count). */
static void hvm_params(struct restore_ctx *ctx, const uint8_t *body)
{
    uint32_t count;

    memcpy(&count, body, 4);
    for (uint32_t i = 0; i < count; i++) {
        uint64_t idx, val;

        memcpy(&idx, body + 8 + 16 * (size_t)i, 8);
        memcpy(&val, body + 16 + 16 * (size_t)i, 8);
        if (idx == XCS_HVM_PARAM_STORE_PFN)
            ctx->res->store_gfn = val;
        else if (idx == XCS_HVM_PARAM_CONSOLE_PFN)
            ctx->res->console_gfn = val;
    }
}

/*----- libxc records -----*/

static int static_data_end(struct restore_ctx *ctx)
{
    unsigned int missing = 0;

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
 * A memory or register record whose body is in memory.  With apply 0 only
 * checks (a buffered checkpoint is checked whole first).
 */
static int libxc_record_mem(struct restore_ctx *ctx, uint32_t type,
                            const uint8_t *body, uint32_t len,
                            uint64_t rec_off, int apply)
{
    switch (type) {
    case XCS_REC_PAGE_DATA:
        return page_data_mem(ctx, body, rec_off, apply);
    case XCS_REC_HVM_CONTEXT:
        return hvm_context(ctx, body, len, rec_off, apply);
    case XCS_REC_HVM_PARAMS:
        if (apply)
            hvm_params(ctx, body);
        return 0;
    default:
        return 0; /* X86_TSC_INFO (the sim has no TSC to set), VERIFY */
    }
}

/*
 * The arena grows to hold one more record of len body bytes; a record's
 * bytes arrived (or, for pages, their length was checked) before it grows.
 */
static uint8_t *arena_slot(struct restore_ctx *ctx, uint32_t type,
                           uint32_t len, uint64_t rec_off)
{
    struct arena *a = &ctx->ckpt;
    size_t need = 16 + (size_t)xcs_rec_padded(len);
    uint8_t *slot;

    if (a->cap - a->len < need) {
        size_t ncap = a->cap ? a->cap : (1u << 20);
        uint8_t *n;

        while (ncap - a->len < need)
            ncap *= 2;
        n = realloc(a->data, ncap);
        if (!n) {
            xcs_fail(ctx->cb, ENOMEM, "buffering a checkpoint of %zu bytes",
                     a->len + need);
            return NULL;
        }
        a->data = n;
        a->cap = ncap;
    }
    slot = a->data + a->len;
    memcpy(slot, &type, 4);
    memcpy(slot + 4, &len, 4);
    memcpy(slot + 8, &rec_off, 8);
    return slot;
}

/* Keep a checked record for the checkpoint's end; a bad one spoils it. */
static int buffer_record(struct restore_ctx *ctx, uint32_t type,
                         const uint8_t *body, uint32_t len, uint64_t rec_off)
{
    uint8_t *slot = arena_slot(ctx, type, len, rec_off);

    if (!slot)
        return -1;
    memcpy(slot + 16, body, len);
    if (libxc_record_mem(ctx, type, slot + 16, len, rec_off, 0) < 0)
        return -1;
    ctx->ckpt.len += 16 + (size_t)xcs_rec_padded(len);
    return 0;
}

static int buffer_page_batch(struct restore_ctx *ctx, uint32_t count,
                             uint32_t ndata, uint64_t rec_off)
{
    uint32_t len = 8 + 8 * count + ndata * XCS_PAGE_SIZE, zero = 0;
    uint8_t *slot = arena_slot(ctx, XCS_REC_PAGE_DATA, len, rec_off);

    if (!slot)
        return -1;
    memcpy(slot + 16, &count, 4);
    memcpy(slot + 20, &zero, 4);
    memcpy(slot + 24, ctx->pfns, 8 * (size_t)count);
    if (read_exact(ctx, slot + 24 + 8 * (size_t)count,
                   (size_t)ndata * XCS_PAGE_SIZE, "PAGE_DATA pages") < 0 ||
        libxc_record_mem(ctx, XCS_REC_PAGE_DATA, slot + 16, len, rec_off, 0) < 0)
        return -1;
    ctx->ckpt.len += 16 + (size_t)xcs_rec_padded(len);
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

/*----- the walker's client -----*/

static int on_image(struct xcs_walker *w)
{
    struct restore_ctx *ctx = w->data;

    if (w->dtype == XCS_DHDR_TYPE_X86_PV && ctx->p->foreign)
        ctx->pv = 1;
    else if (w->dtype != XCS_DHDR_TYPE_X86_HVM)
        return xcs_fail(ctx->cb, EINVAL, "domain type %u: the sim engine "
                        "restores HVM-shaped streams (type 2)%s", w->dtype,
                        ctx->p->foreign ? " and PV ones (type 1)" : " only");
    xcs_logf(ctx->cb, XCS_LOG_DETAIL, -1, "libxc image v%u from Xen %u.%u",
             w->hdrs.ihdr.version, w->hdrs.dhdr.xen_major, w->hdrs.dhdr.xen_minor);
    return 0;
}

/* The clean END of a checkpointed stream: its last state is final. */
static int remus_end(struct restore_ctx *ctx)
{
    /*
     * The sender says what came since the last CHECKPOINT is its final,
     * consistent state (a converted legacy stream ends so after the image
     * carrying LAST_CHECKPOINT): commit it.  The first image was applied as
     * it came; later ones were buffered.
     */
    if (ctx->buffering && !ctx->ckpt.len)
        return 0;
    if (ctx->buffering && apply_checkpoint(ctx) < 0) {
        ctx->fatal = 1;
        return -1;
    }
    ctx->res->checkpoints++;
    return 0;
}

static int on_record(struct xcs_walker *w, uint32_t type, const uint8_t *body,
                     uint32_t len)
{
    struct restore_ctx *ctx = w->data;

    switch (type) {
    case XCS_REC_STATIC_DATA_END: /* also a v2 stream's implied one */
        return static_data_end(ctx);
    case XCS_REC_X86_CPUID_POLICY: /* no CPU to set */
        ctx->policies |= 1;
        return 0;
    case XCS_REC_X86_MSR_POLICY:
        ctx->policies |= 2;
        return 0;
    case XCS_REC_END:
        return ctx->remus ? remus_end(ctx) : 0;
    case XCS_REC_X86_PV_VCPU_BASIC: /* the walker allows it in PV only */
        return foreign_vcpu(ctx, xcs_get_le32(body), body + 8, len - 8,
                            w->rec_off);
    case XCS_REC_X86_TSC_INFO:
    case XCS_REC_HVM_CONTEXT:
    case XCS_REC_HVM_PARAMS:
    case XCS_REC_VERIFY:
        if (ctx->buffering)
            return buffer_record(ctx, type, body, len, w->rec_off);
        return libxc_record_mem(ctx, type, body, len, w->rec_off, 1);
    default:
        /* CHECKPOINT (on_checkpoint); PV machinery the sim does not model */
        return 0;
    }
}

static int on_page_batch(struct xcs_walker *w, const uint8_t *pfns,
                         uint32_t count, uint32_t ndata)
{
    struct restore_ctx *ctx = w->data;

    memcpy(ctx->pfns, pfns, 8 * (size_t)count); /* align the words */
    if (ctx->buffering)
        return buffer_page_batch(ctx, count, ndata, w->rec_off);
    return page_data_direct(ctx, count, w->rec_off);
}

/* libxl emulator records: the sim has no device model; hand its state over. */
static int on_libxl_record(struct xcs_walker *w, uint32_t type,
                           const uint8_t *body, uint32_t len)
{
    struct restore_ctx *ctx = w->data;

    if (type != XCS_LIBXL_REC_EMULATOR_CONTEXT || !ctx->p->dm_path || !body)
        return 0;
    free(ctx->dm);
    ctx->dm = malloc(len - 8 ? len - 8 : 1);
    if (!ctx->dm)
        return xcs_fail(ctx->cb, ENOMEM, "keeping %u bytes of device model "
                        "state", len - 8);
    memcpy(ctx->dm, body + 8, len - 8);
    ctx->dm_len = len - 8;
    return 0;
}

/* A checkpoint is complete: apply it, count it, ask whether to go on. */
static int on_checkpoint(struct xcs_walker *w)
{
    struct restore_ctx *ctx = w->data;
    int r;

    ctx->fatal = 1; /* what fails here is no broken checkpoint */
    if (ctx->buffering && apply_checkpoint(ctx) < 0)
        return -1;
    if (!ctx->have_ctx)
        return xcs_fail(ctx->cb, EINVAL, "checkpoint %u without HVM_CONTEXT",
                        ctx->res->checkpoints + 1);
    ctx->res->checkpoints++;
    ctx->buffering = 1;
    if (ctx->cb->restore_checkpoint) {
        r = ctx->cb->restore_checkpoint(ctx->cb->data);
        if (r == XCS_CHECKPOINT_FAILOVER) {
            ctx->fatal = 0;
            return XCS_WALK_STOP;
        }
        if (r != XCS_CHECKPOINT_SUCCESS)
            return xcs_fail(ctx->cb, ECANCELED, "restore_checkpoint callback "
                            "failed (%d)", r);
    }
    ctx->fatal = 0;
    return 0;
}

static const struct xcs_walk_ops restore_ops = {
    .on_image = on_image,
    .on_record = on_record,
    .on_page_batch = on_page_batch,
    .on_libxl_record = on_libxl_record,
    .on_checkpoint = on_checkpoint,
};

/*----- whole restore -----*/

static int restore_stream(struct restore_ctx *ctx)
{
    int rc;

    ctx->wo.start = ctx->p->wrap;
    ctx->wo.stream_type = (enum xcs_stream_type)ctx->p->stream_type;
    ctx->wo.flags = ctx->p->dm_path ? XCS_WALK_EMU_BODY : 0;
    ctx->wo.max_batch = XCS_MAX_BATCH_SIZE;
    ctx->wo.libxl_len_max = XCS_REC_LENGTH_MAX;
    ctx->wo.xl_optdata_max = XL_OPTDATA_MAX;
    xcs_walk_attach(&ctx->w, &ctx->r, &ctx->wo, &restore_ops, ctx);

    rc = xcs_walk(&ctx->w);
    if (rc == XCS_WALK_STOP)
        return 0;
    if (rc == 0 && ctx->w.xl_legacy)
        return xcs_fail(ctx->cb, EINVAL, "xl savefile carries a legacy "
                        "(pre-4.6) stream: convert it first");
    if (rc == 0 && ctx->w.ended != 2)
        return 0;
    if (rc != 0) {
        walk_failed(ctx);
        /* Remus: a broken later checkpoint leaves the last complete one. */
        if (!ctx->remus || ctx->fatal || ctx->res->checkpoints == 0)
            return -1;
    }
    /* EOF or a broken checkpoint: the last complete one stands. */
    xcs_logf(ctx->cb, XCS_LOG_NOTICE, -1, "stream ended: failing over to "
             "checkpoint %u (%zu buffered bytes dropped)",
             ctx->res->checkpoints, ctx->ckpt.len);
    ctx->ckpt.len = 0;
    return 0;
}

/* The context's heap buffers (NULL or allocated: free() takes both). */
static void buffers_free(struct restore_ctx *ctx)
{
    free(ctx->ckpt.data);
    free(ctx->dm);
    free(ctx->vcpus);
    free(ctx->pages);
    free(ctx->pfns);
}

int xcs_engine_restore(const struct xcs_restore_params *p,
                       const struct xcs_engine_callbacks *cb,
                       struct xcs_restore_result *res)
{
    struct restore_ctx ctx = {.tfd = -1, .p = p, .cb = cb, .res = res};
    uint64_t t0;
    int saved;
    int rc = -1;

    if (xcs_engine_begin(&t0, res, sizeof(*res), cb, p->sim_path,
                         p->stream_type, p->wrap) < 0)
        goto out;
    ctx.remus = p->stream_type == XCS_STREAM_REMUS;
    ctx.max_pages = p->max_pages && p->max_pages < XCS_SIM_MAX_PAGES
                        ? p->max_pages
                        : XCS_SIM_MAX_PAGES;

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
    xcs_progress_start(&ctx.pr, cb, pages_at_most(p->io_fd), "Restoring frames");
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
    xcs_walk_release(&ctx.w);
    ctx.res->duration_ns = xcs_now_ns() - t0;
    buffers_free(&ctx);
    errno = saved;
    return rc;
}
