/*
 * test_trim.c -- the device's list of caches to trim under memory pressure
 * (memory.c), through internal.h. Owners drop their own or their
 * neighbour's last reference in the middle of a trim, an owner already
 * being freed stays registered while the walk passes, and real pools are
 * created, filled and released on some threads while others trim. Built
 * and run by tests/c/run.sh under ASan/UBSan and valgrind, which turn any
 * step of the walk onto a freed registration into a failure.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>

/* ------------------------------------------------------------------ */
/* A fake cache: a reference count, and what its trim does             */
/* ------------------------------------------------------------------ */

/* What a fake saw, kept outside it because fakes are freed mid-test. */
typedef struct seen {
    int trims;
    int freed;
} seen_t;

typedef struct fake {
    atomic_uint_fast64_t refcount;
    cm_device_t *dev;
    cm_trimmer_t trimmer;
    uint64_t bytes;           /* what a trim reports freed                */
    struct fake *drop;        /* its trim drops one reference of this one */
    seen_t *seen;
} fake_t;

static bool fake_try_retain(void *owner)
{
    fake_t *f = owner;
    uint64_t rc = atomic_load(&f->refcount);
    while (rc != 0) {
        if (atomic_compare_exchange_weak(&f->refcount, &rc, rc + 1))
            return true;
    }
    return false;
}

/* As a pool does: the last reference unregisters, then frees. */
static void fake_release(void *owner)
{
    fake_t *f = owner;
    if (atomic_fetch_sub(&f->refcount, 1) != 1)
        return;
    cm__memory_remove_trimmer(f->dev, &f->trimmer);
    f->seen->freed++;
    free(f);
}

static uint64_t fake_trim(void *owner)
{
    fake_t *f = owner;
    f->seen->trims++;
    fake_t *drop = f->drop;
    f->drop = NULL;
    if (drop != NULL)
        fake_release(drop);
    return f->bytes;
}

static const cm_trimmer_hooks_t fake_hooks = {
    .try_retain = fake_try_retain,
    .release = fake_release,
    .trim = fake_trim,
};

static fake_t *fake_new(cm_device_t *dev, uint64_t refcount, uint64_t bytes, seen_t *seen)
{
    fake_t *f = calloc(1, sizeof *f);
    if (f == NULL) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    atomic_init(&f->refcount, refcount);
    f->dev = dev;
    f->bytes = bytes;
    f->seen = seen;
    f->trimmer.hooks = &fake_hooks;
    f->trimmer.owner = f;
    cm__memory_add_trimmer(dev, &f->trimmer);
    return f;
}

static void test_nothing_to_trim(void)
{
    cm_device_t *dev = open_host(0);
    CHECK_EQ_U(cm__memory_trim(dev), 0);
    cm_device_release(dev);
}

/* The walk visits the newest registration first: c, then b, then a. */
static void test_owners_freed_during_the_walk(void)
{
    cm_device_t *dev = open_host(0);
    seen_t sa = {0, 0}, sb = {0, 0}, sc = {0, 0};
    fake_t *a = fake_new(dev, 1, 1, &sa);
    fake_t *b = fake_new(dev, 1, 10, &sb);
    fake_t *c = fake_new(dev, 1, 100, &sc);
    /* c's trim drops c's only reference but the walk's: c must live until
     * the walk has moved on, then be freed by it. b's trim frees a, the
     * next registration, which must then be neither trimmed nor touched. */
    c->drop = c;
    b->drop = a;
    CHECK_EQ_U(cm__memory_trim(dev), 110);
    CHECK_EQ_U(sc.trims, 1);
    CHECK_EQ_U(sc.freed, 1);
    CHECK_EQ_U(sb.trims, 1);
    CHECK_EQ_U(sb.freed, 0);
    CHECK_EQ_U(sa.trims, 0);
    CHECK_EQ_U(sa.freed, 1);
    CHECK(dev->trimmers == &b->trimmer && b->trimmer.next == NULL);
    /* The walk gave its reference on b back. */
    CHECK_EQ_U(atomic_load(&b->refcount), 1);
    CHECK_EQ_U(cm__memory_trim(dev), 10);
    CHECK_EQ_U(sb.trims, 2);
    fake_release(b);
    CHECK_EQ_U(sb.freed, 1);
    CHECK(dev->trimmers == NULL);
    cm_device_release(dev);
}

/* An owner whose count reached zero has not unregistered yet (it is about
 * to, on another thread): the walk passes it by without a reference. */
