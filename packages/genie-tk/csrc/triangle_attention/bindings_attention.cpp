// Python bindings of the triangle attention kernels: argument checks that name
// the argument (common/tensor_checks.h), then the host entry points of
// triangle_attention.h on the caller's stream. Layouts: see that header.
#include "triangle_attention/bindings_attention.h"

#include <nanobind/ndarray.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "common/cuda_utils.h"
#include "common/tensor_checks.h"
#include "triangle_attention/triangle_attention.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace genie_tk {
namespace {

// TMA boxes and the kernels' float2 loads need aligned bases.
constexpr std::size_t kAlignment = 16;
// TMA global strides must stay below 2^40 bytes.
constexpr std::int64_t kMaxTensorBytes = std::int64_t{1} << 40;

using Shape = std::initializer_list<std::int64_t>;

std::int64_t dim(const nb::ndarray<>& a, std::size_t i) { return static_cast<std::int64_t>(a.shape(i)); }

void check_tensor(const nb::ndarray<>& a, const char* name, nb::dlpack::dtype dtype, Shape shape,
                  const nb::ndarray<>& like, const char* like_name) {
    check_operand(a, name, dtype, shape, like, like_name, kAlignment);
}

// The problem described by q ([B, I, H, N, D], bf16 or fp16) after checking
// it; `name` is the argument that plays q's part.
TriangleAttentionProblem problem_of(const nb::ndarray<>& q, const char* name, double scale) {
    const std::string arg = name;
    check_cuda_device(q, name);
    check_ndim(q, name, 5);
    if (q.dtype() != kBFloat16 && q.dtype() != kFloat16) {
        fail_type(arg + " must have dtype bfloat16 or float16, got " + dtype_name(q.dtype()));
    }
    check_contiguous(q, name);
    check_alignment(q, name, kAlignment);
    for (std::size_t i = 0; i < 4; ++i) {
        if (dim(q, i) > INT_MAX) fail_value(arg + " has a dimension over 2^31 - 1: shape " + shape_str(q));
    }
    if (dim(q, 1) * dim(q, 2) > INT_MAX) fail_value(arg + ": rows * heads must stay below 2^31, shape " + shape_str(q));
    const std::int64_t np = triangle_attention_padded_keys(dim(q, 3));
    if (static_cast<std::int64_t>(q.size()) * 2 >= kMaxTensorBytes ||
        dim(q, 0) * dim(q, 2) * dim(q, 3) * np * 2 >= kMaxTensorBytes) {
        fail_value(arg + " is too large for the kernels' tensor maps (2^40 bytes), shape " + shape_str(q));
    }
    if (!triangle_attention_head_dim_supported(dim(q, 4))) {
        fail_value(arg + " has head dim " + std::to_string(dim(q, 4)) + "; the kernels take 16, 32 or 64");
    }
    if (!std::isfinite(scale)) fail_value("scale must be finite, got " + std::to_string(scale));
    return TriangleAttentionProblem{
        q.dtype() == kBFloat16 ? AttentionDtype::kBFloat16 : AttentionDtype::kFloat16,
        static_cast<int>(dim(q, 0)), static_cast<int>(dim(q, 1)), static_cast<int>(dim(q, 2)),
        static_cast<int>(dim(q, 3)), static_cast<int>(dim(q, 4)), static_cast<float>(scale),
    };
}

bool empty(const TriangleAttentionProblem& p) { return p.batch == 0 || p.rows == 0 || p.heads == 0 || p.n == 0; }

struct Inputs {
    TriangleAttentionProblem p;
    nb::dlpack::dtype dtype;
};

// Checks q, k, v (and dout when given), bias and key_bias; returns the problem.
Inputs check_inputs(const nb::ndarray<>& q, const nb::ndarray<>& k, const nb::ndarray<>& v, const nb::ndarray<>& bias,
                    const nb::ndarray<>& key_bias, double scale) {
    const TriangleAttentionProblem p = problem_of(q, "q", scale);
    const nb::dlpack::dtype dt = q.dtype();
    const std::int64_t b = p.batch, i = p.rows, h = p.heads, n = p.n, d = p.head_dim;
    const std::int64_t np = triangle_attention_padded_keys(n);
    check_tensor(k, "k", dt, {b, i, h, n, d}, q, "q");
    check_tensor(v, "v", dt, {b, i, h, n, d}, q, "q");
    check_tensor(bias, "bias", dt, {b, h, n, np}, q, "q");
    check_tensor(key_bias, "key_bias", kFloat32, {b, i, np}, q, "q");
    return {p, dt};
}

void fwd(nb::ndarray<> o, nb::ndarray<> stats, nb::ndarray<> q, nb::ndarray<> k, nb::ndarray<> v,
         nb::ndarray<> bias, nb::ndarray<> key_bias, double scale, std::uintptr_t stream) {
    const Inputs in = check_inputs(q, k, v, bias, key_bias, scale);
    const TriangleAttentionProblem& p = in.p;
    check_tensor(o, "o", in.dtype, {p.batch, p.rows, p.heads, p.n, p.head_dim}, q, "q");
    check_tensor(stats, "stats", kFloat32, {p.batch, p.rows, p.heads, p.n, 2}, q, "q");
    if (empty(p)) return;
    DeviceGuard device(q.device_id());
    triangle_attention_fwd_sm90({p, o.data(), static_cast<float*>(stats.data()), q.data(), k.data(), v.data(),
                                 bias.data(), static_cast<const float*>(key_bias.data())},
                                stream_from_handle(stream));
}

void bwd_delta(nb::ndarray<> delta, nb::ndarray<> dout, nb::ndarray<> out, std::uintptr_t stream) {
    const TriangleAttentionProblem p = problem_of(dout, "dout", 1.0);
    check_tensor(out, "out", dout.dtype(), {p.batch, p.rows, p.heads, p.n, p.head_dim}, dout, "dout");
    check_tensor(delta, "delta", kFloat32, {p.batch, p.rows, p.heads, p.n}, dout, "dout");
    if (empty(p)) return;
    DeviceGuard device(dout.device_id());
    const std::int64_t rows = static_cast<std::int64_t>(p.batch) * p.rows * p.heads * p.n;
    triangle_attention_bwd_delta(static_cast<float*>(delta.data()), dout.data(), out.data(), p.dtype, rows,
                                 p.head_dim, stream_from_handle(stream));
}

// Checks what both backward kernels read and fills the common arguments.
TriangleAttentionBwdArgs bwd_args(const nb::ndarray<>& dout, const nb::ndarray<>& q, const nb::ndarray<>& k,
                                  const nb::ndarray<>& v, const nb::ndarray<>& bias, const nb::ndarray<>& key_bias,
                                  const nb::ndarray<>& stats, const nb::ndarray<>& delta, double scale) {
    const Inputs in = check_inputs(q, k, v, bias, key_bias, scale);
    const TriangleAttentionProblem& p = in.p;
    check_tensor(dout, "dout", in.dtype, {p.batch, p.rows, p.heads, p.n, p.head_dim}, q, "q");
    check_tensor(stats, "stats", kFloat32, {p.batch, p.rows, p.heads, p.n, 2}, q, "q");
    check_tensor(delta, "delta", kFloat32, {p.batch, p.rows, p.heads, p.n}, q, "q");
    TriangleAttentionBwdArgs a{};
    a.p = p;
    a.q = q.data();
    a.k = k.data();
    a.v = v.data();
    a.dout = dout.data();
    a.bias = bias.data();
    a.key_bias = static_cast<const float*>(key_bias.data());
    a.stats = static_cast<const float*>(stats.data());
    a.delta = static_cast<const float*>(delta.data());
    return a;
}

void bwd_dqkv(nb::ndarray<> dq_accum, nb::ndarray<> dk, nb::ndarray<> dv, nb::ndarray<> dout, nb::ndarray<> q,
              nb::ndarray<> k, nb::ndarray<> v, nb::ndarray<> bias, nb::ndarray<> key_bias, nb::ndarray<> stats,
              nb::ndarray<> delta, double scale, std::uintptr_t stream) {
    TriangleAttentionBwdArgs a = bwd_args(dout, q, k, v, bias, key_bias, stats, delta, scale);
    const TriangleAttentionProblem& p = a.p;
    check_tensor(dq_accum, "dq_accum", kFloat32, {p.batch, p.rows, p.heads, p.n, p.head_dim}, q, "q");
    check_tensor(dk, "dk", q.dtype(), {p.batch, p.rows, p.heads, p.n, p.head_dim}, q, "q");
    check_tensor(dv, "dv", q.dtype(), {p.batch, p.rows, p.heads, p.n, p.head_dim}, q, "q");
    if (empty(p)) return;
    a.dq_accum = static_cast<float*>(dq_accum.data());
    a.dk = dk.data();
    a.dv = dv.data();
    DeviceGuard device(q.device_id());
    triangle_attention_bwd_dqkv_sm90(a, stream_from_handle(stream));
}

void bwd_dbias(nb::ndarray<> dbias_partial, nb::ndarray<> dout, nb::ndarray<> q, nb::ndarray<> k, nb::ndarray<> v,
               nb::ndarray<> bias, nb::ndarray<> key_bias, nb::ndarray<> stats, nb::ndarray<> delta, double scale,
               std::uintptr_t stream) {
    TriangleAttentionBwdArgs a = bwd_args(dout, q, k, v, bias, key_bias, stats, delta, scale);
    const TriangleAttentionProblem& p = a.p;
    const std::int64_t np = triangle_attention_padded_keys(p.n);
    check_tensor(dbias_partial, "dbias_partial", kFloat32, {-1, p.batch, p.heads, p.n, np}, q, "q");
    if (empty(p)) return;
    const std::int64_t splits = dim(dbias_partial, 0);
    const std::int64_t rows_per_split = splits > 0 ? (p.rows + splits - 1) / splits : 0;
    if (splits < 1 || splits > p.rows || (p.rows + rows_per_split - 1) / rows_per_split != splits) {
        fail_value("dbias_partial must have triangle_attention_dbias_splits(...) planes in its first axis (no "
                   "empty row split), got shape " + shape_str(dbias_partial));
    }
    a.dbias_partial = static_cast<float*>(dbias_partial.data());
    a.dbias_splits = static_cast<int>(splits);
    DeviceGuard device(q.device_id());
    triangle_attention_bwd_dbias_sm90(a, stream_from_handle(stream));
}

int dbias_splits(int batch, int rows, int heads, int n, int num_sms) {
    if (batch < 1 || rows < 1 || heads < 1 || n < 1 || num_sms < 1) {
        fail_value("dbias_splits needs positive sizes and multiprocessor count");
    }
    return triangle_attention_dbias_splits({AttentionDtype::kBFloat16, batch, rows, heads, n, 32, 1.f}, num_sms);
}

}  // namespace

