// xcsave_ext.cpp - the xcsave._ext module: native fast paths Python calls
// in-process (simulated domains, stream inspection, verification and
// conversion).  Save and restore proper run in the helper process, never here.
#include "ext_common.hpp"

#include <cerrno>
#include <cstring>

namespace xcsave_ext {

void raise_errno(int err, const std::string &what)
{
    errno = err;
    PyErr_SetFromErrnoWithFilename(PyExc_OSError, what.c_str());
    throw py::error_already_set();
}

void raise_errno_reason(int err, const std::string &reason, const py::object &filename)
{
    std::string text = reason.empty() ? std::string(std::strerror(err)) : reason;
    // Drop a trailing " (ENAME)": an upper-case errno name in parentheses.
    size_t open = text.rfind(" (");
    if (open != std::string::npos && text.back() == ')' &&
        text.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", open + 2) ==
            text.size() - 1)
        text.resize(open);
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "isO", err, text.c_str(),
                                          filename.ptr());
    if (exc) {
        PyErr_SetObject(reinterpret_cast<PyObject *>(Py_TYPE(exc)), exc);
        Py_DECREF(exc);
    }
    throw py::error_already_set();
}

void raise_xcsave(const char *name, const py::tuple &args, const py::dict &kwargs)
{
    py::object cls = py::module_::import("xcsave.errors").attr(name);
    py::object exc = cls(*args, **kwargs);

    PyErr_SetObject(cls.ptr(), exc.ptr());
    throw py::error_already_set();
}

void raise_stream_error(const std::string &reason, uint64_t offset, const std::string &record)
{
    py::dict kw;

    kw["offset"] = offset;
    kw["record"] = record.empty() ? py::object(py::none()) : py::object(py::str(record));
    raise_xcsave("StreamError", py::make_tuple(reason), kw);
}

} // namespace xcsave_ext

PYBIND11_MODULE(_ext, m)
{
    m.doc() = "xcsave native fast paths (simulated domains, stream tools)";
    m.attr("BACKENDS") = XCS_BACKENDS;
    xcsave_ext::register_sim(m);
    xcsave_ext::register_stream(m);
    xcsave_ext::register_skeleton(m);
}
