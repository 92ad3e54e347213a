/*
 * interop.h -- DLPack exchange and Python-object glue for mlxbuf.
 *
 * The DLPack types below follow the DLPack 1.1 specification (dlpack.h of
 * dmlc/dlpack): same names, same layout, same values, so a pointer to one
 * of them can be handed to any DLPack consumer or taken from any producer.
 * They are written out here rather than included because build_ffi.py feeds
 * this header to cffi's cdef, which needs plain declarations.
 *
 * Export: cm_dlpack_export turns a view of a storage into a managed tensor
 * that holds one storage reference. Its deleter is pure C (an atomic
 * cm_storage_release and a free), so a consumer may call it from any
 * thread, with or without the GIL, even after the interpreter has shut down.
 *
 * Import: cm_dlpack_import wraps a producer's managed tensor as an external
 * storage without copying; the storage owns the tensor and calls the
 * producer's deleter exactly once, when the storage dies (after every
 * command buffer that used it completed).
 *
 * The cm_py_* functions live in pycapsule.c, which includes Python.h and is
 * compiled only into the Python extension (never into the pure-C tests).
 * Threads: every function here may be called from any thread.
 */
#ifndef CMETAL_INTEROP_H
#define CMETAL_INTEROP_H

#include <stddef.h>
#include <stdint.h>

#include "cmetal.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ */
/* DLPack 1.1 types                                                    */
/* ------------------------------------------------------------------ */

#define CM_DLPACK_MAJOR_VERSION 1
#define CM_DLPACK_MINOR_VERSION 1

/* DLManagedTensorVersioned.flags bits. */
#define CM_DLPACK_FLAG_READ_ONLY 1
#define CM_DLPACK_FLAG_IS_COPIED 2
#define CM_DLPACK_FLAG_IS_SUBBYTE_TYPE_PADDED 4

/* Most dimensions cm_dlpack_export accepts (numpy's own limit). */
#define CM_DLPACK_MAX_NDIM 64

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct {
    DLDeviceType device_type;
    int32_t device_id;          /* 0 for plain CPU memory                 */
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
    kDLFloat8_e3m4 = 7,
    kDLFloat8_e4m3 = 8,
    kDLFloat8_e4m3b11fnuz = 9,
    kDLFloat8_e4m3fn = 10,
    kDLFloat8_e4m3fnuz = 11,
    kDLFloat8_e5m2 = 12,
    kDLFloat8_e5m2fnuz = 13,
    kDLFloat8_e8m0fnu = 14,
    kDLFloat6_e2m3fn = 15,
    kDLFloat6_e3m2fn = 16,
    kDLFloat4_e2m1fn = 17
} DLDataTypeCode;

