// nanobind registration of the triangle attention entry points of genie_tk._C.
#pragma once

#include <nanobind/nanobind.h>

namespace genie_tk {

// Adds triangle_attention_{fwd, bwd_delta, bwd_dqkv, bwd_dbias, dbias_splits}.
void register_triangle_attention(nanobind::module_& m);

}  // namespace genie_tk
