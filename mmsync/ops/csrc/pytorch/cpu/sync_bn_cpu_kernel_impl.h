// Body of the sync_bn CPU kernels, included (no include guard on purpose)
// inside one namespace per instruction set by sync_bn_cpu_kernel*.cpp, after
// sync_bn_cpu_kernel.h. Work is cut into fixed pieces, independent of the
// thread count, and partials are merged in a fixed order: deterministic.

// Elements of one plane summed in the accumulate type before the partial
// moments are merged in double; small enough to stay in L1/L2 between the
// two reads of the statistics pass, so memory is read once.
constexpr int64_t kChunk = 4096;
// Independent accumulators of the reductions (vectorized by the compiler).
constexpr int kLanes = 64;
// ROWS layout: channels per tile, elements per block, row groups.
constexpr int64_t kTile = 1024;
constexpr int64_t kBlockElems = 16384;
constexpr int64_t kMaxGroups = 64;

// About 32K elements per task of the elementwise passes.
inline int64_t grain_for(int64_t inner) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, inner));
}

template <typename acc_t>
inline acc_t reduce_lanes(acc_t* acc) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// Per-channel constants in the accumulate type. The mean is split into hi +
// lo parts so that x - mean keeps full precision when mean >> std.
template <typename acc_t>
struct Consts {
  std::vector<acc_t> hi, lo, k, b;
  Consts(const ChannelTable& t, int64_t C) : hi(C), lo(C), k(C), b(C) {
    for (int64_t c = 0; c < C; ++c) {
      hi[c] = acc_t(t.mean[c]);
      lo[c] = acc_t(t.mean[c] - double(hi[c]));
      k[c] = acc_t(t.scale[c]);
      b[c] = acc_t(t.bias[c]);
    }
  }
};

// Mean (relative to `base`) and M2 of x[0..n) in two reads of a
// cache-resident span: the mean, then the shifted moments, corrected by their
// first-order residual. Relative means of one channel merge without the
// rounding of means at the data's offset.
template <typename scalar_t, typename acc_t>
inline void span_moments(const scalar_t* x, int64_t n, double base,
                         double& mean, double& m2) {
  acc_t acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += acc_t(x[i + j]);
  acc_t total = reduce_lanes(acc);
  for (; i < n; ++i) total += acc_t(x[i]);
  const acc_t shift = total / acc_t(n);
  acc_t s1[kLanes] = {}, s2[kLanes] = {};
  for (i = 0; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = acc_t(x[i + j]) - shift;
      s1[j] += d;
      s2[j] += d * d;
    }
  acc_t d1 = reduce_lanes(s1), d2 = reduce_lanes(s2);
  for (; i < n; ++i) {
    const acc_t d = acc_t(x[i]) - shift;
    d1 += d;
    d2 += d * d;
  }
  mean = (double(shift) - base) + double(d1) / double(n);
  m2 = double(d2) - double(d1) * double(d1) / double(n);
}

template <typename scalar_t>
void stats_planar(const scalar_t* x, const Geometry& g, double* shift,
                  double* mean, double* var) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = (g.S + kChunk - 1) / kChunk;
  const int64_t tasks = g.N * g.C * K;
  std::vector<double> part_mean(tasks), part_m2(tasks);
  for (int64_t c = 0; c < g.C; ++c) shift[c] = double(x[c * g.S]);
  at::parallel_for(0, tasks, grain_for(std::min(g.S, kChunk)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t plane = t / K, k = t % K;
                       const int64_t len = std::min(kChunk, g.S - k * kChunk);
                       span_moments<scalar_t, acc_t>(
                           x + plane * g.S + k * kChunk, len,
                           shift[plane % g.C], part_mean[t], part_m2[t]);
                     }
                   });
  at::parallel_for(0, g.C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double n = 0, m = 0, m2 = 0;
      for (int64_t i = 0; i < g.N; ++i)
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t = (i * g.C + c) * K + k;
          const double len = double(std::min(kChunk, g.S - k * kChunk));
          chan_merge(n, m, m2, len, part_mean[t], part_m2[t]);
        }
      mean[c] = m;
      var[c] = n > 0 ? m2 / n : 0.0;
    }
  });
}

