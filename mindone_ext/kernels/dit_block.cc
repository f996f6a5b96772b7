// A whole DiT block (dit.py's dit_layer) as one CPU kernel: the time embedding's six modulations,
// the modulated norm, the q, k, v projections, the rotary window attention, the output projection's
// gated residual, the MLP's modulated norm, its GELU and its gated residual. The same steps as the
// block's ~14 graph kernels (window_attention.h, dit_steps.h, sgemm.h), in one call: at the tiny
// checkpoint's shapes a block's kernels cost mostly their launches (an ODE window of one answer
// spent ~85% of its time outside the kernels' own work), and a solve runs 36 DiT evaluations.
// Built against MindSpore's oneDNN (sgemm.h).
#include <cstdint>
#include <vector>

#include "dit_steps.h"
#include "parallel.h"
#include "sgemm.h"
#include "tensors.h"
#include "window_attention.h"

namespace {

const int64_t VALUES_PER_THREAD = 1 << 14;  // as dit_modulation.cc's norms
const int64_t PRODUCTS_PER_THREAD = 1 << 20;  // multiply-adds below which a projection runs on one thread

// The block's inputs, in dit_layer's weights' order after x and t_emb.
enum Input { X, TIME, NORM_W, NORM_B, Q_W, Q_B, K_W, K_B, V_W, V_B, O_W, O_B, UP_W, UP_B, DOWN_W, DOWN_B, COS, SIN,
             KEYS, VALID, SCALE, OUT, COUNT };

const float *in(void **params, int i) { return static_cast<const float *>(params[i]); }

// Whether input i is a matrix (rows, cols), or a vector (rows,) when cols is 0.
bool shaped(int *ndims, int64_t **shapes, int i, int64_t rows, int64_t cols = 0) {
  return cols == 0 ? ndims[i] == 1 && shapes[i][0] == rows
                   : ndims[i] == 2 && shapes[i][0] == rows && shapes[i][1] == cols;
}

}  // namespace

// MindSpore's AOT custom-op entry. Inputs: x (B, T, D) float32 or its (B * T, D) rows; t_emb (B or
// 1, E), the time embedding (one row shared by every batch row: a guided row's two halves); the
// block's weights as the checkpoint holds them (AdaLN's linear (6 D, E) and bias, q, k, v (H * Dh,
// D) and biases, the output projection (D, H * Dh) and bias, the MLP's up (F, D), down (D, F) and
// biases); cos, sin (H, T, Dh), keys, valid and scale as WindowAttention takes them. Output like x.
extern "C" int DiTBlock(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  native::Window window;
  if (nparam != COUNT || (ndims[X] != 2 && ndims[X] != 3) || ndims[TIME] != 2 || ndims[COS] != 3 ||
      !native::float32(dtypes, KEYS) || !native::window_input(params, ndims, shapes, KEYS, &window))
    return 1;
  const int64_t dim = shapes[X][ndims[X] - 1], rows = native::count(ndims[X], shapes[X]) / dim;
  const int64_t heads = shapes[COS][0], frames = shapes[COS][1], head_dim = shapes[COS][2], inner = heads * head_dim;
  const int64_t embed = shapes[TIME][1], times = shapes[TIME][0], hidden = shapes[UP_W][0];
  const int64_t batch = rows / frames;
  if (rows % frames != 0 || (times != 1 && times != batch) || !shaped(ndims, shapes, NORM_W, 6 * dim, embed) ||
      !shaped(ndims, shapes, NORM_B, 6 * dim) || !shaped(ndims, shapes, O_W, dim, inner) ||
      !shaped(ndims, shapes, O_B, dim) || !shaped(ndims, shapes, UP_W, hidden, dim) ||
      !shaped(ndims, shapes, UP_B, hidden) || !shaped(ndims, shapes, DOWN_W, dim, hidden) ||
      !shaped(ndims, shapes, DOWN_B, dim) || native::count(ndims[SIN], shapes[SIN]) != heads * frames * head_dim)
    return 1;
  for (int i = Q_W; i <= V_B; i += 2)  // q, k, v and their biases
    if (!shaped(ndims, shapes, i, inner, dim) || !shaped(ndims, shapes, i + 1, inner)) return 1;
  const float *x = in(params, X);
  float *out = static_cast<float *>(params[OUT]);
  // the six modulations (shift, scale, gate of the attention, then of the MLP), (times, 6 D)
  std::vector<float> activated(times * embed), modulation(times * 6 * dim);
  const float *t_emb = in(params, TIME);
  for (int64_t i = 0; i < times * embed; ++i) activated[i] = t_emb[i] * native::sigmoid(t_emb[i]);
  int failed = native::linear_rows(activated.data(), times, embed, in(params, NORM_W), 6 * dim, in(params, NORM_B),
                                   modulation.data(), PRODUCTS_PER_THREAD);
  auto part = [&](int64_t row, int which) {  // modulation `which` of x's row `row`
    return modulation.data() + ((times == 1 ? 0 : row / frames) * 6 + which) * dim;
  };
  auto each_row = [&](auto step) {
    native::parallel_ranges(rows, rows * dim, VALUES_PER_THREAD, [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) step(r);
    });
  };
  std::vector<float> h(rows * dim), q(rows * inner), k(rows * inner), v(rows * inner), attended(rows * inner);
  std::vector<float> y(rows * dim), up(rows * hidden);
  each_row([&](int64_t r) {
    native::modulated_norm_row(x + r * dim, part(r, 1), part(r, 0), dim, h.data() + r * dim);
  });
  const Input projections[] = {Q_W, K_W, V_W};
  float *projected[] = {q.data(), k.data(), v.data()};
  for (int i = 0; i < 3; ++i)
    failed |= native::linear_rows(h.data(), rows, dim, in(params, projections[i]), inner, nullptr, projected[i],
                                  PRODUCTS_PER_THREAD);
  native::window_attention(q.data(), k.data(), v.data(), in(params, Q_B), in(params, K_B), in(params, V_B),
                           in(params, COS), in(params, SIN), window, *in(params, SCALE), batch, frames, heads,
                           head_dim, attended.data());
  failed |= native::linear_rows(attended.data(), rows, inner, in(params, O_W), dim, nullptr, y.data(),
                                PRODUCTS_PER_THREAD);
  // the attention's residual (into out), the MLP's norm of it
  each_row([&](int64_t r) {
    native::gated_residual_row(x + r * dim, part(r, 2), y.data() + r * dim, in(params, O_B), dim, out + r * dim);
    native::modulated_norm_row(out + r * dim, part(r, 4), part(r, 3), dim, h.data() + r * dim);
  });
  failed |= native::linear_rows(h.data(), rows, dim, in(params, UP_W), hidden, nullptr, up.data(), PRODUCTS_PER_THREAD);
  native::parallel_ranges(rows, rows * hidden, VALUES_PER_THREAD, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r)
      native::gelu_tanh_row(up.data() + r * hidden, in(params, UP_B), hidden, up.data() + r * hidden);
  });
  failed |= native::linear_rows(up.data(), rows, hidden, in(params, DOWN_W), dim, nullptr, y.data(),
                                PRODUCTS_PER_THREAD);
  each_row([&](int64_t r) {
    native::gated_residual_row(out + r * dim, part(r, 5), y.data() + r * dim, in(params, DOWN_B), dim, out + r * dim);
  });
  return failed;
}
