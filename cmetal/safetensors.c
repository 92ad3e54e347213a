/*
 * safetensors.c -- the fast path for the usual safetensors header (see
 * safetensors.h for what it accepts and why anything else is CM_ERR_UNSUPPORTED).
 *
 * Pure C, no Python: a bounded, single-pass scan over bytes the caller
 * owns. Every read is checked against the end of the text.
 */
#include "safetensors.h"
#include "internal.h"

#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    uint8_t length;
    uint8_t size;
} DTYPES[CM_SAFETENSORS_DTYPE_COUNT] = {
    {"F64", 3, 8}, {"F32", 3, 4}, {"F16", 3, 2}, {"BF16", 4, 2}, {"I64", 3, 8},
    {"I32", 3, 4}, {"I16", 3, 2}, {"I8", 2, 1},  {"U64", 3, 8},  {"U32", 3, 4},
    {"U16", 3, 2}, {"U8", 2, 1},  {"BOOL", 4, 1},
};

/* numpy refuses an empty array whose non-zero dimensions times 8 bytes
 * pass 2**63 - 1 (mlxbuf's MAX_EMPTY_EXTENT). */
#define MAX_EMPTY_EXTENT ((uint64_t)INT64_MAX / 8)

const char *cm_safetensors_dtype_name(int i)
{
    return i >= 0 && i < CM_SAFETENSORS_DTYPE_COUNT ? DTYPES[i].name : NULL;
}

typedef struct {
    const uint8_t *p;           /* next byte                                */
    const uint8_t *end;         /* one past the last byte                   */
    const uint8_t *start;
    const uint8_t *mark;        /* code points counted up to here ...      */
    uint64_t mark_cp;           /* ... this many                            */
    cm_safetensors_scan_t *out;
    uint64_t tensor_cap;
    uint64_t dims_cap;
} scanner_t;

/* Not the fast path's form: the Python parser takes over. */
static int off_path(const scanner_t *s, const char *why)
{
    return cm__fail(CM_ERR_UNSUPPORTED, "safetensors header scan: %s at byte %llu", why,
                    (unsigned long long)(s->p - s->start));
}

/* Code points before q (q at or after the mark): UTF-8 continuation bytes
 * are 10xxxxxx, every other byte starts a code point. */
static uint64_t code_points_to(scanner_t *s, const uint8_t *q)
{
    for (const uint8_t *r = s->mark; r < q; r++)
        s->mark_cp += (*r & 0xC0) != 0x80;
    s->mark = q;
    return s->mark_cp;
}

static void skip_ws(scanner_t *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\n' || *s->p == '\r'))
        s->p++;
}

static int expect(scanner_t *s, uint8_t c)
{
    skip_ws(s);
    if (s->p >= s->end || *s->p != c)
        return 0;
    s->p++;
    return 1;
}

/* After an element of a list or object: *again = 1 when a ',' follows
 * (another element comes), 0 when `close` does (consumed). */
static int separator(scanner_t *s, uint8_t close, int *again)
{
    skip_ws(s);
    if (s->p < s->end && (*s->p == ',' || *s->p == close)) {
        *again = *s->p++ == ',';
        return CM_OK;
    }
    return off_path(s, close == ']' ? "expected ',' or ']'" : "expected ',' or '}'");
}

/* A string without escapes: [*from, *from + *len) is its content. */
static int plain_string(scanner_t *s, const uint8_t **from, uint64_t *len)
{
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"')
        return off_path(s, "expected a string");
    const uint8_t *q = ++s->p;
    while (q < s->end && *q != '"') {
        if (*q == '\\')
            return off_path(s, "an escape in a name or dtype");
        if (*q < 0x20)
            return off_path(s, "a control character in a string");
        q++;
    }
    if (q >= s->end)
        return off_path(s, "an unterminated string");
    *from = s->p;
    *len = (uint64_t)(q - s->p);
    s->p = q + 1;
    return CM_OK;
}

static int is_hex_digit(uint8_t c)
{
    return (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'f');
}

/* Any JSON string, escapes included (checked for form only: __metadata__'s
 * strings are decoded again by the caller). */
static int any_string(scanner_t *s)
{
    skip_ws(s);
    if (s->p >= s->end || *s->p != '"')
        return off_path(s, "expected a string");
    s->p++;
    while (s->p < s->end && *s->p != '"') {
        uint8_t c = *s->p++;
        if (c < 0x20)
            return off_path(s, "a control character in a string");
        if (c != '\\')
            continue;
        if (s->p >= s->end)
            return off_path(s, "an unterminated escape");
        c = *s->p++;
        if (c == 'u') {
            for (int i = 0; i < 4; i++, s->p++) {
                if (s->p >= s->end || !is_hex_digit(*s->p))
                    return off_path(s, "a bad \\u escape");
            }
        } else if (!strchr("\"\\/bfnrt", c) || c == '\0') {
            return off_path(s, "a bad escape");
        }
    }
    if (s->p >= s->end)
        return off_path(s, "an unterminated string");
    s->p++;
    return CM_OK;
}

/* A plain unsigned integer (JSON: 0 or no leading zero) below 2**64; a
 * sign, fraction or exponent is off the path (Python refuses floats). */
