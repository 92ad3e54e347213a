/*
 * library.m -- MTLCompileOptions, MTLLibrary, MTLFunction and compute
 * pipelines, and the backend's built-in kernels.
 *
 * The simulator cannot compile Metal Shading Language. It reads what it
 * can check from the source: the kernel functions (`kernel void NAME(`),
 * their [[buffer(n)]] arguments (address space, const, element type: for
 * the setBuffer offset rule and for which buffers a dispatch writes), and
 * the errors it can see (unbalanced brackets, #error), reported in the
 * compiler's "program_source:LINE:COLUMN: error: ..." form. A dispatch
 * runs the kernel's registered implementation (msim_register_kernel).
 * Compile options are recorded: fast math is on unless switched off, as
 * in Metal.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sim.h"

NSErrorDomain const MTLLibraryErrorDomain = @"MTLLibraryErrorDomain";

#define MSIM_MAX_ARGS 31
#define MSIM_NAME_MAX 128

@implementation MTLCompileOptions {
    BOOL _fastMathEnabled;
    MTLMathMode _mathMode;
}

- (instancetype)init
{
    self = [super init];
    _fastMathEnabled = YES;
    _mathMode = MTLMathModeFast;
    return self;
}

/* mathMode is macOS 15 API: on an older simulated macOS the selector is
 * absent, as on a Mac. */
static void math_mode_check(SEL cmd, id target)
{
    int major = msim__config().macos_major;
    if (major >= 15)
        return;
    msim__invalid("macos15-api", "-[MTLCompileOptions %s] sent on simulated macOS %d: mathMode "
                  "needs macOS 15 (use fastMathEnabled before)", sel_getName(cmd), major);
    msim__raise(NSInvalidArgumentException,
                "-[MTLCompileOptions %s]: unrecognized selector sent to instance %p",
                sel_getName(cmd), (__bridge void *)target);
}

/* The two spellings of one setting: mathMode (macOS 15) refines it. */
- (BOOL)fastMathEnabled { return _fastMathEnabled; }

- (void)setFastMathEnabled:(BOOL)on
{
    _fastMathEnabled = on;
    _mathMode = on ? MTLMathModeFast : MTLMathModeSafe;
}

- (MTLMathMode)mathMode
{
    math_mode_check(_cmd, self);
    return _mathMode;
}

- (void)setMathMode:(MTLMathMode)mode
{
    math_mode_check(_cmd, self);
    _mathMode = mode;
    _fastMathEnabled = mode == MTLMathModeFast;
}

- (id)copyWithZone:(NSZone *)zone
{
    (void)zone;
    MTLCompileOptions *c = [[MTLCompileOptions alloc] init];
    c->_fastMathEnabled = _fastMathEnabled;
    c->_mathMode = _mathMode;
    return c;
}

@end

/* ---- reading MSL --------------------------------------------------------------------- */

typedef struct msim_kernel_sig {
    MTLFunctionType type;
    char name[MSIM_NAME_MAX];
    msim_arg_t args[MSIM_MAX_ARGS];
    size_t nargs;
} msim_kernel_sig_t;

/* The source with comments and string/character literals blanked out
 * (newlines kept, so line numbers stay right). */
static char *strip(const char *src)
{
    size_t n = strlen(src);
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    memcpy(out, src, n + 1);
    for (size_t i = 0; i < n; i++) {
        if (out[i] == '/' && out[i + 1] == '/') {
            while (i < n && out[i] != '\n')
                out[i++] = ' ';
        } else if (out[i] == '/' && out[i + 1] == '*') {
            out[i] = out[i + 1] = ' ';
            i += 2;
            while (i < n && !(out[i] == '*' && out[i + 1] == '/')) {
                if (out[i] != '\n')
                    out[i] = ' ';
                i++;
            }
            if (i < n)
                out[i] = out[i + 1] = ' ';
            i++;
        } else if (out[i] == '"' || out[i] == '\'') {
            char q = out[i++];
            while (i < n && out[i] != q && out[i] != '\n') {
                if (out[i] == '\\' && i + 1 < n)
                    out[i++] = ' ';
                out[i++] = ' ';
            }
        }
    }
    return out;
}

static void line_col(const char *text, size_t at, int *line, int *col)
{
    *line = 1;
    *col = 1;
    for (size_t i = 0; i < at; i++) {
        if (text[i] == '\n') {
            (*line)++;
            *col = 1;
        } else {
            (*col)++;
        }
    }
}