static void test_owner_being_freed_is_skipped(void)
{
    cm_device_t *dev = open_host(0);
    seen_t sd = {0, 0}, se = {0, 0};
    fake_t *e = fake_new(dev, 1, 7, &se);
    fake_t *d = fake_new(dev, 0, 1000, &sd);
    CHECK_EQ_U(cm__memory_trim(dev), 7);
    CHECK_EQ_U(sd.trims, 0);
    CHECK_EQ_U(atomic_load(&d->refcount), 0);
    CHECK_EQ_U(se.trims, 1);
    cm__memory_remove_trimmer(dev, &d->trimmer);
    free(d);
    fake_release(e);
    CHECK(dev->trimmers == NULL);
    cm_device_release(dev);
}

/* A real pool: its cache is what a trim gives back. */
static void test_pool_cache_is_trimmed(void)
{
    cm_device_t *dev = open_host(0);
    cm_pool_t *p1, *p2;
    CHECK_OK(cm_pool_create(dev, -1, &p1));
    CHECK_OK(cm_pool_create(dev, -1, &p2));
    cm_alloc_result_t a, b;
    CHECK_OK(cm_pool_alloc(p1, 4096, 0, &a));
    CHECK_OK(cm_pool_alloc(p2, 8192, 0, &b));
    cm_storage_release(a.storage);
    cm_storage_release(b.storage);
    cm_device_stats_t st;
    cm_device_stats(dev, &st);
    CHECK_EQ_U(st.cached_bytes, 4096 + 8192);
    CHECK_EQ_U(cm__memory_trim(dev), 4096 + 8192);
    cm_device_stats(dev, &st);
    CHECK_EQ_U(st.cached_bytes, 0);
    CHECK_EQ_U(st.active_bytes, 0);
    /* Trimmed pools still work. */
    CHECK_OK(cm_pool_alloc(p1, 4096, 0, &a));
    cm_storage_release(a.storage);
    cm_pool_release(p1);
    cm_pool_release(p2);
    CHECK(dev->trimmers == NULL);
    cm_device_release(dev);
}

/* ------------------------------------------------------------------ */
/* Pools made and released while other threads trim                    */
/* ------------------------------------------------------------------ */

enum { CHURNERS = 2, TRIMMERS = 2, ROUNDS = 300 };

typedef struct race {
    cm_device_t *dev;
    atomic_int churners_left;
    atomic_int errors;
} race_t;

static void *churn_pools(void *arg)
{
    race_t *r = arg;
    for (int i = 0; i < ROUNDS; i++) {
        cm_pool_t *pool;
        if (cm_pool_create(r->dev, -1, &pool) != CM_OK) {
            atomic_fetch_add(&r->errors, 1);
            continue;
        }
        cm_alloc_result_t a, b;
        bool ok = cm_pool_alloc(pool, 4096, 0, &a) == CM_OK &&
                  cm_pool_alloc(pool, 4096 * (1 + i % 3), 0, &b) == CM_OK;
        if (ok) {
            cm_storage_release(a.storage);
            cm_storage_release(b.storage);
        } else {
            atomic_fetch_add(&r->errors, 1);
        }
        /* Alternately release the pool with its cache full and after an
         * allocation that may itself trim (limit pressure is not needed:
         * the trimmer threads trim all the time). */
        if (i % 2 && cm_pool_alloc(pool, 4096, 0, &a) == CM_OK)
            cm_storage_release(a.storage);
        cm_pool_release(pool);
    }
    atomic_fetch_sub(&r->churners_left, 1);
    return NULL;
}

static void *trim_all_the_time(void *arg)
{
    race_t *r = arg;
    while (atomic_load(&r->churners_left) > 0)
        cm__memory_trim(r->dev);
    return NULL;
}

static void test_trim_races_pool_release(void)
{
    race_t r;
    r.dev = open_host(0);
    atomic_init(&r.churners_left, CHURNERS);
    atomic_init(&r.errors, 0);
    pthread_t th[CHURNERS + TRIMMERS];
    for (int i = 0; i < CHURNERS + TRIMMERS; i++)
        CHECK(pthread_create(&th[i], NULL, i < CHURNERS ? churn_pools : trim_all_the_time,
                             &r) == 0);
    for (int i = 0; i < CHURNERS + TRIMMERS; i++)
        pthread_join(th[i], NULL);
    CHECK_EQ_U(atomic_load(&r.errors), 0);
    cm_device_stats_t st;
    cm_device_stats(r.dev, &st);
    CHECK_EQ_U(st.active_bytes, 0);
    CHECK_EQ_U(st.cached_bytes, 0);
    CHECK_EQ_U(st.live_storages, 0);
    CHECK(r.dev->trimmers == NULL);
    cm_device_release(r.dev);
}

int main(void)
{
    static const test_case_t tests[] = {
        {"nothing_to_trim", test_nothing_to_trim},
        {"owners_freed_during_the_walk", test_owners_freed_during_the_walk},
        {"owner_being_freed_is_skipped", test_owner_being_freed_is_skipped},
        {"pool_cache_is_trimmed", test_pool_cache_is_trimmed},
        {"trim_races_pool_release", test_trim_races_pool_release},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0]);
}