// Splits the rows of a ROWS input into blocks of about kBlockElems, and the
// blocks into a fixed number of groups; each (group, channel tile) task
// owns its partials, so memory stays O(groups * C).
struct RowPlan {
  int64_t tile, tiles, block_rows, blocks, groups;
  explicit RowPlan(const Geometry& g) {
    tile = std::min(g.C, kTile);
    tiles = (g.C + tile - 1) / tile;
    block_rows = std::max<int64_t>(8, kBlockElems / tile);
    blocks = (g.rows() + block_rows - 1) / block_rows;
    groups = std::min(blocks, kMaxGroups);
  }
  int64_t group_begin(int64_t grp) const { return grp * blocks / groups; }

  // Calls fn(group, c0, ct, r0, r1) for every block of every task.
  template <typename F>
  void for_each_block(const Geometry& g, F fn) const {
    at::parallel_for(0, groups * tiles, 1, [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t grp = task / tiles, c0 = (task % tiles) * tile;
        const int64_t ct = std::min(tile, g.C - c0);
        for (int64_t blk = group_begin(grp); blk < group_begin(grp + 1);
             ++blk) {
          const int64_t r0 = blk * block_rows;
          fn(grp, c0, ct, r0, std::min(g.rows(), r0 + block_rows));
        }
      }
    });
  }
};

// Channels of a ROWS block handled with accumulators held in registers.
template <typename acc_t>
constexpr int64_t row_width() {
  return 256 / int64_t(sizeof(acc_t));
}

// Moments of channels [c0, c0 + W) over rows [r0, r1), means relative to
// base[c0..], W fixed at compile time (accumulators in registers) or the
// runtime width `w` when W == 0.
template <int64_t W, typename scalar_t, typename acc_t>
inline void rows_moments(const scalar_t* x, int64_t C, int64_t c0, int64_t w,
                         int64_t r0, int64_t r1, const double* base,
                         double* mean, double* m2) {
  constexpr int64_t kMax = row_width<acc_t>();
  const int64_t width = W > 0 ? W : w;
  acc_t s[kMax] = {}, d1[kMax] = {}, d2[kMax] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c0;
    for (int64_t j = 0; j < width; ++j) s[j] += acc_t(row[j]);
  }
  const acc_t inv_rows = acc_t(1) / acc_t(r1 - r0);
  for (int64_t j = 0; j < width; ++j) s[j] *= inv_rows;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* row = x + r * C + c0;
    for (int64_t j = 0; j < width; ++j) {
      const acc_t d = acc_t(row[j]) - s[j];
      d1[j] += d;
      d2[j] += d * d;
    }
  }
  const double rows = double(r1 - r0);
  for (int64_t j = 0; j < width; ++j) {
    mean[j] = (double(s[j]) - base[j]) + double(d1[j]) / rows;
    m2[j] = double(d2[j]) - double(d1[j]) * double(d1[j]) / rows;
  }
}

