/*
 * backend_sim.c - the helper's sim backend: xcsave's own stream engine
 * (csrc/core/engine_*.c) on a simulated domain, with the engine's callbacks
 * relayed to the parent exactly as the xen backend relays libxenguest's.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "helper.h"
#include "xcs_format.h"

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

static int sim_postcopy(void *data)
{
    (void)data;
    return xcs_stub_postcopy();
}

static int sim_checkpoint(void *data)
{
    (void)data;
    return xcs_stub_checkpoint();
}

static int sim_static_data_done(unsigned int missing, void *data)
{
    (void)data;
    return xcs_stub_static_data_done(missing);
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
        cb->postcopy = sim_postcopy;
    if (xcs_cb_wanted(op, XCS_MSG_CHECKPOINT)) {
        if (op->restore)
            cb->restore_checkpoint = sim_checkpoint;
        else
            cb->checkpoint = sim_checkpoint;
    }
    if (xcs_cb_wanted(op, XCS_MSG_STATIC_DATA_DONE))
        cb->static_data_done = sim_static_data_done;
}

static int need_sim_path(const struct xcs_op *op)
{
    if (op->sim_path)
        return 0;
    errno = EINVAL;
    xcs_log(XCS_LOG_ERROR, errno, SIM_CONTEXT, "the sim backend needs --sim PATH");
    return -1;
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
    p.max_iters = 5;         /* Xen's default policy, when none is asked */
    p.dirty_threshold = 50;

    xcs_arm_sigterm_abort(op->io_fd);
    rc = xcs_engine_save(&p, &cb, &st);
 out:
    saved = errno;
    if (xcs_msg_exists(XCS_MSG_STATS)) {
        unsigned int n = st.rounds < XCS_STATS_MAX_ROUNDS ? st.rounds : XCS_STATS_MAX_ROUNDS;
        xcs_stub_stats(st.rounds, st.pages_sent, st.zero_pages, st.bytes_written,
                       st.downtime_ns, st.duration_ns, st.pages_per_round,
                       (uint32_t)(n * sizeof(st.pages_per_round[0])));
    }
    free(xlcfg);
    errno = saved;
    return rc;
}

static int sim_restore(const struct xcs_op *op, struct xcs_restore_out *out)
{
    struct xcs_engine_callbacks cb;
    struct xcs_restore_params p;
    struct xcs_restore_result res;
    int rc = -1, saved;

    memset(&res, 0, sizeof(res));
    if (need_sim_path(op))
        goto out;
    fill_callbacks(op, &cb);
    memset(&p, 0, sizeof(p));
    p.io_fd = op->io_fd;
    p.sim_path = op->sim_path;
    p.wrap = op->wrap;
    p.stream_type = op->stream_type;
    p.max_pages = op->max_pages;

    /* SIGTERM makes the stream read EOF, so the engine removes its partial domain. */
    xcs_arm_sigterm_abort(op->io_fd);
    rc = xcs_engine_restore(&p, &cb, &res);
    out->store_gfn = res.store_gfn;
    out->console_gfn = res.console_gfn;
 out:
    saved = errno;
    if (xcs_msg_exists(XCS_MSG_STATS))
        xcs_stub_stats(res.checkpoints, res.pages_received, 0, res.bytes_read, 0,
                       res.duration_ns, NULL, 0);
    errno = saved;
    return rc;
}

const struct xcs_backend xcs_backend_sim = {
    .name = "sim",
    .save = sim_save,
    .restore = sim_restore,
};
