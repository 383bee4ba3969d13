// limctl: the operator's view of lim segments. See docs/limctl.md.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <string>
#include <string_view>

#include "commands.hpp"
#include "common.hpp"
#include "lim/error.hpp"

namespace {

// An error message as one safe line: control bytes and bytes outside ASCII as \xNN, so nothing in
// it can drive the terminal or split the line. Backslashes stay: names and keys inside messages
// are escaped already (lim::detail::printable), and escaping them again would turn a "\x0a"
// there, or a parser's "'\n'", into "\x5cx0a".
std::string one_line(std::string_view text) {
    std::string out;
    out.reserve(text.size());
    for (const unsigned char c : text) {
        if (c >= 0x20 && c < 0x7F) {
            out.push_back(static_cast<char>(c));
        } else {
            out += fmt::format("\\x{:02x}", c);
        }
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    CLI::App app{"limctl: inspect and repair lim shared-memory segments"};
    app.require_subcommand(1);
    app.set_version_flag("--version", "limctl " LIM_VERSION);
    limctl::Action action;
    limctl::add_read_commands(app, action);
    limctl::add_watch_command(app, action);
    limctl::add_repair_commands(app, action);
    limctl::add_backoff_command(app, action);
    limctl::add_create_command(app, action);
    limctl::add_feeder_command(app, action);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        app.exit(e);
        return limctl::kExitUsage;
    }
    try {
        return action ? action() : limctl::kExitUsage;
    } catch (const limctl::UsageError& e) {
        fmt::print(stderr, "limctl: {}\n", one_line(e.what()));
        return limctl::kExitUsage;
    } catch (const lim::Error& e) {
        fmt::print(stderr, "limctl: {} ({})\n", one_line(e.what()), lim::to_string(e.code()));
        // A segment name or key outside the alphabet can only come from the command line (names
        // read from /dev/shm are reported per file by ls; keys of a TOML file are checked as
        // usage before anything opens): a bad command line, as a bad duration is.
        return e.code() == lim::Errc::invalid_name ? limctl::kExitUsage : limctl::kExitError;
    } catch (const std::exception& e) {
        fmt::print(stderr, "limctl: {}\n", one_line(e.what()));
        return limctl::kExitError;
    }
}
