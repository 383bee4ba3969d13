"""The examples in docs/python.md, docs/c-api.md and README.md run: every ```python block as a
script, every ```cpp and ```c block compiled against this build and run (README's with stand-ins
for what the reader supplies)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import lim
from conftest import REPO

DOCS = REPO / "docs"


def blocks(page: str, lang: str):
    text = (REPO / page if page == "README.md" else DOCS / page).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


def segment_names(code: str):
    return re.findall(r'open_or_create\("([A-Za-z0-9._-]+)"', code)


def run_env():
    return dict(os.environ, PYTHONPATH=str(REPO / "python"))


def build_flags(tmp_path):
    inc = os.environ.get("LIM_INCLUDE_DIR") or str(REPO / "lib" / "include")
    libdir = os.environ.get("LIM_LIBRARY_DIR")
    if not libdir:
        if not os.environ.get("LIM_LIBRARY"):
            pytest.skip("LIM_LIBRARY_DIR / LIM_LIBRARY not set (run through ctest)")
        libdir = str(Path(os.environ["LIM_LIBRARY"]).parent)
    return [f"-I{inc}", f"-L{libdir}", "-llim", f"-Wl,-rpath,{libdir}"]


@pytest.mark.parametrize("index", range(len(blocks("python.md", "python"))))
def test_python_md_python_examples(index, tmp_path):
    code = blocks("python.md", "python")[index]
    try:
        r = subprocess.run([sys.executable, "-c", code], env=run_env(), capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        for name in segment_names(code):
            lim.Segment.remove(name)


def compile_and_run(code: str, suffix: str, compiler: list, tmp_path):
    src = tmp_path / f"example{suffix}"
    src.write_text(code)
    exe = tmp_path / "example"
    r = subprocess.run(compiler + [str(src), "-o", str(exe)] + build_flags(tmp_path),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    try:
        r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout
    finally:
        for name in segment_names(code):
            lim.Segment.remove(name)


def test_python_md_cpp_worker(tmp_path):
    (code,) = blocks("python.md", "cpp")
    out = compile_and_run(code, ".cpp", ["g++", "-std=c++20", "-Wall", "-Werror"], tmp_path)
    assert "in flight now: 0" in out


def test_c_api_md_example(tmp_path):
    (code,) = blocks("c-api.md", "c")
    out = compile_and_run(code, ".c", ["cc", "-std=c11", "-Wall", "-Wextra", "-Werror"],
                          tmp_path)
    assert "in flight 1 of 4, bytes 1500" in out
    assert "open: not_found:" in out


# README.md's snippets name things the reader supplies (a query, an HTTP call, a body); these
# stand-ins make them whole programs, the code in between is the README's as written.
README_CPP_PRELUDE = """#include <string>
#include <utility>
#include <vector>

#include <lim/lim.hpp>

namespace {
struct Response {
    int status = 429;
    std::vector<std::pair<std::string, std::string>> headers{{"Retry-After", "1"}};
};
void run_query() {}
Response http_post(const std::string&, const std::string&) { return {}; }
}  // namespace

int main() {
    const std::string url = "https://api.example.com/", body = "{}";
"""


def test_readme_cpp_example(tmp_path):
    (code,) = blocks("README.md", "cpp")
    name = f"docs-readme-cpp-{os.getpid()}"  # not "myapp": a real segment may have that name
    code = code.replace("#include <lim/lim.hpp>\n", "").replace('"myapp"', f'"{name}"')
    program = README_CPP_PRELUDE + code + """
    std::printf("backoff %d, emails in flight %g\\n", api.snapshot().backoff_active ? 1 : 0,
                emails.in_flight(lim::Clock::now()));
    lim::Segment::remove(NAME);
}
""".replace("NAME", f'"{name}"')
    program = "#include <cstdio>\n" + program
    out = compile_and_run(program, ".cpp", ["g++", "-std=c++20", "-Wall", "-Werror"], tmp_path)
    assert "backoff 1, emails in flight 1" in out


def test_readme_python_example(tmp_path):
    (code,) = blocks("README.md", "python")
    name = f"docs-readme-py-{os.getpid()}"
    code = 'body = b"{}"\n' + code.replace('"myapp"', f'"{name}"')
    try:
        r = subprocess.run([sys.executable, "-c", code], env=run_env(), capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        lim.Segment.remove(name)
