/*
 * sched_cap.c - the helper's one-shot mode for auto-converge's xen actuator
 * (xcsave/throttle.py): read, and optionally set, a domain's credit2 cap.
 *
 *   --xcsave-1 sched-cap [--backend xen] --domid N [--cap C]
 *
 * Sends hello (backend "xen", mode "sched-cap"), then sched_cap(sched_id,
 * vcpus, weight, cap): the scheduler of the domain's cpupool and its credit2
 * parameters *before* any change (weight and cap 0 under another
 * scheduler); then, with --cap, sets the cap to C (0..65535, percent of one
 * pCPU for the whole domain; 0: no cap) keeping the weight; and ends with
 * complete(r, errno), whose reply it waits for.  Setting a cap on a domain
 * that is not under credit2 fails with EOPNOTSUPP.  Python never links
 * libxenctrl: the calls are made here.
 *
 * Without the xen backend built in, it says so (a log frame, exit 255), as
 * a save with --backend xen does.
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef XCS_HAVE_XEN
#include <xenctrl.h>
#endif

#include "helper.h"

#ifndef XCS_BACKENDS
#define XCS_BACKENDS "sim"
#endif
#define SCHED_CAP_MAX 65535UL /* credit2's cap is a u16 */

#ifdef XCS_HAVE_XEN
/* The libxc part: sched_cap, then the cap when asked.  0, or -1 with errno. */
static int sched_cap(uint32_t domid, int set, uint16_t cap)
{
    xc_interface *xch = NULL;
    xc_cpupoolinfo_t *pool = NULL;
    xc_dominfo_t info;
    struct xen_domctl_sched_credit2 sdom = {0, 0};
    uint32_t sched_id;
    int rc = -1;

    xch = xc_interface_open(NULL, NULL, 0);
    if (!xch) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT, "opening libxenctrl");
        goto out;
    }
    if (xc_domain_getinfo(xch, domid, 1, &info) != 1 || info.domid != domid) {
        errno = ESRCH;
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT, "domid %u: no such domain", domid);
        goto out;
    }
    pool = xc_cpupool_getinfo(xch, info.cpupool);
    if (!pool) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                "domid %u: reading its cpupool %u", domid, info.cpupool);
        goto out;
    }
    sched_id = pool->sched_id;
    if (sched_id == XEN_SCHEDULER_CREDIT2 &&
        xc_sched_credit2_domain_get(xch, domid, &sdom) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                "domid %u: reading its credit2 parameters", domid);
        goto out;
    }
    xcs_stub_sched_cap(sched_id, info.max_vcpu_id + 1, sdom.weight, sdom.cap);
    if (set && sched_id != XEN_SCHEDULER_CREDIT2) {
        errno = EOPNOTSUPP;
        xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                "domid %u: its cpupool's scheduler (%u) is not credit2: no cap to set",
                domid, sched_id);
        goto out;
    }
    if (set) {
        sdom.cap = cap;
        if (xc_sched_credit2_domain_set(xch, domid, &sdom) < 0) {
            xcs_log(XCS_LOG_ERROR, errno, XCS_HELPER_CONTEXT,
                    "domid %u: setting its credit2 cap to %u", domid, cap);
            goto out;
        }
    }
    rc = 0;

out:
    if (pool)
        xc_cpupool_infofree(xch, pool);
    if (xch) {
        int saved = errno;

        xc_interface_close(xch);
        errno = saved;
    }
    return rc;
}
#endif

int xcs_sched_cap_main(int argc, char **argv)
{
    unsigned long cap = SCHED_CAP_MAX + 1; /* none given: only read */
    const struct xcs_oneshot_opt opts[] = {{"cap", 0, SCHED_CAP_MAX, &cap}};
    uint32_t domid = xcs_oneshot_argv("sched-cap", "[--backend xen] --domid N [--cap 0..65535]",
                                      argc, argv, opts, 1);
    int set = cap <= SCHED_CAP_MAX, r, errnoval;

    xcs_stub_hello(XCS_PROTO_VERSION, XCS_PROTO_HASH, "xen", "sched-cap");
#ifdef XCS_HAVE_XEN
    errno = 0;
    r = sched_cap(domid, set, (uint16_t)cap);
    errnoval = r ? (errno ? errno : EIO) : 0;
    xcs_stub_complete(r, errnoval);
    return 0;
#else
    /* read only by the Xen call above */
    (void)domid;
    (void)r;
    (void)set;
    (void)errnoval;
    xcs_log(XCS_LOG_ERROR, EOPNOTSUPP, XCS_HELPER_CONTEXT,
            "backend 'xen' is not built into this helper (built: %s)", XCS_BACKENDS);
    xcs_exit_fatal();
#endif
}
