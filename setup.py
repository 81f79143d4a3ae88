"""
The build's one part that setup.cfg cannot say: the splice engine's C extension
(epsproxy/proxy/_splice_engine.c, issue 14).  It is optional: where it cannot be built
(no C compiler, not Linux) the proxies splice in Python, as before, and say so at start.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(
        Extension(
            "epsproxy.proxy._splice_engine",
            ["epsproxy/proxy/_splice_engine.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    )

setup(ext_modules=extensions)
