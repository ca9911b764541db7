// gfnmap kvm: the built-in guest's machine code (x86-64, runs at CPL3), with its source listing.
// Regenerate with the listing's assembly through GNU as (.intel_syntax noprefix) if it changes.
#pragma once

#include <cstdint>

namespace gfnmap::kvm::detail {

// Entry: RDI = slice base (gva == gpa), RSI = pages (>= 1), RDX = passes, RCX = write percent,
// R8 bit 0 = random order, R9 = seed. Uses RAX RBX RDX R10-R15; no stack, no memory but the
// slice. RBX = XOR of the words read; R11 = passes done.
//   R13 = (smallest power of two >= pages) - 1: the mask of the order LCG x -> 5x + 1, which
//         has full period mod a power of two, so each pass visits every page once (values
//         >= pages are skipped).
//   R15 = read/write LCG (Knuth MMIX constants): write iff ((R15 >> 32) * 100) >> 32 < RCX.
inline constexpr uint8_t kGuestCode[] = {
    // <start>:
    0x49, 0x89, 0xd2,                                             // 0: mov r10,rdx
    0x31, 0xdb,                                                   // 3: xor ebx,ebx
    0x45, 0x31, 0xdb,                                             // 5: xor r11d,r11d
    0x41, 0xbd, 0x01, 0x00, 0x00, 0x00,                           // 8: mov r13d,0x1
    0x49, 0x39, 0xf5,                                             // e: cmp r13,rsi
    0x73, 0x05,                                                   // 11: jae 18 <start+0x18>
    0x49, 0xd1, 0xe5,                                             // 13: shl r13,1
    0xeb, 0xf6,                                                   // 16: jmp e <start+0xe>
    0x49, 0xff, 0xcd,                                             // 18: dec r13
    0x4d, 0x89, 0xcf,                                             // 1b: mov r15,r9
    // <pass_loop>:
    0x4d, 0x39, 0xd3,                                             // 1e: cmp r11,r10
    0x0f, 0x83, 0x94, 0x00, 0x00, 0x00,                           // 21: jae bb <done>
    0x4d, 0x89, 0xce,                                             // 27: mov r14,r9
    0x4d, 0x21, 0xee,                                             // 2a: and r14,r13
    0x45, 0x31, 0xe4,                                             // 2d: xor r12d,r12d
    // <iter>:
    0x41, 0xf6, 0xc0, 0x01,                                       // 30: test r8b,0x1
    0x75, 0x0d,                                                   // 34: jne 43 <rand>
    0x49, 0x39, 0xf4,                                             // 36: cmp r12,rsi
    0x73, 0x6f,                                                   // 39: jae aa <pass_done>
    0x4c, 0x89, 0xe0,                                             // 3b: mov rax,r12
    0x49, 0xff, 0xc4,                                             // 3e: inc r12
    0xeb, 0x18,                                                   // 41: jmp 5b <access>
    // <rand>:
    0x4d, 0x39, 0xec,                                             // 43: cmp r12,r13
    0x77, 0x62,                                                   // 46: ja aa <pass_done>
    0x49, 0xff, 0xc4,                                             // 48: inc r12
    0x4f, 0x8d, 0x74, 0xb6, 0x01,                                 // 4b: lea r14,[r14+r14*4+0x1]
    0x4d, 0x21, 0xee,                                             // 50: and r14,r13
    0x4c, 0x89, 0xf0,                                             // 53: mov rax,r14
    0x48, 0x39, 0xf0,                                             // 56: cmp rax,rsi
    0x73, 0xd5,                                                   // 59: jae 30 <iter>
    // <access>:
    0x48, 0x89, 0xc2,                                             // 5b: mov rdx,rax
    0x48, 0xc1, 0xe2, 0x0c,                                       // 5e: shl rdx,0xc
    0x48, 0x01, 0xfa,                                             // 62: add rdx,rdi
    0x48, 0xb8, 0x2d, 0x7f, 0x95, 0x4c, 0x2d,                     // 65: movabs rax,0x5851f42d4c957f2d
    0xf4, 0x51, 0x58, 
    0x4c, 0x0f, 0xaf, 0xf8,                                       // 6f: imul r15,rax
    0x48, 0xb8, 0x4f, 0x81, 0x67, 0xf7, 0x7e,                     // 73: movabs rax,0x14057b7ef767814f
    0x7b, 0x05, 0x14, 
    0x49, 0x01, 0xc7,                                             // 7d: add r15,rax
    0x4c, 0x89, 0xf8,                                             // 80: mov rax,r15
    0x48, 0xc1, 0xe8, 0x20,                                       // 83: shr rax,0x20
    0x48, 0x6b, 0xc0, 0x64,                                       // 87: imul rax,rax,0x64
    0x48, 0xc1, 0xe8, 0x20,                                       // 8b: shr rax,0x20
    0x48, 0x39, 0xc8,                                             // 8f: cmp rax,rcx
    0x72, 0x05,                                                   // 92: jb 99 <do_write>
    0x48, 0x33, 0x1a,                                             // 94: xor rbx,QWORD PTR [rdx]
    0xeb, 0x97,                                                   // 97: jmp 30 <iter>
    // <do_write>:
    0x49, 0x8d, 0x43, 0x01,                                       // 99: lea rax,[r11+0x1]
    0x25, 0xff, 0x0f, 0x00, 0x00,                                 // 9d: and eax,0xfff
    0x48, 0x09, 0xd0,                                             // a2: or rax,rdx
    0x48, 0x89, 0x02,                                             // a5: mov QWORD PTR [rdx],rax
    0xeb, 0x86,                                                   // a8: jmp 30 <iter>
    // <pass_done>:
    0x44, 0x89, 0xd8,                                             // aa: mov eax,r11d
    0xba, 0xe0, 0x00, 0x00, 0x00,                                 // ad: mov edx,0xe0
    0xef,                                                         // b2: out dx,eax
    0x49, 0xff, 0xc3,                                             // b3: inc r11
    0xe9, 0x63, 0xff, 0xff, 0xff,                                 // b6: jmp 1e <pass_loop>
    // <done>:
    0x44, 0x89, 0xd8,                                             // bb: mov eax,r11d
    0xba, 0xe1, 0x00, 0x00, 0x00,                                 // be: mov edx,0xe1
    0xef,                                                         // c3: out dx,eax
    0xeb, 0xf5,                                                   // c4: jmp bb <done>
};

inline constexpr uint64_t kGuestCodeSize = sizeof(kGuestCode);
static_assert(kGuestCodeSize == 198);

}  // namespace gfnmap::kvm::detail