template <typename scalar_t>
void stats_rows(const scalar_t* x, const Geometry& g, double* shift,
                double* mean, double* var) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = row_width<acc_t>();
  const RowPlan plan(g);
  const int64_t C = g.C;
  std::vector<double> gn(plan.groups * C, 0.0), gm(plan.groups * C, 0.0),
      gm2(plan.groups * C, 0.0);
  for (int64_t c = 0; c < C; ++c) shift[c] = double(x[c]);
  plan.for_each_block(g, [&](int64_t grp, int64_t c0, int64_t ct, int64_t r0,
                             int64_t r1) {
    double bm[W], bm2[W];
    const double rows = double(r1 - r0);
    for (int64_t c = c0; c < c0 + ct; c += W) {
      const int64_t w = std::min(W, c0 + ct - c);
      if (w == W)
        rows_moments<W, scalar_t, acc_t>(x, C, c, W, r0, r1, shift + c, bm,
                                         bm2);
      else
        rows_moments<0, scalar_t, acc_t>(x, C, c, w, r0, r1, shift + c, bm,
                                         bm2);
      for (int64_t j = 0; j < w; ++j) {
        const int64_t idx = grp * C + c + j;
        chan_merge(gn[idx], gm[idx], gm2[idx], rows, bm[j], bm2[j]);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, m = 0, m2 = 0;
    for (int64_t grp = 0; grp < plan.groups; ++grp) {
      const int64_t idx = grp * C + c;
      chan_merge(n, m, m2, gn[idx], gm[idx], gm2[idx]);
    }
    mean[c] = m;
    var[c] = n > 0 ? m2 / n : 0.0;
  }
}

void stats(at::ScalarType dtype, const void* x, const Geometry& g,
           double* shift, double* mean, double* var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "sync_bn_stats_cpu", [&] {
        const scalar_t* xs = static_cast<const scalar_t*>(x);
        if (g.layout == Layout::kPlanar)
          stats_planar<scalar_t>(xs, g, shift, mean, var);
        else
          stats_rows<scalar_t>(xs, g, shift, mean, var);
      });
}

// ReLU of an output value; NaN stays NaN, as in F.relu.
template <typename acc_t>
inline acc_t relu_value(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

// ReLU's gradient: dy where the forward output xm * k + b was positive, 0
// elsewhere. Both operands are values already loaded, so that the compiler
// turns the choice into a vector blend instead of a conditional load.
template <typename acc_t>
inline acc_t relu_grad(acc_t dy, acc_t xm, acc_t k, acc_t b) {
  return xm * k + b > acc_t(0) ? dy : acc_t(0);
}

template <typename scalar_t, typename acc_t>
inline void output_span(const scalar_t* x, scalar_t* y, int64_t n, acc_t hi,
                        acc_t lo, acc_t k, acc_t b, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      y[i] = scalar_t(relu_value(((acc_t(x[i]) - hi) - lo) * k + b));
    }
  } else {
    for (int64_t i = 0; i < n; ++i)
      y[i] = scalar_t(((acc_t(x[i]) - hi) - lo) * k + b);
  }
}

template <typename scalar_t>
void output_impl(const scalar_t* x, scalar_t* y, const Geometry& g,
                 const ChannelTable& t, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const Consts<acc_t> cs(t, g.C);
  const acc_t *hi = cs.hi.data(), *lo = cs.lo.data(), *k = cs.k.data(),
              *b = cs.b.data();
  const int64_t C = g.C;
  if (g.layout == Layout::kPlanar) {
    at::parallel_for(0, g.N * C, grain_for(g.S), [&](int64_t bg, int64_t e) {
      for (int64_t p = bg; p < e; ++p) {
        const int64_t c = p % C;
        output_span(x + p * g.S, y + p * g.S, g.S, hi[c], lo[c], k[c], b[c],
                    relu);
      }
    });
    return;
  }
  at::parallel_for(0, g.rows(), grain_for(C), [&](int64_t bg, int64_t e) {
    for (int64_t r = bg; r < e; ++r) {
      const scalar_t* xr = x + r * C;
      scalar_t* yr = y + r * C;
      if (relu) {
        for (int64_t c = 0; c < C; ++c) {
          yr[c] = scalar_t(
              relu_value(((acc_t(xr[c]) - hi[c]) - lo[c]) * k[c] + b[c]));
        }
      } else {
        for (int64_t c = 0; c < C; ++c)
          yr[c] = scalar_t(((acc_t(xr[c]) - hi[c]) - lo[c]) * k[c] + b[c]);
      }
    }
  });
}

void output(at::ScalarType dtype, const void* x, void* y, const Geometry& g,
            const ChannelTable& t, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "sync_bn_output_cpu", [&] {
        output_impl<scalar_t>(static_cast<const scalar_t*>(x),
                              static_cast<scalar_t*>(y), g, t, relu);
      });
}

// sum(dy') and sum(dy' * (x - mean)) over a span; with relu, dy' is dy where
// the forward output (x - mean) * k + b was positive and 0 elsewhere.
template <typename scalar_t, typename acc_t>
inline void grad_span_sums(const scalar_t* dy, const scalar_t* x, int64_t n,
                           acc_t hi, acc_t lo, acc_t k, acc_t b, bool relu,
                           double& sdy, double& sdyx) {
  acc_t a1[kLanes] = {}, a2[kLanes] = {};
  int64_t i = 0;
  if (relu) {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const acc_t xm = (acc_t(x[i + j]) - hi) - lo;
        const acc_t gv = relu_grad(acc_t(dy[i + j]), xm, k, b);
        a1[j] += gv;
        a2[j] += gv * xm;
      }
  } else {
    for (; i + kLanes <= n; i += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const acc_t gv = acc_t(dy[i + j]);
        a1[j] += gv;
        a2[j] += gv * ((acc_t(x[i + j]) - hi) - lo);
      }
  }
  acc_t t1 = reduce_lanes(a1), t2 = reduce_lanes(a2);
  for (; i < n; ++i) {
    const acc_t xm = (acc_t(x[i]) - hi) - lo;
    const acc_t gv = relu ? relu_grad(acc_t(dy[i]), xm, k, b) : acc_t(dy[i]);
    t1 += gv;
    t2 += gv * xm;
  }
  sdy = t1;
  sdyx = t2;
}