/* The first error the simulator can see, as the compiler words it. */
static bool find_error(const char *text, char *msg, size_t cap)
{
    int line, col;
    /* #error directives. */
    for (const char *p = text; *p;) {
        const char *q = p;
        while (*q == ' ' || *q == '\t')
            q++;
        if (*q == '#') {
            q++;
            while (*q == ' ' || *q == '\t')
                q++;
            if (strncmp(q, "error", 5) == 0 && !isalnum((unsigned char)q[5]) && q[5] != '_') {
                line_col(text, (size_t)(p - text), &line, &col);
                const char *m = q + 5;
                while (*m == ' ' || *m == '\t')
                    m++;
                int len = 0;
                while (m[len] && m[len] != '\n')
                    len++;
                snprintf(msg, cap, "program_source:%d:%d: error: %.*s", line,
                         (int)(q - p), len, m);
                return true;
            }
        }
        const char *nl = strchr(p, '\n');
        if (!nl)
            break;
        p = nl + 1;
    }
    /* Brackets. */
    size_t depth = 0, stack_pos[256];
    char stack[256];
    for (size_t i = 0; text[i]; i++) {
        char c = text[i];
        if (c == '(' || c == '[' || c == '{') {
            if (depth == sizeof stack) {
                line_col(text, i, &line, &col);
                snprintf(msg, cap, "program_source:%d:%d: error: brackets nested too deeply",
                         line, col);
                return true;
            }
            stack[depth] = c;
            stack_pos[depth++] = i;
        } else if (c == ')' || c == ']' || c == '}') {
            char open = c == ')' ? '(' : c == ']' ? '[' : '{';
            if (depth == 0 || stack[depth - 1] != open) {
                line_col(text, i, &line, &col);
                snprintf(msg, cap, "program_source:%d:%d: error: unexpected '%c'", line, col, c);
                return true;
            }
            depth--;
        }
    }
    if (depth) {
        char open = stack[depth - 1];
        char close = open == '(' ? ')' : open == '[' ? ']' : '}';
        int at_line, at_col;
        line_col(text, stack_pos[depth - 1], &at_line, &at_col);
        line_col(text, strlen(text), &line, &col);
        snprintf(msg, cap,
                 "program_source:%d:%d: error: expected '%c' (to match the '%c' at line %d)",
                 line, col, close, open, at_line);
        return true;
    }
    return false;
}

static bool is_ident(char c)
{
    return isalnum((unsigned char)c) || c == '_';
}

/* Size and alignment of an MSL scalar or vector type name; 0 and 0 if
 * unknown (a struct: the simulator does not lay those out). */
static void type_layout(const char *name, unsigned *size, unsigned *alignment)
{
    static const struct {
        const char *name;
        unsigned size;
    } scalars[] = {
        {"bool", 1}, {"char", 1}, {"uchar", 1}, {"int8_t", 1}, {"uint8_t", 1},
        {"short", 2}, {"ushort", 2}, {"half", 2}, {"bfloat", 2}, {"int16_t", 2},
        {"uint16_t", 2}, {"int", 4}, {"uint", 4}, {"float", 4}, {"int32_t", 4},
        {"uint32_t", 4}, {"long", 8}, {"ulong", 8}, {"int64_t", 8}, {"uint64_t", 8},
        {"size_t", 8},
    };
    *size = *alignment = 0;
    bool packed = strncmp(name, "packed_", 7) == 0;
    if (packed)
        name += 7;
    size_t len = strlen(name);
    unsigned lanes = 1;
    if (len > 1 && name[len - 1] >= '2' && name[len - 1] <= '4' && !isdigit((unsigned char)name[len - 2])) {
        lanes = (unsigned)(name[len - 1] - '0');
        len--;
    }
    for (size_t i = 0; i < sizeof scalars / sizeof *scalars; i++) {
        if (strlen(scalars[i].name) == len && strncmp(scalars[i].name, name, len) == 0) {
            unsigned scalar = scalars[i].size;
            if (packed) {
                *size = scalar * lanes;
                *alignment = scalar;
            } else {
                /* A 3-lane vector is laid out like a 4-lane one. */
                *size = *alignment = scalar * (lanes == 3 ? 4 : lanes);
            }
            return;
        }
    }
}

