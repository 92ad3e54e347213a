/*
 * interop.c -- DLPack export and import over the core's storages.
 *
 * Pure C: no Python here, so the deleters this file hands out can run on
 * any thread and after the interpreter is gone (the DLPack rule for
 * deleters). The PyCapsule side is in pycapsule.c.
 *
 * Uses the public storage calls only and takes no lock of its own
 * (LOCKING.md).
 */
#include "interop.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ */
/* Shape arithmetic                                                    */
/* ------------------------------------------------------------------ */

/* Element offsets (relative to element 0) of the lowest and highest
 * element the view reaches, and the element count. Fails on overflow. */
static int view_extent(int32_t ndim, const int64_t *shape, const int64_t *strides,
                       int64_t *lo, int64_t *hi, uint64_t *count)
{
    int64_t low = 0, high = 0, n = 1;
    for (int32_t i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "shape[%d] is %lld: dimensions must be >= 0", i, (long long)shape[i]);
        if (__builtin_mul_overflow(n, shape[i], &n))
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "shape overflows 64 bits at dimension %d", i);
    }
    if (n > 0) {
        for (int32_t i = 0; i < ndim; i++) {
            int64_t step;
            if (__builtin_mul_overflow(shape[i] - 1, strides[i], &step))
                return cm__fail(CM_ERR_INVALID_ARGUMENT,
                                "stride %lld of dimension %d overflows 64 bits",
                                (long long)strides[i], i);
            if (step >= 0 ? __builtin_add_overflow(high, step, &high)
                          : __builtin_add_overflow(low, step, &low))
                return cm__fail(CM_ERR_INVALID_ARGUMENT, "strides overflow 64 bits");
        }
    }
    *lo = low;
    *hi = high;
    *count = (uint64_t)n;
    return CM_OK;
}

/* Runs before view_extent has checked the shape, so the product is formed
 * unsigned (wrapping is defined); view_extent then refuses a shape whose
 * product overflows, and these strides are never used. */
static void row_major_strides(int32_t ndim, const int64_t *shape, int64_t *strides)
{
    uint64_t step = 1;
    for (int32_t i = ndim - 1; i >= 0; i--) {
        strides[i] = (int64_t)step;
        step *= shape[i] > 0 ? (uint64_t)shape[i] : 1;
    }
}

/* C-contiguous in the DLPack sense: strides absent, or equal to row-major
 * strides wherever the dimension is longer than 1 (numpy and PyTorch give
 * arbitrary strides to length-1 dimensions). */
static int is_c_contiguous(int32_t ndim, const int64_t *shape, const int64_t *strides)
{
    if (strides == NULL)
        return 1;
    int64_t step = 1;
    for (int32_t i = ndim - 1; i >= 0; i--) {
        if (shape[i] == 0)
            return 1;
        if (shape[i] != 1 && strides[i] != step)
            return 0;
        step *= shape[i];
    }
    return 1;
}

static int check_dtype(DLDataType dt, const char *what)
{
    if (dt.bits == 0 || dt.bits % 8 != 0 || dt.lanes == 0)
        return cm__fail(CM_ERR_UNSUPPORTED,
                        "%s dtype (code %u, %u bits, %u lanes) is not a whole number of bytes "
                        "per element", what, dt.code, dt.bits, dt.lanes);
    return CM_OK;
}

/* ------------------------------------------------------------------ */
/* Export                                                              */
/* ------------------------------------------------------------------ */

/* The tensor and its shape/strides in one allocation, so the deleter is a
 * single free. manager_ctx is the storage. */
static void export_deleter(DLManagedTensor *self)
{
    if (self == NULL)
        return;
    cm_storage_release((cm_storage_t *)self->manager_ctx);
    free(self);
}

static void export_deleter_versioned(DLManagedTensorVersioned *self)
{
    if (self == NULL)
        return;
    cm_storage_release((cm_storage_t *)self->manager_ctx);
    free(self);
}

