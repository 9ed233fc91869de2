// CPU kernel of fastfair::grad_fanout_out: threads over chunks of g; each chunk is read from memory once and
// re-read from L1 for every (step, branch) coefficient, so the op costs one read of g plus the writes.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "half_cpu.h"
#include "launchers.h"

namespace fastfair {
namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per thread task (see solver_step_cpu.cpp)
// Elements of g kept in L1 while every coefficient is applied; of 256, 2048 and 16384 elements, 256 was
// fastest on large fan-outs (short bursts into the many output streams).
constexpr int64_t kTile = 256;

template <typename G, typename O>
void fanout_range(const G* __restrict__ g, const std::vector<double>& coefs, O* __restrict__ out, int64_t n,
                  int64_t begin, int64_t end) {
  using A = typename FanoutAcc<G>::type;
  constexpr bool kHalfOut = std::is_same_v<O, c10::Half> || std::is_same_v<O, c10::BFloat16>;
  if constexpr (kHalfOut && std::is_same_v<A, float>) {
    float upcast[kTile];  // an fp16/bf16 g's tile in fp32, converted once rather than once per coefficient
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t len = std::min(kTile, end - tile);
      const float* src = nullptr;
      if constexpr (std::is_same_v<G, float>) {
        src = g + tile;
      } else if constexpr (std::is_same_v<G, c10::Half>) {
        half_cpu::widen(g + tile, upcast, len);
        src = upcast;
      } else {
        for (int64_t i = 0; i < len; ++i) upcast[i] = static_cast<float>(g[tile + i]);
        src = upcast;
      }
      for (size_t c = 0; c < coefs.size(); ++c)
        half_cpu::scale_store(src, static_cast<float>(coefs[c]), out + static_cast<int64_t>(c) * n + tile, len);
    }
  } else {  // fp32/fp64 outputs, and fp64 g (rounded through float to fp16/bf16 by c10, as by torch)
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t stop = std::min(tile + kTile, end);
      for (size_t c = 0; c < coefs.size(); ++c) {
        const A s = static_cast<A>(coefs[c]);
        O* __restrict__ dst = out + static_cast<int64_t>(c) * n;
#pragma omp simd
        for (int64_t i = tile; i < stop; ++i) dst[i] = static_cast<O>(s * static_cast<A>(g[i]));
      }
    }
  }
}

}  // namespace

void grad_fanout_cpu(const at::TensorBase& g, const std::vector<double>& coefs, const at::TensorBase& out) {
  const int64_t n = g.numel();
  dispatch_fanout(g, out, [&](const auto* g_ptr, auto* out_ptr) {
    at::parallel_for(0, n, kGrain,
                     [&](int64_t begin, int64_t end) { fanout_range(g_ptr, coefs, out_ptr, n, begin, end); });
  });
}

}  // namespace fastfair
