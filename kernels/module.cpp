// The Python module fastdiff._C. Importing it loads this shared library, whose static initialisers register the
// torch.library ops of torch_ops*.cpp; the module itself is empty. How the library was built (the torch it was
// compiled against, whether it has CUDA kernels) is written beside it as _C.json, which fastdiff.ops.native
// reads before loading it. Limited C API: the module is not tied to one Python version.
#define Py_LIMITED_API 0x030A0000
#include <Python.h>

// The instruction sets this library's code was compiled for (-march=native picks the build machine's), as the
// names of /proc/cpuinfo's flags. fastdiff.ops.native finds this string in the file before it loads the library
// and refuses it on a CPU that lacks one of them: its first kernel would die of SIGILL. Every source of the
// library is compiled with the same flags, so this one file's macros are the library's.
extern "C" __attribute__((used, visibility("default"))) const char fastdiff_isa[] = "FASTDIFF_ISA:"
#ifdef __SSSE3__
    " ssse3"
#endif
#ifdef __SSE4_1__
    " sse4_1"
#endif
#ifdef __POPCNT__
    " popcnt"
#endif
#ifdef __LZCNT__
    " abm"
#endif
#ifdef __BMI__
    " bmi1"
#endif
#ifdef __MOVBE__
    " movbe"
#endif
#ifdef __ADX__
    " adx"
#endif
#ifdef __SSE4_2__
    " sse4_2"
#endif
#ifdef __AVX__
    " avx"
#endif
#ifdef __AVX2__
    " avx2"
#endif
#ifdef __FMA__
    " fma"
#endif
#ifdef __F16C__
    " f16c"
#endif
#ifdef __BMI2__
    " bmi2"
#endif
#ifdef __AVXVNNI__
    " avx_vnni"
#endif
#ifdef __AVX512F__
    " avx512f"
#endif
#ifdef __AVX512CD__
    " avx512cd"
#endif
#ifdef __AVX512BW__
    " avx512bw"
#endif
#ifdef __AVX512DQ__
    " avx512dq"
#endif
#ifdef __AVX512VL__
    " avx512vl"
#endif
#ifdef __AVX512IFMA__
    " avx512ifma"
#endif
#ifdef __AVX512VBMI__
    " avx512vbmi"
#endif
#ifdef __AVX512VBMI2__
    " avx512_vbmi2"
#endif
#ifdef __AVX512VNNI__
    " avx512_vnni"
#endif
#ifdef __AVX512BITALG__
    " avx512_bitalg"
#endif
#ifdef __AVX512VPOPCNTDQ__
    " avx512_vpopcntdq"
#endif
#ifdef __AVX512BF16__
    " avx512_bf16"
#endif
#ifdef __AVX512FP16__
    " avx512_fp16"
#endif
#ifdef __AMX_TILE__
    " amx_tile"
#endif
#ifdef __AMX_BF16__
    " amx_bf16"
#endif
#ifdef __AMX_INT8__
    " amx_int8"
#endif
#ifdef __GFNI__
    " gfni"
#endif
#ifdef __VAES__
    " vaes"
#endif
#ifdef __VPCLMULQDQ__
    " vpclmulqdq"
#endif
    ";";

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
