/*
 * walker.h - the one v2/v3 stream walker: the layer state machine and the
 * order rules of a migration stream, written once, for the verifier
 * (scan.c) and the restore engine (engine_restore.c).
 *
 *   xl header -> libxl header -> libxl records -> (LIBXC_CONTEXT) libxc
 *   image header -> libxc records -> (END) libxl records -> END [-> EOF]
 *
 * In a checkpointed stream (the CALLER's stream type: remus or colo, never
 * guessed from the stream) the libxc layer hands the fd back to the libxl
 * layer at CHECKPOINT, and libxl hands it back again at CHECKPOINT_END; a
 * bare libxc stream's next checkpoint follows its CHECKPOINT directly.  EOF
 * at a record boundary after a complete checkpoint ends the stream (the
 * restorer fails over to that checkpoint).
 *
 * The walker reads through the exact-read source (source.h), checks every
 * record's framing, order and format fields, and calls the client:
 *
 *   on_header       every record header as read, in either layer (optional
 *                   and unknown types included, before they are checked),
 *                   w->rec_off its offset: the stream's record sequence;
 *   on_record       a libxc record, body in memory (not PAGE_DATA);
 *   on_page_batch   a PAGE_DATA record's header and pfn words, checked; the
 *                   client then consumes the batch's page bytes from the
 *                   source itself: maps them (verify: skip), moves them by
 *                   the kernel (restore) or buffers them;
 *   on_libxl_record a libxl emulator record, body in memory (or NULL when
 *                   only its header was read and the rest skipped);
 *   on_checkpoint   a checkpoint completed (CHECKPOINT, or CHECKPOINT_END
 *                   when wrapped);
 *   on_image        the libxc image and domain headers were read.
 *
 * A callback returns 0, or non-zero to stop the walk with that code (a
 * client reports its own errors, or through xcs_walk_bad in the walker's
 * one error shape: offset, layer, record, reason, errno; XCS_WALK_STOP ends
 * the walk early and successfully).  on_record also sees a v2 stream's
 * implied STATIC_DATA_END, with body NULL, before the first record that
 * implies it.
 *
 * Conventions: xcs_walk returns 0 (the stream is valid and ended),
 * XCS_WALK_INVALID (w->err says where and why) or -1 (I/O error, errno,
 * w->err.reason names the call), or a callback's code.
 */
#ifndef XCS_WALKER_H
#define XCS_WALKER_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "source.h"

