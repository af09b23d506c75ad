// CPU kernels of the step and its backward: OpenMP over coordinates through ATen's parallel_for (torch's own
// OpenMP pool, so torch.set_num_threads applies and no second OpenMP runtime is loaded). Both run blocks
// of coordinates through register-tiled products (l2l_cpu_forward.h, l2l_cpu_backward.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "l2l_cpu_backward.h"
#include "l2l_ops.h"

namespace l2l {
namespace {

// Coordinates per task; the weight-gradient partial sums are per chunk of this many, whatever the number
// of threads, so the reduction's order (and so its rounding) never depends on the thread count.
constexpr int64_t kChunk = 2048;

// Runs fn(task) for tasks [0, count) on torch's threads, each thread claiming the next task until none is
// left: a thread slowed down (by another process on its core, say) takes fewer tasks instead of holding
// the others at the end.
template <typename Fn>
void claim_tasks(int64_t count, Fn&& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), count);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t; (t = next.fetch_add(1)) < count;) fn(t);
  });
}

// An output allocated for this call is first touched by the kernel, a page fault per page, and in a VM a
// fault is expensive: measured here, first writing 32 MB (the state outputs at 100k coordinates) takes
// 26 ms in 4 KiB pages, more than the step, and 3.6 ms in 2 MiB ones. The whole 2 MiB pages of an output
// are asked for as huge pages. Advice only: pages already mapped stay as they are.
void prefer_huge_pages(const at::Tensor& t) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (first + kHuge - 1) & ~(kHuge - 1), end = (first + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

template <typename Fn>
void dispatch_hidden(const NetShape& s, Fn&& fn) {
  if (s.hidden == 20) {
    fn(std::integral_constant<int, 20>());
  } else {
    fn(std::integral_constant<int, 0>());
  }
}

// The factors of θ' = θ·decay + lr·Δ: (1, 1) for meta-training's step, the group's options for the optimizer's.
struct Factors {
  float lr, decay;
  bool maximize;
};

Factors factors(const Update& u) {
  const float lr = u.lr_ptr != nullptr ? *u.lr_ptr : u.lr;  // a CPU tensor's value: reading it waits for nothing
  return {lr, decay_factor(lr, u.weight_decay), u.maximize};
}

// Returns how many coordinates were skipped for a non-finite ∇ (only for the optimizer's step). The
// coordinates that take the learned step are gathered into blocks of cpu::kBlock, whatever lies between them.
template <int H_CT, typename S, typename P>
int64_t forward_rows(const Row& row, int64_t begin, int64_t end, const cpu::BlockWeights& w, const NetShape& s,
                     bool group_step, const Factors& f) {
  using acc_t = at::opmath_type<P>;  // float, or double for double parameters
  const P* theta_in = row[0].const_data_ptr<P>();
  P* theta_out = row[1].data_ptr<P>();
  const P* grad = row[2].const_data_ptr<P>();
  const S* h_in = reinterpret_cast<const S*>(row[3].const_data_ptr());
  S* h_out = reinterpret_cast<S*>(row[4].data_ptr());
  const S* c_in = reinterpret_cast<const S*>(row[5].const_data_ptr());
  S* c_out = reinterpret_cast<S*>(row[6].data_ptr());
  const int64_t stride = row[0].numel() * s.hidden;
  const acc_t decay = static_cast<acc_t>(f.decay);
  int64_t skipped = 0, index[cpu::kBlock];
  float x[cpu::kBlock][2] = {}, delta[cpu::kBlock];
  int count = 0;
  auto run_block = [&] {
    cpu::block_forward<H_CT, S>(s, w, count, index, x, h_in, c_in, h_out, c_out, stride, delta);
    for (int b = 0; b < count; ++b) {
      const int64_t n = index[b];
      theta_out[n] = static_cast<P>(static_cast<acc_t>(theta_in[n]) * decay + static_cast<acc_t>(f.lr * delta[b]));
    }
    count = 0;
  };
  for (int64_t n = begin; n < end; ++n) {
    float g = static_cast<float>(grad[n]);
    if (group_step) {
      if (!std::isfinite(g)) {
        ++skipped;
        continue;
      }
      if (g == 0.0f) {  // no gradient signal: the state stays, θ only decays
        theta_out[n] = static_cast<P>(static_cast<acc_t>(theta_in[n]) * decay);
        continue;
      }
      if (f.maximize) g = -g;
    }
    features(s, g, x[count]);
    index[count] = n;
    if (++count == cpu::kBlock) run_block();
  }
  if (count > 0) run_block();
  return skipped;
}

template <typename Fn>
void dispatch_state(const at::Tensor& state, Fn&& fn) {
  if (state.scalar_type() == at::kBFloat16) {
    fn(uint16_t());
  } else {
    fn(float());
  }
}

}  // namespace

