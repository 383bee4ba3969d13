// Running limctl from tests: capture stdout, stderr and the exit code; normalise what varies
// between runs (pids, times, the segment name) so that output can be compared with golden files.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

namespace lim::test {

struct Run {
    int code = -1;
    std::string out;
    std::string err;
};

inline std::string slurp(const std::string& path) {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// Runs `limctl <args>` through the shell (args are quoted by the caller where needed).
inline Run limctl(const std::string& args, const std::string& prefix = "") {
    const std::string dir = "/tmp/limctl-test-" + std::to_string(::getpid());
    std::system(("mkdir -p " + dir).c_str());
    const std::string cmd =
        prefix + std::string(LIMCTL_PATH) + " " + args + " >" + dir + "/out 2>" + dir + "/err";
    Run r;
    const int status = std::system(cmd.c_str());
    r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(dir + "/out");
    r.err = slurp(dir + "/err");
    return r;
}

// Replaces the segment name, the given pids, and dates with placeholders.
inline std::string normalise(std::string text, const std::string& segment,
                             const std::vector<int>& pids) {
    text = std::regex_replace(text, std::regex(segment), "<SEG>");
    for (int pid : pids) {
        text = std::regex_replace(text, std::regex("\\b" + std::to_string(pid) + "\\b"), "<PID>");
    }
    text = std::regex_replace(text, std::regex(R"(\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\dZ?)"), "<TIME>");
    // Column widths follow the widths of what was replaced: compare cells, not padding.
    text = std::regex_replace(text, std::regex(" {2,}"), "  ");
    text = std::regex_replace(text, std::regex("(^|\n) +"), "$1");
    return text;
}

// Compares `actual` with tests/limctl/golden/<name>; LIM_UPDATE_GOLDEN=1 rewrites the file.
inline void check_golden(const std::string& name, const std::string& actual) {
    const std::string path = std::string(GOLDEN_DIR) + "/" + name;
    if (std::getenv("LIM_UPDATE_GOLDEN")) {
        std::ofstream(path) << actual;
        MESSAGE("updated " << path);
        return;
    }
    const std::string expected = slurp(path);
    CAPTURE(name);
    CHECK_MESSAGE(actual == expected, "golden file differs:\n--- expected\n"
                                          << expected << "\n--- actual\n"
                                          << actual);
}

}  // namespace lim::test
