/*
 * xcs_scan.h - the native stream scanner and verifier.
 *
 * xcs_scan_fd() reads one migration stream from an fd, record by record,
 * and fills a report: the format (xl header / libxl stream / libxc image
 * v2-v3 / pre-4.6 legacy image), versions, guest type, per-record-type
 * counts and bytes, pages, pfn range, vcpus, checkpoints, and on an invalid
 * stream the FIRST error: byte offset, layer, record and reason.
 *
 * It checks everything Xen's verify-stream-v2 checks (facts 4.3) plus what
 * that tool does not: record order, duplicate and out-of-range pfns, the
 * mandatory records, bytes after the outermost END, guest-type consistency,
 * checkpointed streams per the caller's stream type (the libxc and libxl
 * layers hand the fd to each other at CHECKPOINT / CHECKPOINT_END), and
 * optional (bit 31) libxc records, which are accepted and skipped.
 *
 * Input goes through the exact-read source (source.h) in its mapped mode: a
 * regular file is mapped, so page data is never touched; anything else
 * (pipes, sockets) is read with exact reads, never past what the stream needs,
 * except for the one-byte probe for trailing bytes after the outermost END
 * (skipped with XCS_SCAN_ALLOW_TRAILING).
 *
 * Conventions: 0 on success, -1 with errno set on failure; the scanner
 * returns XCS_SCAN_INVALID (1) for a stream that is not valid.  Nothing
 * here prints.
 */
#ifndef XCS_SCAN_H
#define XCS_SCAN_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "source.h"
#include "walker.h"
#include "xcs_legacy.h"

#ifdef __cplusplus
extern "C" {
#endif

/*----- scanner -----*/


#define XCS_SCAN_ALLOW_TRAILING 0x1u /* bytes after the outermost END are fine */

struct xcs_scan_opts {
    enum xcs_fmt fmt;
    enum xcs_stream_type stream_type;
    unsigned int legacy_width;   /* 32|64; 0 = guess (section 2 hints) */
    enum xcs_guest legacy_guest; /* UNKNOWN = guess */
    unsigned int flags;          /* XCS_SCAN_* */
};

#define XCS_SCAN_INVALID 1
#define XCS_SCAN_MAX_WARNINGS 8
#define XCS_SCAN_WARNING_LEN 400



struct xcs_scan_report {
    enum xcs_fmt format;          /* outermost layer found */
    enum xcs_stream_type stream_type;
    enum xcs_guest guest;

    /* xl savefile header */
    int xl;
    uint32_t xl_mflags, xl_oflags, xl_optlen, xl_config_len;

    /* libxl stream */
    int libxl;
    uint32_t libxl_version, libxl_options;
    uint64_t libxl_count[XCS_LIBXL_REC_TYPE_COUNT];
    uint64_t libxl_bytes[XCS_LIBXL_REC_TYPE_COUNT];

    /* libxc image */
    int libxc;
    uint32_t libxc_version;
    uint16_t libxc_options;
    uint32_t xen_major, xen_minor; /* major 0: converted from legacy */
    uint64_t libxc_offset;         /* where the image header starts */
    uint64_t libxc_count[XCS_REC_TYPE_COUNT];
    uint64_t libxc_bytes[XCS_REC_TYPE_COUNT];
    uint64_t optional_count, optional_bytes;
    unsigned int pv_width, pv_levels;
    uint64_t p2m_end_pfn;          /* PV: last pfn the P2M frames cover */

    /* memory and vcpus */
    uint64_t pages;                /* pages with data */
    uint64_t pages_unique;         /* distinct pfns with data */
    uint64_t page_entries;         /* pfn entries, data or not */
    uint64_t xtab, broken, xalloc;
    uint64_t min_pfn, max_pfn;     /* over entries other than XTAB */
    uint32_t max_batch;
    uint32_t vcpus;                /* PV: vcpu BASIC ids; HVM: CPU descriptors */
    uint32_t hvm_params;

    /* checkpoints and the end */
    uint32_t checkpoints;          /* complete checkpoints */
    int ended;                     /* 1 END, 2 EOF after a checkpoint (failover) */
    uint64_t discarded_records;    /* after the last checkpoint, when ended == 2 */
    uint64_t qemu_trailer_len;     /* libxc image + DeviceModelRecord0002 (Xen's converter) */
    uint64_t bytes;                /* consumed */

    struct xcs_legacy_report legacy;

    unsigned int nr_warnings;
    char warnings[XCS_SCAN_MAX_WARNINGS][XCS_SCAN_WARNING_LEN];

    int valid;
    struct xcs_stream_error error;
};

/*
 * Scan the stream on fd from its current offset.  Returns 0 (valid),
 * XCS_SCAN_INVALID (rep->error says where and why) or -1 on an I/O error
 * (errno; rep->error.reason names the call).
 */
int xcs_scan_fd(int fd, const struct xcs_scan_opts *opts,
                struct xcs_scan_report *rep);

#ifdef __cplusplus
}
#endif

#endif /* XCS_SCAN_H */
