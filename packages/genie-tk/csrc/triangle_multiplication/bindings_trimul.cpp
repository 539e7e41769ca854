// Python bindings of the triangle multiplicative update kernels: argument
// checks that name the argument (common/tensor_checks.h), then the host entry
// points of triangle_multiplication.h on the caller's stream. Layouts: see
// that header.
#include "triangle_multiplication/bindings_trimul.h"

#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <string>

#include "common/cuda_utils.h"
#include "common/tensor_checks.h"
#include "triangle_multiplication/triangle_multiplication.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace genie_tk {
namespace {

constexpr nb::dlpack::dtype kFloat64{static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float), 64, 1};
// TMA boxes and 16-byte vector accesses need aligned bases.
constexpr std::size_t kAlignment = 16;
// TMA global strides must stay below 2^40 bytes.
constexpr std::int64_t kMaxTensorBytes = std::int64_t{1} << 40;

using Shape = std::initializer_list<std::int64_t>;
using OptionalArray = std::optional<nb::ndarray<>>;

std::int64_t dim(const nb::ndarray<>& a, std::size_t i) { return static_cast<std::int64_t>(a.shape(i)); }

void check_size(const nb::ndarray<>& a, const char* name) {
    if (static_cast<std::int64_t>(a.nbytes()) >= kMaxTensorBytes) {
        fail_value(std::string(name) + " is too large for the TMA descriptors (2^40 bytes or more)");
    }
}

// A C-contiguous, aligned CUDA tensor of `dtype` and `shape` (-1: any) on the device of `like`.
void check_tensor(const nb::ndarray<>& a, const char* name, nb::dlpack::dtype dtype, Shape shape,
                  const nb::ndarray<>& like, const char* like_name) {
    check_operand(a, name, dtype, shape, like, like_name, kAlignment);
    check_size(a, name);
}

void check_optional(const OptionalArray& a, const char* name, nb::dlpack::dtype dtype, Shape shape,
                    const nb::ndarray<>& like, const char* like_name) {
    if (a) check_tensor(*a, name, dtype, shape, like, like_name);
}

// The element type of a half-precision tensor `a` of rank `ndim`, after
// checking device, layout and size.
TrimulDtype half_dtype(const nb::ndarray<>& a, const char* name, std::size_t ndim) {
    check_cuda_device(a, name);
    check_ndim(a, name, ndim);
    if (a.dtype() != kBFloat16 && a.dtype() != kFloat16) {
        fail_type(std::string(name) + " must have dtype bfloat16 or float16, got " + dtype_name(a.dtype()));
    }
    check_contiguous(a, name);
    check_alignment(a, name, kAlignment);
    check_size(a, name);
    for (std::size_t i = 0; i < ndim; ++i) {
        if (dim(a, i) > INT_MAX) fail_value(std::string(name) + " has a dimension over 2^31 - 1: shape " + shape_str(a));
    }
    return a.dtype() == kBFloat16 ? TrimulDtype::kBFloat16 : TrimulDtype::kFloat16;
}

void check_channels(std::int64_t c, const char* what, const nb::ndarray<>& a, const char* name) {
    if (!trimul_channels_supported(c)) {
        fail_value(std::string(what) + " must be 64 or 128 (the sizes the kernels are built for), got " +
                   std::to_string(c) + " from " + name + " of shape " + shape_str(a));
    }
}

// z [B, N, N, C]: returns its dtype; `c` receives C.
TrimulDtype check_pair(const nb::ndarray<>& z, std::int64_t* c) {
    const TrimulDtype dtype = half_dtype(z, "z", 4);
    if (dim(z, 1) != dim(z, 2) || dim(z, 1) == 0) {
        fail_value("z must have shape [B, N, N, C] with N >= 1, got " + shape_str(z));
    }
    *c = dim(z, 3);
    check_channels(*c, "c_z", z, "z");
    return dtype;
}

TrimulContraction contraction_mode(const std::string& mode) {
    if (mode == "ABt") return TrimulContraction::kABt;
    if (mode == "AtB") return TrimulContraction::kAtB;
    if (mode == "AB") return TrimulContraction::kAB;
    fail_value("mode must be 'ABt', 'AtB' or 'AB', got '" + mode + "'");
}

