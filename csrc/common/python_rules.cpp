#include "common/python_rules.h"

#include <map>

namespace genfast {
namespace {

// Filled once at import; the objects are never freed, as the module that holds them.
std::map<std::string, pybind11::object*>& rules() {
  static auto* map = new std::map<std::string, pybind11::object*>();
  return *map;
}

}  // namespace

void set_double_backward(const std::string& op, pybind11::function rule) {
  rules()[op] = new pybind11::object(std::move(rule));
}

pybind11::object double_backward_rule(const std::string& op) {
  const auto found = rules().find(op);
  TORCH_CHECK(found != rules().end(), "genfast: ", op, "'s double-backward rule was not set");
  return *found->second;
}

}  // namespace genfast
