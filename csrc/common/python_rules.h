// The Python rules that genfast's C++ autograd nodes call for backward(create_graph=True): each op's
// rule is defined once, in genfast/ops (a graph-building backward, or the message of the error saying
// why there is none), and handed over at import by genfast/ops/_op.py through set_double_backward.
#pragma once

#include <torch/extension.h>

#include <string>

namespace genfast {

void set_double_backward(const std::string& op, pybind11::function rule);

pybind11::object double_backward_rule(const std::string& op);

// Calls op's rule with args and returns what it returns; the caller holds the GIL while it keeps the result.
template <typename... Args>
pybind11::object call_double_backward(const std::string& op, Args&&... args) {
  pybind11::gil_scoped_acquire gil;
  return double_backward_rule(op)(std::forward<Args>(args)...);
}

}  // namespace genfast