static int unsigned_int(scanner_t *s, uint64_t *value)
{
    skip_ws(s);
    if (s->p >= s->end || *s->p < '0' || *s->p > '9')
        return off_path(s, "expected an unsigned integer");
    uint64_t v = 0;
    const uint8_t *first = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') {
        if (__builtin_mul_overflow(v, 10, &v) || __builtin_add_overflow(v, (uint64_t)(*s->p - '0'), &v))
            return off_path(s, "an integer beyond 64 bits");
        s->p++;
    }
    if (*first == '0' && s->p - first > 1)
        return off_path(s, "a leading zero");
    if (s->p < s->end && (*s->p == '.' || *s->p == 'e' || *s->p == 'E'))
        return off_path(s, "a fraction or exponent");
    *value = v;
    return CM_OK;
}

static int grow(void **array, uint64_t *cap, uint64_t need, size_t elem)
{
    if (need <= *cap)
        return CM_OK;
    uint64_t n = *cap ? *cap : 256;
    while (n < need)
        n *= 2;
    if (n > SIZE_MAX / elem)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "safetensors header scan: %llu entries", (unsigned long long)n);
    void *bigger = realloc(*array, (size_t)n * elem);
    if (bigger == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "safetensors header scan: cannot grow to %llu entries",
                        (unsigned long long)n);
    *array = bigger;
    *cap = n;
    return CM_OK;
}

static int shape(scanner_t *s, cm_safetensors_tensor_t *t)
{
    if (!expect(s, '['))
        return off_path(s, "shape is not a list");
    t->dims_index = s->out->dims_count;
    t->ndim = 0;
    skip_ws(s);
    if (s->p < s->end && *s->p == ']') {
        s->p++;
        return CM_OK;
    }
    for (;;) {
        uint64_t d;
        int rc = unsigned_int(s, &d);
        if (rc)
            return rc;
        if (d > (uint64_t)INT64_MAX)
            return off_path(s, "a dimension beyond int64");
        if (t->ndim == CM_SAFETENSORS_MAX_NDIM)
            return off_path(s, "too many dimensions");
        rc = grow((void **)&s->out->dims, &s->dims_cap, s->out->dims_count + 1, sizeof(int64_t));
        if (rc)
            return rc;
        s->out->dims[s->out->dims_count++] = (int64_t)d;
        t->ndim++;
        int again;
        rc = separator(s, ']', &again);
        if (rc || !again)
            return rc;
    }
}

static int offsets(scanner_t *s, cm_safetensors_tensor_t *t)
{
    if (!expect(s, '['))
        return off_path(s, "data_offsets is not a list");
    int rc = unsigned_int(s, &t->begin);
    if (rc)
        return rc;
    if (!expect(s, ','))
        return off_path(s, "data_offsets is not a pair");
    rc = unsigned_int(s, &t->end);
    if (rc)
        return rc;
    if (!expect(s, ']'))
        return off_path(s, "data_offsets is not a pair");
    return CM_OK;
}

static int key_is(const uint8_t *key, uint64_t len, const char *word)
{
    return len == strlen(word) && memcmp(key, word, len) == 0;
}

/* {"dtype": "...", "shape": [...], "data_offsets": [b, e]} in any order,
 * each key once, no other key. */
static int entry(scanner_t *s, cm_safetensors_tensor_t *t)
{
    if (!expect(s, '{'))
        return off_path(s, "an entry is not an object");
    int seen = 0;
    for (int i = 0; i < 3; i++) {
        const uint8_t *key;
        uint64_t len;
        int rc = plain_string(s, &key, &len);
        if (rc)
            return rc;
        if (!expect(s, ':'))
            return off_path(s, "expected ':'");
        int which = key_is(key, len, "dtype") ? 1 : key_is(key, len, "shape") ? 2
                  : key_is(key, len, "data_offsets") ? 4 : 0;
        if (which == 0 || (seen & which))
            return off_path(s, "an unknown or repeated entry key");
        seen |= which;
        if (which == 1) {
            const uint8_t *name;
            uint64_t name_len;
            rc = plain_string(s, &name, &name_len);
            if (rc)
                return rc;
            int k = 0;
            while (k < CM_SAFETENSORS_DTYPE_COUNT
                   && !(name_len == DTYPES[k].length && memcmp(name, DTYPES[k].name, name_len) == 0))
                k++;
            if (k == CM_SAFETENSORS_DTYPE_COUNT)
                return off_path(s, "an unknown dtype");
            t->dtype = (uint32_t)k;
        } else {
            rc = which == 2 ? shape(s, t) : offsets(s, t);
            if (rc)
                return rc;
        }
        if (!expect(s, i < 2 ? ',' : '}'))
            return off_path(s, i < 2 ? "an entry lacks a key" : "an entry has more keys");
    }
    return CM_OK;
}

/* The rules of the Python parser for one tensor; pos is where the previous
 * tensor ended (tensors must tile the data section in file order here). */
