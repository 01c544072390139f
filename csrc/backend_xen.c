/*
 * backend_xen.c - the helper's xen backend: libxenguest's xc_domain_save /
 * xc_domain_restore with every callback relayed to the parent.
 *
 * Built only when xenctrl.h/xenguest.h are found (Debian libxen-dev).  This
 * is what Xen 4.17's libxl-save-helper does, plus the precopy_policy
 * callback (xcsave-1 only: the 4.17 table has no message for it, so under
 * libxl every migration gets libxc's default 5-iteration/50-page policy).
 */

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <xenctrl.h>
#include <xenguest.h>
#include <xentoollog.h>

#include "helper.h"

/*----- logger: libxc's messages and progress become log/progress frames -----*/

struct relay_stats {
    unsigned int rounds;      /* from "Frames iteration N" progress */
    unsigned long last_done;  /* pages of the last progress report */
    uint64_t pages_sent;
};

static struct relay_stats relay;

static void relay_vmessage(struct xentoollog_logger *lg, xentoollog_level level,
                           int errnoval, const char *context,
                           const char *format, va_list al)
{
    (void)lg;
    xcs_vlog((uint32_t)level, errnoval, context, format, al);
}

static void relay_progress(struct xentoollog_logger *lg, const char *context,
                           const char *doing_what, int percent,
                           unsigned long done, unsigned long total)
{
    unsigned int iter;

    (void)lg;
    (void)percent; /* dropped on the wire, as in Xen: the parent recomputes it */
    if (doing_what && sscanf(doing_what, "Frames iteration %u", &iter) == 1) {
        if (iter + 1 > relay.rounds) {
            relay.pages_sent += relay.last_done;
            relay.rounds = iter + 1;
        }
        relay.last_done = done;
    }
    xcs_stub_progress(context ? context : "", doing_what ? doing_what : "",
                      done, total);
}

static void relay_destroy(struct xentoollog_logger *lg)
{
    (void)lg;
}

static xentoollog_logger relay_logger = {
    relay_vmessage, relay_progress, relay_destroy,
};

/*----- callbacks: each one is a message whose reply is the return value -----*/

/*
 * The generated header has the trampolines of the callbacks with plain
 * integer arguments (xcs_tramp_<name>); these two take libxenguest's types.
 */
static int xcs_tramp_precopy_policy(struct precopy_stats st, void *data)
{
    (void)data;
    return xcs_stub_precopy_policy(st.iteration, (uint64_t)st.total_written,
                                   (int64_t)st.dirty_count);
}

static void xcs_tramp_restore_results(xen_pfn_t store_gfn,
                                      xen_pfn_t console_gfn, void *data)
{
    (void)data;
    xcs_stub_restore_results(store_gfn, console_gfn);
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/*
 * libxc does not report per-round counts, bytes, downtime or checkpoints to
 * its caller; what we know comes from its progress reports.  Unknown
 * figures are 0.
 */
static void send_stats(const struct xcs_op *op, uint64_t started)
{
    uint64_t pages = relay.pages_sent + relay.last_done;

    if (op->restore)
        xcs_send_restore_stats(0, pages, 0, now_ns() - started);
    else if (xcs_msg_exists(XCS_MSG_STATS))
        xcs_stub_stats(relay.rounds, pages, 0, 0, 0, now_ns() - started, NULL, 0);
}

/* cb.<name> = its trampoline, for each callback the parent flagged. */
#define INSTALL_FLAGGED(name, NAME)           \
    if (xcs_cb_wanted(op, XCS_MSG_##NAME))    \
        cb.name = xcs_tramp_##name;

/*----- save / restore -----*/

/*
 * The guest types xcsave's own supervisor (the xcsave-1 dialect) saves and
 * restores: PV and PVH.  An HVM guest has a device model (QEMU) whose state
 * is part of its image and which only a toolstack that drives QEMU (QMP)
 * saves: libxl does, running this helper in the xen-4.17 dialect, so there
 * every guest type goes; and so does xcsave's supervisor when it says it
 * saves the device model itself (--device-model 1, a save only).  Refused
 * before the domain is touched: 0, or -1 with errno (EOPNOTSUPP for an HVM
 * guest, ESRCH for no such domain).
 */
static int check_guest(xc_interface *xch, const struct xcs_op *op)
{
    xc_domaininfo_t info;

    if (op->dialect != XCS_DIALECT_XCSAVE_1)
        return 0;
    if (xc_domain_getinfolist(xch, op->domid, 1, &info) != 1 || info.domain != op->domid) {
        errno = ESRCH;
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT, "domid %u: no such domain",
                op->domid);
        return -1;
    }
    if ((info.flags & XEN_DOMINF_hvm_guest) &&
        (info.arch_config.emulation_flags & ~XEN_X86_EMU_LAPIC) && !op->dm_by_caller) {
        errno = EOPNOTSUPP;
        if (op->restore)
            xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                    "domid %u is an HVM guest (emulated devices 0x%x): xcsave restores PV "
                    "and PVH guests; an HVM guest's device model is libxl's to restore "
                    "(xl restore)", op->domid, info.arch_config.emulation_flags);
        else
            xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                    "domid %u is an HVM guest (emulated devices 0x%x): its device model's "
                    "state must be saved with it: give its QMP socket (--qmp; the API's "
                    "device_model=), or use xl save",
                    op->domid, info.arch_config.emulation_flags);
        return -1;
    }
    return 0;
}

