// limctl: the operator's view of lim segments. See docs/limctl.md.
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <cstdio>

#include "commands.hpp"
#include "common.hpp"
#include "lim/error.hpp"
#include "shm/names.hpp"

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
        fmt::print(stderr, "limctl: {}\n", lim::detail::printable(e.what()));
        return limctl::kExitUsage;
    } catch (const lim::Error& e) {
        fmt::print(stderr, "limctl: {} ({})\n", lim::detail::printable(e.what()),
                   lim::to_string(e.code()));
        // A segment name or key outside the alphabet can only come from the command line (names
        // read from /dev/shm are reported per file by ls; keys of a TOML file are checked as
        // usage before anything opens): a bad command line, as a bad duration is.
        return e.code() == lim::Errc::invalid_name ? limctl::kExitUsage : limctl::kExitError;
    } catch (const std::exception& e) {
        fmt::print(stderr, "limctl: {}\n", lim::detail::printable(e.what()));
        return limctl::kExitError;
    }
}
