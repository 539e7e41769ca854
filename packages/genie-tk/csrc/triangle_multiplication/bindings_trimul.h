// nanobind registration of the triangle multiplicative update entry points of genie_tk._C.
#pragma once

#include <nanobind/nanobind.h>

namespace genie_tk {

// Adds trimul_contract, trimul_input and trimul_output.
void register_triangle_multiplication(nanobind::module_& m);

}  // namespace genie_tk
