"""The package installs offline with Debian's pip into a venv, finds liblim, and its version is
the C++ library's."""

import os
import re
import shutil
import subprocess
import sys
import venv

import pytest

import lim
from conftest import REPO


def cmake_project_version() -> str:
    text = (REPO / "CMakeLists.txt").read_text()
    m = re.search(r"project\(\s*lim\s+VERSION\s+([0-9.]+)", text)
    assert m, "no project(lim VERSION ...) in CMakeLists.txt"
    return m.group(1)


def test_version_follows_the_library():
    assert lim.__version__ == cmake_project_version()
    if os.environ.get("LIM_PROJECT_VERSION"):
        assert lim.__version__ == os.environ["LIM_PROJECT_VERSION"]
    from lim import _lib
    assert _lib.lib.lim_version().decode() == lim.__version__


def test_pip_install_offline_into_a_venv(tmp_path):
    have = subprocess.run([sys.executable, "-c", "import setuptools, wheel, pip"],
                          capture_output=True, text=True)
    if have.returncode != 0:
        pytest.skip(f"python3-pip/-setuptools/-wheel missing: {have.stderr}")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = str(env_dir / "bin" / "python")
    # The venv has no pip of its own: run the system pip with the venv's interpreter.
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "python", src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                         "__pycache__"))
    r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-index",
                        str(src)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    check = ("import lim, pathlib; "
             "assert 'venv' in lim.__file__, lim.__file__; "
             "assert pathlib.Path(lim.__file__).with_name('py.typed').exists(); "
             "print(lim.__version__, lim.parse_retry_after('120'))")
    r = subprocess.run([py, "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [lim.__version__, "120.0"]


def test_library_found_beside_the_prefix(tmp_path):
    """Without LIM_LIBRARY, an installed package finds liblim in its prefix's lib directory."""
    lib = os.environ.get("LIM_LIBRARY")
    if not lib:
        pytest.skip("needs LIM_LIBRARY to know which liblim to copy")
    prefix = tmp_path / "prefix"
    site = prefix / "lib" / "python3" / "dist-packages"
    site.mkdir(parents=True)
    (prefix / "lib" / "liblim.so").symlink_to(os.path.realpath(lib))
    shutil.copytree(REPO / "python" / "lim", site / "lim")
    env = {k: v for k, v in os.environ.items() if k not in ("LIM_LIBRARY", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", "import lim; print(lim.library_path())"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(prefix / "lib" / "liblim.so")


def test_pip_prefix_finds_cmake_prefix(tmp_path):
    """docs/python.md: `cmake --install --prefix P` plus `pip install --prefix P` find each other,
    with no LIM_LIBRARY. Debian's pip puts the package under P/local/lib/python3.X/dist-packages
    while CMake puts liblim in P/lib."""
    lib = os.environ.get("LIM_LIBRARY")
    if not lib:
        pytest.skip("needs LIM_LIBRARY to know which liblim to copy")
    have = subprocess.run([sys.executable, "-c", "import setuptools, wheel, pip"],
                          capture_output=True, text=True)
    if have.returncode != 0:
        pytest.skip(f"python3-pip/-setuptools/-wheel missing: {have.stderr}")
    prefix = tmp_path / "prefix"
    (prefix / "lib").mkdir(parents=True)
    (prefix / "lib" / "liblim.so").symlink_to(os.path.realpath(lib))  # where CMake installs it
    src = tmp_path / "src"
    shutil.copytree(REPO / "python", src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                         "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("LIM_LIBRARY", "PYTHONPATH")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                        "--no-index", "--no-deps", "--prefix", str(prefix), str(src)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    inits = list(prefix.rglob("lim/__init__.py"))
    assert len(inits) == 1, inits
    env["PYTHONPATH"] = str(inits[0].parent.parent)
    r = subprocess.run([sys.executable, "-c", "import lim; print(lim.library_path())"],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(prefix / "lib" / "liblim.so")


def test_documented_pip_commands_install_offline(tmp_path):
    """Every `pip install ... ./python` line of README.md and docs/python.md works with no
    network: run as written (into a scratch --prefix), with pip's index switched off."""
    have = subprocess.run([sys.executable, "-c", "import setuptools, wheel, pip"],
                          capture_output=True, text=True)
    if have.returncode != 0:
        pytest.skip(f"python3-pip/-setuptools/-wheel missing: {have.stderr}")
    commands = []
    for page in (REPO / "README.md", REPO / "docs" / "python.md"):
        for line in page.read_text().splitlines():
            m = re.search(r"pip install ((?:--?[\w-]+ )*)\./python\b", line)
            if m:
                commands.append((page.name, m.group(1).split()))
    assert len(commands) >= 3, commands
    shutil.copytree(REPO / "python", tmp_path / "python",
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    for i, (page, flags) in enumerate(commands):
        r = subprocess.run([sys.executable, "-m", "pip", "install", *flags, "--prefix",
                            str(tmp_path / f"prefix{i}"), "./python"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{page}: pip install {' '.join(flags)} ./python\n" + r.stderr


def test_a_bad_lim_library_fails_the_import_naming_it(tmp_path):
    env = dict(os.environ, LIM_LIBRARY=str(tmp_path / "no-such-liblim.so"),
               PYTHONPATH=str(REPO / "python"))
    r = subprocess.run([sys.executable, "-c", "import lim"], env=env, capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "LIM_LIBRARY" in r.stderr, r.stderr
