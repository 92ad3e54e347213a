/*
 * backend.c -- which backend a device opens on: the backends this build
 * has, and the choice among them (CM_BACKEND_AUTO prefers Metal).
 *
 * Owns nothing mutable and takes no lock.
 */
#include "internal.h"

static int metal_available(void)
{
#if defined(CM_HAVE_METAL)
    return cm_metal_backend.available();
#else
    return 0;
#endif
}

int cm_backend_available(int backend)
{
    switch (backend) {
    case CM_BACKEND_AUTO:
        return 1;
    case CM_BACKEND_HOST:
        return cm_host_backend.available();
    case CM_BACKEND_METAL:
        return metal_available();
    default:
        return 0;
    }
}

int cm__backend_pick(int backend, const cm_backend_t **out)
{
    switch (backend) {
    case CM_BACKEND_AUTO:
#if defined(CM_HAVE_METAL)
        if (cm_metal_backend.available()) {
            *out = &cm_metal_backend;
            return CM_OK;
        }
#endif
        *out = &cm_host_backend;
        return CM_OK;
    case CM_BACKEND_HOST:
        *out = &cm_host_backend;
        return CM_OK;
    case CM_BACKEND_METAL:
#if defined(CM_HAVE_METAL)
        if (cm_metal_backend.available()) {
            *out = &cm_metal_backend;
            return CM_OK;
        }
        return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                        "no Metal device: MTLCreateSystemDefaultDevice() found none "
                        "in this process");
#else
        return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                        "no Metal device: this build has no Metal backend (Metal "
                        "exists only on macOS)");
#endif
    default:
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "unknown backend %d: expected %d (auto), %d (host) or %d (metal)",
                        backend, CM_BACKEND_AUTO, CM_BACKEND_HOST, CM_BACKEND_METAL);
    }
}
