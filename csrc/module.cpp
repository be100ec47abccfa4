// The Python module `panther_fx._C`: empty on purpose. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations that attach native kernels to the ops defined in Python (no pybind: the abi3 build does not
// link torch_python, and every entry point is a torch.ops.panther op, which Dynamo can keep in the graph).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <map>
#include <mutex>
#include <string>

#include "linear.h"

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace panther {

namespace {
std::mutex calls_mutex;
std::map<std::string, int64_t>& calls() {
  static std::map<std::string, int64_t> table;
  return table;
}
}  // namespace

void count_call(const char* op) {
  std::lock_guard<std::mutex> guard(calls_mutex);
  ++calls()[op];
}

int64_t native_calls(const std::string& op) {
  std::lock_guard<std::mutex> guard(calls_mutex);
  auto it = calls().find(op);
  return it == calls().end() ? 0 : it->second;
}

TORCH_LIBRARY_FRAGMENT(panther, m) {
  // How many times a native kernel (name like "lowrank_linear.cpu") ran: lets tests prove dispatch.
  m.def("_native_calls(str kernel) -> int", &native_calls);
}

}  // namespace panther