void trimul_contract_py(nb::ndarray<> out, nb::ndarray<> a, nb::ndarray<> b, OptionalArray scale,
                        const std::string& mode, std::uintptr_t stream) {
    const TrimulDtype dtype = half_dtype(a, "a", 4);
    const std::int64_t batch = dim(a, 0), channels = dim(a, 1), n = dim(a, 2);
    if (dim(a, 3) != trimul_padded(n)) {
        fail_value("a must have shape [B, C, N, Np] with Np = N rounded up to a multiple of " +
                   std::to_string(kTrimulRowBlock) + ", got " + shape_str(a));
    }
    const Shape shape{batch, channels, n, trimul_padded(n)};
    check_tensor(b, "b", a.dtype(), shape, a, "a");
    check_tensor(out, "out", a.dtype(), shape, a, "a");
    check_optional(scale, "scale", kFloat32, {1}, a, "a");
    const TrimulContraction m = contraction_mode(mode);
    DeviceGuard device(a.device_id());
    trimul_contract_sm90(
        TrimulContractArgs{dtype, m, static_cast<int>(batch), static_cast<int>(channels), static_cast<int>(n),
                           out.data(), a.data(), b.data(),
                           scale ? static_cast<const float*>(scale->data()) : nullptr},
        stream_from_handle(stream));
}

void trimul_input_py(nb::ndarray<> ab, OptionalArray moments, nb::ndarray<> z, OptionalArray mask,
                     nb::ndarray<> ln_weight, nb::ndarray<> ln_bias, nb::ndarray<> p_weight,
                     nb::ndarray<> p_bias, nb::ndarray<> g_weight, nb::ndarray<> g_bias, double eps,
                     std::uintptr_t stream) {
    std::int64_t c = 0;
    const TrimulDtype dtype = check_pair(z, &c);
    const std::int64_t batch = dim(z, 0), n = dim(z, 1);
    check_tensor(p_weight, "p_weight", z.dtype(), {-1, c}, z, "z");
    const std::int64_t features = dim(p_weight, 0);
    check_channels(features / 2, "c_hidden", p_weight, "p_weight");
    if (features % 2) fail_value("p_weight must have 2 * c_hidden rows, got shape " + shape_str(p_weight));
    check_tensor(g_weight, "g_weight", z.dtype(), {features, c}, z, "z");
    check_tensor(ab, "ab", z.dtype(), {2, batch, features / 2, n, trimul_padded(n)}, z, "z");
    check_optional(moments, "moments", kFloat64, {4}, z, "z");
    check_optional(mask, "mask", kFloat32, {batch, n, n}, z, "z");
    check_tensor(ln_weight, "ln_weight", kFloat32, {c}, z, "z");
    check_tensor(ln_bias, "ln_bias", kFloat32, {c}, z, "z");
    check_tensor(p_bias, "p_bias", kFloat32, {features}, z, "z");
    check_tensor(g_bias, "g_bias", kFloat32, {features}, z, "z");
    DeviceGuard device(z.device_id());
    TrimulInputArgs args{};
    args.dtype = dtype;
    args.batch = static_cast<int>(batch);
    args.n = static_cast<int>(n);
    args.c = static_cast<int>(c);
    args.hidden = static_cast<int>(features / 2);
    args.eps = static_cast<float>(eps);
    args.ab = ab.data();
    args.moments = moments ? static_cast<double*>(moments->data()) : nullptr;
    args.z = z.data();
    args.mask = mask ? static_cast<const float*>(mask->data()) : nullptr;
    args.ln_weight = static_cast<const float*>(ln_weight.data());
    args.ln_bias = static_cast<const float*>(ln_bias.data());
    args.p_weight = p_weight.data();
    args.p_bias = static_cast<const float*>(p_bias.data());
    args.g_weight = g_weight.data();
    args.g_bias = static_cast<const float*>(g_bias.data());
    trimul_input_sm90(args, stream_from_handle(stream));
}

