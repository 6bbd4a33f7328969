// The fused_accum operator library: schemas of the kernel spec (op_schemas.h).
// Implementations register per device in cpu/kernels.cpp and cuda/kernels.cu.
#include <torch/library.h>

#include "op_schemas.h"

TORCH_LIBRARY(fused_accum, m) { fused_accum::define_ops(m); }

// Importing fused_accum._C loads this library, and with it the registrations above.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