int cm_dlpack_export(cm_storage_t *s, const cm_dlpack_view_t *view, int versioned, void **out)
{
    if (out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_dlpack_export: out is NULL");
    *out = NULL;
    if (s == NULL || view == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_dlpack_export: storage or view is NULL");
    if (view->ndim < 0 || view->ndim > CM_DLPACK_MAX_NDIM)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cannot export %d dimensions: the limit is %d",
                        view->ndim, CM_DLPACK_MAX_NDIM);
    if (view->ndim > 0 && view->shape == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_dlpack_export: shape is NULL");
    int rc = check_dtype(view->dtype, "exported");
    if (rc)
        return rc;

    cm_storage_info_t info;
    rc = cm_storage_info(s, &info);
    if (rc)
        return rc;

    int32_t ndim = view->ndim;
    size_t dims = ndim > 0 ? (size_t)ndim : 1;
    int64_t strides_buf[CM_DLPACK_MAX_NDIM];
    const int64_t *strides = view->strides;
    if (strides == NULL) {
        row_major_strides(ndim, view->shape, strides_buf);
        strides = strides_buf;
    }

    int64_t lo, hi;
    uint64_t count;
    rc = view_extent(ndim, view->shape, strides, &lo, &hi, &count);
    if (rc)
        return rc;
    uint64_t itemsize = (uint64_t)view->dtype.bits / 8 * view->dtype.lanes;
    if (count > 0) {
        /* Every reachable byte inside [0, byte_len): element 0 at
         * byte_offset, the view spanning lo..hi elements around it. */
        unsigned __int128 first = (unsigned __int128)(-(__int128)lo) * itemsize;
        unsigned __int128 last = (unsigned __int128)view->byte_offset
                               + (unsigned __int128)hi * itemsize + itemsize;
        if (first > view->byte_offset || last > info.byte_len) {
            char cap[32];
            return cm__fail(CM_ERR_INVALID_ARGUMENT,
                            "view of %llu elements at byte %llu reaches outside the %s storage",
                            (unsigned long long)count, (unsigned long long)view->byte_offset,
                            cm__fmt_bytes(info.byte_len, cap, sizeof cap));
        }
    } else if (view->byte_offset > info.byte_len) {
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "view offset %llu is beyond the %llu-byte storage",
                        (unsigned long long)view->byte_offset, (unsigned long long)info.byte_len);
    }

    void *data;
    uint64_t byte_offset;
    if (view->device_type == kDLCPU) {
        if (info.contents == NULL)
            return cm__fail(CM_ERR_UNSUPPORTED, "storage has no CPU-visible contents to export as kDLCPU");
        data = info.contents + view->byte_offset;
        byte_offset = 0;
    } else if (view->device_type == kDLMetal) {
        if (info.native_handle == 0)
            return cm__fail(CM_ERR_UNSUPPORTED,
                            "storage has no Metal buffer to export as kDLMetal (8); "
                            "export as kDLCPU (1) instead");
        data = (void *)(uintptr_t)info.native_handle;
        byte_offset = info.native_offset + view->byte_offset;
    } else {
        return cm__fail(CM_ERR_UNSUPPORTED,
                        "cannot export to DLPack device type %d: supported are kDLCPU (1) and "
                        "kDLMetal (8)", view->device_type);
    }
    /* DLPack: the data pointer of an empty tensor should be NULL. */
    if (count == 0) {
        data = NULL;
        byte_offset = 0;
    }

    size_t head = versioned ? sizeof(DLManagedTensorVersioned) : sizeof(DLManagedTensor);
    unsigned char *block = malloc(head + 2 * dims * sizeof(int64_t));
    if (block == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cannot allocate a DLPack tensor of %d dimensions", ndim);
    int64_t *shape_copy = (int64_t *)(block + head);
    int64_t *strides_copy = shape_copy + dims;
    shape_copy[0] = strides_copy[0] = 1; /* 0-d: valid pointers all the same */
    if (ndim > 0) {
        memcpy(shape_copy, view->shape, (size_t)ndim * sizeof(int64_t));
        memcpy(strides_copy, strides, (size_t)ndim * sizeof(int64_t));
    }

    DLTensor *t;
    if (versioned) {
        DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)block;
        memset(m, 0, sizeof *m);
        m->version.major = CM_DLPACK_MAJOR_VERSION;
        m->version.minor = CM_DLPACK_MINOR_VERSION;
        m->manager_ctx = s;
        m->deleter = export_deleter_versioned;
        m->flags = view->flags | (info.writable ? 0 : CM_DLPACK_FLAG_READ_ONLY);
        t = &m->dl_tensor;
    } else {
        DLManagedTensor *m = (DLManagedTensor *)block;
        memset(m, 0, sizeof *m);
        m->manager_ctx = s;
        m->deleter = export_deleter;
        t = &m->dl_tensor;
    }
    t->data = data;
    t->device.device_type = (DLDeviceType)view->device_type;
    t->device.device_id = view->device_id;
    t->ndim = ndim;
    t->dtype = view->dtype;
    t->shape = shape_copy;
    t->strides = strides_copy;
    t->byte_offset = byte_offset;

    cm_storage_retain(s);
    *out = block;
    return CM_OK;
}

void cm_dlpack_delete(void *managed, int versioned)
{
    if (managed == NULL)
        return;
    if (versioned) {
        DLManagedTensorVersioned *m = managed;
        if (m->deleter)
            m->deleter(m);
    } else {
        DLManagedTensor *m = managed;
        if (m->deleter)
            m->deleter(m);
    }
}

const char *cm_dlpack_capsule_name(int versioned, int used)
{
    if (versioned)
        return used ? "used_dltensor_versioned" : "dltensor_versioned";
    return used ? "used_dltensor" : "dltensor";
}

/* ------------------------------------------------------------------ */
/* Import                                                              */
/* ------------------------------------------------------------------ */

static int cpu_visible(int32_t device_type)
{
    return device_type == kDLCPU || device_type == kDLCUDAHost || device_type == kDLROCMHost;
}

/* Decimal text of v (printf has no 128-bit conversion). */
static const char *fmt_i128(__int128 v, char *buf, size_t cap)
{
    char digits[48];
    size_t n = 0;
    unsigned __int128 u = v < 0 ? (unsigned __int128)0 - (unsigned __int128)v : (unsigned __int128)v;
    do {
        digits[n++] = (char)('0' + (int)(u % 10));
        u /= 10;
    } while (u != 0 && n < sizeof digits);
    size_t k = 0;
    if (v < 0 && k + 1 < cap)
        buf[k++] = '-';
    while (n > 0 && k + 1 < cap)
        buf[k++] = digits[--n];
    buf[k] = '\0';
    return buf;
}

/* The bytes a CPU tensor addresses, [low, low + span), element 0 at low +
 * origin. Integer arithmetic only: a producer's data + byte_offset may not
 * be a valid pointer, and forming one would be undefined behaviour. lo and
 * hi are view_extent's element offsets around element 0 (lo <= 0 <= hi).
 * Whether the memory is really there only the producer knows; what no
 * memory can be is refused: a NULL pointer, bytes beyond either end of the
 * address space, and offsets from data larger than any object
 * (PTRDIFF_MAX: byte_offset = 2**63 is one). */
static int addressed_range(const DLTensor *t, int64_t lo, int64_t hi, uint64_t itemsize,
                           cm_dlpack_import_info_t *info)
{
    if (t->data == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "DLPack tensor of %llu bytes has a NULL data pointer",
                        (unsigned long long)info->nbytes);
    __int128 first = (__int128)t->byte_offset + (__int128)lo * (__int128)itemsize;
    __int128 last = (__int128)t->byte_offset + ((__int128)hi + 1) * (__int128)itemsize;
    __int128 data = (__int128)(uintptr_t)t->data;
    if (first < -(__int128)PTRDIFF_MAX || last > (__int128)PTRDIFF_MAX || last - first > (__int128)PTRDIFF_MAX
        || data + first < 0 || data + last > (__int128)UINTPTR_MAX + 1) {
        char from[48], to[48];
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "DLPack tensor at data %p + byte_offset %llu reaches outside the address "
                        "space: its bytes run from %s to %s past data (objects span at most %lld "
                        "bytes)",
                        t->data, (unsigned long long)t->byte_offset, fmt_i128(first, from, sizeof from),
                        fmt_i128(last, to, sizeof to), (long long)PTRDIFF_MAX);
    }
    info->low = (uint64_t)(data + first);
    info->span = (uint64_t)(last - first);
    info->origin = (uint64_t)(-first + (__int128)t->byte_offset);
    return CM_OK;
}

