// Python module stub for fused_dit_ops._C. Importing it runs the static TORCH_LIBRARY_IMPL
// registrations of the CUDA kernels; the schemas themselves are declared once, in Python
// (fused_dit_ops/_schemas.py), before this module is imported.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fused_dit_ops CUDA kernels (registered as torch.ops.fused_dit.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
