// The mmsync._ext Python module: empty on purpose. Importing it loads this
// shared library, whose static TORCH_LIBRARY registrations make the ops
// visible as torch.ops.mmsync.*; there is no pybind table to keep in sync.
#include <Python.h>

extern "C" {
PyObject* PyInit__ext(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_ext", "Compiled ops of mmsync.", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
