// ext_common.hpp - shared declarations of the xcsave._ext pybind11 module.
//
// The module is split by topic, one file each (psutil-style): xcsave_ext.cpp
// defines the module and calls the register_* functions below.  Exception
// classes live in Python (xcsave/errors.py); C++ only maps onto them.
#pragma once

#include <pybind11/pybind11.h>

#include <initializer_list>
#include <string>

#include "codec.h"

namespace xcsave_ext {

namespace py = pybind11;

void register_sim(py::module_ &m);    // ext_sim.cpp: simulated domains
void register_stream(py::module_ &m); // ext_stream.cpp: inspect/verify/convert
void register_skeleton(py::module_ &m); // ext_skeleton.cpp: stream skeletons

// A format or stream type by its name in codec.c's table (parse is
// xcs_fmt_parse or xcs_stream_type_parse); a name with a NUL in it is none.
template <typename E>
bool named(int (*parse)(const char *, E *), const std::string &name, E *out)
{
    return name.find('\0') == std::string::npos && parse(name.c_str(), out) == 0;
}

// The same, if it is one of allowed: each entry point takes its own subset
// and words its own refusal.
template <typename E>
bool named(int (*parse)(const char *, E *), const std::string &name,
           std::initializer_list<E> allowed, E *out)
{
    if (!named(parse, name, out))
        return false;
    for (E v : allowed)
        if (v == *out)
            return true;
    return false;
}

// d[key] = value for each (key, value) pair, in order: a C struct's
// fields copied into the dict Python reads.
inline void put(py::dict &) {}

template <typename V, typename... Rest>
void put(py::dict &d, const char *key, const V &value, const Rest &...rest)
{
    d[key] = value;
    put(d, rest...);
}

// Raise OSError (the right subclass for errno) naming what failed.
[[noreturn]] void raise_errno(int err, const std::string &what);

// Raise OSError(err, text, filename) for a failure the native code
// described itself ("read: Is a directory (EISDIR)"): text is that reason
// without its trailing errno name (Python's one-line text adds the name
// once), or strerror(err) when there is none; filename is the path the
// caller opened, or None for an fd it was given.
[[noreturn]] void raise_errno_reason(int err, const std::string &reason,
                                     const py::object &filename);

// Raise xcsave.errors.<name>(*args, **kwargs); name is a class in
// xcsave/errors.py (the one place the extension's own errors are made).
[[noreturn]] void raise_xcsave(const char *name, const py::tuple &args,
                               const py::dict &kwargs);

// Raise xcsave.errors.StreamError(reason, offset=, record=) (record None
// when empty): an invalid stream, where and why.
[[noreturn]] void raise_stream_error(const std::string &reason, uint64_t offset,
                                     const std::string &record);

} // namespace xcsave_ext
