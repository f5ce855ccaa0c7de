"""Build the private compiled kernels ``cellmigrate._kernels`` from ``cython/``.

Environment switches (all off by default, so a wheel is baseline and portable):

* ``CELLMIGRATE_CYTHON_DEBUG=1`` turns bounds, wraparound and initialization checks
  back on and compiles with ``-O0 -g`` (for debugging or sanitizer runs).
* ``CELLMIGRATE_MARCH=<arch>`` adds ``-march=<arch>`` for a builder who opts in to a
  CPU-specific build. Wheels never set it: SIMD paths are chosen at run time instead.
* ``CELLMIGRATE_SANITIZE=address,undefined`` builds with those sanitizers.
"""

import glob
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("CELLMIGRATE_CYTHON_DEBUG", "") not in ("", "0")
MARCH = os.environ.get("CELLMIGRATE_MARCH", "").strip()
SANITIZE = os.environ.get("CELLMIGRATE_SANITIZE", "").strip()

# One place for every directive: fast by default, checked in debug builds.
directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
    "freethreading_compatible": True,
}

compile_args = []
link_args = []
if sys.platform != "win32":
    compile_args += ["-O0", "-g"] if DEBUG else ["-O3"]
    compile_args += ["-fno-strict-aliasing"]
    # POSIX threads: the whole-state passes start their own (cm_claims.h).
    compile_args.append("-pthread")
    link_args.append("-pthread")
    if MARCH:
        compile_args.append(f"-march={MARCH}")
    if SANITIZE:
        compile_args += [f"-fsanitize={SANITIZE}", "-fno-omit-frame-pointer"]
        link_args += [f"-fsanitize={SANITIZE}"]
else:
    compile_args += ["/O2"]

extensions = [
    Extension(
        "cellmigrate._kernels",
        sources=["cython/_kernels.pyx"],
        include_dirs=["cython"],
        # Rebuild when a C header changes, not only the .pyx/.pxi Cython tracks.
        depends=sorted(glob.glob("cython/*.h")),
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["cython"],
    ),
)
