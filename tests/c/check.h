/*
 * check.h -- the few lines every C test program here shares. Plain C, no
 * framework: CHECK prints the failing expression with the thread's last C
 * error and counts it; run_tests runs a table of tests and returns the
 * program's exit status (non-zero if anything failed). Each test_*.c is its
 * own program (tests/c/run.sh), so the counters are per program.
 */
#ifndef MLXBUF_TESTS_C_CHECK_H
#define MLXBUF_TESTS_C_CHECK_H

#include "cmetal.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;
static int checks;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        checks++;                                                                        \
        if (!(cond)) {                                                                   \
            failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error %d: %s)\n", __FILE__,   \
                    __LINE__, #cond, cm_last_status(), cm_last_error());                 \
        }                                                                                \
    } while (0)

#define CHECK_OK(expr) CHECK((expr) == CM_OK)
#define CHECK_EQ_U(a, b)                                                                 \
    do {                                                                                 \
        uint64_t a_ = (uint64_t)(a), b_ = (uint64_t)(b);                                 \
        checks++;                                                                        \
        if (a_ != b_) {                                                                  \
            failures++;                                                                  \
            fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%" PRIu64 " != %" PRIu64     \
                            ")\n",                                                       \
                    __FILE__, __LINE__, #a, #b, a_, b_);                                 \
        }                                                                                \
    } while (0)
#define CHECK_MSG(sub) CHECK(strstr(cm_last_error(), (sub)) != NULL)

/* Whether the n bytes at p all equal value. */
static inline bool all_bytes(const uint8_t *p, uint64_t n, uint8_t value)
{
    for (uint64_t i = 0; i < n; i++)
        if (p[i] != value)
            return false;
    return true;
}

static inline cm_device_t *open_host(int flags)
{
    cm_device_t *dev = NULL;
    if (cm_device_open(CM_BACKEND_HOST, flags, &dev) != CM_OK) {
        fprintf(stderr, "cannot open host device: %s\n", cm_last_error());
        exit(2);
    }
    return dev;
}

typedef struct test_case {
    const char *name;
    void (*fn)(void);
} test_case_t;

static inline int run_tests(const test_case_t *tests, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int before = failures;
        tests[i].fn();
        printf("%-30s %s\n", tests[i].name, failures == before ? "ok" : "FAILED");
    }
    printf("%d checks, %d failed\n", checks, failures);
    return failures == 0 ? 0 : 1;
}

#endif /* MLXBUF_TESTS_C_CHECK_H */
