// ext_stream.cpp - stream inspection, verification and legacy conversion
// for xcsave._ext (the native code is csrc/core/scan.c and legacy.c).
//
//   scan(src, fmt="auto", stream_type="plain", width=0, guest="",
//        allow_trailing=False) -> dict
//       src is an fd (int, read from its current offset, not closed) or a
//       path.  The report dict always comes back, valid or not: an invalid
//       stream has report["valid"] False and report["error"] =
//       {"offset", "layer", "record", "type", "reason"}, so Python gets
//       where and why separately (xcsave.streamtools turns it into
//       xcsave.errors.StreamError when it wants an exception).  I/O errors
//       raise OSError.
//
//   sniff_format(head) -> str | None; FORMATS, STREAM_TYPES: the C name tables.
//
//   convert_legacy(in_fd, out_fd, width, guest, fmt="libxc", xl_in=False,
//                  xl_out=False, stream_type="plain", skip_qemu=False) -> dict
//       Converts and returns statistics (kernel_copied_bytes: page data
//       moved fd to fd by copy_file_range/sendfile/splice, never through
//       this process; 0 with XCSAVE_NO_SPLICE=1).  An invalid or unconvertible input
//       raises xcsave.errors.StreamError(reason, offset=, record=); bad
//       arguments raise ValueError; I/O errors OSError.
//
// Both release the GIL for the native work.
#include "ext_common.hpp"

#include <pybind11/stl.h>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

extern "C" {
#include "xcs_legacy.h"
#include "xcs_scan.h"
}

namespace xcsave_ext {

namespace {

enum xcs_fmt parse_fmt(const std::string &s)
{
    xcs_fmt f;

    if (!named(xcs_fmt_parse, s, &f))
        throw py::value_error("format must be auto, xl, libxl, libxc or legacy, not " + s);
    return f;
}

enum xcs_stream_type parse_stream_type(const std::string &s)
{
    xcs_stream_type t;

    if (!named(xcs_stream_type_parse, s, &t))
        throw py::value_error("stream type must be plain, remus or colo, not " + s);
    return t;
}

enum xcs_guest parse_guest(const std::string &s, bool allow_empty)
{
    if (s == "pv")
        return XCS_GUEST_PV;
    if (s == "hvm")
        return XCS_GUEST_HVM;
    if (allow_empty && s.empty())
        return XCS_GUEST_UNKNOWN;
    throw py::value_error("guest must be pv or hvm, not '" + s + "'");
}

py::object guest_name(enum xcs_guest g)
{
    if (g == XCS_GUEST_PV)
        return py::str("pv");
    if (g == XCS_GUEST_HVM)
        return py::str("hvm");
    return py::none();
}

// An fd we opened (path) or were given (borrowed).
class InputFd {
  public:
    explicit InputFd(const py::object &src)
    {
        if (py::isinstance<py::int_>(src)) {
            fd_ = src.cast<int>();
            return;
        }
        std::string path = py::module_::import("os").attr("fspath")(src).cast<std::string>();
        name_ = py::str(path);
        {
            py::gil_scoped_release nogil;
            fd_ = open(path.c_str(), O_RDONLY | O_CLOEXEC);
        }
        if (fd_ < 0)
            raise_errno(errno, path);
        owned_ = true;
    }
    ~InputFd()
    {
        if (owned_)
            close(fd_);
    }
    InputFd(const InputFd &) = delete;
    InputFd &operator=(const InputFd &) = delete;
    int fd() const { return fd_; }
    // The path opened, or None for a borrowed fd (the caller names it).
    const py::object &name() const { return name_; }

