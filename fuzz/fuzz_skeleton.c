/*
 * fuzz_skeleton.c - libFuzzer harness for stream skeletons
 * (csrc/core/skeleton.c): making a skeleton body of a stream, and walking
 * and inflating a body that may be anything.
 *
 * Input: one option byte, then the stream or the body.
 *   bit 0     0: make (the input is a stream), 1: inflate (it is a body)
 *   bits 1-2  format: 0 auto (make only; inflate: xl), 1 xl, 2 libxl, 3 libxc
 *   bits 3-4  stream type: 0 plain, 1 remus, 2 colo, 3 plain
 *
 * Invariants beyond "no sanitizer report": the result is 0, INVALID or -1
 * with a NUL-terminated reason; a body that walks inflates to a stream of
 * the size the walk counted, which makes a body with the same records
 * (type, length, pfns, pages) and as many pages; a stream that makes a body
 * inflates back to its own size and records.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "xcs_skeleton.h"

static int same_records(const struct xcs_skel_info *a, const struct xcs_skel_info *b)
{
    if (a->nrecords != b->nrecords)
        return 0;
    for (size_t i = 0; i < a->nrecords; i++) {
        const struct xcs_skel_record *x = &a->records[i], *y = &b->records[i];

        if (x->offset != y->offset || x->type != y->type || x->length != y->length ||
            x->count != y->count || x->pages != y->pages || x->layer != y->layer)
            return 0;
    }
    return 1;
}

static void check_result(int rc, const struct xcs_skel_info *info)
{
    FUZZ_CHECK(rc == 0 || rc == XCS_SKEL_INVALID || rc == -1);
    FUZZ_CHECK(memchr(info->err.reason, 0, sizeof(info->err.reason)));
    if (rc)
        FUZZ_CHECK(info->err.reason[0] != '\0');
}

/* Inflate body into a memfd; returns it (offset 0) or -1 when it does not walk. */
static int inflated(const uint8_t *body, size_t len, enum xcs_fmt fmt,
                    enum xcs_stream_type type, struct xcs_skel_info *info)
{
    int fd = memfd_create("fuzz-inflated", MFD_CLOEXEC);
    int rc;

    FUZZ_CHECK(fd >= 0);
    rc = xcs_skel_inflate(body, len, fmt, type, fd, info);
    check_result(rc, info);
    if (rc) {
        close(fd);
        return -1;
    }
    FUZZ_CHECK((uint64_t)lseek(fd, 0, SEEK_CUR) == info->stream_size);
    FUZZ_CHECK(lseek(fd, 0, SEEK_SET) == 0);
    return fd;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct xcs_skel_info a, b, c;
    enum xcs_stream_type type;
    enum xcs_fmt fmt;
    struct fuzz_in in;
    uint8_t *body = NULL, *body2 = NULL;
    size_t len = 0, len2 = 0;
    int fd = -1, rc;
    uint8_t o;

    if (size < 1)
        return 0;
    memset(&a, 0, sizeof(a));
    memset(&b, 0, sizeof(b));
    memset(&c, 0, sizeof(c));
    o = data[0];
    fmt = (enum xcs_fmt)((o >> 1) & 3);
    type = (enum xcs_stream_type)(((o >> 3) & 3) % 3);
    if (o & 1) {
        /* a body from anywhere: walk it, inflate it, make it again */
        if (fmt == XCS_FMT_AUTO)
            fmt = XCS_FMT_XL;
        rc = xcs_skel_inflate(data + 1, size - 1, fmt, type, -1, &a);
        check_result(rc, &a);
        if (rc)
            goto out;
        fd = inflated(data + 1, size - 1, fmt, type, &b);
        FUZZ_CHECK(fd >= 0 && b.stream_size == a.stream_size && same_records(&a, &b));
        rc = xcs_skel_make(fd, fmt, type, &body, &len, &c);
        check_result(rc, &c);
        FUZZ_CHECK(rc == 0 && same_records(&a, &c) && c.pages == a.pages &&
                   c.stream_size == a.stream_size && len == size - 1);
        goto out;
    }
    /* a stream: make its body, and inflate that back */
    fuzz_in_open(&in, data + 1, size - 1, 0);
    rc = xcs_skel_make(in.fd, fmt, type, &body, &len, &a);
    fuzz_in_close(&in);
    check_result(rc, &a);
    if (rc)
        goto out;
    FUZZ_CHECK(a.stream_size == size - 1 && len == a.body_size);
    FUZZ_CHECK(len + a.pages * (XCS_PAGE_SIZE - XCS_SKEL_DIGEST_LEN) == a.stream_size);
    fd = inflated(body, len, a.fmt, type, &b);
    FUZZ_CHECK(fd >= 0 && b.stream_size == a.stream_size && same_records(&a, &b));
    rc = xcs_skel_make(fd, a.fmt, type, &body2, &len2, &c);
    check_result(rc, &c);
    FUZZ_CHECK(rc == 0 && same_records(&a, &c) && len2 == len);
out:
    if (fd >= 0)
        close(fd);
    free(body);
    free(body2);
    xcs_skel_info_release(&a);
    xcs_skel_info_release(&b);
    xcs_skel_info_release(&c);
    return 0;
}
