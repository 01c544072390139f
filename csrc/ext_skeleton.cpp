// ext_skeleton.cpp - stream skeletons for xcsave._ext (the native code is
// csrc/core/skeleton.c; the file format around the body is
// xcsave/skeleton.py's, docs/skeletons.md).
//
//   skeleton_make(fd, fmt="auto", stream_type="plain") -> (bytes, dict)
//       The body of the stream in the regular file fd (from its offset) and
//       what the walk found (skeleton_walk's dict, with stream_xxh64).
//
//   skeleton_walk(body, fmt, stream_type="plain", out_fd=-1) -> dict
//       Walk a body; with out_fd, write the inflated stream to it.  The
//       dict: format, stream_size, body_size, pages, zero_pages, trailing,
//       records (a list of (layer, name, type, offset, length, count,
//       pages)), xl / libxl / libxc (header fields or None), checkpoints,
//       ended.
//
//   skeleton_page(digest) -> bytes; skeleton_digest(page) -> int: one page.
//
// An invalid stream or body raises xcsave.errors.StreamError(reason,
// offset=, record=); I/O errors OSError; bad arguments ValueError.  The
// walks release the GIL.
#include "ext_common.hpp"

#include <pybind11/stl.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

extern "C" {
#include "xcs_skeleton.h"
}

namespace xcsave_ext {

namespace {

enum xcs_fmt skel_fmt(const std::string &s, bool allow_auto)
{
    xcs_fmt f;

    if (allow_auto ? named(xcs_fmt_parse, s, {XCS_FMT_AUTO, XCS_FMT_XL, XCS_FMT_LIBXL,
                                               XCS_FMT_LIBXC}, &f)
                   : named(xcs_fmt_parse, s, {XCS_FMT_XL, XCS_FMT_LIBXL, XCS_FMT_LIBXC}, &f))
        return f;
    throw py::value_error(std::string("skeleton format must be ") +
                          (allow_auto ? "auto, " : "") + "xl, libxl or libxc, not " + s);
}

enum xcs_stream_type skel_type(const std::string &s)
{
    xcs_stream_type t;

