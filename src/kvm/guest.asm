# gfnmap kvm: source of the built-in guest (src/kvm/guest_code.h holds its bytes). Rebuild:
#   as guest.asm -o g.o && objdump -d -M intel g.o   (GNU as, then paste the bytes)
.intel_syntax noprefix
.code64
start:
  mov r10, rdx
  xor ebx, ebx
  xor r11d, r11d
  mov r13d, 1
1:
  cmp r13, rsi
  jae 2f
  shl r13, 1
  jmp 1b
2:
  dec r13
  mov r15, r9
pass_loop:
  cmp r11, r10
  jae done
  mov r14, r9
  and r14, r13
  xor r12d, r12d
iter:
  test r8b, 1
  jnz rand
  cmp r12, rsi
  jae pass_done
  mov rax, r12
  inc r12
  jmp access
rand:
  cmp r12, r13
  ja pass_done
  inc r12
  lea r14, [r14 + r14*4 + 1]
  and r14, r13
  mov rax, r14
  cmp rax, rsi
  jae iter
access:
  mov rdx, rax
  shl rdx, 12
  add rdx, rdi
  movabs rax, 6364136223846793005
  imul r15, rax
  movabs rax, 1442695040888963407
  add r15, rax
  mov rax, r15
  shr rax, 32
  imul rax, rax, 100
  shr rax, 32
  cmp rax, rcx
  jb do_write
  xor rbx, [rdx]
  jmp iter
do_write:
  lea rax, [r11 + 1]
  and eax, 0xfff
  or rax, rdx
  mov [rdx], rax
  jmp iter
pass_done:
  mov eax, r11d
  mov edx, 0xE0
  out dx, eax
  inc r11
  jmp pass_loop
done:
  mov eax, r11d
  mov edx, 0xE1
  out dx, eax
  jmp done
