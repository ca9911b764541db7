// gfnmap benchmarks: ratios measured in the same run, and fault-in floors measured beside their
// subject in the same repetition.
//
// This machine drifts 5-20% between runs and, on a VM whose outer host fills shadow pages on a
// first touch, by 2x between repetitions of one run: a fault-in and a floor measured a minute
// apart do not share their conditions. So each fault-in repetition runs its floors right beside
// it (run_paired, in an order that rotates between repetitions) and keeps the ratio of that
// repetition; the medians of those ratios over repetitions are what the programs print after
// the table (print_paired) and what BENCHMARKS.md quotes.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <benchmark/benchmark.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace gfnmap::bench {

// ---------------------------------------------------------------- samples of this run

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
    std::printf("  %-60s", name.c_str());
    for (double v : values) std::printf(" %.2f", v);
    std::printf("\n");
  }
}

// "  label: 1234.5 unit, 1.03x name (987.0)": the median of `key` and its ratio to the median
// of each peer, when both were measured in this run.
inline void print_ratios(const char* label, const std::string& key,
                         std::initializer_list<std::pair<const char*, std::string>> peers,
                         const char* unit) {
  const double v = median_of(key);
  if (v == 0) return;
  std::printf("  %-44s %9.1f %s", label, v, unit);
  for (const auto& [name, peer_key] : peers) {
    const double f = median_of(peer_key);
    if (f != 0) std::printf(", %.2fx %s (%.1f)", v / f, name, f);
  }
  std::printf("\n");
}

// ---------------------------------------------------------------- fault-in floors

// A floor of a fault-in: MADV_POPULATE_WRITE of fresh private anonymous memory (4K pages, or
// THP with MADV_HUGEPAGE), one call for the whole range or one per 4K page (KVM's shape: one GUP
// per fault), and with `touch` one 8-byte write to each 4K page, timed with the populate.
//
// A fault-in that writes every page (a guest's first write, gfnmap's Vcpu write after its
// fault) does the work of populate + touch, so that is its floor. Populate only is no floor for
// it on a host where the first user touch of a populated page is itself costly (a shadow-page
// fill by an outer hypervisor: ~5-10 us a page on some VMs, against ~1 us for the populate);
// it is kept beside it, labelled, and is the floor of a fault-in that does not touch.
struct FloorSpec {
  const char* id;     // counter suffix: "populate_touch"
  const char* label;  // printed: "populate+touch"
  bool thp;
  bool per_page;
  bool touch;
};
inline constexpr FloorSpec kPopulateTouch{"populate_touch", "populate+touch", false, false, true};
inline constexpr FloorSpec kPopulateOnly{"populate_only", "populate only", false, false, false};
inline constexpr FloorSpec kPerPagePopulateTouch{"per_page_populate_touch",
                                                 "per-page populate+touch", false, true, true};
inline constexpr FloorSpec kPerPagePopulateOnly{"per_page_populate_only",
                                                "per-page populate only", false, true, false};
inline constexpr FloorSpec kThpPopulateTouch{"thp_populate_touch", "THP populate+touch", true,
                                             false, true};
inline constexpr FloorSpec kThpPopulateOnly{"thp_populate_only", "THP populate only", true, false,
                                            false};

// Seconds of one floor over `bytes` of fresh memory (mmap and munmap not timed); < 0 when the
// memory cannot be mapped.
inline double populate_floor_seconds(uint64_t bytes, const FloorSpec& f) {
  constexpr uint64_t kPage = 4096;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return -1;
  madvise(p, bytes, f.thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  auto* base = static_cast<char*>(p);
  const auto t0 = std::chrono::steady_clock::now();
  if (f.per_page) {
    for (uint64_t off = 0; off < bytes; off += kPage) {
      madvise(base + off, kPage, MADV_POPULATE_WRITE);
      if (f.touch) *reinterpret_cast<volatile uint64_t*>(base + off) = off;
    }
  } else {
    madvise(p, bytes, MADV_POPULATE_WRITE);
    if (f.touch) {
      for (uint64_t off = 0; off < bytes; off += kPage) {
        *reinterpret_cast<volatile uint64_t*>(base + off) = off;
      }
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  munmap(p, bytes);
  return secs;
}

// Runs `subject` (returns its timed seconds, < 0 on failure) and each floor once over `bytes`,
// in an order that rotates from one call to the next (so no one of them is always the first
// after an idle period or always follows the same neighbour). Returns the seconds of each:
// [0] the subject, [1 + i] floors[i]. Empty when anything failed.
//
// warm: run this floor, untimed, right before each of them. For THP: on a VM with free page
// reporting, a huge page that sat free is handed back to the outer host and its next populate
// costs the outer host's refill (10 us per 4K instead of 0.2 on the project's host B), so
// without it the THP rows measure which of them got such a block, not their own work.
template <class Subject>
std::vector<double> run_paired(Subject&& subject, const std::vector<FloorSpec>& floors,
                               uint64_t bytes, const FloorSpec* warm = nullptr) {
  static unsigned rotation = 0;
  const size_t n = floors.size() + 1;
  std::vector<double> secs(n, -1);
  const size_t first = rotation++ % n;
  for (size_t k = 0; k < n; ++k) {
    const size_t i = (first + k) % n;
    if (warm != nullptr && populate_floor_seconds(bytes, *warm) < 0) return {};
    secs[i] = i == 0 ? subject() : populate_floor_seconds(bytes, floors[i - 1]);
    if (secs[i] < 0) return {};
  }
  return secs;
}

// Reports one repetition of a paired fault-in of `pages` 4K pages: counters ns_per_page,
// floor_<id>_ns and x_<id> (this repetition's ratio; Google Benchmark's median aggregate is
// then the median ratio), and samples "<key>" (ns/page) and "<key> x <floor label>".
inline void report_paired(benchmark::State& state, const std::string& key, uint64_t pages,
                          const std::vector<double>& secs,
                          const std::vector<FloorSpec>& floors) {
  const double n = static_cast<double>(pages);
  const double ns = secs[0] * 1e9 / n;
  state.SetIterationTime(secs[0]);
  state.counters["ns_per_page"] = ns;
  record(key, ns);
  size_t i = 1;
  for (const FloorSpec& f : floors) {
    const double floor_ns = secs[i++] * 1e9 / n;
    state.counters[std::string("floor_") + f.id + "_ns"] = floor_ns;
    state.counters[std::string("x_") + f.id] = ns / floor_ns;
    record(std::string("floor ") + f.label + " (beside " + key + ")", floor_ns);
    record(key + " x " + f.label, ns / floor_ns);
  }
}

// "  key: 1234 ns/page; 1.03x populate+touch, 7.9x populate only": the medians over this run's
// repetitions of the subject and of its per-repetition ratios.
inline void print_paired(const std::string& key, const std::vector<FloorSpec>& floors) {
  const double ns = median_of(key);
  if (ns == 0) return;
  std::printf("  %-58s %8.0f ns/page;", key.c_str(), ns);
  const char* sep = " ";
  for (const FloorSpec& f : floors) {
    const double x = median_of(key + " x " + f.label);
    const double fl = median_of(std::string("floor ") + f.label + " (beside " + key + ")");
    if (x != 0) std::printf("%s%.2fx %s (%.0f)", sep, x, f.label, fl);
    sep = ", ";
  }
  std::printf("\n");
}

}  // namespace gfnmap::bench
