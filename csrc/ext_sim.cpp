// ext_sim.cpp - simulated domains and the in-process stream engine for
// xcsave._ext: create/inspect/dirty sim domains, and run xcs_engine_save /
// xcs_engine_restore in-process for tests and benchmarks (the product runs
// them in the helper).  Blocking work runs with the GIL released.
#include "ext_common.hpp"

#include <pybind11/stl.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

extern "C" {
#include "private_file.h"
#include "simdom.h"
#include "xcs_engine.h"
}

namespace xcsave_ext {

namespace {

// An open sim domain, closed on scope exit.
struct SimDom {
    xcs_sim_dom dom{};

    SimDom(const std::string &path, int flags)
    {
        if (xcs_sim_open(path.c_str(), flags, &dom) < 0)
            raise_errno(errno, path);
    }
    ~SimDom() { xcs_sim_close(&dom); }
    SimDom(const SimDom &) = delete;
    SimDom &operator=(const SimDom &) = delete;
};

// Asked by xcs_sim_create between steps (GIL released): runs Python's
// signal handlers (Ctrl-C raises KeyboardInterrupt there), then the caller's
// cancelled().  An exception from either stops the create and is re-raised
// once it has cleaned up.
struct CreateCancel {
    py::object cancelled;
    std::exception_ptr error;

