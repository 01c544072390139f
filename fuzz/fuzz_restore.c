/*
 * fuzz_restore.c - libFuzzer harness for the sim restore engine
 * (csrc/core/engine_restore.c): xcs_engine_restore() on an untrusted
 * stream into a target in a private temporary directory, with a page cap.
 *
 * Input: one option byte, then the stream.
 *   bit 0     0: memfd, 1: pipe
 *   bits 1-2  wrapping: 0 libxc, 1 libxl, 2 xl, 3 libxc
 *   bit 3     remus (checkpointed) stream
 *   bits 4-5  restore_checkpoint reply: 0/3 SUCCESS, 1 FAILOVER, 2 ERROR
 *   bit 6     static_data_done installed (and answers 0)
 *   bit 7     max_pages 64 (else 4096)
 *
 * Oracle (what issue 7 asks of every restore): a failure logs an ERROR
 * line and sets errno, and leaves nothing in the directory (no target, no
 * .NAME.partial.*); a success leaves exactly the target, which opens as a
 * valid sim domain within the cap; the engine never reads more than it
 * reports (the fd offset equals bytes_read: it is shared with libxl).
 */
#include <dirent.h>
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "simdom.h"
#include "xcs_engine.h"
#include "xcs_format.h"

static int errors_logged;
static int ckpt_reply;

static void cb_log(enum xcs_log_level level, int errnoval, const char *msg,
                   void *data)
{
    (void)errnoval;
    (void)data;
    FUZZ_CHECK(strlen(msg) < 4096);
    if (level >= XCS_LOG_ERROR)
        errors_logged++;
}

static void cb_progress(const char *what, uint64_t done, uint64_t total,
                        void *data)
{
    (void)what;
    (void)done;
    (void)total;
    (void)data;
}

static int cb_sdd(unsigned int missing, void *data)
{
    (void)data;
    FUZZ_CHECK(missing <= 3);
    return 0;
}

static int cb_ckpt(void *data)
{
    (void)data;
    return ckpt_reply;
}

static int dir_entries(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    int n = 0;

    FUZZ_CHECK(d != NULL);
    while ((e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const int replies[4] = {XCS_CHECKPOINT_SUCCESS,
                                   XCS_CHECKPOINT_FAILOVER,
                                   XCS_CHECKPOINT_ERROR,
                                   XCS_CHECKPOINT_SUCCESS};
    struct xcs_engine_callbacks cb;
    struct xcs_restore_params p;
    struct xcs_restore_result res;
    struct fuzz_in in;
    char target[128];
    const char *dir;
    uint8_t o;
    int rc, err;

    if (size < 1)
        return 0;
    fuzz_ignore_sigpipe();
    dir = fuzz_tmpdir();
    snprintf(target, sizeof(target), "%s/target.dom", dir);
    o = data[0];

    memset(&cb, 0, sizeof(cb));
    cb.log = cb_log;
    cb.progress = cb_progress;
    if (o & 64)
        cb.static_data_done = cb_sdd;
    cb.restore_checkpoint = cb_ckpt;
    ckpt_reply = replies[(o >> 4) & 3];
    errors_logged = 0;

    memset(&p, 0, sizeof(p));
    p.sim_path = target;
    {
        static const enum xcs_fmt wraps[4] = {XCS_FMT_LIBXC, XCS_FMT_LIBXL,
                                              XCS_FMT_XL, XCS_FMT_LIBXC};

        p.wrap = wraps[(o >> 1) & 3];
    }
    p.stream_type = (o & 8) ? XCS_STREAM_REMUS : XCS_STREAM_PLAIN;
    p.max_pages = (o & 128) ? 64 : 4096;

    fuzz_in_open(&in, data + 1, size - 1, o & 1);
    p.io_fd = in.fd;
    errno = 0;
    rc = xcs_engine_restore(&p, &cb, &res);
    err = errno;
    if (!(o & 1))
        FUZZ_CHECK((uint64_t)lseek(in.fd, 0, SEEK_CUR) == res.bytes_read);
    fuzz_in_close(&in);

    FUZZ_CHECK(rc == 0 || rc == -1);
    FUZZ_CHECK(res.bytes_read <= size - 1);
    if (rc != 0) {
        FUZZ_CHECK(err != 0);
        FUZZ_CHECK(errors_logged > 0);
        FUZZ_CHECK(dir_entries(dir) == 0);
    } else {
        struct xcs_sim_dom dom;

        FUZZ_CHECK(dir_entries(dir) == 1);
        FUZZ_CHECK(xcs_sim_open(target, XCS_SIM_RDONLY, &dom) == 0);
        FUZZ_CHECK(dom.nr_pages >= 1 && dom.nr_pages <= p.max_pages);
        FUZZ_CHECK(xcs_sim_get_state(&dom) == XCS_SIM_PAUSED);
        xcs_sim_close(&dom);
        FUZZ_CHECK(unlink(target) == 0);
    }
    return 0;
}
