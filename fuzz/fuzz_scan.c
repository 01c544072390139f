/*
 * fuzz_scan.c - libFuzzer harness for the native stream scanner/verifier
 * (csrc/core/scan.c, and through it the legacy reader in legacy.c): the
 * xl header, the libxl stream, libxc images v2/v3 and legacy images, read
 * from a regular file (mapped) or from a pipe (exact reads).
 *
 * Input: two option bytes, then the stream.
 *   byte 0 bit 0     0: memfd (mapped), 1: pipe (exact reads)
 *          bits 1-3  format: 0 auto, 1 xl, 2 libxl, 3 libxc, 4 legacy, 5-7 auto
 *          bits 4-5  stream type: 0 plain, 1 remus, 2 colo, 3 plain
 *   byte 1 bit 0     legacy width and guest given (else guessed)
 *          bit 1     legacy width 32 (else 64)
 *          bit 2     legacy guest HVM (else PV)
 *          bit 3     bytes after the outermost END are allowed
 *
 * Invariants beyond "no sanitizer report": the result is 0, INVALID or -1;
 * valid matches the result; the error strings are NUL-terminated; an
 * invalid stream names a reason; counters are consistent.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "xcs_scan.h"

static struct xcs_scan_report rep;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct xcs_scan_opts opts;
    struct fuzz_in in;
    uint8_t o, o2;
    unsigned int fmt;
    int rc;

    if (size < 2)
        return 0;
    fuzz_ignore_sigpipe();
    o = data[0];
    o2 = data[1];
    memset(&opts, 0, sizeof(opts));
    fmt = (o >> 1) & 7;
    opts.fmt = fmt <= 4 ? (enum xcs_fmt)fmt : XCS_FMT_AUTO;
    opts.stream_type = (enum xcs_stream_type)(((o >> 4) & 3) % 3);
    if (o2 & 1) {
        opts.legacy_width = (o2 & 2) ? 32 : 64;
        opts.legacy_guest = (o2 & 4) ? XCS_GUEST_HVM : XCS_GUEST_PV;
    }
    if (o2 & 8)
        opts.flags = XCS_SCAN_ALLOW_TRAILING;
    fuzz_in_open(&in, data + 2, size - 2, o & 1);
    rc = xcs_scan_fd(in.fd, &opts, &rep);
    fuzz_in_close(&in);

    FUZZ_CHECK(rc == 0 || rc == XCS_SCAN_INVALID || rc == -1);
    FUZZ_CHECK(rep.valid == (rc == 0));
    FUZZ_CHECK(memchr(rep.error.reason, 0, sizeof(rep.error.reason)));
    FUZZ_CHECK(memchr(rep.error.record, 0, sizeof(rep.error.record)));
    FUZZ_CHECK(memchr(rep.error.layer, 0, sizeof(rep.error.layer)));
    FUZZ_CHECK(rep.nr_warnings <= XCS_SCAN_MAX_WARNINGS);
    for (unsigned int i = 0; i < rep.nr_warnings; i++)
        FUZZ_CHECK(memchr(rep.warnings[i], 0, XCS_SCAN_WARNING_LEN));
    if (rc != 0)
        FUZZ_CHECK(rep.error.reason[0] != '\0');
    FUZZ_CHECK(rep.bytes <= size - 2);
    if (rc == 0) /* an invalid stream's counters stop wherever it broke */
        FUZZ_CHECK(rep.pages_unique <= rep.pages && rep.ended);
    return 0;
}
