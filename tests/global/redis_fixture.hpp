// What the global tests run for real: a redis-server on 127.0.0.1 (a free port, persistence
// off) and lim-feeder processes, each started with fork+exec and stopped at the end.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace lim::test {

// The redis-server binary, or "" when it is not installed (the tests then skip, saying so).
inline std::string find_redis_server() {
    for (const char* p : {"/usr/bin/redis-server", "/usr/local/bin/redis-server"}) {
        if (::access(p, X_OK) == 0) return p;
    }
    return "";
}

inline int free_port() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0;
    ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
    socklen_t len = sizeof a;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
    ::close(fd);
    return ntohs(a.sin_port);
}

inline bool port_answers(int port) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(static_cast<std::uint16_t>(port));
    const bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
    ::close(fd);
    return ok;
}

// A child process run by exec, killed (SIGKILL) and reaped when the handle goes.
class ChildProcess {
  public:
    ChildProcess() = default;
    ChildProcess(const ChildProcess&) = delete;
    ChildProcess& operator=(const ChildProcess&) = delete;
    ~ChildProcess() { stop(SIGKILL); }

    // `env`: "NAME=value" entries added to the child's environment (e.g. an LD_PRELOAD).
    void start(const std::vector<std::string>& argv, const std::string& log_path,
               const std::vector<std::string>& env = {}) {
        pid_ = ::fork();
        if (pid_ == 0) {
            for (const auto& e : env) {
                const std::size_t eq = e.find('=');
                if (eq == std::string::npos ||
                    ::setenv(e.substr(0, eq).c_str(), e.c_str() + eq + 1, 1) != 0)
                    ::_exit(126);
            }
            std::vector<char*> args;
            for (const auto& a : argv)
                args.push_back(const_cast<char*>(a.c_str()));
            args.push_back(nullptr);
            if (std::freopen(log_path.c_str(), "a", stderr) == nullptr) ::_exit(126);
            if (std::freopen("/dev/null", "w", stdout) == nullptr) ::_exit(126);
            ::execv(args[0], args.data());
            ::_exit(127);
        }
    }
    void signal(int sig) const {
        if (pid_ > 0) ::kill(pid_, sig);
    }
    // Sends `sig` and waits for the process; returns its wait status.
    int stop(int sig) {
        if (pid_ <= 0) return 0;
        ::kill(pid_, SIGCONT);
        ::kill(pid_, sig);
        int status = 0;
        ::waitpid(pid_, &status, 0);
        pid_ = -1;
        return status;
    }
    bool running() const { return pid_ > 0; }
    pid_t pid() const { return pid_; }
    // Waits up to `timeout` for the process to exit by itself: its wait status, or nullopt if it
    // is still running then.
    std::optional<int> wait_for(std::chrono::milliseconds timeout) {
        const auto until = std::chrono::steady_clock::now() + timeout;
        while (pid_ > 0) {
            int status = 0;
            if (::waitpid(pid_, &status, WNOHANG) == pid_) {
                pid_ = -1;
                return status;
            }
            if (std::chrono::steady_clock::now() >= until) break;
            std::this_thread::sleep_for(std::chrono::milliseconds{10});
        }
        return std::nullopt;
    }

  private:
    pid_t pid_ = -1;
};

class RedisServer {
  public:
    // `env`: added to the server's environment (ChildProcess::start), e.g. to run it under
    // libfaketime (tests/global/clock_step_test.cpp).
    RedisServer(std::string binary, int port, std::string log, std::vector<std::string> env = {})
        : binary_(std::move(binary)), port_(port), log_(std::move(log)), env_(std::move(env)) {}

    bool start() {
        proc_.start({binary_, "--port", std::to_string(port_), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--daemonize", "no"},
                    log_, env_);
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds{10};
        while (!port_answers(port_)) {
            if (std::chrono::steady_clock::now() > until) return false;
            std::this_thread::sleep_for(std::chrono::milliseconds{20});
        }
        return true;
    }
    ~RedisServer() { kill(); }
    void kill() {
        const pid_t pid = proc_.pid();
        proc_.stop(SIGKILL);
        // libfaketime (run by env_) makes a shared-memory file and a semaphore per process and
        // removes them only at a clean exit, so a killed server's would stay in /dev/shm for good.
        if (pid > 0 && !env_.empty()) {
            std::remove(("/dev/shm/faketime_shm_" + std::to_string(pid)).c_str());
            std::remove(("/dev/shm/sem.faketime_sem_" + std::to_string(pid)).c_str());
        }
    }
    int port() const { return port_; }

  private:
    std::string binary_;
    int port_;
    std::string log_;
    std::vector<std::string> env_;
    ChildProcess proc_;
};

inline std::string read_file(const std::string& path) {
    std::ifstream in(path);
    std::stringstream s;
    s << in.rdbuf();
    return s.str();
}

}  // namespace lim::test
