"""cffi_modules (the native extension) and the man page; the rest of the
metadata is in pyproject.toml.

The man page cloneaware(1) is written at build time by tools/gen_manpage.py
from the command line being built (so it cannot drift from it) and
installed as share/man/man1/cloneaware.1 under the installation's prefix,
as the .deb installs it (issue 21, defect 19).  The Debian build writes its
own from the installed program (debian/rules) and sets
CLONEAWARE_NO_MANPAGE=1 to skip this one."""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
MANPAGE = os.path.join("build", "man", "cloneaware.1")


class BuildPyWithManpage(build_py):
    def run(self):
        super().run()
        if os.environ.get("CLONEAWARE_NO_MANPAGE") == "1":
            return
        out = os.path.join(HERE, MANPAGE)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run([sys.executable, os.path.join(HERE, "tools", "gen_manpage.py"),
                        "--output", out, "--readme", os.path.join(HERE, "README.md")],
                       check=True, env=env, cwd=HERE)


setup(
    cffi_modules=["native/build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithManpage},
    data_files=[] if os.environ.get("CLONEAWARE_NO_MANPAGE") == "1"
    else [("share/man/man1", [MANPAGE])],
)
