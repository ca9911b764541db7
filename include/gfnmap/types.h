// gfnmap types: strong address types (Gfn, Gpa, Hva, Pfn), KVM's exact pfn/hva error
// encodings and predicates, the follow (GUP) flags, and the Result<T> used by the whole API.
#pragma once

#include <compare>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

namespace gfnmap {

inline constexpr unsigned kPageShift = 12;
inline constexpr uint64_t kPageSize = uint64_t{1} << kPageShift;
inline constexpr uint64_t kPageMask = ~(kPageSize - 1);

// A 64-bit value whose meaning is fixed by Tag: a Gfn never silently mixes with a Gpa.
template <class Tag>
struct Strong {
  uint64_t value = 0;

  constexpr Strong() = default;
  constexpr explicit Strong(uint64_t v) : value(v) {}

  friend constexpr auto operator<=>(Strong, Strong) = default;
  friend constexpr bool operator==(Strong, Strong) = default;
  // Offsets are plain integers: Gfn + pages, Hva + bytes.
  friend constexpr Strong operator+(Strong a, uint64_t n) { return Strong(a.value + n); }
  friend constexpr Strong operator-(Strong a, uint64_t n) { return Strong(a.value - n); }
  // The distance between two values of one kind is a plain integer.
  friend constexpr uint64_t operator-(Strong a, Strong b) { return a.value - b.value; }
};

struct GfnTag {};
struct GpaTag {};
struct HvaTag {};
using Gfn = Strong<GfnTag>;  // guest frame number: gpa >> kPageShift
using Gpa = Strong<GpaTag>;  // guest physical address
using Hva = Strong<HvaTag>;  // host (user) virtual address

constexpr Gfn gpa_to_gfn(Gpa gpa) { return Gfn(gpa.value >> kPageShift); }
constexpr Gpa gfn_to_gpa(Gfn gfn) { return Gpa(gfn.value << kPageShift); }

// ---------------------------------------------------------------------------------------------
// Host page frame numbers and KVM's error encodings (spec section 5). Errors live in the pfn
// domain: bits 52..62 mark an error pfn, bit 63 alone is "no slot".

struct Pfn {
  uint64_t value = 0;

