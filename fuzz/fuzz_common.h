/*
 * fuzz_common.h - what the libFuzzer harnesses share: turning the fuzz input
 * into an fd of either kind the stream code reads (a regular file, which the
 * scanner maps, or a pipe, which everything reads with exact reads), and a
 * per-process scratch directory.
 *
 * Every harness takes its options from the first input byte (see each
 * harness and fuzz/README.md); the rest of the input is the stream.
 */
#ifndef XCS_FUZZ_COMMON_H
#define XCS_FUZZ_COMMON_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define FUZZ_CHECK(cond)                                                     \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__,       \
                    __LINE__, #cond);                                        \
            abort();                                                         \
        }                                                                    \
    } while (0)

struct fuzz_in {
    int fd;             /* what the code under test reads */
    int pipe_w;         /* pipe mode: write end, owned by the writer thread */
    pthread_t writer;
    int have_writer;
    const uint8_t *data;
    size_t len;
};

static inline void *fuzz_writer(void *arg)
{
    struct fuzz_in *in = arg;
    size_t off = 0;

    while (off < in->len) {
        ssize_t r = write(in->pipe_w, in->data + off, in->len - off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break; /* EPIPE: the reader stopped early, as it may */
        off += (size_t)r;
    }
    close(in->pipe_w);
    return NULL;
}

/* A memfd (regular file) or a pipe fed by a thread, holding data[0..len). */
static inline int fuzz_in_open(struct fuzz_in *in, const uint8_t *data, size_t len,
                        int use_pipe)
{
    memset(in, 0, sizeof(*in));
    in->data = data;
    in->len = len;
    in->pipe_w = -1;
    if (!use_pipe) {
        size_t off = 0;

        in->fd = memfd_create("fuzz-in", MFD_CLOEXEC);
        FUZZ_CHECK(in->fd >= 0);
        while (off < len) {
            ssize_t r = write(in->fd, data + off, len - off);
            FUZZ_CHECK(r > 0);
            off += (size_t)r;
        }
        FUZZ_CHECK(lseek(in->fd, 0, SEEK_SET) == 0);
        return 0;
    }
    {
        int p[2];

        FUZZ_CHECK(pipe2(p, O_CLOEXEC) == 0);
        in->fd = p[0];
        in->pipe_w = p[1];
        FUZZ_CHECK(pthread_create(&in->writer, NULL, fuzz_writer, in) == 0);
        in->have_writer = 1;
    }
    return 0;
}

static inline void fuzz_in_close(struct fuzz_in *in)
{
    close(in->fd); /* first: a blocked writer then gets EPIPE */
    if (in->have_writer)
        pthread_join(in->writer, NULL);
}

/* The writer thread must see EPIPE, not die of SIGPIPE. */
static inline void fuzz_ignore_sigpipe(void)
{
    signal(SIGPIPE, SIG_IGN);
}

static char fuzz_dir[64];

/* At exit: the directory is empty by then (each input cleans up after itself). */
static inline void fuzz_rmdir(void)
{
    if (fuzz_dir[0])
        (void)rmdir(fuzz_dir);
}

/* A fresh private directory (under /dev/shm when there is one), removed at exit. */
static inline char *fuzz_tmpdir(void)
{
    if (fuzz_dir[0])
        return fuzz_dir;
    snprintf(fuzz_dir, sizeof(fuzz_dir), "%s/xcsave-fuzz.XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
    FUZZ_CHECK(mkdtemp(fuzz_dir) != NULL);
    atexit(fuzz_rmdir);
    return fuzz_dir;
}

#endif /* XCS_FUZZ_COMMON_H */
