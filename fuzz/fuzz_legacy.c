/*
 * fuzz_legacy.c - libFuzzer harness for the legacy (pre-4.6) reader and the
 * legacy -> v3 converter (csrc/core/legacy.c).
 *
 * Input: one option byte, then the legacy stream.
 *   bit 0  0: memfd (mapped), 1: pipe (exact reads)
 *   bit 1  toolstack width 32 (else 64)
 *   bit 2  guest HVM (else PV)
 *   bit 3  output: libxl stream (else bare libxc image)
 *   bit 4  the input starts with an xl header
 *   bit 5  write an xl header (libxl output only; else refused as EARG)
 *   bit 6  stream type remus (else plain)
 *   bit 7  skip the qemu record
 *
 * Oracle: a conversion that succeeds must produce a stream that xcsave's
 * own verifier accepts (same stream type), and the error line of one that
 * fails must be non-empty and NUL-terminated.
 */
#include <stddef.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "xcs_legacy.h"
#include "xcs_scan.h"

static struct xcs_scan_report rep;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct xcs_legacy_opts opts;
    struct xcs_legacy_stats st;
    struct xcs_scan_opts so;
    struct fuzz_in in;
    char err[512];
    uint8_t o;
    int out, rc;

    if (size < 1)
        return 0;
    fuzz_ignore_sigpipe();
    o = data[0];
    memset(&opts, 0, sizeof(opts));
    opts.width = (o & 2) ? 32 : 64;
    opts.guest = (o & 4) ? XCS_GUEST_HVM : XCS_GUEST_PV;
    opts.out_format = (o & 8) ? XCS_FMT_LIBXL : XCS_FMT_LIBXC;
    opts.in_has_xl_header = (o & 16) != 0;
    opts.out_xl_header = (o & 32) != 0;
    opts.stream_type = (o & 64) ? XCS_STREAM_REMUS : XCS_STREAM_PLAIN;
    opts.skip_qemu = (o & 128) != 0;
    opts.stats = &st;

    out = memfd_create("fuzz-out", MFD_CLOEXEC);
    FUZZ_CHECK(out >= 0);
    fuzz_in_open(&in, data + 1, size - 1, o & 1);
    memset(err, 0x55, sizeof(err));
    rc = xcs_legacy_convert(in.fd, out, &opts, err, sizeof(err));
    fuzz_in_close(&in);

    FUZZ_CHECK(rc == 0 || rc == XCS_LEGACY_EIO || rc == XCS_LEGACY_EFORMAT ||
               rc == XCS_LEGACY_EUNSUP || rc == XCS_LEGACY_EARG);
    FUZZ_CHECK(memchr(err, 0, sizeof(err)));
    FUZZ_CHECK(st.in_bytes <= size - 1);
    if (rc != 0) {
        FUZZ_CHECK(err[0] != '\0');
    } else {
        /* What the converter wrote must verify. */
        memset(&so, 0, sizeof(so));
        so.fmt = opts.out_xl_header ? XCS_FMT_XL : opts.out_format;
        so.stream_type = opts.stream_type;
        FUZZ_CHECK(lseek(out, 0, SEEK_SET) == 0);
        if (xcs_scan_fd(out, &so, &rep) != 0) {
            fprintf(stderr, "converted stream does not verify: offset %llu, "
                    "%s %s: %s\n", (unsigned long long)rep.error.offset,
                    rep.error.layer, rep.error.record, rep.error.reason);
            abort();
        }
    }
    close(out);
    return 0;
}