  constexpr Pfn() = default;
  constexpr explicit Pfn(uint64_t v) : value(v) {}
  friend constexpr auto operator<=>(Pfn, Pfn) = default;
  friend constexpr bool operator==(Pfn, Pfn) = default;
};

inline constexpr uint64_t kPfnErrMask = uint64_t{0x7ff} << 52;        // KVM_PFN_ERR_MASK
inline constexpr uint64_t kPfnErrNoslotMask = uint64_t{0xfff} << 52;  // KVM_PFN_ERR_NOSLOT_MASK

inline constexpr Pfn kPfnNoslot{uint64_t{1} << 63};           // KVM_PFN_NOSLOT
inline constexpr Pfn kPfnErrFault{kPfnErrMask};               // KVM_PFN_ERR_FAULT
inline constexpr Pfn kPfnErrHwpoison{kPfnErrMask + 1};        // KVM_PFN_ERR_HWPOISON
inline constexpr Pfn kPfnErrRoFault{kPfnErrMask + 2};         // KVM_PFN_ERR_RO_FAULT
inline constexpr Pfn kPfnErrSigpending{kPfnErrMask + 3};      // KVM_PFN_ERR_SIGPENDING
inline constexpr Pfn kPfnErrNeedsIo{kPfnErrMask + 4};         // KVM_PFN_ERR_NEEDS_IO

static_assert(kPfnErrFault.value == 0x7FF0000000000000ULL);
static_assert(kPfnErrNeedsIo.value == 0x7FF0000000000004ULL);
static_assert(kPfnNoslot.value == 0x8000000000000000ULL);

// True for every KVM_PFN_ERR_* (NEEDS_IO included), false for NOSLOT.
constexpr bool is_error_pfn(Pfn pfn) { return (pfn.value & kPfnErrMask) != 0; }
// True for every error and for NOSLOT.
constexpr bool is_error_noslot_pfn(Pfn pfn) { return (pfn.value & kPfnErrNoslotMask) != 0; }
constexpr bool is_noslot_pfn(Pfn pfn) { return pfn == kPfnNoslot; }
constexpr bool is_sigpending_pfn(Pfn pfn) { return pfn == kPfnErrSigpending; }

// "FAULT", "NOSLOT", ... for error pfns; the number in hex otherwise.
std::string pfn_to_string(Pfn pfn);

// ---------------------------------------------------------------------------------------------
// Host virtual address errors (generic, non-s390): every hva at or above PAGE_OFFSET is an
// error hva, so RO_BAD is one too.

inline constexpr uint64_t kPageOffset = 0xffff888000000000ULL;  // x86-64 PAGE_OFFSET
inline constexpr Hva kHvaErrBad{kPageOffset};                   // KVM_HVA_ERR_BAD
inline constexpr Hva kHvaErrRoBad{kPageOffset + kPageSize};     // KVM_HVA_ERR_RO_BAD

constexpr bool kvm_is_error_hva(Hva hva) { return hva.value >= kPageOffset; }

// ---------------------------------------------------------------------------------------------
// Follow (GUP) flags. Callers of the resolver may pass only kFollWrite, kFollNowait,
// kFollInterruptible and, with the v7 API, kFollGet; the slow path adds the others itself.

using FollFlags = uint32_t;
inline constexpr FollFlags kFollWrite = 1u << 0;            // FOLL_WRITE
inline constexpr FollFlags kFollNowait = 1u << 1;           // FOLL_NOWAIT
inline constexpr FollFlags kFollInterruptible = 1u << 2;    // FOLL_INTERRUPTIBLE
inline constexpr FollFlags kFollGet = 1u << 3;              // FOLL_GET  [v7 only]
inline constexpr FollFlags kFollHwpoison = 1u << 4;         // FOLL_HWPOISON (slow path adds it)
inline constexpr FollFlags kFollHonorNumaFault = 1u << 5;   // FOLL_HONOR_NUMA_FAULT [merged]
inline constexpr FollFlags kFollPin = 1u << 6;              // FOLL_PIN (pin instead of get)
inline constexpr FollFlags kFollCallerFlags =
    kFollWrite | kFollNowait | kFollInterruptible | kFollGet;

// "WRITE|NOWAIT", or "0".
std::string foll_flags_to_string(FollFlags flags);

// ---------------------------------------------------------------------------------------------
// Result<T>: a value or an Error (errno plus a message for people). Shaped like std::expected,
// which g++ 12 lacks in C++20.

struct Error {
  int code = 0;         // a positive errno value (EINVAL, EEXIST, ...)
  std::string message;  // what was wrong, for a person; never empty

  friend bool operator==(const Error&, const Error&) = default;
};

// "EINVAL: slot id 40000 >= 32764" style rendering; errno_name(22) == "EINVAL".
std::string_view errno_name(int code);
std::string error_to_string(const Error& e);

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Error error) : v_(std::move(error)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  // Precondition: ok().
  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }

  // Precondition: !ok().
  const Error& error() const { return std::get<1>(v_); }
  int code() const { return ok() ? 0 : error().code; }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), ok_(false) {}  // NOLINT

  bool ok() const { return ok_; }
  explicit operator bool() const { return ok_; }
  const Error& error() const { return error_; }
  int code() const { return ok_ ? 0 : error_.code; }

 private:
  Error error_;
  bool ok_ = true;
};

// A non-owning reference to a callable, for callbacks on hot paths (never allocates).
template <class Sig>
class FunctionRef;
template <class R, class... Args>
class FunctionRef<R(Args...)> {
 public:
  template <class F>
    requires(!std::is_same_v<std::remove_cvref_t<F>, FunctionRef> &&
             std::is_invocable_r_v<R, F&, Args...>)
  FunctionRef(F&& f)  // NOLINT(google-explicit-constructor)
      : obj_(const_cast<void*>(static_cast<const void*>(&f))),
        call_([](void* o, Args... a) -> R {
          return (*static_cast<std::remove_reference_t<F>*>(o))(std::forward<Args>(a)...);
        }) {}
  R operator()(Args... a) const { return call_(obj_, std::forward<Args>(a)...); }

 private:
  void* obj_;
  R (*call_)(void*, Args...);
};

// make_error(EINVAL, "slot id ", id, " out of range")
template <class... Parts>
Error make_error(int code, Parts&&... parts) {
  std::string msg;
  auto append = [&msg](const auto& p) {
    if constexpr (std::is_arithmetic_v<std::decay_t<decltype(p)>>) {
      msg += std::to_string(p);
    } else {
      msg += p;
    }
  };
  (append(parts), ...);
  return Error{code, std::move(msg)};
}

}  // namespace gfnmap
