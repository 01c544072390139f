"""Build xcsave: the pybind11 extension ``xcsave._ext`` and the helper executable.

The helper (``xcsave/xcsave-helper``) is a private libexec-style binary, like
Xen's ``libxl-save-helper``: it is linked into the package directory of the
build tree so that wheels, ``pip install .`` and ``pip install -e .`` all carry
it next to the extension, and it is never put on ``$PATH``.

Native sources:
  csrc/core/*.c        shared by the helper and the extension (stream engine,
                       simulated domains, legacy reader; the verifier scan.c
                       and the skeletons skeleton.c
                       are the extension's only)
  csrc/helper_main.c   the helper: argv, protocol loop, backend dispatch
  csrc/backend_*.c     helper backends; backend_xen.c only when xenguest.h is
                       found (Debian libxen-dev) unless XCSAVE_XEN=0
  csrc/tunnel_tls.c    the helper's TLS tunnel; with OpenSSL when its headers
                       are found (Debian libssl-dev) unless XCSAVE_TLS=0,
                       else a tunnel that fails with one line
  csrc/logdirty.c      the helper's one-shot log-dirty mode (xcsave plan of a
                       Xen domain); with libxenctrl when the xen backend is
                       built, else a mode that fails with one line
  csrc/wire*.c         the helper's wire pumps (wire-send/wire-recv); zstd
                       compression when zstd.h is found (Debian libzstd-dev)
                       unless XCSAVE_ZSTD=0, else --compress off only
  csrc/*.cpp           the extension (xcsave_ext.cpp holds the module)

Environment switches:
  XCSAVE_XEN=0|1              force the xen backend off/on (default: autodetect)
  XCSAVE_TLS=0|1              force the TLS tunnel off/on (default: autodetect)
  XCSAVE_ZSTD=0|1             force wire compression off/on (default: autodetect)
  XCSAVE_SANITIZE=address,... add -fsanitize=... to the helper (and the C core
                              objects the helper links)
  XCSAVE_SANITIZE_EXT=1       also build the extension with the sanitizers
                              (python must then run with libasan preloaded)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from glob import glob
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension
from pybind11.setup_helpers import build_ext as _pybind_build_ext
from setuptools import setup

HERE = Path(__file__).resolve().parent
HELPER_NAME = "xcsave-helper"
C_FLAGS = ["-std=c11", "-O2", "-g", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror"]
XEN_LIBS = ["xenguest", "xenctrl", "xentoollog"]


def _rel(paths: list[str]) -> list[str]:
    return sorted(os.path.relpath(p, HERE) for p in paths)


CORE_SOURCES = _rel(glob(str(HERE / "csrc" / "core" / "*.c")))
# The verifier and the skeletons serve the extension only: the helper
# restores and converts.
HELPER_CORE_SOURCES = [
    s for s in CORE_SOURCES if os.path.basename(s) not in ("scan.c", "skeleton.c")
]
EXT_SOURCES = _rel(glob(str(HERE / "csrc" / "*.cpp")))


def _xen_wanted(compiler_cmd: list[str]) -> bool:
    """Whether to build the xen backend: XCSAVE_XEN, else probe for xenguest.h."""
    return _wanted(compiler_cmd, "XCSAVE_XEN", ["xenctrl.h", "xenguest.h"])


def _tls_wanted(compiler_cmd: list[str]) -> bool:
    """Whether to build the TLS tunnel with OpenSSL: XCSAVE_TLS, else probe for ssl.h."""
    return _wanted(compiler_cmd, "XCSAVE_TLS", ["openssl/ssl.h"])


def _zstd_wanted(compiler_cmd: list[str]) -> bool:
    """Whether to build wire compression with libzstd: XCSAVE_ZSTD, else probe for zstd.h."""
    return _wanted(compiler_cmd, "XCSAVE_ZSTD", ["zstd.h"])


def _wanted(compiler_cmd: list[str], switch: str, headers: list[str]) -> bool:
    """The environment switch if set, else whether ``headers`` compile."""
    forced = os.environ.get(switch)
    if forced is not None:
        return forced not in ("0", "", "no", "off")
    probe = "".join(f"#include <{h}>\n" for h in headers) + "int main(void) { return 0; }\n"
    try:
        r = subprocess.run(
            [*compiler_cmd, "-x", "c", "-fsyntax-only", "-"],
            input=probe.encode(),
            capture_output=True,
            check=False,
        )
    except OSError:
        return False
    return r.returncode == 0


def _sanitize_flags() -> list[str]:
    san = os.environ.get("XCSAVE_SANITIZE", "").strip()
    if not san:
        return []
    return [f"-fsanitize={san}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]


class build_ext(_pybind_build_ext):
    """Build the extension, then the helper into the package directory."""

    def build_extensions(self) -> None:
        cc = self.compiler.compiler_so[0] if self.compiler.compiler_type == "unix" else "cc"
        self._have_xen = _xen_wanted([cc])
        self._have_tls = _tls_wanted([cc])
        self._have_zstd = _zstd_wanted([cc])
        backends = ["sim", *(["xen"] if self._have_xen else [])]
        defines = [("XCS_BACKENDS", '"' + ",".join(backends) + '"')]
        if self._have_xen:
            defines.append(("XCS_HAVE_XEN", "1"))
        if self._have_tls:
            defines.append(("XCS_HAVE_TLS", "1"))
        if self._have_zstd:
            defines.append(("XCS_HAVE_ZSTD", "1"))
        san = _sanitize_flags()
        include_dirs = [str(HERE / "csrc"), str(HERE / "csrc" / "core")]

        # The C core, once for the extension (no sanitizer unless asked) ...
        ext_san = san if os.environ.get("XCSAVE_SANITIZE_EXT") else []
        core_ext_objs = self.compiler.compile(
            CORE_SOURCES,
            output_dir=os.path.join(self.build_temp, "core-ext"),
            macros=defines,
            include_dirs=include_dirs,
            extra_postargs=[*C_FLAGS, *ext_san],
        )
        for ext in self.extensions:
            ext.extra_objects = [*core_ext_objs]
            ext.include_dirs = [*include_dirs, *ext.include_dirs]
            ext.define_macros = [*defines, *ext.define_macros]
            if ext_san:
                ext.extra_compile_args = [*ext.extra_compile_args, *ext_san]
                ext.extra_link_args = [*ext.extra_link_args, *ext_san]
        super().build_extensions()
        self._build_helper(defines, include_dirs, san)

    def _helper_build_path(self) -> str:
        return os.path.join(self.build_lib, "xcsave", HELPER_NAME)

    def _build_helper(
        self, defines: list[tuple[str, str]], include_dirs: list[str], san: list[str]
    ) -> None:
        sources = [
            "csrc/helper_main.c",
            "csrc/backend_sim.c",
            # the sched-cap mode; with the xen backend, built below as GNU C
            *([] if self._have_xen else ["csrc/sched_cap.c"]),
            "csrc/tunnel_tls.c",
            "csrc/wire.c",
            "csrc/wire_frame.c",
            *HELPER_CORE_SOURCES,
        ]
        libraries: list[str] = ["m", "pthread"]
        if self._have_tls:
            libraries = ["ssl", "crypto", *libraries]
        if self._have_zstd:
            libraries = ["zstd", *libraries]
        out_dir = os.path.join(self.build_temp, "helper")
        objs = self.compiler.compile(
            sources,
            output_dir=out_dir,
            macros=defines,
            include_dirs=include_dirs,
            extra_postargs=[*C_FLAGS, *san],
        )
        # Xen's public headers use anonymous unions: GNU C, not ISO C11.
        xen_flags = [("-std=gnu11" if f == "-std=c11" else f) for f in C_FLAGS]
        # The log-dirty mode (xcsave plan) uses libxenctrl when it is there.
        objs += self.compiler.compile(
            ["csrc/logdirty.c"],
            output_dir=out_dir,
            macros=defines,
            include_dirs=include_dirs,
            extra_postargs=[*xen_flags, *san],
        )
        if self._have_xen:
            objs += self.compiler.compile(
                ["csrc/backend_xen.c", "csrc/sched_cap.c"],
                output_dir=out_dir,
                macros=defines,
                include_dirs=include_dirs,
                extra_postargs=[*xen_flags, *san],
            )
            libraries = [*XEN_LIBS, *libraries]
        out = self._helper_build_path()
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # link_executable appends nothing on unix; the C driver links libc.
        self.compiler.link_executable(
            objs,
            HELPER_NAME,
            output_dir=os.path.dirname(out),
            libraries=libraries,
            extra_postargs=[*san],
            target_lang="c",
        )
        backends = "sim" + (", xen" if self._have_xen else "")
        tls = "OpenSSL" if self._have_tls else "not built (no libssl-dev)"
        zstd = "libzstd" if self._have_zstd else "not built (no libzstd-dev)"
        self.announce(
            f"xcsave: built {out} with backends: {backends}; TLS: {tls}; zstd: {zstd}", level=2
        )
        sys.stderr.write(
            f"xcsave: helper backends: {backends}; TLS tunnel: {tls}; wire zstd: {zstd}\n"
        )

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), self._helper_build_path()]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = dict(super().get_output_mapping())
        if self.inplace:
            mapping[self._helper_build_path()] = str(HERE / "xcsave" / HELPER_NAME)
        return mapping

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        # Copy beside and rename over: writing into the old file fails with
        # ETXTBSY while any helper from it is running (tests, benchmarks).
        dest = HERE / "xcsave" / HELPER_NAME
        tmp = dest.with_name(f".{HELPER_NAME}.{os.getpid()}.tmp")
        shutil.copy2(self._helper_build_path(), tmp)
        os.replace(tmp, dest)


setup(
    ext_modules=[
        Pybind11Extension(
            "xcsave._ext",
            EXT_SOURCES,
            cxx_std=17,
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
