/*
 * helper.h - what helper_main.c offers the helper's backends, and what a
 * backend offers helper_main.c.
 *
 * A backend does one save or one restore and talks to the parent only through
 * the generated stubs in xcsave_msgs.h (xcs_stub_<name>) and the helpers
 * below; helper_main.c owns argv, the protocol framing, hello/complete,
 * signals and the exit status.
 */
#ifndef XCS_HELPER_H
#define XCS_HELPER_H

#include <stdarg.h>
#include <stdint.h>
#include <sys/types.h>

#include "xcs_engine.h"
#include "xcsave_msgs.h"

#define XCS_HELPER_CONTEXT "xcsave-helper"

/* wire modes: channels, frame sizes (see wire.c and docs/architecture.md, "Migration") */
#define XCS_WIRE_MAX_CHANNELS 16
#define XCS_WIRE_FRAME_MIN 4096u
#define XCS_WIRE_FRAME_MAX (4u << 20)
#define XCS_WIRE_FRAME_DEFAULT (1u << 20)
/*
 * zstd's level without --level: 3 for --compress zstd (zstd's own default;
 * at 1 Gbit/s it moved 1 GiB of mixed memory 2.04-2.08x faster than no
 * compression, level 1 1.97-2.00x: docs/performance.md), 1 for adaptive,
 * whose rule tries 3 where the link leaves time (wire.c, adapt()).
 */
#define XCS_WIRE_ZSTD_LEVEL 3
#define XCS_WIRE_ADAPTIVE_LEVEL 1
#define XCS_WIRE_WINDOW_DEFAULT (64ull << 20)
#define XCS_WIRE_WINDOW_MAX (1ull << 30)

struct xcs_op {
    enum xcs_dialect dialect;
    int restore;          /* 0: save, 1: restore */
    int io_fd;            /* the migration stream, never buffered */
    int aux_fd;           /* save: recv_fd; restore: send_back_fd; -1 none */
    uint32_t domid;
    uint32_t xcflags;     /* save: XCFLAGS_LIVE (1) | XCFLAGS_DEBUG (2) */
    uint32_t cbflags;     /* which callbacks the parent installed */
    int stream_type;      /* enum xcs_stream_type */
    /* restore, as libxl passes them */
    uint32_t store_evtchn, store_domid, console_evtchn, console_domid;
    /* sim backend (xcsave-1 argv only) */
    const char *sim_path;
    int sim_build_only;   /* restore: build sim_path itself, the caller commits */
    enum xcs_fmt wrap;
    uint64_t max_pages;
    unsigned int checkpoints, interval_ms;
    unsigned int copy_threads; /* sim save: PAGE_DATA writer threads (0 = 1) */
    unsigned int idle_ms; /* stream silent this long: ETIMEDOUT (0 = never) */
    const char *xl_config_path;
    const char *dm_path;  /* restore: hand the device model's state over here */
    int dm_by_caller;     /* save: the caller saves the device model (QMP): HVM goes */
    int foreign;          /* sim restore: a stream the sim did not write (real Xen's) */
    const char *out_tmp;  /* save: io_fd's file, the caller's uncommitted temporary */
    /* legacy input (restore): 0 = v2/v3 stream; else 32 or 64 */
    unsigned int legacy_width;
    int legacy_hvm;
    /* tunnel mode (xcsave-1 argv only): io_fd is the TCP socket */
    int tunnel;           /* 1: --xcsave-1 tunnel */
    int plain_fd;         /* the plaintext end of the parent's socketpair */
    int tls_server;       /* --role: 0 client, 1 server */
    const char *tls_dir;  /* ca-cert.pem, cert.pem, key.pem */
    const char *peer_name; /* client: the name the server's certificate must carry */
    unsigned int handshake_timeout_ms;
    /* wire modes (xcsave-1 argv only, wire.c): io_fd is --in-fd / --out-fd */
    int wire;             /* 0: none, 1: wire-send, 2: wire-recv */
    int wire_chan[XCS_WIRE_MAX_CHANNELS]; /* --channel-fd, in channel order */
    unsigned int wire_nchan;
    int wire_raw;         /* wire-send --raw: no framing, channel 0 only */
    int wire_compress;    /* 0 off, 1 zstd, 2 adaptive */
    int wire_level;       /* zstd level */
    uint64_t wire_rate;   /* bytes/s on the wire, 0 = no cap */
    uint32_t wire_frame;  /* frame_max */
    uint64_t wire_window; /* bytes of unacknowledged / out-of-order data */
    int wire_tee_fd;      /* wire-recv: a copy of the plain stream, -1 none */
    int wire_resume_sock; /* SOCK_SEQPACKET end replacement channels arrive on, -1 */
    unsigned int wire_resume_ms;
    int wire_copy;        /* --copy: never splice (wire.c), every byte through memory */
};

struct xcs_restore_out {
    uint64_t store_gfn;
    uint64_t console_gfn;
};

struct xcs_backend {
    const char *name;
    /* Each returns 0 or -1 with errno set (xc_domain_save's convention). */
    int (*save)(const struct xcs_op *op);
    int (*restore)(const struct xcs_op *op, struct xcs_restore_out *out);
    /*
     * xcsave-1: a save succeeded but the caller did not commit its image
     * (complete's reply was non-zero, or never came: the toolstack died).
     * Put the source back as it was before the save.  NULL: nothing to do
     * (the xen backend: resuming a real domain is the toolstack's job).
     */
    void (*save_not_committed)(const struct xcs_op *op);
};

extern const struct xcs_backend xcs_backend_sim;
#ifdef XCS_HAVE_XEN
extern const struct xcs_backend xcs_backend_xen;
#endif

