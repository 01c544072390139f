/*
 * backend_sim.c - the helper's sim backend: xcsave's own stream engine
 * (csrc/core/engine_*.c) on a simulated domain, with the engine's callbacks
 * relayed to the parent exactly as the xen backend relays libxenguest's.
 */

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helper.h"
#include "simdom.h"
#include "xcs_format.h"
#include "xcs_legacy.h"

#define SIM_CONTEXT "xcsave-sim"
#define XL_CONFIG_MAX (1u << 20)

/*----- engine callbacks -> protocol -----*/

static const struct xcs_op *cur_op;

static void sim_log(enum xcs_log_level level, int errnoval, const char *msg,
                    void *data)
{
    (void)data;
    xcs_log((uint32_t)level, errnoval, SIM_CONTEXT, "%s", msg);
}

static void sim_progress(const char *doing_what, uint64_t done, uint64_t total,
                         void *data)
{
    (void)data;
    xcs_stub_progress(SIM_CONTEXT, doing_what, (unsigned long)done,
                      (unsigned long)total);
}

static int sim_suspend(void *data)
{
    (void)data;
    /*
     * The parent decides whether the guest may be suspended (xl would ask
     * the guest through xenstore); the engine then marks the simulated
     * domain suspended.  Without the callback installed the engine suspends
     * on its own, as a hypervisor-side pause would.
     */
    if (!xcs_cb_wanted(cur_op, XCS_MSG_SUSPEND))
        return 1;
    return xcs_stub_suspend();
}

static int sim_precopy_policy(struct xcs_precopy_stats st, void *data)
{
    (void)data;
    return xcs_stub_precopy_policy(st.iteration, st.total_written,
                                   st.dirty_count);
}

/* Reads the xl config file for the xl header; NULL/0 if none was given. */
static int read_xl_config(const char *path, char **buf, size_t *len)
{
    struct stat st;
    char *b = NULL;
    size_t got = 0;
    int fd = -1, rc = -1;

    *buf = NULL;
    *len = 0;
    if (!path)
        return 0;
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT, "xl config %s", path);
        goto out;
    }
    if (st.st_size > XL_CONFIG_MAX) {
        errno = EFBIG;
        xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT,
                "xl config %s is larger than %u bytes", path, XL_CONFIG_MAX);
        goto out;
    }
    b = malloc((size_t)st.st_size + 1);
    if (!b)
        goto out;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, b + got, (size_t)st.st_size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EIO;
            xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT, "reading xl config %s", path);
            goto out;
        }
        got += (size_t)r;
    }
    *buf = b;
    *len = got;
    b = NULL;
    rc = 0;
 out:
    free(b);
    if (fd >= 0)
        close(fd);
    return rc;
}

static void fill_callbacks(const struct xcs_op *op, struct xcs_engine_callbacks *cb)
{
    memset(cb, 0, sizeof(*cb));
    cur_op = op;
    cb->log = sim_log;
    cb->progress = sim_progress;
    cb->suspend = sim_suspend;
    if (xcs_cb_wanted(op, XCS_MSG_PRECOPY_POLICY))
        cb->precopy_policy = sim_precopy_policy;
    if (xcs_cb_wanted(op, XCS_MSG_POSTCOPY))
        cb->postcopy = xcs_tramp_postcopy;
    if (xcs_cb_wanted(op, XCS_MSG_CHECKPOINT)) {
        if (op->restore)
            cb->restore_checkpoint = xcs_tramp_checkpoint;
        else
            cb->checkpoint = xcs_tramp_checkpoint;
    }
    if (xcs_cb_wanted(op, XCS_MSG_STATIC_DATA_DONE))
        cb->static_data_done = xcs_tramp_static_data_done;
}

static int need_sim_path(const struct xcs_op *op)
{
    if (op->sim_path)
        return 0;
    errno = EINVAL;
    xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT, "the sim backend needs --sim PATH");
    return -1;
}

/* The source as it was before the save, for sim_save_not_committed. */
static struct {
    int known;
    enum xcs_sim_state state;
    int logdirty;
} save_before;

