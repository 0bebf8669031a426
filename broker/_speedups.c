/* Redwire's one C helper: XOR a payload with a 4-byte WebSocket mask (RFC 6455 5.3).
 * broker/masking.py holds the pure-Python version and picks this one when it is built. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static PyObject *
apply_mask(PyObject *self, PyObject *args)
{
    Py_buffer data, mask;
    if (!PyArg_ParseTuple(args, "y*y*:apply_mask", &data, &mask)) {
        return NULL;
    }
    if (mask.len != 4) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&mask);
        PyErr_SetString(PyExc_ValueError, "mask must be 4 bytes");
        return NULL;
    }
    Py_ssize_t n = data.len;
    PyObject *result = PyBytes_FromStringAndSize(NULL, n);
    if (result != NULL) {
        const unsigned char *src = (const unsigned char *)data.buf;
        unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(result);
        const unsigned char *m = (const unsigned char *)mask.buf;
        uint32_t m32;
        memcpy(&m32, m, 4);
        uint64_t m64 = ((uint64_t)m32 << 32) | m32;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t chunk;
            memcpy(&chunk, src + i, 8);
            chunk ^= m64;
            memcpy(dst + i, &chunk, 8);
        }
        for (; i < n; i++) {
            dst[i] = src[i] ^ m[i & 3];
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&mask);
    return result;
}

static PyMethodDef methods[] = {
    {"apply_mask", apply_mask, METH_VARARGS, "XOR data with a 4-byte mask, repeating."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "broker._speedups", "WebSocket masking in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
