// Validation of array arguments that arrive from Python by DLPack
// (nb::ndarray). The bindings take untyped nb::ndarray<> and check here, so a
// mistake is reported as "<argument> must ..., got ..." instead of nanobind's
// generic "incompatible function arguments".
//
// Wrong dtype -> TypeError; wrong device, rank, shape, layout -> ValueError.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace genie_tk {

namespace nb = nanobind;

inline constexpr nb::dlpack::dtype kBFloat16{static_cast<std::uint8_t>(nb::dlpack::dtype_code::Bfloat),
                                             16, 1};
inline constexpr nb::dlpack::dtype kFloat16{static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float), 16, 1};
inline constexpr nb::dlpack::dtype kFloat32{static_cast<std::uint8_t>(nb::dlpack::dtype_code::Float), 32, 1};

inline std::string dtype_name(nb::dlpack::dtype dt) {
    std::string base;
    switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
        case nb::dlpack::dtype_code::Int: base = "int"; break;
        case nb::dlpack::dtype_code::UInt: base = "uint"; break;
        case nb::dlpack::dtype_code::Float: base = "float"; break;
        case nb::dlpack::dtype_code::Bfloat: base = "bfloat"; break;
        case nb::dlpack::dtype_code::Complex: base = "complex"; break;
        case nb::dlpack::dtype_code::Bool: return "bool";
        default: base = "dtype_code_" + std::to_string(dt.code) + "_"; break;
    }
    std::string name = base + std::to_string(dt.bits);
    if (dt.lanes != 1) name += "x" + std::to_string(dt.lanes);
    return name;
}

inline std::string device_name(const nb::ndarray<>& a) {
    switch (a.device_type()) {
        case nb::device::cpu::value: return "cpu";
        case nb::device::cuda::value: return "cuda:" + std::to_string(a.device_id());
        case nb::device::cuda_host::value: return "cuda_host (pinned host memory)";
        case nb::device::cuda_managed::value: return "cuda_managed";
        default: return "DLPack device type " + std::to_string(a.device_type());
    }
}

// "(a, b, c)" from n items, as Python prints tuples.
template <typename Item>
std::string tuple_str(std::size_t n, Item item) {
    std::string s = "(";
    for (std::size_t i = 0; i < n; ++i) s += (i ? ", " : "") + item(i);
    return s + (n == 1 ? ",)" : ")");
}

inline std::string shape_str(const nb::ndarray<>& a) {
    return tuple_str(a.ndim(), [&](std::size_t i) { return std::to_string(a.shape(i)); });
}

inline std::string strides_str(const nb::ndarray<>& a) {
    return tuple_str(a.ndim(), [&](std::size_t i) { return std::to_string(a.stride(i)); });
}

[[noreturn]] inline void fail_value(const std::string& msg) { throw nb::value_error(msg.c_str()); }
[[noreturn]] inline void fail_type(const std::string& msg) { throw nb::type_error(msg.c_str()); }

inline void check_cuda_device(const nb::ndarray<>& a, const char* name) {
    if (a.device_type() != nb::device::cuda::value) {
        fail_value(std::string(name) + " must be a CUDA tensor, got a tensor on " + device_name(a));
    }
}

inline void check_dtype(const nb::ndarray<>& a, const char* name, nb::dlpack::dtype expected) {
    if (a.dtype() != expected) {
        fail_type(std::string(name) + " must have dtype " + dtype_name(expected) + ", got " +
                  dtype_name(a.dtype()));
    }
}

inline void check_ndim(const nb::ndarray<>& a, const char* name, std::size_t ndim) {
    if (a.ndim() != ndim) {
        fail_value(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                   std::to_string(a.ndim()) + "-D with shape " + shape_str(a));
    }
}

// `expected` uses -1 for "any size".
inline void check_shape(const nb::ndarray<>& a, const char* name, std::initializer_list<std::int64_t> expected) {
    const std::int64_t* e = expected.begin();
    bool ok = a.ndim() == expected.size();
    for (std::size_t i = 0; ok && i < expected.size(); ++i) {
        ok = e[i] < 0 || static_cast<std::int64_t>(a.shape(i)) == e[i];
    }
    if (!ok) {
        const std::string want =
            tuple_str(expected.size(), [&](std::size_t i) { return e[i] < 0 ? std::string("*") : std::to_string(e[i]); });
        fail_value(std::string(name) + " must have shape " + want + ", got " + shape_str(a));
    }
}

// Row-major and dense; as in torch, strides of size-1 dimensions are ignored
// and an empty array counts as contiguous.
inline bool is_c_contiguous(const nb::ndarray<>& a) {
    if (a.size() == 0) return true;
    std::int64_t expected = 1;
    for (std::size_t i = a.ndim(); i-- > 0;) {
        if (a.shape(i) != 1 && a.stride(i) != expected) return false;
        expected *= static_cast<std::int64_t>(a.shape(i));
    }
    return true;
}

inline void check_contiguous(const nb::ndarray<>& a, const char* name) {
    if (!is_c_contiguous(a)) {
        fail_value(std::string(name) + " must be C-contiguous (call .contiguous()), got shape " + shape_str(a) +
                   " with strides " + strides_str(a) + " (in elements)");
    }
}

inline void check_alignment(const nb::ndarray<>& a, const char* name, std::size_t bytes) {
    if (reinterpret_cast<std::uintptr_t>(a.data()) % bytes != 0) {
        fail_value(std::string(name) + " must start at a " + std::to_string(bytes) +
                   "-byte aligned address (a view with an odd offset?)");
    }
}

inline void check_same_device(const nb::ndarray<>& a, const char* a_name, const nb::ndarray<>& b,
                              const char* b_name) {
    if (a.device_type() != b.device_type() || a.device_id() != b.device_id()) {
        fail_value(std::string(a_name) + " and " + b_name + " must be on the same device, got " + device_name(a) +
                   " and " + device_name(b));
    }
}

// The usual preconditions of a kernel argument: a C-contiguous CUDA tensor of
// the given dtype and rank.
inline void check_cuda_tensor(const nb::ndarray<>& a, const char* name, nb::dlpack::dtype dtype,
                              std::size_t ndim) {
    check_cuda_device(a, name);
    check_dtype(a, name, dtype);
    check_ndim(a, name, ndim);
    check_contiguous(a, name);
}

// A kernel operand: a C-contiguous CUDA tensor of `dtype` and `shape` (-1:
// any size), on the device of `like`, starting at an `alignment`-byte address.
inline void check_operand(const nb::ndarray<>& a, const char* name, nb::dlpack::dtype dtype,
                          std::initializer_list<std::int64_t> shape, const nb::ndarray<>& like, const char* like_name,
                          std::size_t alignment) {
    check_cuda_tensor(a, name, dtype, shape.size());
    check_shape(a, name, shape);
    check_same_device(a, name, like, like_name);
    check_alignment(a, name, alignment);
}

}  // namespace genie_tk