    static int check(void *data)
    {
        CreateCancel &c = *static_cast<CreateCancel *>(data);
        py::gil_scoped_acquire gil;
        if (c.error)
            return 1;
        try {
            if (PyErr_CheckSignals() < 0)
                throw py::error_already_set();
            return !c.cancelled.is_none() && py::bool_(c.cancelled()) ? 1 : 0;
        } catch (...) {
            c.error = std::current_exception();
            return 1;
        }
    }
};

// "classic", "random", "zero", "text" or "mixed" (ValueError otherwise).
xcs_sim_fill parse_fill(const std::string &name)
{
    xcs_sim_fill fill;

    if (xcs_sim_fill_parse(name.c_str(), &fill) < 0)
        throw py::value_error("fill must be classic, random, zero, text or "
                              "mixed, not '" + name + "'");
    return fill;
}

void sim_create(const std::string &path, uint64_t nr_pages, unsigned int vcpus,
                uint64_t seed, bool replace, py::object cancelled,
                const std::string &fill_name)
{
    CreateCancel cancel{std::move(cancelled), nullptr};
    xcs_sim_fill fill = parse_fill(fill_name);
    int r, err;
    {
        py::gil_scoped_release nogil;
        r = xcs_sim_create(path.c_str(), nr_pages, vcpus, seed, fill,
                           replace ? XCS_SIM_CREATE_REPLACE : 0,
                           CreateCancel::check, &cancel);
        err = errno;
    }
    if (cancel.error)
        std::rethrow_exception(cancel.error);
    if (r < 0)
        raise_errno(err, path);
}

py::dict sim_info(const std::string &path)
{
    SimDom d(path, XCS_SIM_RDONLY);
    const xcs_sim_hdr *h = d.dom.hdr;
    int64_t dirty = __atomic_load_n(&h->dirty_count, __ATOMIC_RELAXED);
    py::dict out;

    out["pages"] = h->nr_pages;
    out["page_shift"] = h->page_shift;
    out["vcpus"] = h->nr_vcpus;
    out["state"] = xcs_sim_state_name(xcs_sim_get_state(&d.dom));
    out["logdirty"] = xcs_sim_logdirty_enabled(&d.dom) != 0;
    // Writers and the saver update the counter apart from the bits: it can
    // be transiently off, never below zero for a reader.
    out["dirty_count"] = dirty < 0 ? 0 : dirty;
    out["generation"] = __atomic_load_n(&h->generation, __ATOMIC_RELAXED);
    out["pages_written"] = __atomic_load_n(&h->pages_written, __ATOMIC_RELAXED);
    out["memory"] = h->nr_pages << h->page_shift;
    out["size"] = h->file_size;
    out["seed"] = h->seed;
    out["fill"] = xcs_sim_fill_name((xcs_sim_fill)h->fill);
    out["throttle"] = xcs_sim_get_throttle(&d.dom); // as stored: may be garbage
    return out;
}

std::string sim_digest(const std::string &path)
{
    SimDom d(path, XCS_SIM_RDONLY); // never populate: holes stay holes
    uint8_t dg[XCS_SIM_DIGEST_SIZE];
    char hex[2 * XCS_SIM_DIGEST_SIZE + 1];

    {
        py::gil_scoped_release nogil;
        xcs_sim_digest(&d.dom, dg);
    }
    for (size_t i = 0; i < sizeof(dg); i++)
        std::snprintf(hex + 2 * i, 3, "%02x", dg[i]);
    return std::string(hex, 2 * XCS_SIM_DIGEST_SIZE);
}

void sim_set_state(const std::string &path, const std::string &state)
{
    xcs_sim_state st;

    if (xcs_sim_state_parse(state.c_str(), &st) < 0)
        throw py::value_error("state must be running, paused or suspended, "
                              "not '" + state + "'");
    SimDom d(path, 0);
    int r;
    {
        py::gil_scoped_release nogil; // may wait for in-flight writers
        r = xcs_sim_set_state(&d.dom, st);
    }
    if (r < 0)
        raise_errno(errno, path);
}

// Log-dirty on or off, as the hypervisor's switch.  The toolstack needs
// "off" after a save helper died mid-precopy: only the helper would have
// turned it off (xcsave/api.py, the failed save's undo).
void sim_set_logdirty(const std::string &path, bool enable)
{
    SimDom d(path, 0);

    if (enable)
        xcs_sim_logdirty_enable(&d.dom);
    else
        xcs_sim_logdirty_disable(&d.dom);
}

// Auto-converge's actuator for a sim domain (xcsave/throttle.py): the
// percent of its time the guest is kept from running.
void sim_set_throttle(const std::string &path, int64_t percent)
{
    if (percent < 0 || percent > (int64_t)XCS_SIM_THROTTLE_MAX)
        throw py::value_error("throttle must be a percent from 0 to " +
                              std::to_string(XCS_SIM_THROTTLE_MAX) + ", not " +
                              std::to_string(percent));
    SimDom d(path, 0);
    if (xcs_sim_set_throttle(&d.dom, (unsigned int)percent) < 0)
        raise_errno(errno, path);
}

// The planner's sample (xcsave/sample.py): take the dirty log (fetch and
// clear, as a save's round does) and OR it into union, a writable buffer of
// the bitmap's size that the caller keeps across samples.  Returns the pages
// taken.  EINVAL if log-dirty is off (nobody is logging: nothing to take)
// or union is not the bitmap's size.
uint64_t sim_logdirty_take(const std::string &path, py::buffer union_buf)
{
    SimDom d(path, 0);
    py::buffer_info b = union_buf.request(true);
    uint64_t words = d.dom.hdr->bitmap_bytes / 8;
    uint64_t n;

    if (!xcs_sim_logdirty_enabled(&d.dom))
        raise_errno_reason(EINVAL, "log-dirty is off", py::str(path));
    if ((uint64_t)(b.size * b.itemsize) != words * 8)
        throw py::value_error("union must be " + std::to_string(words * 8) +
                              " bytes (the dirty bitmap's size)");
    std::vector<uint64_t> taken(words);
    {
        py::gil_scoped_release nogil;
        n = xcs_sim_dirty_fetch_and_clear(&d.dom, taken.data());
        uint8_t *u = static_cast<uint8_t *>(b.ptr);
        for (uint64_t w = 0; w < words; w++) {
            uint64_t v;
            std::memcpy(&v, u + w * 8, 8); // the buffer may be unaligned
            v |= taken[w];
            std::memcpy(u + w * 8, &v, 8);
        }
    }
    return n;
}

// fill_name "" (or None from Python): the fill the domain was created with.
int64_t sim_dirty(const std::string &path, uint64_t rate, double duration,
                  uint64_t seed, const std::string &fill_name)
{
    int fill = fill_name.empty() ? XCS_SIM_FILL_DOMAIN : (int)parse_fill(fill_name);
    int64_t n;
    {
        py::gil_scoped_release nogil;
        n = xcs_sim_dirty_run(path.c_str(), rate, duration, seed, fill);
    }
    if (n < 0)
        raise_errno(errno, path);
    return n;
}

void sim_remove(const std::string &path)
{
    if (xcs_sim_remove(path.c_str()) < 0)
        raise_errno(errno, path);
}

void rename_noreplace(const std::string &from, const std::string &to)
{
    int r;
    {
        py::gil_scoped_release nogil;
        r = xcs_rename_noreplace(from.c_str(), to.c_str(), 0);
    }
    if (r < 0)
        raise_errno(errno, to);
}

/*----- the engine, in-process -----*/

xcs_fmt parse_wrap(const std::string &wrap)
{
    xcs_fmt f;

    if (!named(xcs_fmt_parse, wrap, {XCS_FMT_LIBXC, XCS_FMT_LIBXL, XCS_FMT_XL}, &f))
        throw py::value_error("wrap must be libxc, libxl or xl, not '" + wrap +
                              "'");
    return f;
}

int parse_stream_type(const std::string &t)
{
    xcs_stream_type st;

    if (!named(xcs_stream_type_parse, t, {XCS_STREAM_PLAIN, XCS_STREAM_REMUS}, &st))
        throw py::value_error("stream_type must be plain or remus, not '" + t +
                              "'");
    return st;
}

// Engine callbacks: collect log/progress in C++ (no GIL needed), call the
// optional Python callables with the GIL re-acquired.  A Python exception
// in a callable is kept, makes the engine stop, and is re-raised after it.
struct EngineCtx {
    std::vector<std::tuple<int, int, std::string>> log;
    std::vector<std::tuple<std::string, uint64_t, uint64_t>> progress;
    std::string last_error;
    py::object policy, suspend, checkpoint;
    std::exception_ptr py_error;