/* The dialect in use (set once, before the first frame). */
enum xcs_dialect xcs_current_dialect(void);

/* Whether the parent installed callback m (its cbflags bit is set). */
int xcs_cb_wanted(const struct xcs_op *op, enum xcs_msg m);

/* Whether the dialect has message m at all. */
int xcs_msg_exists(enum xcs_msg m);

/* A restore's restore_stats, where the dialect has the message; errno kept. */
void xcs_send_restore_stats(uint32_t checkpoints, uint64_t pages_received, uint64_t bytes,
                            uint64_t duration_ns);

/* log frames: truncated to what the dialect can carry. */
void xcs_log(uint32_t level, int errnoval, const char *context,
             const char *fmt, ...) __attribute__((format(printf, 4, 5)));
void xcs_vlog(uint32_t level, int errnoval, const char *context,
              const char *fmt, va_list al) __attribute__((format(printf, 4, 0)));

/*
 * Give up before the operation could start (e.g. xc_interface_open failed):
 * exit 255 without complete, as Xen's helper does with fail().  Log first.
 */
void xcs_exit_fatal(void) __attribute__((noreturn));

/*
 * SIGTERM aborts an operation the way Xen's helper does: the handler dup2()s
 * /dev/null over io_fd so that the next read sees EOF and the next write
 * fails, and the backend's own error path (resume the guest, remove a
 * partial domain) runs.  Called by a backend once it knows io_fd.
 */
void xcs_arm_sigterm_abort(int io_fd);

/*
 * PR_SET_PDEATHSIG(SIGTERM): the parent's death (even SIGKILL) sends us
 * SIGTERM; a parent already gone when this runs raises it at once.  Install
 * the SIGTERM handler first.  (xcs_arm_sigterm_abort does this too.)
 */
void xcs_arm_parent_death(void);

/*
 * For a ppoll() loop: SIGTERM runs handler (which sets a flag) and is
 * blocked from now on except inside ppoll(), whose mask unblocks it, so a
 * stop that arrives anywhere is seen at the next wait at the latest, never
 * lost between the flag's check and the wait.  0, or -1 with errno set.
 */
int xcs_sigterm_until_ppoll(void (*handler)(int));

/*
 * A part this helper was built without (its headers were missing): logs
 * "<what> is not built into this helper (<missing> when xcsave was built)"
 * under context, and returns -1 with errno EOPNOTSUPP.
 */
int xcs_not_built(const char *context, const char *what, const char *missing);

/*
 * The TLS tunnel (tunnel_tls.c): handshake on op->io_fd, then relay between
 * it and op->plain_fd until both directions are closed.  Sends tls_peer once
 * the peer is authenticated, tunnel_stats at the end, and log frames naming
 * what failed.  Returns 0, or -1 with errno set (EACCES: a certificate was
 * refused; ETIMEDOUT: the handshake deadline passed; ECONNRESET: the peer
 * cut the stream without close_notify; EOPNOTSUPP: built without OpenSSL).
 */
int xcs_tunnel(const struct xcs_op *op);

/*
 * The wire pumps (wire.c): op->wire 1 sends the plain stream read from
 * op->io_fd over op->wire_chan[] in frames (or, with wire_raw, as it is),
 * 2 receives them and writes the plain stream in order to op->io_fd.
 * Sends wire_stats (every 500 ms and at the end) and wire_lost, applies
 * wire_rate read from stdin.  Returns 0, or -1 with errno set (EPROTO: a
 * frame broke the rules; ETIMEDOUT: silence; ECONNRESET/EPIPE: a channel
 * failed without resume).
 */
int xcs_wire(const struct xcs_op *op);

/*
 * A parent->helper message (wire_rate) at the start of buf[0..have): its
 * row and body.  Returns the bytes it takes, 0 if incomplete, -1 if it is
 * no valid xcsave-1 frame of a parent->helper message (errno EPROTO).
 */
ssize_t xcs_parse_parent_msg(const uint8_t *buf, size_t have, enum xcs_msg *m,
                             const uint8_t **body, uint32_t *body_len);

/*
 * A whole number in base (10, or 0 for C's 0x/0 prefixes) from lo to hi
 * into *out: 0, or -1 for anything else (empty, a sign or a space first,
 * trailing text, out of range).  The helper's one number parser.
 */
int xcs_parse_ulong(const char *s, int base, unsigned long lo, unsigned long hi,
                    unsigned long *out);

/* A one-shot mode's own option, besides the --backend and --domid all take. */
struct xcs_oneshot_opt {
    const char *name;
    unsigned long lo, hi; /* a number from lo to hi; hi == 0: a flag (no value) */
    unsigned long *value; /* where the number goes (a flag: 1) */
};

/*
 * The argv of a one-shot mode, "--xcsave-1 MODE [--backend xen] --domid N
 * [opts...]" (sched-cap, logdirty): the domid it names.  A bad argv is one
 * line on stderr, "xcsave-helper: MODE: why (usage: USAGE)", before any
 * message, and exit 255.  At most XCS_ONESHOT_MAX_OPTS opts.
 */
#define XCS_ONESHOT_MAX_OPTS 4
uint32_t xcs_oneshot_argv(const char *mode, const char *usage, int argc, char **argv,
                          const struct xcs_oneshot_opt *opts, size_t nopts);

/* The one-shot --xcsave-1 sched-cap mode (sched_cap.c): its whole run. */
int xcs_sched_cap_main(int argc, char **argv);
/*
 * The one-shot log-dirty mode (logdirty.c): argv is the helper's whole
 * argv, "--xcsave-1 logdirty ..."; returns the exit status.
 */
int xcs_logdirty_main(int argc, char **argv);

#endif /* XCS_HELPER_H */
