// Tests for gfnmap types: KVM's pfn and hva error encodings and their predicates (spec 1, 5).
// Invariant 13 (NOSLOT is not an error pfn) is checked here at the encoding level.
#include "gfnmap/types.h"

#include <gtest/gtest.h>

#include <cerrno>

namespace gfnmap {
namespace {

TEST(PfnEncoding, ExactKernelValues) {
  EXPECT_EQ(kPfnErrFault.value, 0x7FF0000000000000ULL);
  EXPECT_EQ(kPfnErrHwpoison.value, 0x7FF0000000000001ULL);
  EXPECT_EQ(kPfnErrRoFault.value, 0x7FF0000000000002ULL);
  EXPECT_EQ(kPfnErrSigpending.value, 0x7FF0000000000003ULL);
  EXPECT_EQ(kPfnErrNeedsIo.value, 0x7FF0000000000004ULL);
  EXPECT_EQ(kPfnNoslot.value, 0x8000000000000000ULL);
}

TEST(PfnPredicates, ErrorsAreErrorPfnsNoslotIsNot_Invariant13) {
  for (Pfn e : {kPfnErrFault, kPfnErrHwpoison, kPfnErrRoFault, kPfnErrSigpending,
                kPfnErrNeedsIo}) {
    EXPECT_TRUE(is_error_pfn(e)) << pfn_to_string(e);
    EXPECT_TRUE(is_error_noslot_pfn(e)) << pfn_to_string(e);
    EXPECT_FALSE(is_noslot_pfn(e)) << pfn_to_string(e);
  }
  EXPECT_FALSE(is_error_pfn(kPfnNoslot));
  EXPECT_TRUE(is_error_noslot_pfn(kPfnNoslot));
  EXPECT_TRUE(is_noslot_pfn(kPfnNoslot));
  EXPECT_TRUE(is_sigpending_pfn(kPfnErrSigpending));
  EXPECT_FALSE(is_sigpending_pfn(kPfnErrFault));
}

TEST(PfnPredicates, OrdinaryPfnsAreNotErrors) {
  for (uint64_t v : {0ULL, 1ULL, 0x12345ULL, (1ULL << 52) - 1}) {
    EXPECT_FALSE(is_error_pfn(Pfn(v)));
    EXPECT_FALSE(is_error_noslot_pfn(Pfn(v)));
  }
  // Any bit of 52..62 makes an error pfn; bit 63 alone does not.
  for (int bit = 52; bit <= 62; ++bit) EXPECT_TRUE(is_error_pfn(Pfn(1ULL << bit))) << bit;
}

TEST(HvaErrors, BadAndRoBadAreErrorHvas) {
  EXPECT_TRUE(kvm_is_error_hva(kHvaErrBad));
  EXPECT_TRUE(kvm_is_error_hva(kHvaErrRoBad));
  EXPECT_NE(kHvaErrBad, kHvaErrRoBad);
  EXPECT_FALSE(kvm_is_error_hva(Hva(0x7fff00000000ULL)));
}

TEST(AddressTypes, ConversionsAndArithmetic) {
  EXPECT_EQ(gpa_to_gfn(Gpa(0x12345678)), Gfn(0x12345));
  EXPECT_EQ(gfn_to_gpa(Gfn(0x12345)), Gpa(0x12345000));
  EXPECT_EQ(Gfn(10) + 5, Gfn(15));
  EXPECT_EQ(Gfn(10) - Gfn(4), 6u);
  static_assert(!std::is_convertible_v<Gfn, Gpa>);
  static_assert(!std::is_convertible_v<uint64_t, Gfn>);
}

TEST(Strings, PfnsFlagsErrnos) {
  EXPECT_EQ(pfn_to_string(kPfnErrNeedsIo), "NEEDS_IO");
  EXPECT_EQ(pfn_to_string(Pfn(0x1f)), "0x1f");
  EXPECT_EQ(foll_flags_to_string(kFollWrite | kFollNowait), "WRITE|NOWAIT");
  EXPECT_EQ(foll_flags_to_string(0), "0");
  EXPECT_EQ(errno_name(EEXIST), "EEXIST");
  EXPECT_EQ(error_to_string(make_error(EINVAL, "slot ", 5, " bad")), "EINVAL: slot 5 bad");
}

TEST(ResultType, ValueAndError) {
  Result<int> good = 7;
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 7);
  Result<int> bad = make_error(ENOENT, "missing");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.code(), ENOENT);
  Result<void> v;
  EXPECT_TRUE(v.ok());
  Result<void> e = make_error(EFAULT, "x");
  EXPECT_EQ(e.code(), EFAULT);
}

TEST(FunctionRefType, CallsWithoutAllocating) {
  int sum = 0;
  auto add = [&sum](int x) { sum += x; };
  FunctionRef<void(int)> ref = add;
  ref(3);
  ref(4);
  EXPECT_EQ(sum, 7);
}

}  // namespace
}  // namespace gfnmap
