// limctl watch in a real terminal (tmux): it draws the segment, refreshes as the limiter changes,
// quits on 'q', and leaves the terminal as it found it.
#include <unistd.h>

#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <thread>

#include "lim/lim.hpp"
#include "limctl/run.hpp"
#include "support/process.hpp"

using namespace lim;
using namespace std::chrono_literals;

namespace {

std::string sh(const std::string& cmd) {
    const std::string file = "/tmp/limctl-watch-" + std::to_string(::getpid());
    std::system((cmd + " >" + file + " 2>&1").c_str());
    return lim::test::slurp(file);
}

// Polls the pane until it shows every one of `texts` (a frame can be captured half drawn), for
// up to 60 s (a loaded machine runs limctl and tmux late). Returns the last capture.
std::string wait_for(const std::string& session, std::initializer_list<std::string> texts) {
    const auto shows_all = [&](const std::string& screen) {
        for (const std::string& t : texts) {
            if (screen.find(t) == std::string::npos) return false;
        }
        return true;
    };
    std::string screen;
    const auto until = std::chrono::steady_clock::now() + 60s;
    for (;;) {
        screen = sh("tmux capture-pane -p -t " + session);
        if (shows_all(screen) || std::chrono::steady_clock::now() > until) break;
        std::this_thread::sleep_for(100ms);
    }
    return screen;
}

std::string wait_for(const std::string& session, const std::string& text) {
    return wait_for(session, {text});
}

}  // namespace

TEST_CASE("watch shows the segment live, quits on q and restores the terminal") {
    if (std::system("command -v tmux >/dev/null 2>&1") != 0) {
        MESSAGE("tmux is not installed (scripts/install-deps.sh installs it): skipping");
        return;
    }
    lim::test::SegmentGuard guard(lim::test::unique_name("watch"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    auto sem = Semaphore::open(seg, "db", {.capacity = 8});
    const std::string session = "limwatch" + std::to_string(::getpid());
    const std::string cmd =
        std::string(LIMCTL_PATH) + " watch " + guard.name() + " --interval 100ms";
    sh("tmux kill-session -t " + session);
    // After watch exits, the pane reports the terminal modes that matter: canonical input and
    // echo must be back on.
    sh("tmux new-session -d -x 160 -y 30 -s " + session + " 'printf BEFORE-WATCH; echo; " + cmd +
       "; echo WATCH-EXIT=$?; stty -a | tr \" ;\" \"\\n\\n\" | grep -E \"^-?(icanon|echo)$\" | "
       "sed s/^/MODE:/; sleep 300'");

    std::string screen = wait_for(session, {"lim watch: " + guard.name(), "db", "0 / 8"});
    CHECK(screen.find("lim watch: " + guard.name()) != std::string::npos);
    CHECK(screen.find("db") != std::string::npos);
    CHECK(screen.find("0 / 8") != std::string::npos);
    CHECK(screen.find("BEFORE-WATCH") == std::string::npos);  // on the alternate screen

    sem.acquire(5);  // the next frames show it
    screen = wait_for(session, {"5 / 8", "[############"});
    CHECK(screen.find("5 / 8") != std::string::npos);
    CHECK(screen.find("[############") != std::string::npos);

    sh("tmux send-keys -t " + session + " q");
    screen = wait_for(session, "WATCH-EXIT=");
    CHECK(screen.find("WATCH-EXIT=0") != std::string::npos);
    CHECK(screen.find("BEFORE-WATCH") != std::string::npos);  // back on the normal screen
    CHECK(screen.find("lim watch:") == std::string::npos);    // which the view did not touch
    screen = wait_for(session, {"MODE:icanon", "MODE:echo"});
    CHECK(screen.find("MODE:icanon") != std::string::npos);
    CHECK(screen.find("MODE:echo") != std::string::npos);
    sh("tmux kill-session -t " + session);
    sem.release(5);
}

TEST_CASE("watch ends on SIGINT too") {
    if (std::system("command -v tmux >/dev/null 2>&1") != 0) return;
    lim::test::SegmentGuard guard(lim::test::unique_name("watch-int"));
    auto seg = Segment::open_or_create(guard.name(), {.max_limiters = 4, .max_processes = 8});
    const std::string session = "limwatchint" + std::to_string(::getpid());
    sh("tmux kill-session -t " + session);
    sh("tmux new-session -d -x 120 -y 20 -s " + session + " '" + std::string(LIMCTL_PATH) +
       " watch " + guard.name() + " --interval 100ms; echo WATCH-EXIT=$?; sleep 300'");
    CHECK(wait_for(session, "lim watch:").find("lim watch:") != std::string::npos);
    sh("tmux send-keys -t " + session + " C-c");
    CHECK(wait_for(session, "WATCH-EXIT=").find("WATCH-EXIT=0") != std::string::npos);
    sh("tmux kill-session -t " + session);
}
