// ext_common.hpp - shared declarations of the xcsave._ext pybind11 module.
//
// The module is split by topic, one file each (psutil-style): xcsave_ext.cpp
// defines the module and calls the register_* functions below.  Exception
// classes live in Python (xcsave/errors.py); C++ only maps onto them.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace xcsave_ext {

namespace py = pybind11;

void register_sim(py::module_ &m);    // ext_sim.cpp: simulated domains
void register_stream(py::module_ &m); // ext_stream.cpp: inspect/verify/convert

// Raise OSError (the right subclass for errno) naming what failed.
[[noreturn]] void raise_errno(int err, const std::string &what);

// Raise xcsave.errors.<name>(message); name is a class in xcsave/errors.py.
[[noreturn]] void raise_xcsave(const char *name, const std::string &message);

} // namespace xcsave_ext
