/*
 * xcs_engine.h - xcsave's native save/restore engine for simulated domains.
 *
 * The engine writes and reads genuine libxc migration streams (v3, HVM
 * shaped), optionally wrapped in the libxl stream and the xl savefile
 * header.  It knows nothing of the helper protocol: like xc_domain_save()
 * it reports through a callbacks struct, which the helper (csrc/backend_sim.c)
 * maps onto protocol messages and the extension may map onto anything else.
 *
 * Conventions: functions return 0 on success, -1 on failure with errno set
 * and a message sent through cb->log (level XCS_LOG_ERROR) first.
 */
#ifndef XCS_ENGINE_H
#define XCS_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"

#ifdef __cplusplus
extern "C" {
#endif

/* xentoollog levels, as carried by the helper's log message. */
enum xcs_log_level {
    XCS_LOG_DEBUG = 1,
    XCS_LOG_VERBOSE = 2,
    XCS_LOG_DETAIL = 3,
    XCS_LOG_PROGRESS = 4,
    XCS_LOG_INFO = 5,
    XCS_LOG_NOTICE = 6,
    XCS_LOG_WARN = 7,
    XCS_LOG_ERROR = 8,
    XCS_LOG_CRITICAL = 9
};

/* Precopy policy answers: the values of xenguest.h's XGS_POLICY_*. */
#define XCS_POLICY_ABORT (-1)
#define XCS_POLICY_CONTINUE_PRECOPY 0
#define XCS_POLICY_STOP_AND_COPY 1

/* restore checkpoint answers: xenguest.h's XGR_CHECKPOINT_*. */
#define XCS_CHECKPOINT_ERROR 0
#define XCS_CHECKPOINT_SUCCESS 1
#define XCS_CHECKPOINT_FAILOVER 2

struct xcs_precopy_stats {
    unsigned int iteration;  /* round about to start (0 = first) */
    uint64_t total_written;  /* pages written so far */
    int64_t dirty_count;     /* pages dirty now; -1 if unknown */
};

struct xcs_engine_callbacks {
    /* Mandatory.  Both may be called at any time. */
    void (*log)(enum xcs_log_level level, int errnoval, const char *msg,
                void *data);
    void (*progress)(const char *doing_what, uint64_t done, uint64_t total,
                     void *data);

    /* Save.  Return values as xenguest.h's struct save_callbacks. */
    int (*suspend)(void *data);             /* !0 = suspended */
    int (*precopy_policy)(struct xcs_precopy_stats st, void *data);
    int (*postcopy)(void *data);            /* >0 ok */
    int (*checkpoint)(void *data);          /* 1 = take another */

    /* Restore.  NULL means "not asked". */
    int (*static_data_done)(unsigned int missing, void *data); /* 0 ok */
    int (*restore_checkpoint)(void *data); /* XCS_CHECKPOINT_* */

    void *data;
};

struct xcs_save_params {
    int io_fd;                /* written with write/writev/vmsplice only */
    const char *sim_path;     /* the simulated domain file */
    int live;                 /* precopy rounds from the dirty log */
    enum xcs_fmt wrap;        /* XCS_FMT_XL, _LIBXL or _LIBXC */
    int stream_type;          /* enum xcs_stream_type */
    unsigned int checkpoints; /* remus: number of checkpoints to send */
    unsigned int interval_ms; /* remus: time between checkpoints */
    const char *xl_config;    /* xl header config bytes (may be NULL) */
    size_t xl_config_len;
    unsigned int max_iters;   /* policy fallback when precopy_policy NULL; */
                              /* 0 for either: Xen's, XCS_XEN_* */
    unsigned int dirty_threshold;
    /*
     * Added by the engine (additive).  The first full pass omits all-zero
     * pages unless send_zero_pages is set: xcs_engine_restore builds a new,
     * zero-filled domain file, so an unsent page reads as zero there.  Set it
     * for a target that does not start zeroed (a real Xen restore populates
     * only the pfns it receives).  Later rounds always send every dirty
     * page, zero or not.
     */
    int send_zero_pages;
    /*
     * Added (additive; 0 means 1).  Write a round's PAGE_DATA with this many
     * threads at once, each pwritev'ing its share of the batches at offsets
     * computed beforehand; the stream is byte for byte what one thread would
     * write and the fd's position ends right after it.  Only when io_fd is a
     * regular file without O_APPEND and the round has at least
     * XCS_COPY_MIN_PAGES pages; otherwise (pipes, sockets) the sequential
     * path, silently.  At most XCS_MAX_COPY_THREADS.
     */
    unsigned int copy_threads;
};

#define XCS_MAX_COPY_THREADS 64
#define XCS_COPY_MIN_PAGES 4096 /* four full batches */

#define XCS_STATS_MAX_ROUNDS 64

struct xcs_save_stats {
    unsigned int rounds;                        /* memory rounds sent */
    uint64_t pages_per_round[XCS_STATS_MAX_ROUNDS];
    uint64_t pages_sent;                        /* all rounds */
    uint64_t zero_pages;                        /* skipped as zero */
    uint64_t bytes_written;                     /* whole stream */
    uint64_t downtime_ns;                       /* suspend -> end of stream */
    uint64_t duration_ns;                       /* whole save */
    uint64_t spliced_bytes;                     /* of bytes_written, vmspliced */
    uint64_t threaded_bytes;                    /* of bytes_written, by copy threads */
    unsigned int copy_threads;                  /* threads that wrote them (0: none) */
};

struct xcs_restore_params {
    int io_fd;                /* read exactly the stream, never past END */
    const char *sim_path;     /* target domain file, created; removed on failure */
    /*
     * 0: build beside sim_path under a temporary name and rename it over
     * sim_path at the end (the helper used on its own).  1: create sim_path
     * itself (O_EXCL) and leave it there on success: the toolstack chose
     * that name, judges the run, and renames it into place itself, so no
     * signal to the toolstack can land between a rename and its verdict.
     */
    int build_only;
    enum xcs_fmt wrap;        /* XCS_FMT_XL, _LIBXL or _LIBXC */
    int stream_type;
    uint64_t max_pages;       /* 0 = the stream decides, capped */
    /*
     * Accept a foreign image: one not written by the sim engine (e.g. a
     * legacy stream converted on the fly), PV or HVM, without xcsave's sim
     * record.  The domain is then sized by its highest pfn (or max_pages),
     * and vCPU v's state is the first XCS_SIM_VCPU_SIZE bytes of the
     * guest's own context (PV: X86_PV_VCPU_BASIC v; HVM: HVM_CONTEXT as
     * vCPU 0), zero-padded.
     */
    int foreign;
    /*
     * Where to hand over the device model's state (the body of the libxl
     * EMULATOR_CONTEXT record after its 8-byte emulator header), as Xen's
     * restorer dumped it to qemu-resume.<domid>; NULL = skip it.  Written
     * next to the domain, atomically, only on success.
     */
    const char *dm_path;
};

struct xcs_restore_result {
    uint64_t store_gfn;
    uint64_t console_gfn;
    uint64_t pages_received;
    uint64_t bytes_read;
    uint64_t kernel_moved_bytes; /* of bytes_read: never entered the helper */
    uint64_t duration_ns;
    unsigned int checkpoints; /* complete checkpoints applied (remus) */
};

/*
 * The two entry points: 0, or -1 with errno after an error logged through
 * cb.  stats / res are the caller's (never NULL), zeroed first and filled
 * on success and failure alike.
 */
int xcs_engine_save(const struct xcs_save_params *p,
                    const struct xcs_engine_callbacks *cb,
                    struct xcs_save_stats *stats);

int xcs_engine_restore(const struct xcs_restore_params *p,
                       const struct xcs_engine_callbacks *cb,
                       struct xcs_restore_result *res);

#ifdef __cplusplus
}
#endif

#endif /* XCS_ENGINE_H */