/* One parameter: "device const float *a [[buffer(0)]]". */
static bool parse_arg(const char *p, size_t n, msim_arg_t *arg)
{
    char text[512];
    if (n >= sizeof text)
        n = sizeof text - 1;
    memcpy(text, p, n);
    text[n] = '\0';
    char *open = strstr(text, "[[");
    if (!open)
        return false;
    char *attr = strstr(open, "buffer");
    while (attr && (is_ident(attr[-1]) || is_ident(attr[6])))
        attr = strstr(attr + 1, "buffer");
    if (!attr)
        return false;
    char *paren = attr + 6;
    while (isspace((unsigned char)*paren))
        paren++;
    if (*paren != '(')
        return false;
    arg->index = (unsigned)strtoul(paren + 1, NULL, 10);
    bool device = false, constant = false, is_const = false;
    char type[64] = "", last[64] = "";
    arg->name[0] = '\0';
    for (char *q = text; *q && q < open;) {
        if (is_ident(*q)) {
            char word[64];
            size_t k = 0;
            while (is_ident(*q) && k + 1 < sizeof word)
                word[k++] = *q++;
            word[k] = '\0';
            if (strcmp(word, "device") == 0)
                device = true;
            else if (strcmp(word, "constant") == 0)
                constant = true;
            else if (strcmp(word, "const") == 0)
                is_const = true;
            else
                snprintf(last, sizeof last, "%s", word);
        } else {
            if ((*q == '*' || *q == '&') && !type[0])
                snprintf(type, sizeof type, "%s", last);
            q++;
        }
    }
    if (!device && !constant)
        return false;
    if (type[0])
        snprintf(arg->name, sizeof arg->name, "%s", last);
    unsigned size, align;
    type_layout(type, &size, &align);
    arg->device_space = device;
    arg->written = device && !is_const;
    arg->type_size = size;
    arg->type_alignment = align;
    if (!device)
        arg->alignment = 4;
    else
        arg->alignment = align < 4 ? 4 : align > 16 ? 16 : align;
    return true;
}

/* Every `kernel void NAME(` with its buffer arguments, and the `vertex T
 * NAME(` and `fragment T NAME(` functions. */
static size_t find_kernels(const char *text, msim_kernel_sig_t *out, size_t max)
{
    static const struct {
        const char *word;
        MTLFunctionType type;
    } qualifiers[] = {
        {"kernel", MTLFunctionTypeKernel},
        {"vertex", MTLFunctionTypeVertex},
        {"fragment", MTLFunctionTypeFragment},
    };
    size_t count = 0;
    for (const char *p = text; *p && count < max; p++) {
        if (p > text && is_ident(p[-1]))
            continue;
        size_t which = 0, wlen = 0;
        while (which < 3) {
            wlen = strlen(qualifiers[which].word);
            if (strncmp(p, qualifiers[which].word, wlen) == 0 && !is_ident(p[wlen]))
                break;
            which++;
        }
        if (which == 3)
            continue;
        const char *q = p + wlen;
        while (isspace((unsigned char)*q))
            q++;
        size_t tlen = 0;
        while (is_ident(q[tlen]))
            tlen++;
        if (tlen == 0 || (qualifiers[which].type == MTLFunctionTypeKernel &&
                          (tlen != 4 || strncmp(q, "void", 4) != 0)))
            continue;
        q += tlen;
        while (isspace((unsigned char)*q))
            q++;
        size_t len = 0;
        while (is_ident(q[len]))
            len++;
        const char *paren = q + len;
        while (isspace((unsigned char)*paren))
            paren++;
        if (len == 0 || len >= MSIM_NAME_MAX || *paren != '(')
            continue;
        msim_kernel_sig_t *k = &out[count++];
        memset(k, 0, sizeof *k);
        k->type = qualifiers[which].type;
        memcpy(k->name, q, len);
        /* Split the parameter list at top-level commas. */
        const char *start = paren + 1;
        int depth = 0;
        for (const char *c = start; *c; c++) {
            if (*c == '(' || *c == '[' || *c == '<')
                depth++;
            else if ((*c == ')' || *c == ']' || *c == '>') && depth > 0)
                depth--;
            else if ((*c == ',' && depth == 0) || (*c == ')' && depth == 0)) {
                if (k->nargs < MSIM_MAX_ARGS && parse_arg(start, (size_t)(c - start), &k->args[k->nargs]))
                    k->nargs++;
                start = c + 1;
                if (*c == ')')
                    break;
            }
        }
    }
    return count;
}

/* ---- MTLFunction ------------------------------------------------------------------------ */

@implementation MSimFunction {
    NSString *_name;
    msim_arg_t _args[MSIM_MAX_ARGS];
    NSUInteger _nargs;
    BOOL _fastMath;
    MTLFunctionType _type;
}