void forward_cpu(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s, int64_t* skipped,
                 const Update& u) {
  // One parallel loop over the group's coordinates, in chunks that never straddle two tensors.
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (row, first coordinate)
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r)
    for (int64_t n = 0; n < rows[r][0].numel(); n += kChunk) tasks.emplace_back(r, n);
  for (const Row& row : rows)
    for (int out : {4, 6})  // h' and c', unless they are h and c (the optimizer's in-place step)
      if (!row[out].is_same(row[out - 1])) prefer_huge_pages(row[out]);
  const cpu::BlockWeights w(s, weights.const_data_ptr<float>());
  std::atomic<int64_t> total{0};
  const Factors f = factors(u);
  dispatch_state(rows.front()[3], [&](auto state_tag) {
    using S = decltype(state_tag);
    dispatch_hidden(s, [&](auto hidden) {
      claim_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) {
        const Row& row = rows[tasks[t].first];
        const int64_t begin = tasks[t].second, end = std::min(begin + kChunk, row[0].numel());
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, row[0].scalar_type(), "l2l_forward_cpu", [&] {
          total += forward_rows<decltype(hidden)::value, S, scalar_t>(row, begin, end, w, s, skipped != nullptr, f);
        });
      });
    });
  });
  if (skipped != nullptr) *skipped += total.load();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& h,
                                                           const at::Tensor& c, const at::Tensor& dtheta,
                                                           const at::Tensor& dh_next, const at::Tensor& dc_next,
                                                           const at::Tensor& weights, const NetShape& s) {
  const int64_t n = grad.numel(), stride = n * s.hidden;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  auto dh = at::empty_like(dh_next), dc = at::empty_like(dc_next);
  prefer_huge_pages(dh);
  prefer_huge_pages(dc);
  const float* w = weights.const_data_ptr<float>();
  const cpu::BlockWeights wb(s, w);
  const cpu::AdjointWeights wa(s, w);
  const cpu::GradLayout layout(s, wb.cols);
  // One weight-gradient partial per chunk, whichever thread runs it.
  auto partial = at::zeros({std::max<int64_t>(chunks, 1), layout.size}, weights.options());
  float* acc = partial.data_ptr<float>();
  dispatch_state(h, [&](auto state_tag) {
    using S = decltype(state_tag);
    const S* hp = reinterpret_cast<const S*>(h.const_data_ptr());
    const S* cp = reinterpret_cast<const S*>(c.const_data_ptr());
    dispatch_hidden(s, [&](auto hidden) {
      claim_tasks(chunks, [&](int64_t k) {
        cpu::chunk_backward<decltype(hidden)::value, S>(
            s, wb, wa, layout, k * kChunk, std::min(n, (k + 1) * kChunk), grad.const_data_ptr<float>(), hp, cp,
            dtheta.const_data_ptr<float>(), dh_next.const_data_ptr<float>(), dc_next.const_data_ptr<float>(),
            dh.data_ptr<float>(), dc.data_ptr<float>(), stride, acc + k * layout.size);
      });
    });
  });
  // Second stage: chunk partials summed in chunk order (parallel over weight entries only), then unpacked.
  std::vector<float> total(layout.size, 0.0f);
  at::parallel_for(0, layout.size, 256, [&](int64_t first, int64_t last) {
    for (int64_t k = 0; k < chunks; ++k) {
      const float* row = acc + k * layout.size;
      for (int64_t e = first; e < last; ++e) total[e] += row[e];
    }
  });
  auto d_weights = at::empty({packed_size(s)}, weights.options());
  layout.unpack(s, total.data(), d_weights.data_ptr<float>());
  return {dh, dc, d_weights};
}

}  // namespace l2l