/*
 * Like Xen's helper: without an interface there is no operation to
 * complete (exit).  NULL, with errno and the interface closed, for a guest
 * the dialect does not take (check_guest).
 */
static xc_interface *open_xc(const struct xcs_op *op)
{
    xc_interface *xch = xc_interface_open(&relay_logger, &relay_logger, 0);
    int saved;

    if (!xch) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT, "xc_interface_open failed");
        xcs_exit_fatal();
    }
    if (check_guest(xch, op) < 0) {
        saved = errno;
        xc_interface_close(xch);
        errno = saved;
        return NULL;
    }
    return xch;
}

static int xen_save(const struct xcs_op *op)
{
    static struct save_callbacks cb; /* zeroed: unflagged callbacks stay NULL */
    xc_interface *xch = open_xc(op);
    uint64_t started = now_ns();
    int rc, saved;

    if (!xch)
        return -1;
    XCS_SAVE_CALLBACKS(INSTALL_FLAGGED)

    xcs_arm_sigterm_abort(op->io_fd);
    rc = xc_domain_save(xch, op->io_fd, op->domid, op->xcflags, &cb,
                        (xc_stream_type_t)op->stream_type, op->aux_fd);
    saved = errno;
    send_stats(op, started);
    xc_interface_close(xch);
    errno = saved;
    return rc;
}

static int xen_restore(const struct xcs_op *op, struct xcs_restore_out *out)
{
    static struct restore_callbacks cb;
    xc_interface *xch = open_xc(op);
    unsigned long store_mfn = 0, console_mfn = 0;
    uint64_t started = now_ns();
    int rc, saved;

    if (!xch)
        return -1;
    XCS_RESTORE_CALLBACKS(INSTALL_FLAGGED)

    /* Restore keeps SIGTERM's default action, as Xen's helper does. */
    rc = xc_domain_restore(xch, op->io_fd, op->domid, op->store_evtchn,
                           &store_mfn, op->store_domid, op->console_evtchn,
                           &console_mfn, op->console_domid,
                           (xc_stream_type_t)op->stream_type, &cb, op->aux_fd);
    out->store_gfn = store_mfn;
    out->console_gfn = console_mfn;
    saved = errno;
    send_stats(op, started);
    xc_interface_close(xch);
    errno = saved;
    return rc;
}

const struct xcs_backend xcs_backend_xen = {
    .name = "xen",
    .save = xen_save,
    .restore = xen_restore,
    /*
     * No save_not_committed: complete's reply changes nothing here, as in
     * Xen's helper.  Resuming a real domain is the toolstack's decision and
     * job (libxl resumes it, or destroys it after a migration; only the
     * toolstack knows which), and it needs the toolstack's state (xenstore,
     * the device model) that a helper whose toolstack died cannot reach.
     */
};
