// The Python module `vitkern._C`. It exposes nothing itself: each csrc/<op>.cpp registers its
// CPU kernels as torch operators in the `vitkern_cpu` namespace with TORCH_LIBRARY_FRAGMENT,
// so importing this module is what makes `torch.ops.vitkern_cpu.*` available.
#include <Python.h>

static struct PyModuleDef vitkern_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vitkern_c_module); }
