// Output of lim_suite: a Markdown fragment per scenario (docs/benchmarks.md is assembled from
// them by scripts/bench.sh), gnuplot data files, and a gnuplot script that draws them as PNGs.
#pragma once

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

namespace lim_bench {

struct Settings {
    bool quick = false;
    std::string out_dir = ".";
    std::string command = "lim_suite";  // the command line the tables cite
    int redis_port = 0;
};

// "12.3", "1,234", "4.56 us", as the tables print them.
std::string fmt_ns(double ns);
std::string fmt_ratio(double r);
std::string fmt_num(double v, int decimals);

class Report {
  public:
    // Opens out_dir/<name>.md for writing; throws std::runtime_error if it cannot.
    Report(const Settings& s, const std::string& name);
    void line(const std::string& text = "") { md_ << text << '\n'; }
    void table(const std::vector<std::string>& header,
               const std::vector<std::vector<std::string>>& rows);
    // The caption under every table: machine, command, date.
    void caption();
    // Writes out_dir/<file>.dat (first column x, then one column per series) and appends a plot
    // of it to out_dir/plots.gp, drawn into docs/plots/<file>.png by scripts/bench.sh.
    void plot(const std::string& file, const std::string& title, const std::string& xlabel,
              const std::string& ylabel, bool logx, bool logy,
              const std::vector<std::string>& series, const std::vector<double>& xs,
              const std::vector<std::vector<double>>& ys);

  private:
    const Settings& s_;
    std::ofstream md_;
};

}  // namespace lim_bench