void register_triangle_attention(nb::module_& m) {
    m.attr("TRIANGLE_ATTENTION_KEY_PAD") = kTriangleAttentionBlock;

    m.def("triangle_attention_fwd", &fwd, "o"_a.noconvert(), "stats"_a.noconvert(), "q"_a.noconvert(),
          "k"_a.noconvert(), "v"_a.noconvert(), "bias"_a.noconvert(), "key_bias"_a.noconvert(), "scale"_a,
          "stream"_a,
          "Triangle attention forward (sm_90a). q, k, v, o: [B, I, H, N, D] bfloat16 or float16, D in "
          "{16, 32, 64}; bias: [B, H, N, Np] (same dtype, Np = N rounded up to TRIANGLE_ATTENTION_KEY_PAD); "
          "key_bias: [B, I, Np] float32, log2(e) * inf * (mask - 1); stats: [B, I, H, N, 2] float32 (row max "
          "and log2 row sum of the base-2 logits). All C-contiguous, 16-byte aligned, on one CUDA device. "
          "Asynchronous on `stream`.");

    m.def("triangle_attention_bwd_delta", &bwd_delta, "delta"_a.noconvert(), "dout"_a.noconvert(),
          "out"_a.noconvert(), "stream"_a,
          "delta[b, i, h, j] = sum_d dout * out in float32. dout, out: [B, I, H, N, D]; delta: [B, I, H, N].");

    m.def("triangle_attention_bwd_dqkv", &bwd_dqkv, "dq_accum"_a.noconvert(), "dk"_a.noconvert(),
          "dv"_a.noconvert(), "dout"_a.noconvert(), "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(),
          "bias"_a.noconvert(), "key_bias"_a.noconvert(), "stats"_a.noconvert(), "delta"_a.noconvert(),
          "scale"_a, "stream"_a,
          "dk, dv (written) and dq (added into dq_accum, float32, zero on entry) of triangle attention. "
          "Inputs as for triangle_attention_fwd plus dout, stats and delta.");

    m.def("triangle_attention_bwd_dbias", &bwd_dbias, "dbias_partial"_a.noconvert(), "dout"_a.noconvert(),
          "q"_a.noconvert(), "k"_a.noconvert(), "v"_a.noconvert(), "bias"_a.noconvert(),
          "key_bias"_a.noconvert(), "stats"_a.noconvert(), "delta"_a.noconvert(), "scale"_a, "stream"_a,
          "dbias of triangle attention by row splits: dbias_partial [S, B, H, N, Np] float32, every element "
          "written; dbias = dbias_partial.sum(0)[..., :N]. S from triangle_attention_dbias_splits.");

    m.def("triangle_attention_dbias_splits", &dbias_splits, "batch"_a, "rows"_a, "heads"_a, "n"_a, "num_sms"_a,
          "Row splits S of the dbias kernel for this problem on a GPU with num_sms multiprocessors.");
}

}  // namespace genie_tk
