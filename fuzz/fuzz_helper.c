/*
 * fuzz_helper.c - libFuzzer harness for xcsave-helper's own input handling
 * (csrc/helper_main.c): the argv parsers of both dialects, fd checks,
 * backend dispatch, the frame encoder and the reply reader.
 *
 * helper_main.c is included into this file, compiled with
 * -Dmain=xcs_helper_main and -Dexit=xcs_fuzz_exit, so that each exit()
 * (fatal argv, EOF on a reply) returns here through longjmp with its
 * status, and so that its one-shot static state (the frame buffer, which
 * main() frees on its way out) can be reset between runs.  The sim backend is
 * replaced by the stub below, which asks the callbacks a real backend asks
 * (suspend, precopy_policy, postcopy, checkpoint, static_data_done, ...),
 * so that the replies come from the fuzz input.
 *
 * Input: argv[1..] as NUL-terminated strings, an empty string, then the
 * bytes the parent would write to the helper's stdin (the replies).
 *
 * Oracle: the exit status is 0 (after complete), 255 (fatal) or 254 (EOF
 * waiting for a reply); everything written to stdout parses as frames of
 * the dialect in use, starting with hello (xcsave-1), ending with complete
 * when the status is 0; stderr gets at most one line.  (The helper's
 * stderr goes to a memfd during each run; sanitizer reports go to a copy
 * of the real stderr.)
 */
#include <getopt.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include <sanitizer/common_interface_defs.h>

#include "fuzz_common.h"
#include "helper_main.c"

static jmp_buf exit_jmp;
static int exit_status;

void xcs_fuzz_exit(int status)
{
    exit_status = status & 0xff;
    longjmp(exit_jmp, 1);
}

/*----- a backend that only talks -----*/

static int stub_save(const struct xcs_op *op)
{
    int r;

    xcs_log(XCS_LOG_DEBUG, 0, "fuzz", "stub save of domain %u", op->domid);
    xcs_stub_progress("fuzz", "Frames", 1, 2);
    if (xcs_cb_wanted(op, XCS_MSG_PRECOPY_POLICY)) {
        for (unsigned int it = 0; it < 8; it++) {
            r = xcs_stub_precopy_policy(it, 100u * it, 1000 - it);
            if (r != 0)
                break;
        }
    }
    if (xcs_cb_wanted(op, XCS_MSG_SUSPEND) && !xcs_stub_suspend()) {
        errno = EIO;
        return -1;
    }
    if (xcs_cb_wanted(op, XCS_MSG_SWITCH_QEMU_LOGDIRTY))
        (void)xcs_stub_switch_qemu_logdirty(op->domid, 0);
    if (xcs_cb_wanted(op, XCS_MSG_POSTCOPY))
        (void)xcs_stub_postcopy();
    if (xcs_cb_wanted(op, XCS_MSG_CHECKPOINT))
        for (int i = 0; i < 4 && xcs_stub_checkpoint() > 0; i++)
            ;
    if (xcs_cb_wanted(op, XCS_MSG_WAIT_CHECKPOINT))
        (void)xcs_stub_wait_checkpoint();
    if (xcs_msg_exists(XCS_MSG_STATS)) {
        uint64_t per_round[3] = {3, 2, 1};
        xcs_stub_stats(3, 6, 0, 6 * 4096, 1000, 2000, per_round,
                       sizeof(per_round) / sizeof(per_round[0]));
    }
    return 0;
}

static int stub_restore(const struct xcs_op *op, struct xcs_restore_out *out)
{
    if (xcs_cb_wanted(op, XCS_MSG_STATIC_DATA_DONE) &&
        xcs_stub_static_data_done(3) != 0) {
        errno = EIO;
        return -1;
    }
    if (xcs_cb_wanted(op, XCS_MSG_CHECKPOINT))
        for (int i = 0; i < 4 && xcs_stub_checkpoint() == 1; i++)
            ;
    out->store_gfn = 0xfefff;
    out->console_gfn = 0xfeffe;
    if (xcs_msg_exists(XCS_MSG_RESTORE_STATS))
        xcs_stub_restore_stats(1, 6, 6 * 4096, 2000);
    return 0;
}

const struct xcs_backend xcs_backend_sim = {
    .name = "sim",
    .save = stub_save,
    .restore = stub_restore,
};

/*----- frames on stdout -----*/

static void check_frames(const uint8_t *p, size_t n, int xcs1, int status)
{
    size_t off = 0, lsz = xcs1 ? 4 : 2;
    int first = 1, last = -1;

    while (off < n) {
        uint32_t len = 0;
        uint16_t num;

        FUZZ_CHECK(n - off >= lsz);
        memcpy(&len, p + off, lsz);
        off += lsz;
        FUZZ_CHECK(len >= 2 && len <= n - off);
        memcpy(&num, p + off, 2);
        FUZZ_CHECK(num < XCS_MSG_COUNT + 1);
        if (!xcs1)
            FUZZ_CHECK(num >= 1 && num <= 10);
        if (xcs1 && first)
            FUZZ_CHECK(num == 0); /* hello */
        first = 0;
        last = num;
        off += len;
    }
    if (status == 0)
        FUZZ_CHECK(last == 10); /* complete */
}