static DLTensor *tensor_of(void *managed, int versioned)
{
    return versioned ? &((DLManagedTensorVersioned *)managed)->dl_tensor
                     : &((DLManagedTensor *)managed)->dl_tensor;
}

int cm_dlpack_describe(void *managed, int versioned, cm_dlpack_import_info_t *info)
{
    if (managed == NULL || info == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_dlpack_describe: tensor or info is NULL");
    memset(info, 0, sizeof *info);
    if (versioned) {
        const DLManagedTensorVersioned *m = managed;
        /* The DLPack rule: past a major mismatch only the deleter is safe. */
        if (m->version.major != CM_DLPACK_MAJOR_VERSION)
            return cm__fail(CM_ERR_UNSUPPORTED,
                            "DLPack tensor of version %u.%u: mlxbuf reads major version %d",
                            m->version.major, m->version.minor, CM_DLPACK_MAJOR_VERSION);
        info->flags = m->flags;
    }
    const DLTensor *t = tensor_of(managed, versioned);
    info->device_type = (int32_t)t->device.device_type;
    info->device_id = t->device.device_id;
    info->ndim = t->ndim;
    info->dtype = t->dtype;
    if (t->ndim < 0 || t->ndim > CM_DLPACK_MAX_NDIM)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "DLPack tensor has %d dimensions: the limit is %d",
                        t->ndim, CM_DLPACK_MAX_NDIM);
    if (t->ndim > 0 && t->shape == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "DLPack tensor of %d dimensions has no shape", t->ndim);
    int rc = check_dtype(t->dtype, "DLPack tensor");
    if (rc)
        return rc;

    int64_t lo, hi;
    uint64_t count;
    int64_t strides_buf[CM_DLPACK_MAX_NDIM];
    const int64_t *strides = t->strides;
    if (strides == NULL) {
        row_major_strides(t->ndim, t->shape, strides_buf);
        strides = strides_buf;
    }
    rc = view_extent(t->ndim, t->shape, strides, &lo, &hi, &count);
    if (rc)
        return rc;
    uint64_t itemsize = (uint64_t)t->dtype.bits / 8 * t->dtype.lanes;
    if (__builtin_mul_overflow(count, itemsize, &info->nbytes))
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "DLPack tensor of %llu elements overflows 64 bits",
                        (unsigned long long)count);
    info->contiguous = is_c_contiguous(t->ndim, t->shape, t->strides);
    if (count > 0 && cpu_visible(info->device_type))
        return addressed_range(t, lo, hi, itemsize, info);
    return CM_OK;
}