static void note_source(const char *path)
{
    struct xcs_sim_dom dom = {.fd = -1};

    if (xcs_sim_open(path, 0, &dom) < 0)
        return; /* the engine will fail on it and say why */
    save_before.state = xcs_sim_get_state(&dom);
    save_before.logdirty = xcs_sim_logdirty_enabled(&dom);
    save_before.known = 1;
    xcs_sim_close(&dom);
}

/*
 * The save succeeded and left the source suspended, as a save does, but
 * the caller did not commit the image: it said its commit failed, or it
 * died before answering (its reply never came).  Without this the source
 * stayed suspended with no image anywhere.  Put it back: the state it had
 * (running, normally) and log-dirty off unless it was on before.  Its pages
 * did not change meanwhile (suspended), so this is the domain as it was.
 */
static void sim_save_not_committed(const struct xcs_op *op)
{
    struct xcs_sim_dom dom = {.fd = -1};

    if (!save_before.known)
        return;
    if (xcs_sim_open(op->sim_path, 0, &dom) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT,
                "the image was not committed, and sim domain %s cannot be "
                "opened to put it back: %s", op->sim_path, strerror(errno));
        return;
    }
    if (!save_before.logdirty)
        xcs_sim_logdirty_disable(&dom);
    xcs_sim_set_state(&dom, save_before.state);
    xcs_log(XCS_LOG_NOTICE, -1, SIM_CONTEXT,
            "the image was not committed: sim domain %s is %s again",
            op->sim_path, xcs_sim_state_name(save_before.state));
    xcs_sim_close(&dom);
}

static int sim_save(const struct xcs_op *op)
{
    struct xcs_engine_callbacks cb;
    struct xcs_save_params p;
    struct xcs_save_stats st;
    char *xlcfg = NULL;
    size_t xlcfg_len = 0;
    int rc = -1, saved;

    memset(&st, 0, sizeof(st));
    if (need_sim_path(op) || read_xl_config(op->xl_config_path, &xlcfg, &xlcfg_len))
        goto out;
    fill_callbacks(op, &cb);
    memset(&p, 0, sizeof(p));
    p.io_fd = op->io_fd;
    p.sim_path = op->sim_path;
    p.live = (op->xcflags & 1u) != 0; /* XCFLAGS_LIVE */
    p.wrap = op->wrap;
    p.stream_type = op->stream_type;
    p.checkpoints = op->checkpoints;
    p.interval_ms = op->interval_ms;
    p.xl_config = xlcfg;
    p.xl_config_len = xlcfg_len;
    p.max_iters = XCS_XEN_MAX_ITERS; /* Xen's default policy, when none is asked */
    p.dirty_threshold = XCS_XEN_DIRTY_THRESHOLD;
    p.copy_threads = op->copy_threads;

    note_source(op->sim_path);
    xcs_arm_sigterm_abort(op->io_fd);
    rc = xcs_engine_save(&p, &cb, &st);
 out:
    saved = errno;
    if (xcs_msg_exists(XCS_MSG_STATS)) {
        unsigned int n = st.rounds < XCS_STATS_MAX_ROUNDS ? st.rounds : XCS_STATS_MAX_ROUNDS;
        xcs_stub_stats(st.rounds, st.pages_sent, st.zero_pages, st.bytes_written,
                       st.downtime_ns, st.duration_ns, st.pages_per_round, n);
    }
    free(xlcfg);
    errno = saved;
    return rc;
}

/*----- legacy streams: converted on the fly, as libxl runs convert-legacy-stream -----*/

struct legacy_job {
    int in_fd, out_fd;
    struct xcs_legacy_opts opts;
    int rc;
    char err[512];
};

static void *legacy_thread(void *arg)
{
    struct legacy_job *job = arg;

    job->rc = xcs_legacy_convert(job->in_fd, job->out_fd, &job->opts,
                                 job->err, sizeof(job->err));
    /* EOF for the engine if it is still reading (it stops at END anyway). */
    close(job->out_fd);
    job->out_fd = -1;
    return NULL;
}

/*
 * Restore a pre-4.6 legacy stream: a thread converts it to a libxl v2 stream
 * into a pipe, the engine restores from the pipe.  Whether the stream is
 * checkpointed comes from the caller (op->stream_type), never from the
 * stream: in a plain stream LAST_CHECKPOINT is a no-op and the image ends at
 * its tail (the 2013 rule, facts section 2.6).
 */
