// Run-time choice of the CPU kernels' instruction set (see simd.h, MU_ISA_VARIANTS), and the
// op mini_unlearn::cpu_isa() -> str that reports it (the benchmarks record it).
//
// MINI_UNLEARN_CPU_ISA (read once, at the first kernel call):
//   unset, "", "auto", "native"  AVX-512 where the CPU has it (F, BW, DQ, VL, CD), else AVX2
//   "avx2", "baseline"           the AVX2/FMA/F16C baseline clone even on an AVX-512 CPU
//   "avx512"                     AVX-512; an error on a CPU without it
// Every kernel computes the same bits on either path, so the switch changes speed only.
#include <torch/library.h>
#include <cstdlib>
#include <string>
#include "simd.h"

namespace mini_unlearn {

namespace {

bool cpu_has_avx512() {
#ifdef MU_X86_KERNELS
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512cd");
#else
  return false;
#endif
}

CpuIsa detect_cpu_isa() {
  const char* env = std::getenv("MINI_UNLEARN_CPU_ISA");
  const std::string want = env ? env : "";
  if (want.empty() || want == "auto" || want == "native")
    return cpu_has_avx512() ? CpuIsa::kAvx512 : CpuIsa::kBaseline;
  if (want == "avx2" || want == "baseline") return CpuIsa::kBaseline;
  if (want == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "MINI_UNLEARN_CPU_ISA=avx512, but this CPU (or build) has no AVX-512");
    return CpuIsa::kAvx512;
  }
  TORCH_CHECK(false, "MINI_UNLEARN_CPU_ISA='", want,
              "' is not one of: auto, native, avx2, baseline, avx512 (or unset)");
}

std::string cpu_isa_op() { return cpu_isa_name(); }

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();  // a throw leaves it unset: the next call rechecks
  return isa;
}

const char* cpu_isa_name() {
#ifdef MU_X86_KERNELS
  return cpu_isa() == CpuIsa::kAvx512 ? "avx512" : "avx2";
#else
  return "generic";
#endif
}

TORCH_LIBRARY_FRAGMENT(mini_unlearn, m) { m.def("cpu_isa() -> str", &cpu_isa_op); }

}  // namespace mini_unlearn
