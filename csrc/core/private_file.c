/*
 * private_file.c - private files for guest memory and device state (see
 * private_file.h; the Python side is xcsave/files.py).
 */
#include "private_file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CREATE_FLAGS (O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC)
#define TEMP_CHARS 12
#define TEMP_TRIES 100

int xcs_create_private(const char *path, int flags)
{
    int fd = -1;
    int saved;
    int rc = -1;

    fd = open(path, flags | CREATE_FLAGS, XCS_PRIVATE_MODE);
    if (fd < 0)
        goto out;
    /*
     * The umask may have taken bits from 0600 (0277 leaves 0400): set the
     * mode exactly, on the fd, so a rename of the path cannot redirect it.
     */
    if (fchmod(fd, XCS_PRIVATE_MODE) < 0)
        goto out;
    rc = fd;

out:
    if (rc < 0 && fd >= 0) {
        saved = errno;
        close(fd);
        unlink(path); /* ours: O_EXCL created it */
        errno = saved;
    }
    return rc;
}

/* Random bytes for a name: getrandom, else (no entropy yet) the clock. */
static void name_bytes(unsigned char *buf, size_t len)
{
    struct timespec ts;
    uint64_t x;

    if (getrandom(buf, len, GRND_NONBLOCK) == (ssize_t)len)
        return;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    x = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15ULL ^ (uint64_t)ts.tv_sec ^
        ((uint64_t)getpid() << 32);
    for (size_t i = 0; i < len; i++) {
        x ^= x >> 29;
        x *= 0xbf58476d1ce4e5b9ULL;
        buf[i] = (unsigned char)(x >> 56);
    }
}

int xcs_create_private_temp(const char *prefix, int flags, char **path_out)
{
    static const char alphabet[] =
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    size_t plen = strlen(prefix);
    char *path = NULL;
    int fd = -1;

    *path_out = NULL;
    path = malloc(plen + TEMP_CHARS + 1);
    if (!path) {
        errno = ENOMEM;
        goto out;
    }
    memcpy(path, prefix, plen);
    for (int tries = 0; tries < TEMP_TRIES; tries++) {
        unsigned char r[TEMP_CHARS];

        name_bytes(r, sizeof(r));
        for (size_t i = 0; i < TEMP_CHARS; i++)
            path[plen + i] = alphabet[r[i] % (sizeof(alphabet) - 1)];
        path[plen + TEMP_CHARS] = '\0';
        fd = xcs_create_private(path, flags);
        if (fd >= 0 || errno != EEXIST)
            break;
    }
    if (fd >= 0) {
        *path_out = path;
        path = NULL;
    }

out:
    free(path);
    return fd;
}

int xcs_rename_noreplace(const char *from, const char *to, int replace)
{
    if (replace)
        return rename(from, to);
    if (renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) == 0)
        return 0;
    if (errno != EINVAL && errno != ENOSYS)
        return -1;
    /*
     * No RENAME_NOREPLACE here (an old kernel or a filesystem without it):
     * link() never replaces either, and from is ours to unlink after.
     */
    if (link(from, to) < 0)
        return -1;
    (void)unlink(from);
    return 0;
}