typedef struct {
    uint8_t code;               /* a DLDataTypeCode                       */
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;                 /* CPU address, or an opaque handle (Metal:
                                   the id<MTLBuffer>)                     */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;             /* ndim entries                           */
    int64_t *strides;           /* ndim entries, in elements              */
    uint64_t byte_offset;       /* from data to element 0                 */
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;             /* CM_DLPACK_FLAG_*                       */
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/* ------------------------------------------------------------------ */
/* Export                                                              */
/* ------------------------------------------------------------------ */

/* The view of a storage to export. */
typedef struct cm_dlpack_view {
    uint64_t byte_offset;       /* element 0, from byte 0 of the storage  */
    int32_t ndim;               /* 0 .. CM_DLPACK_MAX_NDIM                */
    const int64_t *shape;       /* ndim entries, each >= 0                */
    const int64_t *strides;     /* ndim entries in elements; NULL = C order */
    DLDataType dtype;           /* whole bytes per element, lanes >= 1    */
    int32_t device_type;        /* kDLCPU: data = CPU address of element 0,
                                   byte_offset 0. kDLMetal: data = the
                                   MTLBuffer, byte_offset = native_offset +
                                   view offset (PyTorch MPS / MLX usage)  */
    int32_t device_id;
    uint64_t flags;             /* versioned only: CM_DLPACK_FLAG_*       */
} cm_dlpack_view_t;

/* A new managed tensor describing `view` of s: a DLManagedTensorVersioned
 * (version 1.1) when versioned != 0, else a legacy DLManagedTensor, in
 * *out. It holds one new reference to s and owns copies of shape and
 * strides (always filled in, row-major when view->strides is NULL). Its
 * deleter drops that reference and frees the tensor: pure C, any thread,
 * any time. Every element the view can reach must lie inside the storage
 * (CM_ERR_INVALID_ARGUMENT otherwise); kDLMetal needs a native buffer and
 * other device types are CM_ERR_UNSUPPORTED. Does not wait for writers:
 * the caller decides (cm_storage_wait_idle). */
int cm_dlpack_export(cm_storage_t *s, const cm_dlpack_view_t *view, int versioned,
                     void **out);

/* Call the deleter of a managed tensor (legacy or versioned) that nobody
 * else will free; NULL and a NULL deleter are accepted. */
void cm_dlpack_delete(void *managed, int versioned);

/* The capsule names of the Python DLPack protocol, as static strings that
 * outlive the interpreter: a PyCapsule stores its name by pointer, so a
 * name owned by a Python object could dangle during shutdown.
 * used != 0 gives the name a consumer renames the capsule to. */
const char *cm_dlpack_capsule_name(int versioned, int used);

/* ------------------------------------------------------------------ */
/* Import                                                              */
/* ------------------------------------------------------------------ */

/* What cm_dlpack_describe learnt from a tensor. */
typedef struct cm_dlpack_import_info {
    int32_t device_type;
    int32_t device_id;
    int32_t ndim;
    DLDataType dtype;
    uint64_t flags;             /* 0 for legacy tensors                   */
    uint64_t nbytes;            /* element count x bytes per element      */
    uint64_t byte_offset;       /* of element 0 inside the new storage    */
    int contiguous;             /* C-contiguous (strides match row-major) */
    /* CPU-visible tensors (kDLCPU, kDLCUDAHost, kDLROCMHost) that hold at
     * least one element: the bytes the tensor addresses are [low, low +
     * span), element 0 at low + origin. 0 otherwise. */
    uint64_t low;
    uint64_t span;
    uint64_t origin;
} cm_dlpack_import_info_t;

/* Describe a managed tensor without taking it: checks the version (major
 * must be 1; a versioned tensor of another major is CM_ERR_UNSUPPORTED and
 * only its deleter may be touched), the rank, the shape and strides, and
 * the dtype. For CPU-visible memory it also checks the address range
 * every element lies in: a NULL data pointer with elements to read, or a
 * range that wraps around the address space (data + byte_offset + the
 * extent of shape x strides, computed without forming a pointer) is
 * CM_ERR_INVALID_ARGUMENT. Whoever copies or wraps the memory reads only
 * [low, low + span). */
int cm_dlpack_describe(void *managed, int versioned, cm_dlpack_import_info_t *info);

/* Wrap a C-contiguous managed tensor as a storage of dev without copying.
 * On success the storage owns the tensor: its release runs the producer's
 * deleter exactly once, when the storage dies; on failure nothing is
 * taken and the caller still owns the tensor. kDLCPU (and the CPU-visible
 * kDLCUDAHost / kDLROCMHost) memory becomes an external storage
 * (cm_storage_wrap_external: Metal needs it page-aligned); kDLMetal, on a
 * Metal device only, adopts the MTLBuffer (cm_storage_wrap_native).
 * Non-contiguous tensors, zero-size tensors and memory the device cannot
 * wrap are CM_ERR_UNSUPPORTED, so the caller can copy instead.
 * writable = 0 forces a read-only storage; a read-only tensor is always
 * wrapped read-only. The result's contents/byte_len are the storage's,
 * info->byte_offset the view's start inside it. */
int cm_dlpack_import(cm_device_t *dev, void *managed, int versioned, int writable,
                     cm_alloc_result_t *out, cm_dlpack_import_info_t *info);

/* ------------------------------------------------------------------ */
/* Python glue (pycapsule.c; only in the Python extension)             */
/* ------------------------------------------------------------------ */

/* Address of the PyCapsule destructor for capsules made from
 * cm_dlpack_export tensors: an unconsumed capsule ("dltensor" /
 * "dltensor_versioned") runs the tensor's deleter once; a consumed one
 * ("used_dltensor*") is the consumer's and is left alone. */
void *cm_py_capsule_destructor(void);

/* A release callback for cm_storage_wrap_external whose ctx is a PyObject
 * the caller gave one reference to (Py_IncRef): it drops that reference,
 * taking the GIL from any thread. During or after interpreter shutdown
 * the reference is leaked instead, since touching Python then can hang or
 * kill the calling thread. */
void cm_py_release_object(void *ctx);

#ifdef __cplusplus
}
#endif

#endif /* CMETAL_INTEROP_H */
