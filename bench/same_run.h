// gfnmap benchmarks: every repetition's value per metric, kept by the benchmarks themselves, so
// a program can print medians and their ratios measured in the same run after the table
// (Google Benchmark's aggregates are per benchmark; a ratio of two of them is left to the
// reader, and this machine drifts 5-20% between runs).
#pragma once

#include <algorithm>
#include <cstdio>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace gfnmap::bench {

inline std::map<std::string, std::vector<double>>& samples() {
  static std::map<std::string, std::vector<double>> s;
  return s;
}
inline void record(const std::string& key, double value) { samples()[key].push_back(value); }

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}
// The median of a recorded metric; 0 when it was not measured (filtered out or skipped).
inline double median_of(const std::string& key) {
  auto it = samples().find(key);
  return it == samples().end() ? 0 : median(it->second);
}

// Prints every recorded repetition, one metric a line.
inline void print_samples(const char* unit) {
  if (samples().empty()) return;
  std::printf("\nEvery repetition (%s):\n", unit);
  for (const auto& [name, values] : samples()) {
    std::printf("  %-34s", name.c_str());
    for (double v : values) std::printf(" %.1f", v);
    std::printf("\n");
  }
}

// "  label: 1234 ns/page, 1.03x floor-name (987), 2.10x other (587)": the median of `key` and
// its ratio to the median of each floor, when both were measured in this run.
inline void print_ratios(const char* label, const std::string& key,
                         std::initializer_list<std::pair<const char*, std::string>> floors,
                         const char* unit = "ns/page") {
  const double v = median_of(key);
  if (v == 0) return;
  std::printf("  %-44s %9.1f %s", label, v, unit);
  for (const auto& [name, floor_key] : floors) {
    const double f = median_of(floor_key);
    if (f != 0) std::printf(", %.2fx %s (%.1f)", v / f, name, f);
  }
  std::printf("\n");
}

}  // namespace gfnmap::bench