static int restore_legacy(const struct xcs_op *op, struct xcs_restore_params *p,
                          const struct xcs_engine_callbacks *cb,
                          struct xcs_restore_result *res)
{
    struct legacy_job job;
    struct xcs_legacy_stats stats;
    pthread_t tid;
    int pfd[2] = {-1, -1};
    int started = 0, rc = -1, saved = 0, r;

    memset(&job, 0, sizeof(job));
    memset(&stats, 0, sizeof(stats));
    job.opts.stats = &stats;
    job.in_fd = op->io_fd;
    job.opts.width = op->legacy_width;
    job.opts.guest = op->legacy_hvm ? XCS_GUEST_HVM : XCS_GUEST_PV;
    job.opts.out_format = XCS_FMT_LIBXL;
    job.opts.in_has_xl_header = op->wrap == XCS_FMT_XL;
    job.opts.stream_type = op->stream_type == XCS_STREAM_REMUS ? XCS_STREAM_REMUS
                                                               : XCS_STREAM_PLAIN;
    /* The converter's pipe: CLOEXEC, never inherited by anything we run. */
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT, "pipe for the legacy converter");
        goto out;
    }
    job.out_fd = pfd[1];
    pfd[1] = -1; /* the thread owns and closes it */
    r = pthread_create(&tid, NULL, legacy_thread, &job);
    if (r) {
        errno = r;
        close(job.out_fd);
        xcs_log(XCS_LOG_ERROR, r, SIM_CONTEXT, "starting the legacy converter");
        goto out;
    }
    started = 1;
    p->io_fd = pfd[0];
    p->wrap = XCS_FMT_LIBXL;
    /* A checkpointed legacy stream comes out as a checkpointed v3 stream. */
    p->stream_type = job.opts.stream_type;
    p->foreign = 1;
    rc = xcs_engine_restore(p, cb, res);
    saved = errno;
 out:
    if (pfd[0] >= 0)
        close(pfd[0]); /* a converter still writing gets EPIPE and stops */
    if (started) {
        pthread_join(tid, NULL);
        if (job.rc == 0 && stats.failover)
            xcs_log(XCS_LOG_WARN, -1, SIM_CONTEXT, "legacy stream: %s",
                    stats.failover_reason);
        if (job.rc != 0) {
            /* The converter's reason is the real one; the engine only saw EOF. */
            xcs_log(XCS_LOG_ERROR, -1, SIM_CONTEXT, "legacy stream: %s", job.err);
            if (rc == 0) {
                /* Restored, then the input failed: still a failed restore. */
                rc = -1;
            }
            saved = job.rc == XCS_LEGACY_EIO ? EIO : EINVAL;
        }
    }
    if (rc < 0 && !saved)
        saved = errno ? errno : EIO;
    errno = saved;
    return rc;
}

static int sim_restore(const struct xcs_op *op, struct xcs_restore_out *out)
{
    struct xcs_engine_callbacks cb;
    struct xcs_restore_params p;
    struct xcs_restore_result res;
    int rc = -1;

    memset(&res, 0, sizeof(res));
    if (need_sim_path(op))
        goto out;
    fill_callbacks(op, &cb);
    memset(&p, 0, sizeof(p));
    p.io_fd = op->io_fd;
    p.sim_path = op->sim_path;
    p.build_only = op->sim_build_only;
    p.wrap = op->wrap;
    p.stream_type = op->stream_type;
    p.max_pages = op->max_pages;
    p.dm_path = op->dm_path;
    p.foreign = op->foreign;

    /* SIGTERM makes the stream read EOF, so the engine removes its partial domain. */
    xcs_arm_sigterm_abort(op->io_fd);
    if (op->legacy_width)
        rc = restore_legacy(op, &p, &cb, &res);
    else
        rc = xcs_engine_restore(&p, &cb, &res);
    out->store_gfn = res.store_gfn;
    out->console_gfn = res.console_gfn;
 out:
    xcs_send_restore_stats(res.checkpoints, res.pages_received, res.bytes_read, res.duration_ns);
    return rc;
}

const struct xcs_backend xcs_backend_sim = {
    .name = "sim",
    .save = sim_save,
    .restore = sim_restore,
    .save_not_committed = sim_save_not_committed,
};
