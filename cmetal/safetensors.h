/*
 * safetensors.h -- a fast scanner for the common safetensors header.
 *
 * A safetensors header is JSON: {"name": {"dtype": ..., "shape": [...],
 * "data_offsets": [begin, end]}, ..., "__metadata__": {...}}. Python's json
 * module builds a dozen objects per tensor, which for a header of a million
 * tensors costs seconds before any check runs. cm_safetensors_scan reads the
 * usual form of such a header in one pass and returns flat arrays.
 *
 * It is a fast path, not a second authority: it accepts a header only if it
 * is valid JSON of the exact shape above and passes every rule of the Python
 * parser (mlxbuf/safetensors.py), and otherwise returns CM_ERR_UNSUPPORTED,
 * after which the Python parser reads the header again and accepts it or
 * names the problem. So anything unusual, valid or not, takes the Python
 * path: an escape in a name or a dtype, an entry key other than the three,
 * a number that is not a plain unsigned integer, tensors not laid out in
 * file order, a nested __metadata__. What the scanner does not check (names
 * unique, __metadata__'s strings, which Python reads from the span it
 * reports) is left to the caller.
 *
 * Threads: cm_safetensors_scan may run on any thread; a result belongs to
 * its caller until cm_safetensors_scan_release.
 */
#ifndef CMETAL_SAFETENSORS_H
#define CMETAL_SAFETENSORS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The dtypes the scanner knows, as indices into cm_safetensors_dtype_name. */
#define CM_SAFETENSORS_DTYPE_COUNT 13

/* Most dimensions the scanner accepts in a shape (numpy's limit); more go
 * to the Python parser. */
#define CM_SAFETENSORS_MAX_NDIM 64

typedef struct cm_safetensors_tensor {
    uint64_t name_offset;       /* in code points from the header's start */
    uint64_t name_length;       /* in code points                          */
    uint64_t begin;             /* data_offsets, from the data section     */
    uint64_t end;
    uint64_t dims_index;        /* first of its ndim entries in dims       */
    uint32_t ndim;
    uint32_t dtype;             /* index for cm_safetensors_dtype_name     */
} cm_safetensors_tensor_t;

typedef struct cm_safetensors_scan {
    uint64_t count;             /* tensors, in the header's order          */
    cm_safetensors_tensor_t *tensors;
    int64_t *dims;              /* every tensor's dimensions, in order     */
    uint64_t dims_count;
    int64_t metadata_offset;    /* code points to __metadata__'s value (an
                                   object or null), -1 when absent         */
    uint64_t metadata_length;   /* its length in code points               */
} cm_safetensors_scan_t;

/* The safetensors name of dtype index i (0 <= i < COUNT), e.g. "F32";
 * NULL beyond. Static storage. */
const char *cm_safetensors_dtype_name(int i);

/* Scan the header text (len bytes of valid UTF-8: the caller decoded it)
 * of a file whose data section starts at file byte data_start and holds
 * data_len bytes. CM_OK: *out holds the result (release it);
 * CM_ERR_UNSUPPORTED: not the fast path's form or not valid, the message
 * says where; CM_ERR_OUT_OF_MEMORY. */
int cm_safetensors_scan(const uint8_t *text, uint64_t len, uint64_t data_start, uint64_t data_len,
                        cm_safetensors_scan_t **out);

/* Free a scan result; NULL is accepted. */
void cm_safetensors_scan_release(cm_safetensors_scan_t *scan);

#ifdef __cplusplus
}
#endif

#endif /* CMETAL_SAFETENSORS_H */