template <typename scalar_t>
void reduce_planar(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                   const Consts<at::opmath_type<scalar_t>>& cs, bool relu,
                   double* sdy, double* sdyx) {
  const int64_t C = g.C, K = (g.S + kChunk - 1) / kChunk;
  const int64_t tasks = g.N * C * K;
  std::vector<double> p1(tasks), p2(tasks);
  at::parallel_for(0, tasks, grain_for(std::min(g.S, kChunk)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t plane = t / K, kk = t % K, c = plane % C;
                       const int64_t off = plane * g.S + kk * kChunk;
                       const int64_t len = std::min(kChunk, g.S - kk * kChunk);
                       grad_span_sums(dy + off, x + off, len, cs.hi[c],
                                      cs.lo[c], cs.k[c], cs.b[c], relu, p1[t],
                                      p2[t]);
                     }
                   });
  for (int64_t i = 0; i < g.N; ++i)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t kk = 0; kk < K; ++kk) {
        const int64_t t = (i * C + c) * K + kk;
        sdy[c] += p1[t];
        sdyx[c] += p2[t];
      }
}

// sum(dy') and sum(dy' * (x - mean)) of channels [c0, c0 + W) over rows
// [r0, r1); W fixed at compile time, or the runtime width `w` when W == 0.
template <int64_t W, typename scalar_t, typename acc_t>
inline void rows_grad_sums(const scalar_t* dy, const scalar_t* x, int64_t C,
                           int64_t c0, int64_t w, int64_t r0, int64_t r1,
                           const Consts<acc_t>& cs, bool relu, double* g1,
                           double* g2) {
  constexpr int64_t kMax = row_width<acc_t>();
  const int64_t width = W > 0 ? W : w;
  const acc_t *hi = cs.hi.data() + c0, *lo = cs.lo.data() + c0,
              *k = cs.k.data() + c0, *b = cs.b.data() + c0;
  acc_t a1[kMax] = {}, a2[kMax] = {};
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* xr = x + r * C + c0;
    const scalar_t* dr = dy + r * C + c0;
    if (relu) {
      for (int64_t j = 0; j < width; ++j) {
        const acc_t xm = (acc_t(xr[j]) - hi[j]) - lo[j];
        const acc_t gv = relu_grad(acc_t(dr[j]), xm, k[j], b[j]);
        a1[j] += gv;
        a2[j] += gv * xm;
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        const acc_t gv = acc_t(dr[j]);
        a1[j] += gv;
        a2[j] += gv * ((acc_t(xr[j]) - hi[j]) - lo[j]);
      }
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    g1[j] += a1[j];
    g2[j] += a2[j];
  }
}

template <typename scalar_t>
void reduce_rows(const scalar_t* dy, const scalar_t* x, const Geometry& g,
                 const Consts<at::opmath_type<scalar_t>>& cs, bool relu,
                 double* sdy, double* sdyx) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = row_width<acc_t>();
  const RowPlan plan(g);
  const int64_t C = g.C;
  std::vector<double> g1(plan.groups * C, 0.0), g2(plan.groups * C, 0.0);
  plan.for_each_block(g, [&](int64_t grp, int64_t c0, int64_t ct, int64_t r0,
                             int64_t r1) {
    for (int64_t c = c0; c < c0 + ct; c += W) {
      const int64_t w = std::min(W, c0 + ct - c);
      double* p1 = g1.data() + grp * C + c;
      double* p2 = g2.data() + grp * C + c;
      if (w == W)
        rows_grad_sums<W>(dy, x, C, c, W, r0, r1, cs, relu, p1, p2);
      else
        rows_grad_sums<0>(dy, x, C, c, w, r0, r1, cs, relu, p1, p2);
    }
  });
  for (int64_t grp = 0; grp < plan.groups; ++grp)
    for (int64_t c = 0; c < C; ++c) {
      sdy[c] += g1[grp * C + c];
      sdyx[c] += g2[grp * C + c];
    }
}