- (instancetype)initWithSignature:(const msim_kernel_sig_t *)sig fastMath:(BOOL)fastMath
{
    self = [super init];
    _type = sig->type;
    _name = [NSString stringWithCString:sig->name encoding:NSUTF8StringEncoding];
    memcpy(_args, sig->args, sizeof _args);
    _nargs = sig->nargs;
    _fastMath = fastMath;
    return self;
}

- (const msim_arg_t *)args
{
    return _args;
}

- (NSUInteger)nargs
{
    return _nargs;
}

- (BOOL)fastMath
{
    return _fastMath;
}

- (MTLFunctionType)functionType
{
    MSIM_ENTRY();
    return _type;
}

- (NSString *)name
{
    MSIM_ENTRY();
    return _name;
}

@end

/* ---- MTLLibrary ---------------------------------------------------------------------- */

@implementation MSimLibrary {
    MSimDevice *_device;
    msim_kernel_sig_t *_kernels;
    size_t _nkernels;
    BOOL _fastMath;
}

+ (instancetype)newWithDevice:(MSimDevice *)device
                       source:(NSString *)source
                         fastMath:(BOOL)fastMath
                            error:(NSError **)error
{
    const char *src = source.UTF8String;
    char *text = src ? strip(src) : NULL;
    if (!text) {
        if (error)
            *error = [NSError msim_errorWithDomain:MTLLibraryErrorDomain
                                              code:MTLLibraryErrorInternal
                                       description:@"cannot read the library source"];
        return nil;
    }
    char msg[512];
    if (find_error(text, msg, sizeof msg)) {
        free(text);
        if (error)
            *error = [NSError msim_errorWithDomain:MTLLibraryErrorDomain
                                              code:MTLLibraryErrorCompileFailure
                                       description:[NSString msim_stringWithFormat:"%s", msg]];
        return nil;
    }
    size_t cap = 64;
    msim_kernel_sig_t *kernels = calloc(cap, sizeof *kernels);
    size_t n = kernels ? find_kernels(text, kernels, cap) : 0;
    free(text);
    MSimLibrary *lib = [[self alloc] init];
    lib->_device = device;
    lib->_kernels = kernels;
    lib->_nkernels = n;
    lib->_fastMath = fastMath;
    MSIM_COUNT(libraries_compiled, 1);
    if (fastMath)
        MSIM_COUNT(libraries_fast_math, 1);
    return lib;
}

- (void)dealloc
{
    free(_kernels);
}

- (NSArray<NSString *> *)functionNames
{
    MSIM_ENTRY();
    MSimList *names = [[MSimList alloc] init];
    for (size_t i = 0; i < _nkernels; i++)
        [names add:[NSString stringWithCString:_kernels[i].name encoding:NSUTF8StringEncoding]];
    return names.array;
}

- (id<MTLFunction>)newFunctionWithName:(NSString *)name
{
    MSIM_ENTRY_NULLABLE();
    const char *want = name.UTF8String;
    for (size_t i = 0; want && i < _nkernels; i++)
        if (strcmp(_kernels[i].name, want) == 0)
            return [[MSimFunction alloc] initWithSignature:&_kernels[i] fastMath:_fastMath];
    return nil;
}

@end

/* ---- pipeline reflection ---------------------------------------------------------------- */

@interface MSimBufferBinding : NSObject <MTLBufferBinding>
- (instancetype)initWithArgument:(const msim_arg_t *)arg;
@end

@implementation MSimBufferBinding {
    msim_arg_t _arg;
    NSString *_name;
}

- (instancetype)initWithArgument:(const msim_arg_t *)arg
{
    self = [super init];
    _arg = *arg;
    _name = [NSString stringWithCString:arg->name encoding:NSUTF8StringEncoding];
    return self;
}

- (NSString *)name { MSIM_ENTRY(); return _name; }
- (MTLBindingType)type { MSIM_ENTRY(); return MTLBindingTypeBuffer; }
- (NSUInteger)index { MSIM_ENTRY(); return _arg.index; }
- (BOOL)isUsed { MSIM_ENTRY(); return YES; }
- (BOOL)isArgument { MSIM_ENTRY(); return NO; }

- (MTLBindingAccess)access
{
    MSIM_ENTRY();
    return _arg.written ? MTLBindingAccessReadWrite : MTLBindingAccessReadOnly;
}

/* A type the simulator cannot lay out (a struct) reports the 4 bytes its
 * own offset rule then asks for. */
