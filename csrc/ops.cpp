// Schemas of every seq2seq_fast op, in one TORCH_LIBRARY block; the per-device
// implementations register themselves in csrc/cpu and csrc/cuda.
#include <Python.h>
#include <torch/library.h>

// Importing seq2seq_fast._C loads this library and so registers the ops; the module itself
// defines no Python functions (ops are reached through torch.ops.seq2seq_fast).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(seq2seq_fast, m) {
  // Reports the build configuration; lets Python check the library loaded.
  m.def("build_info() -> str");
}