void reduce(at::ScalarType dtype, const void* dy, const void* x,
            const Geometry& g, const ChannelTable& t, bool relu,
            double* sum_dy, double* sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "sync_bn_reduce_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const Consts<acc_t> cs(t, g.C);
        const scalar_t* d = static_cast<const scalar_t*>(dy);
        const scalar_t* xs = static_cast<const scalar_t*>(x);
        if (g.layout == Layout::kPlanar)
          reduce_planar(d, xs, g, cs, relu, sum_dy, sum_dy_xmu);
        else
          reduce_rows(d, xs, g, cs, relu, sum_dy, sum_dy_xmu);
      });
}

template <typename scalar_t>
void data_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx,
               const Geometry& g, const ChannelTable& t, const double* shift_,
               const double* k2_, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const Consts<acc_t> cs(t, g.C);
  const int64_t C = g.C;
  std::vector<acc_t> shift_v(C), k2_v(C);
  for (int64_t c = 0; c < C; ++c) {
    shift_v[c] = acc_t(shift_[c]);
    k2_v[c] = acc_t(k2_[c]);
  }
  const acc_t *hi = cs.hi.data(), *lo = cs.lo.data(), *k = cs.k.data(),
              *b = cs.b.data(), *shift = shift_v.data(), *k2 = k2_v.data();
  if (g.layout == Layout::kPlanar) {
    at::parallel_for(0, g.N * C, grain_for(g.S), [&](int64_t bg, int64_t e) {
      for (int64_t p = bg; p < e; ++p) {
        const int64_t c = p % C, off = p * g.S;
        const acc_t h = hi[c], l = lo[c], kc = k[c], sc = shift[c],
                    k2c = k2[c], bc = b[c];
        const scalar_t* xp = x + off;
        const scalar_t* dp = dy + off;
        scalar_t* gp = dx + off;
        if (relu) {
          for (int64_t i = 0; i < g.S; ++i) {
            const acc_t xm = (acc_t(xp[i]) - h) - l;
            const acc_t gv = relu_grad(acc_t(dp[i]), xm, kc, bc);
            gp[i] = scalar_t(kc * (gv - sc) + k2c * xm);
          }
        } else {
          for (int64_t i = 0; i < g.S; ++i)
            gp[i] =
                scalar_t(kc * (acc_t(dp[i]) - sc) + k2c * ((acc_t(xp[i]) - h) - l));
        }
      }
    });
    return;
  }
  at::parallel_for(0, g.rows(), grain_for(C), [&](int64_t bg, int64_t e) {
    for (int64_t r = bg; r < e; ++r) {
      const scalar_t* xr = x + r * C;
      const scalar_t* dr = dy + r * C;
      scalar_t* gr = dx + r * C;
      if (relu) {
        for (int64_t c = 0; c < C; ++c) {
          const acc_t xm = (acc_t(xr[c]) - hi[c]) - lo[c];
          const acc_t gv = relu_grad(acc_t(dr[c]), xm, k[c], b[c]);
          gr[c] = scalar_t(k[c] * (gv - shift[c]) + k2[c] * xm);
        }
      } else {
        for (int64_t c = 0; c < C; ++c)
          gr[c] = scalar_t(k[c] * (acc_t(dr[c]) - shift[c]) +
                           k2[c] * ((acc_t(xr[c]) - hi[c]) - lo[c]));
      }
    }
  });
}

void data(at::ScalarType dtype, const void* dy, const void* x, void* dx,
          const Geometry& g, const ChannelTable& t, const double* shift,
          const double* k2, bool relu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, dtype, "sync_bn_data_cpu", [&] {
        data_impl<scalar_t>(static_cast<const scalar_t*>(dy),
                            static_cast<const scalar_t*>(x),
                            static_cast<scalar_t*>(dx), g, t, shift, k2, relu);
      });
}

const Kernels* table() {
  static const Kernels kernels{MMSYNC_ISA_NAME, &stats, &output, &reduce,
                               &data};
  return &kernels;
}