    static EngineCtx &of(void *data) { return *static_cast<EngineCtx *>(data); }

    static void on_log(xcs_log_level level, int errnoval, const char *msg,
                       void *data)
    {
        EngineCtx &c = of(data);
        c.log.emplace_back(static_cast<int>(level), errnoval, msg);
        if (level >= XCS_LOG_ERROR && c.last_error.empty())
            c.last_error = msg; // the first error is the cause
    }

    static void on_progress(const char *what, uint64_t done, uint64_t total,
                            void *data)
    {
        of(data).progress.emplace_back(what, done, total);
    }

    // Runs fn(callable) under the GIL; on exception keeps it, returns dflt.
    template <typename F>
    int call(const py::object &fn, int dflt, F &&args)
    {
        py::gil_scoped_acquire gil;
        if (py_error)
            return dflt;
        try {
            return args(fn);
        } catch (...) {
            py_error = std::current_exception();
            return dflt;
        }
    }

    static int on_policy(xcs_precopy_stats st, void *data)
    {
        EngineCtx &c = of(data);
        return c.call(c.policy, XCS_POLICY_ABORT, [&](const py::object &fn) {
            return fn(st.iteration, st.total_written, st.dirty_count)
                .cast<int>();
        });
    }

    static int on_suspend(void *data)
    {
        EngineCtx &c = of(data);
        return c.call(c.suspend, 0, [](const py::object &fn) {
            return py::bool_(fn()) ? 1 : 0;
        });
    }

    static int on_checkpoint(void *data)
    {
        EngineCtx &c = of(data);
        return c.call(c.checkpoint, 0, [](const py::object &fn) {
            return fn().cast<int>();
        });
    }

    // The engine's callbacks for the callables set; an installed checkpoint
    // goes in slot (save's checkpoint, restore's restore_checkpoint).
    xcs_engine_callbacks callbacks(int (*xcs_engine_callbacks::*slot)(void *))
    {
        xcs_engine_callbacks cb{};
        cb.log = on_log;
        cb.progress = on_progress;
        if (!policy.is_none())
            cb.precopy_policy = on_policy;
        if (!suspend.is_none())
            cb.suspend = on_suspend;
        if (!checkpoint.is_none())
            cb.*slot = on_checkpoint;
        cb.data = this;
        return cb;
    }

    template <typename A, typename B, typename C>
    static py::list tuples(const std::vector<std::tuple<A, B, C>> &v)
    {
        py::list out;
        for (const auto &e : v)
            out.append(py::make_tuple(std::get<0>(e), std::get<1>(e),
                                      std::get<2>(e)));
        return out;
    }