- (NSUInteger)bufferAlignment
{
    MSIM_ENTRY();
    return _arg.type_alignment ? _arg.type_alignment : 4;
}

- (NSUInteger)bufferDataSize
{
    MSIM_ENTRY();
    return _arg.type_size;
}

@end

@implementation MTLComputePipelineReflection {
    NSArray<id<MTLBinding>> *_bindings;
}

- (instancetype)initWithFunction:(MSimFunction *)function
{
    self = [super init];
    MSimList *bindings = [[MSimList alloc] init];
    for (NSUInteger i = 0; function && i < function.nargs; i++)
        [bindings add:[[MSimBufferBinding alloc] initWithArgument:&function.args[i]]];
    _bindings = bindings.array;
    return self;
}

- (NSArray<id<MTLBinding>> *)bindings
{
    MSIM_ENTRY();
    return _bindings;
}

@end

/* ---- pipelines ------------------------------------------------------------------------- */

@implementation MSimPipeline {
    MSimDevice *_device;
    MSimFunction *_function;
}

- (instancetype)initWithDevice:(MSimDevice *)device function:(MSimFunction *)function
{
    self = [super init];
    _device = device;
    _function = function;
    return self;
}

- (MSimFunction *)function
{
    return _function;
}

- (MSimDevice *)device
{
    return _device;
}

/* An Apple7 GPU's limits for a simple kernel. */
- (NSUInteger)maxTotalThreadsPerThreadgroup
{
    MSIM_ENTRY();
    return 1024;
}

- (NSUInteger)threadExecutionWidth
{
    MSIM_ENTRY();
    return 32;
}

@end

/* ---- the backend's built-in kernels ------------------------------------------------------ */

/* The argument block of mlxbuf_copy_bytes / mlxbuf_fill_bytes (metal.m). */
typedef struct bytes_args {
    uint64_t src_off, dst_off, n;
    uint32_t value, pad;
} bytes_args_t;

static int read_bytes_args(const msim_kernel_args_t *a, bytes_args_t *out)
{
    if (a->constants_len != sizeof *out) {
        snprintf(a->error, a->error_cap, "%s: expected %zu bytes of arguments, got %llu", a->name,
                 sizeof *out, (unsigned long long)a->constants_len);
        return 1;
    }
    memcpy(out, a->constants, sizeof *out);
    return 0;
}

static int out_of_bounds(const msim_kernel_args_t *a, const char *which, uint64_t off, uint64_t n,
                         uint64_t len)
{
    if (off <= len && n <= len - off)
        return 0;
    snprintf(a->error, a->error_cap,
             "GPU page fault: %s reads or writes bytes [%llu, %llu) of a %llu-byte %s buffer",
             a->name, (unsigned long long)off, (unsigned long long)(off + n),
             (unsigned long long)len, which);
    return 1;
}

static int copy_bytes(void *ctx, const msim_kernel_args_t *a)
{
    (void)ctx;
    bytes_args_t b;
    if (read_bytes_args(a, &b))
        return 1;
    if (a->nbuffers != 2) {
        snprintf(a->error, a->error_cap, "%s: expected 2 buffers, got %zu", a->name, a->nbuffers);
        return 1;
    }
    if (out_of_bounds(a, "source", b.src_off, b.n, a->lengths[0]) ||
        out_of_bounds(a, "destination", b.dst_off, b.n, a->lengths[1]))
        return 1;
    memmove(a->buffers[1] + b.dst_off, a->buffers[0] + b.src_off, (size_t)b.n);
    return 0;
}

static int fill_bytes(void *ctx, const msim_kernel_args_t *a)
{
    (void)ctx;
    bytes_args_t b;
    if (read_bytes_args(a, &b))
        return 1;
    if (a->nbuffers != 1) {
        snprintf(a->error, a->error_cap, "%s: expected 1 buffer, got %zu", a->name, a->nbuffers);
        return 1;
    }
    if (out_of_bounds(a, "destination", b.dst_off, b.n, a->lengths[0]))
        return 1;
    memset(a->buffers[0] + b.dst_off, (int)(b.value & 0xFF), (size_t)b.n);
    return 0;
}

static char builtin_ctx;

void msim__builtin_kernels_register(void)
{
    msim_register_kernel("mlxbuf_copy_bytes", copy_bytes, &builtin_ctx);
    msim_register_kernel("mlxbuf_fill_bytes", fill_bytes, &builtin_ctx);
}