static int check_tensor(scanner_t *s, const cm_safetensors_tensor_t *t, uint64_t data_start,
                        uint64_t data_len, uint64_t *pos)
{
    if (t->begin > t->end || t->end > data_len)
        return off_path(s, "data_offsets out of order or beyond the data");
    if (t->begin != *pos)
        return off_path(s, "tensors not in file order");
    const int64_t *dims = s->out->dims + t->dims_index;
    uint64_t count = 1, extent = 1;
    for (uint32_t i = 0; i < t->ndim; i++) {
        uint64_t d = (uint64_t)dims[i];
        if (__builtin_mul_overflow(count, d, &count))
            return off_path(s, "a shape whose product passes 64 bits");
        if (d != 0 && __builtin_mul_overflow(extent, d, &extent))
            return off_path(s, "an empty shape no array can have");
    }
    if (count == 0 && extent > MAX_EMPTY_EXTENT)
        return off_path(s, "an empty shape no array can have");
    uint64_t size = DTYPES[t->dtype].size, nbytes;
    if (__builtin_mul_overflow(count, size, &nbytes) || nbytes != t->end - t->begin)
        return off_path(s, "a shape that disagrees with its data_offsets");
    if ((data_start + t->begin) % size != 0)
        return off_path(s, "a misaligned tensor");
    *pos = t->end;
    return CM_OK;
}

/* __metadata__'s value: null, or a flat object of strings. */
static int metadata(scanner_t *s)
{
    skip_ws(s);
    if (s->end - s->p >= 4 && memcmp(s->p, "null", 4) == 0) {
        s->p += 4;
        return CM_OK;
    }
    if (!expect(s, '{'))
        return off_path(s, "__metadata__ is not an object");
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
        return CM_OK;
    }
    for (;;) {
        int rc = any_string(s);
        if (rc)
            return rc;
        if (!expect(s, ':'))
            return off_path(s, "expected ':'");
        rc = any_string(s);
        if (rc)
            return rc;
        int again;
        rc = separator(s, '}', &again);
        if (rc || !again)
            return rc;
    }
}

static int scan(scanner_t *s, uint64_t data_start, uint64_t data_len)
{
    cm_safetensors_scan_t *out = s->out;
    uint64_t pos = 0;
    if (!expect(s, '{'))
        return off_path(s, "the header is not an object");
    skip_ws(s);
    if (s->p < s->end && *s->p == '}') {
        s->p++;
    } else {
        for (;;) {
            const uint8_t *name;
            uint64_t name_len;
            int rc = plain_string(s, &name, &name_len);
            if (rc)
                return rc;
            if (!expect(s, ':'))
                return off_path(s, "expected ':'");
            if (key_is(name, name_len, "__metadata__")) {
                if (out->metadata_offset >= 0)
                    return off_path(s, "a second __metadata__");
                skip_ws(s);
                out->metadata_offset = (int64_t)code_points_to(s, s->p);
                rc = metadata(s);
                if (rc)
                    return rc;
                out->metadata_length = code_points_to(s, s->p) - (uint64_t)out->metadata_offset;
            } else {
                rc = grow((void **)&out->tensors, &s->tensor_cap, out->count + 1, sizeof *out->tensors);
                if (rc)
                    return rc;
                cm_safetensors_tensor_t *t = &out->tensors[out->count];
                memset(t, 0, sizeof *t);
                t->name_offset = code_points_to(s, name);
                t->name_length = code_points_to(s, name + name_len) - t->name_offset;
                rc = entry(s, t);
                if (rc)
                    return rc;
                rc = check_tensor(s, t, data_start, data_len, &pos);
                if (rc)
                    return rc;
                out->count++;
            }
            int again;
            rc = separator(s, '}', &again);
            if (rc)
                return rc;
            if (!again)
                break;
        }
    }
    skip_ws(s);
    if (s->p != s->end)
        return off_path(s, "text after the header object");
    if (pos != data_len)
        return off_path(s, "tensors that do not cover the data section");
    return CM_OK;
}

int cm_safetensors_scan(const uint8_t *text, uint64_t len, uint64_t data_start, uint64_t data_len,
                        cm_safetensors_scan_t **out)
{
    if (out == NULL)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_safetensors_scan: out is NULL");
    *out = NULL;
    if (text == NULL && len > 0)
        return cm__fail(CM_ERR_INVALID_ARGUMENT, "cm_safetensors_scan: text is NULL");
    cm_safetensors_scan_t *result = calloc(1, sizeof *result);
    if (result == NULL)
        return cm__fail(CM_ERR_OUT_OF_MEMORY, "cm_safetensors_scan: cannot allocate a result");
    result->metadata_offset = -1;
    static const uint8_t nothing[1] = {0};
    if (text == NULL)
        text = nothing; /* len is 0: no pointer arithmetic on NULL */
    scanner_t s = {.p = text, .end = text + len, .start = text, .mark = text, .out = result};
    int rc = scan(&s, data_start, data_len);
    if (rc) {
        cm_safetensors_scan_release(result);
        return rc;
    }
    *out = result;
    return CM_OK;
}

void cm_safetensors_scan_release(cm_safetensors_scan_t *scan)
{
    if (scan == NULL)
        return;
    free(scan->tensors);
    free(scan->dims);
    free(scan);
}
