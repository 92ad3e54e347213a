/*
 * pycapsule.c -- the few pieces of DLPack and external-memory glue that
 * must touch Python objects from C. Compiled only into the Python
 * extension (mlxbuf._cmetal), where Python.h is available; the pure-C core
 * tests never list this file.
 *
 * Why C and not ctypes callbacks: a PyCapsule destructor or a storage
 * release can run during interpreter shutdown, or (the release) on the
 * host backend's worker thread long after Python dropped its last Buffer.
 * A ctypes callback is a Python function: at shutdown its module globals
 * may already be gone and its trampoline may be freed, so calling it can
 * crash. These functions use only the C API and the static capsule names
 * of interop.c, so they stay valid for the life of the process. Python
 * creates capsules with ctypes.pythonapi.PyCapsule_New (cffi cannot return
 * a PyObject*), passing this file's destructor and interop.c's names.
 * Takes the GIL and no lock of the core (LOCKING.md).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "interop.h"

static int is_finalizing(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    return Py_IsFinalizing();
#else
    return _Py_IsFinalizing();
#endif
}

static void capsule_destructor(PyObject *capsule)
{
    /* A consumer that took the tensor renamed the capsule to
     * "used_dltensor*" and now owns the deleter call; anything else is
     * still ours to free, exactly once (the capsule dies once). */
    const char *name = PyCapsule_GetName(capsule);
    if (name == NULL) {
        PyErr_Clear();
        return;
    }
    int versioned;
    if (strcmp(name, cm_dlpack_capsule_name(1, 0)) == 0)
        versioned = 1;
    else if (strcmp(name, cm_dlpack_capsule_name(0, 0)) == 0)
        versioned = 0;
    else
        return;
    /* Keep a pending exception intact: destructors can run while one is
     * being raised, and PyCapsule_GetPointer sets one on failure. */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    void *managed = PyCapsule_GetPointer(capsule, name);
    if (managed == NULL)
        PyErr_Clear();
    else
        cm_dlpack_delete(managed, versioned);
    PyErr_Restore(type, value, tb);
}

void *cm_py_capsule_destructor(void)
{
    return (void *)capsule_destructor;
}

void cm_py_release_object(void *ctx)
{
    if (ctx == NULL || !Py_IsInitialized())
        return;
    if (PyGILState_Check()) {
        Py_DECREF((PyObject *)ctx);
        return;
    }
    /* Taking the GIL while the interpreter finalizes hangs or exits the
     * calling thread (possibly the host worker, holding core locks); a
     * leak at exit is the lesser harm. */
    if (is_finalizing())
        return;
    PyGILState_STATE g = PyGILState_Ensure();
    Py_DECREF((PyObject *)ctx);
    PyGILState_Release(g);
}
