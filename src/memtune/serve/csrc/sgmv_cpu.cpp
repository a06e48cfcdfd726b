// Segmented heterogeneous-rank LoRA on the CPU: one call per adapted layer per engine step.
//
//   for each segment g = [start_g, end_g) of tokens that share adapter g (module m):
//     y[t] += scale_g * B_g (A_g x[t])        A_g (r_g, d_in), Bt_g = B_g^T (r_g, d_out), t in [start_g, end_g)
//
// The factors are read in place from the engine's page pool (`pool`, flat): A_g starts at element
// a_off, Bt_g at bt_off; both are contiguous row-major. `meta` is (S, M, 3) int64 (a_off, bt_off,
// rank; rank 0 = the adapter does not adapt module m), `scale` (S, M) float32, `seg` (S, 2) int64.
//
// Short segments (decode: one token per sequence) run as two GEMVs per token with float
// accumulation, segments spread over threads (they write disjoint rows of y). Long segments
// (prefill) run as two ATen GEMMs each, the same ops as the Python segment loop.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

namespace {

constexpr int64_t kGemvMaxTokens = 4;  // longer segments go to ATen's GEMM

template <typename T>
void gemv_segment(T* y, const T* x, const T* a, const T* bt, int64_t n, int64_t r, int64_t d_in, int64_t d_out,
                  float scale, float* h, float* acc) {
  for (int64_t t = 0; t < n; ++t) {
    const T* xt = x + t * d_in;
    for (int64_t j = 0; j < r; ++j) {  // h = scale * A x_t        (r,)
      const T* aj = a + j * d_in;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < d_in; ++k) s += static_cast<float>(aj[k]) * static_cast<float>(xt[k]);
      h[j] = s * scale;
    }
    for (int64_t o = 0; o < d_out; ++o) acc[o] = 0.f;
    for (int64_t j = 0; j < r; ++j) {  // acc = Bt^T h = B h      (d_out,)
      const T* bj = bt + j * d_out;
      const float hj = h[j];
#pragma omp simd
      for (int64_t o = 0; o < d_out; ++o) acc[o] += hj * static_cast<float>(bj[o]);
    }
    T* yt = y + t * d_out;
#pragma omp simd
    for (int64_t o = 0; o < d_out; ++o) yt[o] = static_cast<T>(static_cast<float>(yt[o]) + acc[o]);
  }
}

void check(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "sgmv: ", name, " must be on the CPU");
  TORCH_CHECK(t.is_contiguous(), "sgmv: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dtype, "sgmv: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.dim() == dim, "sgmv: ", name, " must have ", dim, " dims, got ", t.dim());
}

}  // namespace

// y (T, d_out) += every segment's adapter term, in place; returns y.
at::Tensor sgmv_(at::Tensor y, const at::Tensor& x, const at::Tensor& pool, const at::Tensor& seg,
                 const at::Tensor& meta, const at::Tensor& scale, int64_t module) {
  const auto dt = y.scalar_type();
  check(y, "y", dt, 2);
  check(x, "x", dt, 2);
  check(pool, "pool", dt, 1);
  check(seg, "seg", at::kLong, 2);
  check(meta, "meta", at::kLong, 3);
  check(scale, "scale", at::kFloat, 2);
  const int64_t n_seg = seg.size(0), n_mod = meta.size(1), d_in = x.size(1), d_out = y.size(1);
  TORCH_CHECK(x.size(0) == y.size(0), "sgmv: x has ", x.size(0), " rows, y ", y.size(0));
  TORCH_CHECK(meta.size(0) == n_seg && meta.size(2) == 3 && scale.size(0) == n_seg && scale.size(1) == n_mod,
              "sgmv: meta must be (S, M, 3) and scale (S, M) for S = ", n_seg, " segments");
  TORCH_CHECK(module >= 0 && module < n_mod, "sgmv: module index ", module, " out of [0, ", n_mod, ")");
  const int64_t* sg = seg.data_ptr<int64_t>();
  const int64_t* mt = meta.data_ptr<int64_t>();
  const float* sc = scale.data_ptr<float>();
  const int64_t rows = y.size(0), pool_n = pool.numel();
  int64_t r_max = 0;
  std::vector<int64_t> gemm;  // segments long enough for a GEMM
  for (int64_t g = 0; g < n_seg; ++g) {
    const int64_t s = sg[2 * g], e = sg[2 * g + 1];
    const int64_t* m = mt + (g * n_mod + module) * 3;
    TORCH_CHECK(0 <= s && s <= e && e <= rows, "sgmv: segment ", g, " [", s, ", ", e, ") outside ", rows, " rows");
    TORCH_CHECK(m[2] >= 0 && m[0] >= 0 && m[1] >= 0 && m[0] + m[2] * d_in <= pool_n && m[1] + m[2] * d_out <= pool_n,
                "sgmv: segment ", g, " factors outside the pool");
    r_max = std::max(r_max, m[2]);
    if (m[2] > 0 && e - s > kGemvMaxTokens) gemm.push_back(g);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dt, "sgmv_", [&] {
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* pp = pool.data_ptr<scalar_t>();
    at::parallel_for(0, n_seg, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> h(r_max), acc(d_out);
      for (int64_t g = lo; g < hi; ++g) {
        const int64_t s = sg[2 * g], e = sg[2 * g + 1];
        const int64_t* m = mt + (g * n_mod + module) * 3;
        if (m[2] == 0 || e - s > kGemvMaxTokens) continue;
        gemv_segment<scalar_t>(yp + s * d_out, xp + s * d_in, pp + m[0], pp + m[1], e - s, m[2], d_in, d_out,
                               sc[g * n_mod + module], h.data(), acc.data());
      }
    });
  });
  for (int64_t g : gemm) {  // (n, d_in) @ (d_in, r) -> (n, r); y[s:e] += scale * h @ Bt
    const int64_t s = sg[2 * g], e = sg[2 * g + 1];
    const int64_t* m = mt + (g * n_mod + module) * 3;
    const at::Tensor a = pool.as_strided({m[2], d_in}, {d_in, 1}, m[0]);
    const at::Tensor bt = pool.as_strided({m[2], d_out}, {d_out, 1}, m[1]);
    y.narrow(0, s, e - s).addmm_(x.narrow(0, s, e - s).mm(a.t()), bt, 1.0, sc[g * n_mod + module]);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_", &sgmv_, "segmented heterogeneous-rank LoRA, in place on y (memtune serve)");
}
