/*
 * backend.c -- which backend a device opens on: the table of backends this
 * build has, and the choice among them. The only file that names a
 * backend; everything else reaches one through its cm_backend_t.
 *
 * Owns nothing mutable and takes no lock.
 */
#include "internal.h"

/* In order of preference for CM_BACKEND_AUTO. The host backend is always
 * built and always available, so AUTO always finds one. */
static const cm_backend_t *const backends[] = {
#if defined(CM_HAVE_METAL)
    &cm_metal_backend,
#endif
    &cm_host_backend,
};

#define NBACKENDS (sizeof backends / sizeof backends[0])

static const cm_backend_t *built(int kind)
{
    for (size_t i = 0; i < NBACKENDS; i++)
        if (backends[i]->kind == kind)
            return backends[i];
    return NULL;
}

int cm_backend_available(int backend)
{
    if (backend == CM_BACKEND_AUTO)
        return 1;
    const cm_backend_t *be = built(backend);
    return be != NULL && be->available();
}

/* Whether CM_BACKEND_AUTO may choose be. A simulated Metal
 * (CM_METAL_SIMULATED: a Linux test build) opens only when asked for by
 * name, so no program that asked for the best device runs on a model of
 * Metal by accident. */
static int chosen_by_auto(const cm_backend_t *be)
{
#if defined(CM_METAL_SIMULATED)
    return be->kind != CM_BACKEND_METAL;
#else
    (void)be;
    return 1;
#endif
}

int cm__backend_pick(int backend, const cm_backend_t **out)
{
    if (backend != CM_BACKEND_AUTO && backend != CM_BACKEND_HOST && backend != CM_BACKEND_METAL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT,
                        "unknown backend %d: expected %d (auto), %d (host) or %d (metal)",
                        backend, CM_BACKEND_AUTO, CM_BACKEND_HOST, CM_BACKEND_METAL);
    for (size_t i = 0; i < NBACKENDS; i++) {
        const cm_backend_t *be = backends[i];
        bool wanted = backend == CM_BACKEND_AUTO ? chosen_by_auto(be) : be->kind == backend;
        if (wanted && be->available()) {
            *out = be;
            return CM_OK;
        }
    }
    /* Only Metal can be missing or unavailable. */
    if (built(CM_BACKEND_METAL) == NULL)
        return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                        "no Metal device: this build has no Metal backend (Metal "
                        "exists only on macOS)");
    return cm__fail(CM_ERR_DEVICE_NOT_FOUND,
                    "no Metal device: MTLCreateSystemDefaultDevice() found none "
                    "in this process");
}