    // Runs the engine (op) with the GIL released; raises its failure.
    template <typename Op> void run(Op op)
    {
        int r, err;
        {
            py::gil_scoped_release nogil;
            r = op();
            err = errno;
        }
        if (r < 0)
            raise_failure(err);
    }

    // The result: out, and what the engine logged and reported on the way.
    py::dict result(py::dict out) const
    {
        out["log"] = tuples(log);
        out["progress"] = tuples(progress);
        return out;
    }

    // After a failed run: the callable's exception, else OSError(errno, msg).
    [[noreturn]] void raise_failure(int err)
    {
        if (py_error)
            std::rethrow_exception(py_error);
        std::string msg = last_error.empty() ? std::strerror(err) : last_error;
        PyErr_SetObject(PyExc_OSError,
                        py::make_tuple(err, msg).ptr()); // errno subclass
        throw py::error_already_set();
    }
};

py::dict engine_save(int fd, const std::string &path, bool live,
                     const std::string &wrap, unsigned int max_iters,
                     unsigned int dirty_threshold,
                     const std::string &stream_type, unsigned int checkpoints,
                     unsigned int interval_ms, bool send_zero_pages,
                     py::object xl_config, py::object policy,
                     py::object suspend, py::object checkpoint,
                     unsigned int copy_threads)
{
    EngineCtx ctx;
    xcs_save_params p{};
    xcs_save_stats st{};
    std::string cfg;

    p.io_fd = fd;
    p.sim_path = path.c_str();
    p.live = live;
    p.wrap = parse_wrap(wrap);
    p.stream_type = parse_stream_type(stream_type);
    p.checkpoints = checkpoints;
    p.interval_ms = interval_ms;
    p.max_iters = max_iters;
    p.dirty_threshold = dirty_threshold;
    p.send_zero_pages = send_zero_pages;
    if (copy_threads < 1 || copy_threads > XCS_MAX_COPY_THREADS)
        throw std::invalid_argument("copy_threads must be from 1 to " +
                                    std::to_string(XCS_MAX_COPY_THREADS));
    p.copy_threads = copy_threads;
    if (!xl_config.is_none()) {
        cfg = xl_config.cast<std::string>();
        p.xl_config = cfg.data();
        p.xl_config_len = cfg.size();
    }
    ctx.policy = std::move(policy);
    ctx.suspend = std::move(suspend);
    ctx.checkpoint = std::move(checkpoint);
    xcs_engine_callbacks cb = ctx.callbacks(&xcs_engine_callbacks::checkpoint);
    ctx.run([&] { return xcs_engine_save(&p, &cb, &st); });

    py::dict out;
    py::list per_round;
    unsigned int n = st.rounds < XCS_STATS_MAX_ROUNDS ? st.rounds
                                                      : XCS_STATS_MAX_ROUNDS;
    for (unsigned int i = 0; i < n; i++)
        per_round.append(st.pages_per_round[i]);
    put(out, "rounds", st.rounds, "pages_per_round", per_round);
    put(out, "pages_sent", st.pages_sent, "zero_pages", st.zero_pages,
        "bytes_written", st.bytes_written, "downtime_ns", st.downtime_ns,
        "duration_ns", st.duration_ns, "spliced_bytes", st.spliced_bytes,
        "threaded_bytes", st.threaded_bytes, "copy_threads", st.copy_threads);
    return ctx.result(out);
}

py::dict engine_restore(int fd, const std::string &path,
                        const std::string &wrap, uint64_t max_pages,
                        const std::string &stream_type, py::object checkpoint)
{
    EngineCtx ctx;
    xcs_restore_params p{};
    xcs_restore_result res{};

    p.io_fd = fd;
    p.sim_path = path.c_str();
    p.wrap = parse_wrap(wrap);
    p.stream_type = parse_stream_type(stream_type);
    p.max_pages = max_pages;
    ctx.checkpoint = std::move(checkpoint);
    xcs_engine_callbacks cb = ctx.callbacks(&xcs_engine_callbacks::restore_checkpoint);
    ctx.run([&] { return xcs_engine_restore(&p, &cb, &res); });

    py::dict out;
    put(out, "store_gfn", res.store_gfn, "console_gfn", res.console_gfn,
        "pages_received", res.pages_received, "bytes_read", res.bytes_read,
        "kernel_moved_bytes", res.kernel_moved_bytes,
        "duration_ns", res.duration_ns, "checkpoints", res.checkpoints);
    return ctx.result(out);
}

} // namespace

void register_sim(py::module_ &m)
{
    using namespace pybind11::literals;

    m.attr("SIM_MAX_VCPUS") = XCS_SIM_MAX_VCPUS;
    m.attr("SIM_MAX_PAGES") = XCS_SIM_MAX_PAGES;
    m.def("sim_create", &sim_create, "path"_a, "nr_pages"_a, "vcpus"_a = 1,
          "seed"_a = 0, py::kw_only(), "replace"_a = false,
          "cancelled"_a = py::none(), "fill"_a = "classic",
          "Create a simulated domain file with seeded, guest-like memory "
          "(EEXIST if one is there, unless replace).  Signal handlers run "
          "and cancelled() -> bool is asked between steps: an exception or "
          "True stops it (InterruptedError), the temporary removed.");
    m.def("sim_info", &sim_info, "path"_a,
          "Header of a simulated domain as a dict.");
    m.def("sim_digest", &sim_digest, "path"_a,
          "Hex digest of memory + vCPU state + shape (docs/sim-format.md).");
    m.def("sim_set_state", &sim_set_state, "path"_a, "state"_a,
          "Set running/paused/suspended; leaving running waits for writers.");
    m.def("sim_set_logdirty", &sim_set_logdirty, "path"_a, "enable"_a,
          "Turn log-dirty on (clearing the bitmap) or off.");
    m.def("sim_set_throttle", &sim_set_throttle, "path"_a, "percent"_a,
          "Set the throttle: the percent (0..99) of its time the guest is kept "
          "from running (sim dirty writes that much less; 0 lifts it).");
    m.def("sim_logdirty_take", &sim_logdirty_take, "path"_a, "union"_a,
          "Take the dirty log (fetch and clear) and OR it into union (a "
          "writable buffer of the bitmap's size); returns the pages taken "
          "(EINVAL if log-dirty is off).");
    m.def("sim_dirty", &sim_dirty, "path"_a, "rate"_a, "duration"_a,
          "seed"_a = 0, py::kw_only(), "fill"_a = "",
          "Dirty pages at rate pages/s (0 = flat out) for duration s while "
          "the domain runs, with content of that fill (\"\": the domain's "
          "own); returns pages written.");
    m.def("sim_remove", &sim_remove, "path"_a, "Remove a simulated domain.");
    m.def("rename_noreplace", &rename_noreplace, "src"_a, "dst"_a,
          "Rename src to dst atomically; EEXIST if dst exists "
          "(renameat2 RENAME_NOREPLACE).");
    m.def("engine_save", &engine_save, "fd"_a, "path"_a, "live"_a = false,
          "wrap"_a = "libxc", "max_iters"_a = 0, "dirty_threshold"_a = 0,
          py::kw_only(), "stream_type"_a = "plain", "checkpoints"_a = 0,
          "interval_ms"_a = 0, "send_zero_pages"_a = false,
          "xl_config"_a = py::none(), "policy"_a = py::none(),
          "suspend"_a = py::none(), "checkpoint"_a = py::none(),
          "copy_threads"_a = 1,
          "Save a sim domain to fd in-process (tests, benchmarks); returns "
          "the stats (max_iters, dirty_threshold 0: Xen's default policy).  "
          "policy(iteration, total_written, dirty_count) -> "
          "-1/0/1, suspend() -> bool, checkpoint() -> int.  copy_threads > 1 "
          "writes PAGE_DATA into a regular file with that many threads "
          "(stats: threaded_bytes, copy_threads).");
    m.def("engine_restore", &engine_restore, "fd"_a, "path"_a,
          "wrap"_a = "libxc", "max_pages"_a = 0, py::kw_only(),
          "stream_type"_a = "plain", "checkpoint"_a = py::none(),
          "Restore a sim domain from fd in-process; reads exactly the "
          "stream.  checkpoint() -> 1 go on / 2 failover / 0 error (remus).");
}

} // namespace xcsave_ext
