// limctl's subcommands, one group per file. Each add_* registers its subcommands on `app`; when
// one is chosen, its callback stores the work to do in `action`, which main runs after parsing
// (so that parse errors and --help never touch a segment).
#pragma once

#include <CLI/CLI.hpp>

#include <functional>

namespace limctl {

using Action = std::function<int()>;

void add_read_commands(CLI::App& app, Action& action);    // ls, show, stats
void add_watch_command(CLI::App& app, Action& action);    // watch
void add_repair_commands(CLI::App& app, Action& action);  // reap, reset, rm
void add_backoff_command(CLI::App& app, Action& action);  // set-backoff
void add_create_command(CLI::App& app, Action& action);   // create
void add_feeder_command(CLI::App& app, Action& action);   // leases (feeder_view.cpp)

}  // namespace limctl
