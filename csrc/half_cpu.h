// fp16/bf16 <-> fp32 conversions of the CPU kernels. The c10 conversions (static_cast between c10::Half /
// c10::BFloat16 and float) keep a loop scalar in this build (baseline x86-64, no -mf16c/-mavx2 flags): fp16
// stores and loads ran 3-7x slower than torch's own vectorized copies. These convert bit for bit as torch
// does: fp32 -> fp16/bf16 rounds to nearest even, overflows to inf, keeps subnormals and -0; fp16 -> fp32 is
// exact; NaN stays NaN (its payload bits may differ). On x86-64 the few loops that matter are also compiled
// for AVX2 / F16C and chosen at run time; elsewhere the portable loops run.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/bit_cast.h>

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace fastfair {
namespace half_cpu {

// c10::BFloat16(float)'s rounding (NaN -> 0x7FC0) without its branch, so the loop vectorizes.
inline uint16_t bf16_bits(float f) {
  const uint32_t u = c10::bit_cast<uint32_t>(f);
  const auto rounded = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? uint16_t{0x7FC0} : rounded;
}

C10_ALWAYS_INLINE void scale_store_bf16(const float* __restrict__ g, float s, c10::BFloat16* __restrict__ dst,
                                        int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i].x = bf16_bits(s * g[i]);
}

#if defined(__x86_64__)
// bf16: 8 lanes instead of SSE2's 4 halve the time. fp16: F16C converts as torch's AVX2 kernels do.
__attribute__((target("avx2"))) inline void scale_store_bf16_avx2(const float* g, float s, c10::BFloat16* dst,
                                                                  int64_t n) {
  scale_store_bf16(g, s, dst, n);
}

__attribute__((target("avx,f16c"))) inline void scale_store_f16c(const float* g, float s, c10::Half* dst,
                                                                 int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_mul_ps(sv, _mm256_loadu_ps(g + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(s * g[i], _MM_FROUND_TO_NEAREST_INT);
}

__attribute__((target("avx,f16c"))) inline void widen_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

// __builtin_cpu_init: a kernel may run before libgcc's own constructor has filled in the CPU features.
inline bool has_avx2() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return yes;
}

inline bool has_f16c() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c"));
  return yes;
}
#endif

// dst[i] = s * g[i] rounded to bf16 / fp16, for i < n.
inline void scale_store(const float* __restrict__ g, float s, c10::BFloat16* __restrict__ dst, int64_t n) {
#if defined(__x86_64__)
  if (has_avx2()) return scale_store_bf16_avx2(g, s, dst, n);
#endif
  scale_store_bf16(g, s, dst, n);
}

inline void scale_store(const float* __restrict__ g, float s, c10::Half* __restrict__ dst, int64_t n) {
#if defined(__x86_64__)
  if (has_f16c()) return scale_store_f16c(g, s, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<c10::Half>(s * g[i]);
}

// dst[i] = src[i] as fp32 (exact), for i < n.
inline void widen(const c10::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
#if defined(__x86_64__)
  if (has_f16c()) return widen_f16c(src, dst, n);
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace half_cpu
}  // namespace fastfair