void trimul_output_py(nb::ndarray<> out, nb::ndarray<> x, nb::ndarray<> z, nb::ndarray<> ln_in_weight,
                      nb::ndarray<> ln_in_bias, nb::ndarray<> ln_out_weight, nb::ndarray<> ln_out_bias,
                      nb::ndarray<> z_weight, nb::ndarray<> z_bias, nb::ndarray<> g_weight, nb::ndarray<> g_bias,
                      double eps, std::uintptr_t stream) {
    std::int64_t c = 0;
    const TrimulDtype dtype = check_pair(z, &c);
    const std::int64_t batch = dim(z, 0), n = dim(z, 1);
    check_tensor(x, "x", z.dtype(), {batch, -1, n, trimul_padded(n)}, z, "z");
    const std::int64_t hidden = dim(x, 1);
    check_channels(hidden, "c_hidden", x, "x");
    check_tensor(out, "out", z.dtype(), {batch, n, n, c}, z, "z");
    check_tensor(z_weight, "z_weight", z.dtype(), {c, hidden}, z, "z");
    check_tensor(g_weight, "g_weight", z.dtype(), {c, c}, z, "z");
    check_tensor(ln_in_weight, "ln_in_weight", kFloat32, {c}, z, "z");
    check_tensor(ln_in_bias, "ln_in_bias", kFloat32, {c}, z, "z");
    check_tensor(ln_out_weight, "ln_out_weight", kFloat32, {hidden}, z, "z");
    check_tensor(ln_out_bias, "ln_out_bias", kFloat32, {hidden}, z, "z");
    check_tensor(z_bias, "z_bias", kFloat32, {c}, z, "z");
    check_tensor(g_bias, "g_bias", kFloat32, {c}, z, "z");
    DeviceGuard device(z.device_id());
    TrimulOutputArgs args{};
    args.dtype = dtype;
    args.batch = static_cast<int>(batch);
    args.n = static_cast<int>(n);
    args.c = static_cast<int>(c);
    args.hidden = static_cast<int>(hidden);
    args.eps = static_cast<float>(eps);
    args.out = out.data();
    args.x = x.data();
    args.z = z.data();
    args.ln_in_weight = static_cast<const float*>(ln_in_weight.data());
    args.ln_in_bias = static_cast<const float*>(ln_in_bias.data());
    args.ln_out_weight = static_cast<const float*>(ln_out_weight.data());
    args.ln_out_bias = static_cast<const float*>(ln_out_bias.data());
    args.z_weight = z_weight.data();
    args.z_bias = static_cast<const float*>(z_bias.data());
    args.g_weight = g_weight.data();
    args.g_bias = static_cast<const float*>(g_bias.data());
    trimul_output_sm90(args, stream_from_handle(stream));
}

}  // namespace

void register_triangle_multiplication(nb::module_& m) {
    m.def("trimul_contract", &trimul_contract_py, "out"_a.noconvert(), "a"_a.noconvert(), "b"_a.noconvert(),
          "scale"_a.noconvert().none(), "mode"_a, "stream"_a,
          "Per (batch, channel) product of channel-first tensors on wgmma (fp32 accumulation):\n"
          "mode 'ABt': out = A B^T, 'AtB': out = A^T B, 'AB': out = A B, each times scale.\n\n"
          "out, a, b: [B, C, N, Np] bfloat16 or float16, Np = N rounded up to 64, columns >= N zero "
          "(written as zero in out). scale: float32 [1] or None. Asynchronous on `stream`.");
    m.def("trimul_input", &trimul_input_py, "ab"_a.noconvert(), "moments"_a.noconvert().none(), "z"_a.noconvert(),
          "mask"_a.noconvert().none(), "ln_weight"_a.noconvert(), "ln_bias"_a.noconvert(),
          "p_weight"_a.noconvert(), "p_bias"_a.noconvert(), "g_weight"_a.noconvert(), "g_bias"_a.noconvert(),
          "eps"_a, "stream"_a,
          "Tri-mul input pass: ab[s] = mask * sigmoid(LN(z) g_weight_s^T + g_bias_s) * (LN(z) p_weight_s^T + "
          "p_bias_s), channel-first.\n\n"
          "ab: [2, B, Ch, N, Np] out (ab[0] = a, ab[1] = b, columns >= N zero); moments: float64 [4] or None, "
          "+= (sum a, sum a^2, sum b, sum b^2); z: [B, N, N, C] bfloat16/float16, C and Ch in {64, 128}; "
          "mask: float32 [B, N, N] or None; ln_*: float32 [C]; p_weight, g_weight: [2 Ch, C] in z's dtype "
          "(rows [0, Ch) make a); p_bias, g_bias: float32 [2 Ch]. Asynchronous on `stream`.");
    m.def("trimul_output", &trimul_output_py, "out"_a.noconvert(), "x"_a.noconvert(), "z"_a.noconvert(),
          "ln_in_weight"_a.noconvert(), "ln_in_bias"_a.noconvert(), "ln_out_weight"_a.noconvert(),
          "ln_out_bias"_a.noconvert(), "z_weight"_a.noconvert(), "z_bias"_a.noconvert(), "g_weight"_a.noconvert(),
          "g_bias"_a.noconvert(), "eps"_a, "stream"_a,
          "Tri-mul output pass: out = sigmoid(LN_in(z) g_weight^T + g_bias) * (LN_out(x) z_weight^T + z_bias).\n\n"
          "out: [B, N, N, C]; x: [B, Ch, N, Np] channel-first; z: [B, N, N, C] bfloat16/float16; "
          "z_weight: [C, Ch]; g_weight: [C, C] in z's dtype; LayerNorm parameters and biases float32. "
          "Asynchronous on `stream`.");
}

}  // namespace genie_tk