/*----- the harness -----*/

#define MAX_ARGS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char *argv[MAX_ARGS + 2];
    static int out_fd = -1, err_fd = -1, real_err = -1;
    char *copy, *p, *end;
    int argc = 1, in_fd, xcs1;
    size_t reply_off;
    struct stat st;
    uint8_t *frames;
    static char dummy0[] = "x";
    static char *dummy[] = {dummy0, NULL};

    /* argv strings, then an empty one, then the replies. */
    copy = malloc(size + 1);
    FUZZ_CHECK(copy != NULL);
    memcpy(copy, data, size);
    copy[size] = '\0';
    p = copy;
    end = copy + size;
    argv[0] = (char *)"xcsave-helper";
    while (p < end && *p && argc < MAX_ARGS) {
        argv[argc++] = p;
        p += strlen(p) + 1;
    }
    argv[argc] = NULL;
    if (p < end && !*p)
        p++;
    reply_off = (size_t)(p - copy);
    if (reply_off > size)
        reply_off = size;

    /* stdin: the replies; stdout: a memfd we read back. */
    in_fd = memfd_create("fuzz-replies", MFD_CLOEXEC);
    FUZZ_CHECK(in_fd >= 0);
    if (size > reply_off)
        FUZZ_CHECK(write(in_fd, data + reply_off, size - reply_off) ==
                   (ssize_t)(size - reply_off));
    FUZZ_CHECK(lseek(in_fd, 0, SEEK_SET) == 0);
    FUZZ_CHECK(dup2(in_fd, STDIN_FILENO) == STDIN_FILENO);
    close(in_fd);
    if (out_fd < 0) {
        out_fd = memfd_create("fuzz-frames", MFD_CLOEXEC);
        FUZZ_CHECK(out_fd >= 0);
    }
    FUZZ_CHECK(ftruncate(out_fd, 0) == 0);
    FUZZ_CHECK(dup2(out_fd, STDOUT_FILENO) == STDOUT_FILENO);
    FUZZ_CHECK(lseek(STDOUT_FILENO, 0, SEEK_SET) == 0);
    if (real_err < 0) {
        real_err = fcntl(STDERR_FILENO, F_DUPFD_CLOEXEC, 10);
        FUZZ_CHECK(real_err >= 0);
        __sanitizer_set_report_fd((void *)(intptr_t)real_err);
        err_fd = memfd_create("fuzz-stderr", MFD_CLOEXEC);
        FUZZ_CHECK(err_fd >= 0);
        /* fds 3..9 open, so that small fd numbers in argv can be valid. */
        for (int fd = 3; fd < 10; fd++)
            if (fcntl(fd, F_GETFD) < 0)
                FUZZ_CHECK(dup2(real_err, fd) == fd);
    }
    FUZZ_CHECK(ftruncate(err_fd, 0) == 0);
    fflush(stderr);
    FUZZ_CHECK(dup2(err_fd, STDERR_FILENO) == STDERR_FILENO);
    FUZZ_CHECK(lseek(STDERR_FILENO, 0, SEEK_SET) == 0);

    /* getopt_long keeps state across calls: start it afresh. */
    optind = 0;
    opterr = 0;
    (void)getopt_long(1, dummy, "", NULL, NULL);

    exit_status = -1;
    if (setjmp(exit_jmp) == 0)
        exit_status = xcs_helper_main(argc, argv);
    fflush(stdout);
    fflush(stderr);
    FUZZ_CHECK(dup2(real_err, STDERR_FILENO) == STDERR_FILENO);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    /*
     * Each run starts with no frame buffer, as the helper does: main()
     * frees it on its way out (or never made one, for --version); an exit()
     * taken through longjmp leaves it to us.
     */
    if (exit_status != 0)
        free(msgbuf);
    msgbuf = NULL;
    msgbuf_size = 0;

    FUZZ_CHECK(exit_status == 0 || exit_status == 255 || exit_status == 254);
    {
        char errbuf[8192];
        ssize_t n = pread(err_fd, errbuf, sizeof(errbuf), 0);
        int lines = 0;

        FUZZ_CHECK(n >= 0 && (size_t)n < sizeof(errbuf));
        for (ssize_t i = 0; i < n; i++)
            lines += errbuf[i] == '\n';
        FUZZ_CHECK(lines <= 1);
    }
    xcs1 = argc >= 2 && !strcmp(argv[1], "--xcsave-1");
    FUZZ_CHECK(fstat(out_fd, &st) == 0);
    if (argc >= 2 && !strcmp(argv[1], "--version")) {
        FUZZ_CHECK(exit_status == 0); /* a line of text, not frames */
    } else if (st.st_size > 0) {
        frames = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, out_fd, 0);
        FUZZ_CHECK(frames != MAP_FAILED);
        check_frames(frames, (size_t)st.st_size, xcs1, exit_status);
        munmap(frames, (size_t)st.st_size);
    } else {
        FUZZ_CHECK(exit_status != 0);
    }
    free(copy);
    return 0;
}
