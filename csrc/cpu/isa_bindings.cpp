// The Python module of the extension (forkdec._C): which instruction set the
// CPU kernels use. The ops themselves register through TORCH_LIBRARY.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu/softmax.h"

namespace py = pybind11;
namespace fc = forkdec::cpu;

namespace {

std::vector<std::string> available_cpu_isas() {
  std::vector<std::string> names;
  for (fc::Isa isa : fc::available_isas()) names.emplace_back(fc::isa_name(isa));
  return names;
}

void set_cpu_isa(const std::string& name) {
  fc::Isa isa;
  if (!fc::parse_isa(name, &isa)) {
    throw py::value_error("unknown instruction set '" + name + "'; expected scalar, avx2 or avx512");
  }
  const auto available = fc::available_isas();
  if (std::find(available.begin(), available.end(), isa) == available.end()) {
    std::string list;
    for (const std::string& n : available_cpu_isas()) list += (list.empty() ? "" : ", ") + n;
    throw py::value_error("instruction set '" + name + "' is not available on this CPU (available: " + list + ")");
  }
  fc::set_isa(isa);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "forkdec native kernels; the ops are torch.ops.forkdec.*";
  m.def("cpu_isa", [] { return std::string(fc::isa_name(fc::current_isa())); },
        "The instruction set the CPU kernels use: 'avx512', 'avx2' or 'scalar'.");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Forces the CPU kernels onto one instruction set; ValueError if unknown or unavailable.");
  m.def("available_cpu_isas", &available_cpu_isas,
        "The instruction sets this CPU can run, scalar first, best last.");
}
