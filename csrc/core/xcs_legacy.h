/*
 * xcs_legacy.h - the pre-4.6 (legacy) libxc stream reader and the
 * legacy -> v3 converter (facts section 2).
 *
 * The legacy format has no magic, no version and host-native word size, so
 * the caller says the toolstack width (32/64) and the guest type (PV/HVM),
 * exactly as Xen's convert-legacy-stream needs -w and -g.
 *
 * The 2013 rule (facts 2.6): whether the stream is checkpointed comes from
 * the caller (opts.stream_type), never from the stream.  In a plain stream
 * LAST_CHECKPOINT (-9) is a no-op and the image ends at its tail, so what
 * the toolstack wrote after it (e.g. a record starting
 * "QemuDeviceModelRecord") is never read as a page batch.  In a checkpointed
 * (Remus) stream BODY+TAIL repeat and -9 marks the last checkpoint; a read
 * error in a later checkpoint fails over to the last complete one, as the
 * legacy restorer did.
 *
 * Output (libxc v3, optionally inside a libxl stream and an xl header) is
 * written incrementally as the input is read.  Page data is moved by the
 * kernel where the fds allow (legacy.c, "page data": copy_file_range,
 * sendfile, splice), never through this process; otherwise one page batch
 * at a time goes through memory (XCSAVE_NO_SPLICE=1 forces that).  Only
 * one page batch (and the
 * qemu record of the xend read-to-EOF form, whose length is unknown until
 * EOF) is ever held in memory.  Input is read exactly: nothing past the
 * image is consumed, except for the read-to-EOF qemu form.
 */
#ifndef XCS_LEGACY_H
#define XCS_LEGACY_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "source.h"

#ifdef __cplusplus
extern "C" {
#endif

enum xcs_guest {
    XCS_GUEST_UNKNOWN = 0,
    XCS_GUEST_PV = 1,  /* = dhdr type 1 */
    XCS_GUEST_HVM = 2  /* = dhdr type 2 */
};

/* What the legacy reader found (the verifier reports it too). */
struct xcs_legacy_report {
    unsigned int width;           /* toolstack unsigned long bits */
    int width_guessed;            /* width/guest came from the heuristics */
    uint64_t p2m_size;
    unsigned int guest_width;     /* PV: from the "vcpu" block size */
    unsigned int pt_levels;
    uint32_t vcpu_ctx_size;
    int extv;
    uint32_t xsave_len;
    uint64_t chunks[XCS_LEGACY_NR_CHUNKS]; /* by -id */
    uint64_t batches;
    uint32_t images;              /* BODY+TAIL images read (Remus: > 1) */
    int last_checkpoint_seen;
    char qemu_sig[24];
    uint64_t qemu_len;
    uint64_t toolstack_bytes;
    uint64_t unread_bytes;        /* left after the image (mapped input) */
};

struct xcs_legacy_stats; /* below */

struct xcs_legacy_opts {
    unsigned int width;             /* 32 | 64: the saving toolstack's unsigned long */
    enum xcs_guest guest;           /* XCS_GUEST_PV | XCS_GUEST_HVM */
    enum xcs_fmt out_format;        /* XCS_FMT_LIBXC (bare v3 image) | XCS_FMT_LIBXL */
    int in_has_xl_header;           /* input starts with an xl header (legacy inside) */
    int out_xl_header;              /* write an xl header (libxl output only) */
    enum xcs_stream_type stream_type; /* PLAIN or REMUS (COLO is not a legacy thing) */
    int skip_qemu;                  /* HVM: drop the qemu record (libxc output) */
    struct xcs_legacy_stats *stats; /* optional: filled on success and failure */
};

/* Return codes of xcs_legacy_convert (besides 0). */
#define XCS_LEGACY_EIO (-1)      /* read/write failed: errno */
#define XCS_LEGACY_EFORMAT (-2)  /* the input is not a valid legacy stream */
#define XCS_LEGACY_EUNSUP (-3)   /* a chunk the converter cannot map */
#define XCS_LEGACY_EARG (-4)     /* bad options */

struct xcs_legacy_stats {
    struct xcs_legacy_report legacy;  /* what was read */
    uint64_t in_bytes;                /* consumed from the input */
    uint64_t out_bytes;               /* written */
    uint64_t kernel_copied_bytes;     /* of which page data moved kernel-side */
    uint64_t pages;                   /* pages with data */
    uint64_t page_entries;
    uint64_t min_pfn, max_pfn;
    uint32_t vcpus;
    uint32_t checkpoints;             /* complete checkpoints converted */
    int failover;                     /* remus: a later checkpoint was cut short */
    char failover_reason[400];
    uint64_t err_offset;              /* input offset of the failing chunk */
    char err_chunk[48];               /* its name, "" if none */
    char err_reason[256];             /* without the offset/chunk prefix */
};

/*
 * Convert the legacy stream on in_fd to v3 on out_fd.  Returns 0 or one of
 * XCS_LEGACY_E*; err gets one line ("offset N, chunk NAME: why" for stream
 * errors; "write: Broken pipe (EPIPE)" style for I/O).  Neither fd is
 * closed.  Writes to a pipe whose reader went away fail with EPIPE only if
 * SIGPIPE is ignored by the caller (Python ignores it; the helper must).
 */
int xcs_legacy_convert(int in_fd, int out_fd,
                       const struct xcs_legacy_opts *opts,
                       char *err, size_t errlen);

/*
 * The same over an open source; out_fd < 0 reads and checks without
 * writing (the scanner's legacy path).  The xl header, if any, must have
 * been consumed by the caller unless opts->in_has_xl_header.
 */
int xcs_legacy_run(struct xcs_source *in, int out_fd,
                   const struct xcs_legacy_opts *opts,
                   char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif /* XCS_LEGACY_H */
