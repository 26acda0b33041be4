// The Python module fastdiff._C. Importing it loads this shared library, whose static initialisers register the
// torch.library ops of torch_ops*.cpp; the module itself is empty. How the library was built (the torch it was
// compiled against, whether it has CUDA kernels) is written beside it as _C.json, which fastdiff.ops.native
// reads before loading it. Limited C API: the module is not tied to one Python version.
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

static struct PyModuleDef fastdiff_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Native CPU (and CUDA) kernels of fastdiff, registered as torch.ops.fastdiff_native.*",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastdiff_c_module); }