#ifdef __cplusplus
extern "C" {
#endif

#define XCS_WALK_INVALID 1
#define XCS_WALK_STOP 2 /* a callback ends the walk early, successfully */
#define XCS_WALK_MAX_VCPUS 4096 /* vcpu ids a stream may use */

/* Options (XCS_WALK_*): the verifier's extra strictness. */
#define XCS_WALK_PADDING 0x1u   /* record padding must be zero */
#define XCS_WALK_DUPS 0x2u      /* no pfn twice in one PAGE_DATA */
#define XCS_WALK_MANDATORY 0x4u /* the guest type's mandatory records */
#define XCS_WALK_TRAILING 0x8u  /* nothing after the outermost END */
#define XCS_WALK_EMU_BODY 0x10u /* EMULATOR_CONTEXT bodies in memory */

/* One shape for every stream error (verify's report, restore's message). */
struct xcs_stream_error {
    uint64_t offset;       /* start of the offending record (or header) */
    char layer[8];         /* "xl", "libxl", "libxc", "legacy" */
    uint32_t rtype;        /* record type / chunk id, if has_rtype */
    int has_rtype;
    char record[48];       /* record, chunk or header name */
    int errnum;            /* EINVAL, EMSGSIZE (a limit), EIO (truncated) */
    char reason[320];
};

struct xcs_walker;

struct xcs_walk_ops {
    int (*on_image)(struct xcs_walker *w);
    int (*on_header)(struct xcs_walker *w, const char *layer, uint32_t type,
                     uint32_t len);
    int (*on_record)(struct xcs_walker *w, uint32_t type, const uint8_t *body,
                     uint32_t len);
    int (*on_page_batch)(struct xcs_walker *w, const uint8_t *pfns,
                         uint32_t count, uint32_t ndata);
    int (*on_libxl_record)(struct xcs_walker *w, uint32_t type,
                           const uint8_t *body, uint32_t len);
    int (*on_checkpoint)(struct xcs_walker *w);
    void (*on_warning)(struct xcs_walker *w, const char *text);
};

struct xcs_walk_opts {
    enum xcs_fmt start;        /* XCS_FMT_XL, _LIBXL or _LIBXC */
    enum xcs_stream_type stream_type;
    unsigned int flags;        /* XCS_WALK_* */
    uint32_t max_batch;        /* pfns per PAGE_DATA; 0 = no limit */
    uint32_t libxl_len_max;    /* libxl record length; 0 = no limit */
    uint32_t xl_optdata_max;   /* xl optional data; 0 = no limit */
};

/* The layers' headers a walk met, each as parsed (also when invalid). */
struct xcs_stream_headers {
    int xl;                    /* an xl header was read */
    struct xcs_xl_hdr xl_hdr;
    uint32_t xl_config_len;
    int libxl;                 /* a libxl header was read */
    struct xcs_libxl_hdr libxl_hdr;
    int libxc;                 /* the libxc image began */
    struct xcs_ihdr ihdr;
    struct xcs_dhdr dhdr;
};

struct xcs_walker {
    /* set by the caller before xcs_walk */
    struct xcs_source *in;
    const struct xcs_walk_opts *opts;
    const struct xcs_walk_ops *ops;
    void *data;                /* the client's */

    /* where the walk is (for errors) */
    uint64_t at_off;
    const char *at_layer;
    const char *at_name;
    uint32_t at_type;
    int at_has_type;
    uint64_t rec_off;          /* start of the current record */

    struct xcs_stream_headers hdrs; /* its clients copy it whole */
    int xl_legacy;             /* the xl header announces a legacy stream */

    /* libxc image */
    uint64_t libxc_offset;
    uint32_t dtype;            /* a valid domain header's type: 1 PV, 2 HVM */
    int sde;                   /* STATIC_DATA_END seen (or implied, v2) */
    int pv_info, p2m;
    unsigned int pv_width, pv_levels;
    uint64_t p2m_end_pfn;      /* PV: last pfn the P2M frames cover */
    int have_ctx, have_params, have_tsc, have_shinfo, have_basic;
    int mandatory_done;
    uint8_t vcpu_seen[XCS_WALK_MAX_VCPUS / 8];
    uint32_t vcpus;            /* PV: distinct X86_PV_VCPU_BASIC ids */

    /* checkpoints and the end */
    uint32_t checkpoints;      /* complete checkpoints */
    uint64_t records_since_cp;
    int ended;                 /* 1 END, 2 EOF after a checkpoint */
    uint64_t qemu_trailer_len; /* libxc + DeviceModelRecord0002 */

    /* per record type, as read (counted before the record is checked) */
    uint64_t libxl_count[XCS_LIBXL_REC_TYPE_COUNT];
    uint64_t libxl_bytes[XCS_LIBXL_REC_TYPE_COUNT];
    uint64_t libxc_count[XCS_REC_TYPE_COUNT];
    uint64_t libxc_bytes[XCS_REC_TYPE_COUNT];
    uint64_t optional_count, optional_bytes;

    uint64_t *sortbuf;         /* XCS_WALK_DUPS */
    size_t sortbuf_len;

    struct xcs_stream_error err;
};

/*
 * Walk the stream on w->in from w->opts->start to its outermost END.  An
 * xl header announcing a legacy stream stops after the header with 0 and
 * w->xl_legacy set (legacy.c reads those).
 */
int xcs_walk(struct xcs_walker *w);
/* What the caller sets before xcs_walk (the first four fields), in one call. */
void xcs_walk_attach(struct xcs_walker *w, struct xcs_source *in,
                     const struct xcs_walk_opts *opts, const struct xcs_walk_ops *ops,
                     void *data);
/* Release what the walk allocated. */
void xcs_walk_release(struct xcs_walker *w);

/*
 * Record a stream error at the current record in the one shape; returns
 * XCS_WALK_INVALID.  The first error is kept.
 */
int xcs_walk_bad(struct xcs_walker *w, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* An I/O error on the source (errno): recorded, returns -1. */
int xcs_walk_io_error(struct xcs_walker *w, const char *what);
/*
 * Consume n bytes the client does not look at (page data it verifies only),
 * a short stream being a truncation of `what`.
 */
int xcs_walk_skip(struct xcs_walker *w, uint64_t n, const char *what);
/* 1 when the current guest is PV (domain header type 1). */
int xcs_walk_pv(const struct xcs_walker *w);

#ifdef __cplusplus
}
#endif

#endif /* XCS_WALKER_H */
