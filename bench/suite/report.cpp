#include "suite/report.hpp"

#include <cmath>
#include <stdexcept>

#include "suite/harness.hpp"

namespace lim_bench {

std::string fmt_num(double v, int decimals) {
    char buf[64];
    if (v > 0 && v < 0.1) {  // small throughputs (Redis) keep two significant digits
        std::snprintf(buf, sizeof buf, "%.2g", v);
        return buf;
    }
    std::snprintf(buf, sizeof buf, "%.*f", decimals, v);
    return buf;
}

std::string fmt_ns(double ns) {
    if (!(ns > 0)) return "—";
    if (ns >= 1e6) return fmt_num(ns / 1e6, 2) + " ms";
    if (ns >= 1e4) return fmt_num(ns / 1e3, 1) + " µs";
    if (ns >= 100) return fmt_num(ns, 0) + " ns";
    return fmt_num(ns, 1) + " ns";
}

std::string fmt_ratio(double r) {
    if (!std::isfinite(r) || r <= 0) return "—";
    if (r < 0.01) {
        char buf[32];
        std::snprintf(buf, sizeof buf, "%.2g×", r);
        return buf;
    }
    return fmt_num(r, r >= 10 ? 0 : 2) + "×";
}

Report::Report(const Settings& s, const std::string& name)
    : s_(s), md_(s.out_dir + "/" + name + ".md") {
    if (!md_) throw std::runtime_error("cannot write " + s.out_dir + "/" + name + ".md");
}

void Report::table(const std::vector<std::string>& header,
                   const std::vector<std::vector<std::string>>& rows) {
    std::string h = "|", sep = "|";
    for (std::size_t i = 0; i < header.size(); ++i) {
        h += " " + header[i] + " |";
        sep += i == 0 ? "---|" : "---:|";
    }
    md_ << h << '\n' << sep << '\n';
    for (const auto& r : rows) {
        std::string l = "|";
        for (const auto& c : r)
            l += " " + c + " |";
        md_ << l << '\n';
    }
    caption();
}

void Report::caption() {
    md_ << "\n*Machine: " << machine_line() << ". Command: `" << s_.command
        << "`. Date: " << date_line() << ".*\n\n";
}

void Report::plot(const std::string& file, const std::string& title, const std::string& xlabel,
                  const std::string& ylabel, bool logx, bool logy,
                  const std::vector<std::string>& series, const std::vector<double>& xs,
                  const std::vector<std::vector<double>>& ys) {
    {
        std::ofstream dat(s_.out_dir + "/" + file + ".dat");
        for (std::size_t i = 0; i < xs.size(); ++i) {
            dat << xs[i];
            for (const auto& y : ys)
                dat << ' ' << (i < y.size() && y[i] > 0 ? y[i] : NAN);
            dat << '\n';
        }
    }
    std::ofstream gp(s_.out_dir + "/plots.gp", std::ios::app);
    gp << "set output '" << file << ".png'\n"
       << "set title \"" << title << "\"\nset xlabel \"" << xlabel << "\"\nset ylabel \"" << ylabel
       << "\"\n"
       << (logx ? "set logscale x 2\n" : "unset logscale x\n")
       << (logy ? "set logscale y 10\n" : "unset logscale y\n") << "plot ";
    for (std::size_t j = 0; j < series.size(); ++j)
        gp << (j ? ", " : "") << "'" << s_.out_dir << "/" << file << ".dat' using 1:" << j + 2
           << " with linespoints title \"" << series[j] << "\"";
    gp << "\n";
    md_ << "![" << title << "](plots/" << file << ".png)\n\n";
}

}  // namespace lim_bench