  private:
    py::object name_ = py::none();
    int fd_ = -1;
    bool owned_ = false;
};

// A pfn, or None where there is no page entry to take it from.
py::object pfn_or_none(uint64_t entries, uint64_t pfn)
{
    return entries ? py::object(py::int_(pfn)) : py::none();
}

py::dict records_dict(const uint64_t *count, const uint64_t *bytes, unsigned n,
                      const char *(*name)(uint32_t))
{
    py::dict d;
    for (unsigned i = 0; i < n; i++) {
        if (!count[i])
            continue;
        py::dict e;
        e["count"] = count[i];
        e["bytes"] = bytes[i];
        d[name(i)] = e;
    }
    return d;
}

py::dict legacy_dict(const struct xcs_legacy_report &l)
{
    py::dict d, chunks;
    d["width"] = l.width;
    d["guessed"] = bool(l.width_guessed);
    d["p2m_size"] = l.p2m_size;
    d["guest_width"] = l.guest_width;
    d["pt_levels"] = l.pt_levels;
    d["vcpu_ctx_size"] = l.vcpu_ctx_size;
    d["extv"] = bool(l.extv);
    d["xsave_len"] = l.xsave_len;
    for (int i = 0; i < XCS_LEGACY_NR_CHUNKS; i++)
        if (l.chunks[i])
            chunks[xcs_legacy_chunk_name(-i)] = l.chunks[i];
    d["chunks"] = chunks;
    d["batches"] = l.batches;
    d["images"] = l.images;
    d["last_checkpoint_seen"] = bool(l.last_checkpoint_seen);
    d["qemu_signature"] = l.qemu_sig[0] ? py::object(py::str(l.qemu_sig)) : py::none();
    d["qemu_len"] = l.qemu_len;
    d["toolstack_bytes"] = l.toolstack_bytes;
    d["unread_bytes"] = l.unread_bytes;
    return d;
}

py::dict report_dict(const struct xcs_scan_report &r, int rc)
{
    py::dict d;
    py::list layers, warnings;

    d["valid"] = rc == 0;
    d["format"] = xcs_fmt_name(r.format);
    d["stream_type"] = xcs_stream_type_name(r.stream_type);
    d["guest"] = guest_name(r.guest);
    if (r.xl) {
        py::dict x;
        layers.append("xl");
        x["mandatory_flags"] = r.xl_mflags;
        x["optional_flags"] = r.xl_oflags;
        x["optional_len"] = r.xl_optlen;
        x["config_len"] = r.xl_config_len;
        x["json"] = bool(r.xl_mflags & XCS_XL_MFLAG_JSON);
        x["streamv2"] = bool(r.xl_mflags & XCS_XL_MFLAG_STREAMV2);
        d["xl"] = x;
    } else {
        d["xl"] = py::none();
    }
    if (r.libxl) {
        py::dict x;
        layers.append("libxl");
        x["version"] = r.libxl_version;
        x["options"] = r.libxl_options;
        x["legacy"] = bool(r.libxl_options & XCS_LIBXL_OPT_LEGACY);
        x["records"] = records_dict(r.libxl_count, r.libxl_bytes, XCS_LIBXL_REC_TYPE_COUNT,
                                    xcs_libxl_rec_name);
        d["libxl"] = x;
    } else {
        d["libxl"] = py::none();
    }
    if (r.libxc) {
        py::dict x, opt;
        layers.append("libxc");
        x["version"] = r.libxc_version;
        x["options"] = r.libxc_options;
        x["xen_major"] = r.xen_major;
        x["xen_minor"] = r.xen_minor;
        x["converted"] = r.xen_major == 0;
        x["offset"] = r.libxc_offset;
        x["records"] = records_dict(r.libxc_count, r.libxc_bytes, XCS_REC_TYPE_COUNT,
                                    xcs_libxc_rec_name);
        opt["count"] = r.optional_count;
        opt["bytes"] = r.optional_bytes;
        x["optional"] = opt;
        x["pv_width"] = r.pv_width;
        x["pv_levels"] = r.pv_levels;
        x["p2m_end_pfn"] = r.p2m_end_pfn;
        d["libxc"] = x;
    } else {
        d["libxc"] = py::none();
    }
    if (r.legacy.width) {
        layers.append("legacy");
        d["legacy"] = legacy_dict(r.legacy);
    } else {
        d["legacy"] = py::none();
    }
    d["layers"] = layers;

    py::dict pages;
    put(pages, "data", r.pages, "unique", r.pages_unique, "entries", r.page_entries,
        "xtab", r.xtab, "broken", r.broken, "xalloc", r.xalloc,
        "min_pfn", pfn_or_none(r.page_entries, r.min_pfn),
        "max_pfn", pfn_or_none(r.page_entries, r.max_pfn), "max_batch", r.max_batch);
    d["pages"] = pages;
    d["vcpus"] = r.vcpus;
    d["hvm_params"] = r.hvm_params;
    d["checkpoints"] = r.checkpoints;
    d["ended"] = r.ended == 1 ? py::object(py::str("end"))
                 : r.ended == 2 ? py::object(py::str("eof"))
                                : py::none();
    d["discarded_records"] = r.discarded_records;
    d["qemu_trailer_len"] = r.qemu_trailer_len ? py::object(py::int_(r.qemu_trailer_len))
                                               : py::none();
    d["bytes"] = r.bytes;
    for (unsigned i = 0; i < r.nr_warnings; i++)
        warnings.append(py::str(r.warnings[i]));
    d["warnings"] = warnings;
    if (rc == XCS_SCAN_INVALID) {
        py::dict e;
        e["offset"] = r.error.offset;
        e["layer"] = py::str(r.error.layer);
        e["record"] = py::str(r.error.record);
        e["type"] = r.error.has_rtype ? py::object(py::int_(r.error.rtype)) : py::none();
        e["reason"] = py::str(r.error.reason);
        d["error"] = e;
    } else {
        d["error"] = py::none();
    }
    return d;
}

py::dict scan(const py::object &src, const std::string &fmt, const std::string &stream_type,
              unsigned width, const std::string &guest, bool allow_trailing)
{
    struct xcs_scan_opts opts;
    std::memset(&opts, 0, sizeof(opts));
    opts.fmt = parse_fmt(fmt);
    opts.stream_type = parse_stream_type(stream_type);
    if (width != 0 && width != 32 && width != 64)
        throw py::value_error("width must be 32 or 64");
    opts.legacy_width = width;
    opts.legacy_guest = parse_guest(guest, true);
    opts.flags = allow_trailing ? XCS_SCAN_ALLOW_TRAILING : 0;

    InputFd in(src);
    auto rep = std::make_unique<struct xcs_scan_report>();
    int rc, err;
    {
        py::gil_scoped_release nogil;
        rc = xcs_scan_fd(in.fd(), &opts, rep.get());
        err = errno;
    }
    if (rc < 0)
        raise_errno_reason(err, rep->error.reason, in.name());
    return report_dict(*rep, rc);
}

py::dict convert_legacy(int in_fd, int out_fd, unsigned width, const std::string &guest,
                        const std::string &fmt, bool xl_in, bool xl_out,
                        const std::string &stream_type, bool skip_qemu)
{
    struct xcs_legacy_opts opts;
    struct xcs_legacy_stats st;
    char err[512];
    int rc, e;

    std::memset(&opts, 0, sizeof(opts));
    std::memset(&st, 0, sizeof(st));
    opts.width = width;
    opts.guest = parse_guest(guest, false);
    if (!named(xcs_fmt_parse, fmt, {XCS_FMT_LIBXC, XCS_FMT_LIBXL}, &opts.out_format))
        throw py::value_error("output format must be libxc or libxl, not " + fmt);
    opts.in_has_xl_header = xl_in;
    opts.out_xl_header = xl_out;
    opts.stream_type = parse_stream_type(stream_type);
    opts.skip_qemu = skip_qemu;
    opts.stats = &st;
    {
        py::gil_scoped_release nogil;
        rc = xcs_legacy_convert(in_fd, out_fd, &opts, err, sizeof(err));
        e = errno;
    }
    switch (rc) {
    case 0:
        break;
    case XCS_LEGACY_EIO:
        raise_errno_reason(e, st.err_reason[0] ? st.err_reason : err, py::none());
    case XCS_LEGACY_EARG:
        throw py::value_error(st.err_reason);
    default:
        raise_stream_error(st.err_reason, st.err_offset, st.err_chunk);
    }
    py::dict d;
    put(d, "in_bytes", st.in_bytes, "out_bytes", st.out_bytes,
        "kernel_copied_bytes", st.kernel_copied_bytes, "pages", st.pages,
        "page_entries", st.page_entries, "min_pfn", pfn_or_none(st.page_entries, st.min_pfn),
        "max_pfn", pfn_or_none(st.page_entries, st.max_pfn), "vcpus", st.vcpus,
        "checkpoints", st.checkpoints,
        "failover", st.failover ? py::object(py::str(st.failover_reason)) : py::none(),
        "legacy", legacy_dict(st.legacy));
    return d;
}

// The format a stream's head announces (it goes on past head): "xl",
// "libxl", "libxc", "legacy" (8 bytes or more without a magic), or None for
// fewer than 8 bytes.  scan.c's detection, on a peek.
std::optional<std::string> sniff_format(const py::bytes &head)
{
    std::string h = head;
    enum xcs_fmt f = xcs_fmt_sniff(reinterpret_cast<const uint8_t *>(h.data()), h.size(), 1);

    if (f == XCS_FMT_AUTO)
        return std::nullopt;
    return std::string(xcs_fmt_name(f));
}

py::tuple name_table(const char *const *names, size_t n)
{
    py::tuple t(n);

    for (size_t i = 0; i < n; i++)
        t[i] = py::str(names[i]);
    return t;
}

} // namespace

void register_stream(py::module_ &m)
{
    // codec.c's name tables, in enum order (xcsave/formats.py holds the same).
    m.attr("FORMATS") = name_table(xcs_fmt_names, XCS_FMT_COUNT);
    m.attr("STREAM_TYPES") = name_table(xcs_stream_type_names, XCS_STREAM_TYPE_COUNT);
    m.def("sniff_format", &sniff_format, py::arg("head"),
          "The format a stream's first bytes announce: xl, libxl, libxc, legacy "
          "(no magic), or None under 8 bytes.");
    m.def("scan", &scan, py::arg("src"), py::arg("fmt") = "auto",
          py::arg("stream_type") = "plain", py::arg("width") = 0u, py::arg("guest") = "",
          py::arg("allow_trailing") = false,
          "Scan and verify a migration stream (fd or path); returns the report dict.");
    m.def("convert_legacy", &convert_legacy, py::arg("in_fd"), py::arg("out_fd"),
          py::arg("width"), py::arg("guest"), py::arg("fmt") = "libxc",
          py::arg("xl_in") = false, py::arg("xl_out") = false,
          py::arg("stream_type") = "plain", py::arg("skip_qemu") = false,
          "Convert a legacy (pre-4.6) stream to v3; returns statistics.");
}

} // namespace xcsave_ext