    if (!named(xcs_stream_type_parse, s, &t))
        throw py::value_error("stream type must be plain, remus or colo, not " + s);
    return t;
}

// info, released however the call ends.
struct Info {
    struct xcs_skel_info i;
    Info() { std::memset(&i, 0, sizeof(i)); }
    ~Info() { xcs_skel_info_release(&i); }
    Info(const Info &) = delete;
    Info &operator=(const Info &) = delete;
};

py::dict info_dict(const struct xcs_skel_info &in)
{
    py::dict d;
    py::list records;
    py::str libxc("libxc"), libxl("libxl");

    for (size_t k = 0; k < in.nrecords; k++) {
        const struct xcs_skel_record &r = in.records[k];
        bool xc = r.layer == XCS_SKEL_LIBXC;
        const char *name = xc ? xcs_libxc_rec_name(r.type) : xcs_libxl_rec_name(r.type);

        records.append(py::make_tuple(xc ? libxc : libxl, name, r.type, r.offset, r.length,
                                      r.count, r.pages));
    }
    put(d, "format", xcs_fmt_name(in.fmt), "stream_size", in.stream_size, "body_size",
        in.body_size, "pages", in.pages, "zero_pages", in.zero_pages, "trailing", in.trailing,
        "records", records, "checkpoints", in.checkpoints);
    d["ended"] = in.ended == 1 ? py::object(py::str("end"))
                 : in.ended == 2 ? py::object(py::str("eof"))
                                 : py::none();
    const struct xcs_stream_headers &h = in.hdrs;
    if (h.xl) {
        py::dict x;
        put(x, "mandatory_flags", h.xl_hdr.mflags, "optional_flags", h.xl_hdr.oflags,
            "optional_len", h.xl_hdr.optlen, "config_len", h.xl_config_len);
        d["xl"] = x;
    } else {
        d["xl"] = py::none();
    }
    if (h.libxl) {
        py::dict x;
        put(x, "version", h.libxl_hdr.version, "options", h.libxl_hdr.options);
        d["libxl"] = x;
    } else {
        d["libxl"] = py::none();
    }
    if (h.libxc) {
        py::dict x;
        put(x, "version", h.ihdr.version, "options", h.ihdr.options, "offset",
            in.libxc_offset, "guest",
            h.dhdr.type == XCS_DHDR_TYPE_X86_PV    ? "pv"
            : h.dhdr.type == XCS_DHDR_TYPE_X86_HVM ? "hvm"
                                                   : "?",
            "domain_type", h.dhdr.type, "page_shift", h.dhdr.page_shift, "xen_major",
            h.dhdr.xen_major, "xen_minor", h.dhdr.xen_minor);
        d["libxc"] = x;
    } else {
        d["libxc"] = py::none();
    }
    return d;
}

// One walk into info: fmt and stream_type parsed, then walk(f, t, &info.i)
// (an xcs_skel_* call, which touches no Python object) run without the GIL.
// Its rc 0 returns; the rest raises: an invalid stream StreamError, else
// OSError from its errno.
template <class Walk>
void run_walk(Info &info, const std::string &fmt, bool allow_auto, const std::string &stream_type,
              Walk walk)
{
    enum xcs_fmt f = skel_fmt(fmt, allow_auto);
    enum xcs_stream_type t = skel_type(stream_type);
    int rc, err;

    {
        py::gil_scoped_release nogil;
        rc = walk(f, t, &info.i);
        err = errno;
    }
    if (rc == 0)
        return;
    if (rc == XCS_SKEL_INVALID)
        raise_stream_error(info.i.err.reason, info.i.err.offset, info.i.err.record);
    raise_errno_reason(err, info.i.err.reason, py::none());
}

std::pair<py::bytes, py::dict> skeleton_make(int fd, const std::string &fmt, const std::string &stream_type)
{
    Info info;
    uint8_t *body = nullptr;
    size_t len = 0;

    // owned frees the body however the call ends (a walk that fails has none)
    std::unique_ptr<uint8_t, decltype(&std::free)> owned(nullptr, &std::free);
    run_walk(info, fmt, true, stream_type,
             [&](enum xcs_fmt f, enum xcs_stream_type t, struct xcs_skel_info *i) {
                 int rc = xcs_skel_make(fd, f, t, &body, &len, i);

                 owned.reset(body); // frees no previous body: errno stays the call's
                 return rc;
             });
    py::dict d = info_dict(info.i);
    d["stream_xxh64"] = info.i.stream_xxh64;
    return {py::bytes(reinterpret_cast<const char *>(body), len), d};
}

py::dict skeleton_walk(const py::bytes &body, const std::string &fmt,
                       const std::string &stream_type, int out_fd)
{
    Info info;
    char *p = nullptr;
    ssize_t n = 0;

    if (PyBytes_AsStringAndSize(body.ptr(), &p, &n) < 0)
        throw py::error_already_set();
    // body is immutable and held by the caller for the call
    run_walk(info, fmt, false, stream_type,
             [&](enum xcs_fmt f, enum xcs_stream_type t, struct xcs_skel_info *i) {
                 return xcs_skel_inflate(reinterpret_cast<const uint8_t *>(p),
                                         static_cast<size_t>(n), f, t, out_fd, i);
             });
    return info_dict(info.i);
}

py::bytes skeleton_page(uint64_t digest)
{
    char page[XCS_PAGE_SIZE];

    xcs_skel_page(digest, reinterpret_cast<uint8_t *>(page));
    return py::bytes(page, sizeof(page));
}

uint64_t skeleton_digest(const py::bytes &page)
{
    std::string p = page;

    if (p.size() != XCS_PAGE_SIZE)
        throw py::value_error("a page is 4096 bytes, not " + std::to_string(p.size()));
    return xcs_skel_digest(reinterpret_cast<const uint8_t *>(p.data()));
}

} // namespace

void register_skeleton(py::module_ &m)
{
    m.attr("SKELETON_BODY_MAX") = XCS_SKEL_BODY_MAX;
    m.def("skeleton_make", &skeleton_make, py::arg("fd"), py::arg("fmt") = "auto",
          py::arg("stream_type") = "plain",
          "The skeleton body of the stream in the regular file fd, and what the walk found.");
    m.def("skeleton_walk", &skeleton_walk, py::arg("body"), py::arg("fmt"),
          py::arg("stream_type") = "plain", py::arg("out_fd") = -1,
          "Walk a skeleton body (out_fd: write the inflated stream there); what it found.");
    m.def("skeleton_page", &skeleton_page, py::arg("digest"),
          "The page a skeleton inflates for a digest.");
    m.def("skeleton_digest", &skeleton_digest, py::arg("page"),
          "A page's skeleton digest (XXH64, seed 0).");
}

} // namespace xcsave_ext