static void release_legacy(void *ctx)
{
    DLManagedTensor *m = ctx;
    if (m->deleter)
        m->deleter(m);
}

static void release_versioned(void *ctx)
{
    DLManagedTensorVersioned *m = ctx;
    if (m->deleter)
        m->deleter(m);
}

int cm_dlpack_import(cm_device_t *dev, void *managed, int versioned, int writable,
                     cm_alloc_result_t *out, cm_dlpack_import_info_t *info)
{
    if (dev == NULL || out == NULL || info == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_dlpack_import: device, out or info is NULL");
    memset(out, 0, sizeof *out);
    int rc = cm_dlpack_describe(managed, versioned, info);
    if (rc)
        return rc;
    if (!info->contiguous)
        return cm__fail(CM_ERR_UNSUPPORTED, "DLPack tensor is not C-contiguous: it needs a copy");
    if (info->nbytes == 0)
        return cm__fail(CM_ERR_UNSUPPORTED, "DLPack tensor is empty: there is no memory to wrap");
    if (info->flags & CM_DLPACK_FLAG_READ_ONLY)
        writable = 0;

    const DLTensor *t = tensor_of(managed, versioned);
    void (*release)(void *) = versioned ? release_versioned : release_legacy;
    switch (info->device_type) {
    case kDLCPU:
    case kDLCUDAHost:
    case kDLROCMHost: {
        /* cm_dlpack_describe checked the range: contiguous, so it starts
         * at element 0 and spans nbytes. */
        void *start = (void *)(uintptr_t)info->low;
        rc = cm_storage_wrap_external(dev, start, info->nbytes, writable, release, managed, out);
        if (rc)
            return rc;
        info->byte_offset = 0;
        return CM_OK;
    }
    case kDLMetal: {
        if (dev->backend->kind != CM_BACKEND_METAL)
            return cm__fail(CM_ERR_UNSUPPORTED,
                            "a kDLMetal (8) tensor can only be wrapped by a Metal device; this is a "
                            "%s device", dev->backend->name);
        rc = cm_storage_wrap_native(dev, (uint64_t)(uintptr_t)t->data, out);
        if (rc)
            return rc;
        uint64_t end;
        if (__builtin_add_overflow(t->byte_offset, info->nbytes, &end) || end > out->byte_len) {
            char cap[32];
            int status = cm__fail(CM_ERR_INVALID_ARGUMENT,
                                  "kDLMetal tensor of %llu bytes at byte %llu reaches outside its %s MTLBuffer",
                                  (unsigned long long)info->nbytes,
                                  (unsigned long long)t->byte_offset,
                                  cm__fmt_bytes(out->byte_len, cap, sizeof cap));
            cm_storage_release(out->storage);
            memset(out, 0, sizeof *out);
            return status;
        }
        /* The storage retains the MTLBuffer, but the producer may still
         * recycle it (MLX and PyTorch cache buffers) once its deleter runs,
         * so the deleter must wait for the storage's death too. We hold the
         * only reference, so nobody can observe the storage before this. */
        out->storage->ext_release = release;
        out->storage->ext_ctx = managed;
        if (!writable)
            out->storage->writable = 0;
        info->byte_offset = t->byte_offset;
        return CM_OK;
    }
    default:
        return cm__fail(CM_ERR_UNSUPPORTED,
                        "cannot wrap memory of DLPack device type %d: mlxbuf reads kDLCPU (1) "
                        "memory and, on Metal, kDLMetal (8) buffers",
                        info->device_type);
    }
}
