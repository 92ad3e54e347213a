/*
 * test_fork.c -- fork() while other threads use a device (fork.c). The
 * parent forks while a thread holds each of the device's locks, while
 * threads churn allocations and commits with the keep-alive thread
 * running, and from inside a storage's release callback run under a
 * command buffer's encoder lock. Each child, under an alarm so that a hang
 * fails instead of blocking the run: opens a new device and uses it; reads
 * and writes the storages it inherited; finds every call that would use
 * the inherited device's queue refused with CM_ERR_DEVICE_NOT_FOUND and a
 * message naming the parent (work in flight at the fork never finishes
 * there); drops everything it inherited, pooled storages included. The parent checks the child's exit and keeps working.
 * Built and run by tests/c/run.sh under ASan/UBSan and valgrind.
 */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1

#include "check.h"
#include "internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#if !defined(RUNNING_ON_VALGRIND) || !defined(VALGRIND_CLO_CHANGE)
#undef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#define VALGRIND_COUNT_ERRORS 0
#define VALGRIND_CLO_CHANGE(option)
#endif

#define PAGE 4096
#define PLAIN_BYTES ((uint64_t)64 << 10)
#define BIG_BYTES ((uint64_t)4 << 20)
#define NPOOLED 3

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* ------------------------------------------------------------------ */
/* The child's side                                                    */
/* ------------------------------------------------------------------ */

/* A hang in a child is a failure: SIGALRM ends it. */
static unsigned child_seconds(void)
{
    return RUNNING_ON_VALGRIND ? 300 : 20;
}

/* The child's end. Under valgrind, the exit-time leak check would count as
 * lost whatever only the threads that did not survive the fork pointed to
 * (their stacks are gone: the queue worker's current command buffer, a
 * churning thread's storage), which is fork's nature, not a leak. So a
 * child there fails on the memory errors valgrind counted so far and turns
 * the leak check off before it exits; the parent's leak check stays. */
static _Noreturn void child_end(void)
{
    int bad = failures;
    if (RUNNING_ON_VALGRIND) {
        if (VALGRIND_COUNT_ERRORS != 0)
            bad++;
        VALGRIND_CLO_CHANGE("--leak-check=no");
    }
    _exit(bad == 0 ? 0 : 1);
}

static void check_child_exit(pid_t pid)
{
    int status = 0;
    pid_t got;
    while ((got = waitpid(pid, &status, 0)) < 0 && errno == EINTR) {
    }
    CHECK(got == pid);
    bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok)
        fprintf(stderr, "child %ld ended with %s %d\n", (long)pid,
                WIFSIGNALED(status) ? "signal" : "status",
                WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    CHECK(ok);
}

/* The failure every use of an inherited device's queue gets. */
static void check_refused(int rc, pid_t parent)
{
    CHECK_EQ_U(rc, CM_ERR_DEVICE_NOT_FOUND);
    char opened[64];
    snprintf(opened, sizeof opened, "was opened in process %ld,", (long)parent);
    CHECK_MSG(opened);
    CHECK_MSG("open a new device in this process");
}

/* A device opened in the child works as anywhere. */
static void check_new_device_works(void)
{
    cm_device_t *dev = NULL;
    CHECK_OK(cm_device_open(CM_BACKEND_HOST, 0, &dev));
    if (dev == NULL)
        return;
    cm_pool_t *pool = NULL;
    CHECK_OK(cm_pool_create(dev, -1, &pool));
    cm_alloc_result_t a, b;
    CHECK_OK(cm_storage_alloc(dev, PAGE, &a));
    CHECK_OK(cm_pool_alloc(pool, PAGE, 1, &b));
    cm_cmdbuf_t *cb = NULL;
    CHECK_OK(cm_cmdbuf_create(dev, &cb));
    CHECK_OK(cm_cmdbuf_fill(cb, a.storage, 0, PAGE, 5));
    CHECK_OK(cm_cmdbuf_copy(cb, a.storage, 0, b.storage, 0, PAGE));
    CHECK_OK(cm_cmdbuf_commit(cb));
    CHECK_OK(cm_cmdbuf_wait(cb));
    CHECK(all_bytes(b.contents, PAGE, 5));
    CHECK_OK(cm_residency_commit(dev));
    CHECK_OK(cm_device_synchronize(dev));
    cm_cmdbuf_release(cb);
    cm_storage_release(a.storage);
    cm_storage_release(b.storage);
    cm_pool_release(pool);
    cm_device_release(dev);
}

/* What the parent set up before forking: the child inherits all of it. */
typedef struct world {
    pid_t opener;                     /* the process that opened dev      */
    cm_device_t *dev;
    cm_pool_t *pool;
    cm_storage_t *plain;              /* PLAIN_BYTES of 7                 */
    cm_storage_t *pooled[NPOOLED];    /* a page of 9 each                 */
    cm_storage_t *big;                /* the committed buffer fills it    */
    cm_cmdbuf_t *pending;             /* uncommitted, holds plain, pooled */
    cm_cmdbuf_t *committed;           /* maybe still running at the fork  */
} world_t;

static void check_inherited_refuses(world_t *w, pid_t parent)
{
    cm_alloc_result_t r;
    cm_pool_t *pool = NULL;
    cm_cmdbuf_t *cb = NULL;
    cm_library_t *lib = NULL;
    uint64_t len = PAGE;
    uint8_t mem[64];
    check_refused(cm_storage_alloc(w->dev, PAGE, &r), parent);
    check_refused(cm_pool_alloc(w->pool, PAGE, 0, &r), parent);
    check_refused(cm_pool_alloc_batch(w->pool, &len, 1, 0, &r), parent);
    check_refused(cm_pool_create(w->dev, -1, &pool), parent);
    check_refused(cm_storage_wrap_external(w->dev, mem, sizeof mem, 1, NULL, NULL, &r), parent);
    check_refused(cm_storage_map_file(w->dev, 0, 0, 0, 0, &r), parent);
    check_refused(cm_cmdbuf_create(w->dev, &cb), parent);
    check_refused(cm_cmdbuf_fill(w->pending, w->plain, 0, PAGE, 1), parent);
    check_refused(cm_cmdbuf_copy(w->pending, w->plain, 0, w->big, 0, PAGE), parent);
    check_refused(cm_cmdbuf_commit(w->pending), parent);
    check_refused(cm_cmdbuf_discard(w->pending), parent);
    check_refused(cm_cmdbuf_wait(w->committed), parent);
    check_refused(cm_device_synchronize(w->dev), parent);
    check_refused(cm_residency_commit(w->dev), parent);
    check_refused(cm_residency_flush(w->dev, NULL), parent);
    check_refused(cm_residency_register(w->dev, w->plain), parent);
    check_refused(cm_residency_set_keepalive(w->dev, 10, 0.5), parent);
    check_refused(cm_library_compile(w->dev, "kernel void k() {}", 0, &lib), parent);
    CHECK(pool == NULL && cb == NULL && lib == NULL);
    /* The big fill may have been running at the fork: its write never
     * finishes here. Without one there is nothing to wait for. */
    int rc = cm_storage_wait_idle(w->big);
    if (rc != CM_OK)
        check_refused(rc, parent);

    /* Facts about the device and the buffers still read. */
    cm_device_stats_t stats;
    cm_residency_info_t rinfo;
    CHECK_OK(cm_device_stats(w->dev, &stats));
    CHECK_OK(cm_residency_info(w->dev, &rinfo));
    CHECK(rinfo.enabled);
    CHECK_EQ_U(cm_cmdbuf_status(w->pending), CM_CB_NOT_COMMITTED);
    CHECK_EQ_U(cm_cmdbuf_op_count(w->pending), 1);
    CHECK_EQ_U(cm_cmdbuf_hold_count(w->pending), 2);
}

static void check_inherited_memory(world_t *w)
{
    cm_storage_info_t info;
    CHECK_OK(cm_storage_info(w->plain, &info));
    CHECK(info.resident);
    CHECK(all_bytes(info.contents, PLAIN_BYTES, 7));
    memset(info.contents, 0x5a, PLAIN_BYTES);
    CHECK(all_bytes(info.contents, PLAIN_BYTES, 0x5a));
    for (int i = 0; i < NPOOLED; i++) {
        CHECK_OK(cm_storage_info(w->pooled[i], &info));
        CHECK(all_bytes(info.contents, PAGE, 9));
        info.contents[0] = (uint8_t)i;
    }
}

/* Everything the child inherited goes; nothing of it is cached again. */
static void drop_inherited(world_t *w)
{
    cm_device_stats_t before, after;
    cm_pool_stats_t pool_before, pool_after;
    CHECK_OK(cm_device_stats(w->dev, &before));
    CHECK_OK(cm_pool_stats(w->pool, &pool_before));
    cm_cmdbuf_release(w->pending);    /* its holds go */
    cm_storage_release(w->plain);
    for (int i = 0; i < NPOOLED; i++)
        cm_storage_release(w->pooled[i]);
    CHECK_OK(cm_pool_stats(w->pool, &pool_after));
    CHECK_EQ_U(pool_after.in_use_count, pool_before.in_use_count - NPOOLED);
    CHECK_EQ_U(pool_after.free_count, pool_before.free_count);
    CHECK_OK(cm_device_stats(w->dev, &after));
    CHECK_EQ_U(after.live_storages, before.live_storages - 1 - NPOOLED);
    CHECK_EQ_U(after.active_bytes, before.active_bytes - PLAIN_BYTES - NPOOLED * PAGE);
    CHECK_OK(cm_pool_clear(w->pool));
    cm_pool_release(w->pool);
    cm_cmdbuf_release(w->committed);
    cm_storage_release(w->big);
    cm_device_release(w->dev);
}

static void child_checks(world_t *w)
{
    check_new_device_works();
    check_inherited_memory(w);
    check_inherited_refuses(w, w->opener);
    drop_inherited(w);
    check_new_device_works();
}

/* ------------------------------------------------------------------ */
/* The parent's side                                                   */
/* ------------------------------------------------------------------ */

static cm_storage_t *alloc_filled(cm_device_t *dev, cm_pool_t *pool, uint64_t len, int value)
{
    cm_alloc_result_t r;
    int rc = pool != NULL ? cm_pool_alloc(pool, len, 1, &r) : cm_storage_alloc(dev, len, &r);
    CHECK_OK(rc);
    if (rc != CM_OK)
        exit(2);
    memset(r.contents, value, (size_t)len);
    return r.storage;
}

static void world_open(world_t *w)
{
    memset(w, 0, sizeof *w);
    w->opener = getpid();
    w->dev = open_host(0);
    CHECK_OK(cm_pool_create(w->dev, -1, &w->pool));
    w->plain = alloc_filled(w->dev, NULL, PLAIN_BYTES, 7);
    for (int i = 0; i < NPOOLED; i++)
        w->pooled[i] = alloc_filled(w->dev, w->pool, PAGE, 9);
    /* One cached storage, so the child's pool has a cache to drop. */
    cm_storage_release(alloc_filled(w->dev, w->pool, 2 * PAGE, 0));
    w->big = alloc_filled(w->dev, NULL, BIG_BYTES, 0);
    CHECK_OK(cm_cmdbuf_create(w->dev, &w->pending));
    CHECK_OK(cm_cmdbuf_copy(w->pending, w->plain, 0, w->pooled[0], 0, PAGE));
    CHECK_OK(cm_cmdbuf_create(w->dev, &w->committed));
    CHECK_OK(cm_cmdbuf_fill(w->committed, w->big, 0, BIG_BYTES, 3));
    CHECK_OK(cm_cmdbuf_commit(w->committed));
}

static void world_close(world_t *w)
{
    CHECK_OK(cm_cmdbuf_wait(w->committed));
    cm_cmdbuf_release(w->committed);
    cm_cmdbuf_release(w->pending);
    cm_storage_release(w->plain);
    for (int i = 0; i < NPOOLED; i++)
        cm_storage_release(w->pooled[i]);
    cm_storage_release(w->big);
    cm_pool_release(w->pool);
    cm_device_release(w->dev);
}

/* The parent's device still runs work after a fork. */
static void check_parent_works(world_t *w)
{
    cm_storage_t *a = alloc_filled(w->dev, w->pool, PAGE, 1);
    cm_cmdbuf_t *cb = NULL;
    CHECK_OK(cm_cmdbuf_create(w->dev, &cb));
    CHECK_OK(cm_cmdbuf_copy(cb, w->plain, 0, a, 0, PAGE));
    CHECK_OK(cm_cmdbuf_commit(cb));
    CHECK_OK(cm_cmdbuf_wait(cb));
    cm_storage_info_t info;
    CHECK_OK(cm_storage_info(a, &info));
    CHECK(all_bytes(info.contents, PAGE, 7));
    CHECK_OK(cm_device_synchronize(w->dev));
    cm_cmdbuf_release(cb);
    cm_storage_release(a);
}

static pid_t fork_child(world_t *w)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(child_seconds());
        child_checks(w);
        child_end();
    }
    CHECK(pid > 0);
    return pid;
}

/* ------------------------------------------------------------------ */
/* Fork while a thread holds one of the device's locks                 */
/* ------------------------------------------------------------------ */

typedef struct holder {
    pthread_mutex_t *lock;
    atomic_bool held;
} holder_t;

static void *hold_a_while(void *arg)
{
    holder_t *h = arg;
    pthread_mutex_lock(h->lock);
    atomic_store(&h->held, true);
    sleep_ms(100);
    pthread_mutex_unlock(h->lock);
    return NULL;
}

static void test_fork_while_each_device_lock_is_held(void)
{
    static const struct {
        const char *name;
        size_t offset;
    } locks[] = {
        {"submit_lock", offsetof(cm_device_t, submit_lock)},
        {"lock", offsetof(cm_device_t, lock)},
        {"cb_lock", offsetof(cm_device_t, cb_lock)},
        {"rt_lock", offsetof(cm_device_t, rt_lock)},
    };
    for (size_t i = 0; i < sizeof locks / sizeof locks[0]; i++) {
        world_t w;
        world_open(&w);
        holder_t h = {(pthread_mutex_t *)(void *)((char *)w.dev + locks[i].offset), false};
        pthread_t t;
        CHECK(pthread_create(&t, NULL, hold_a_while, &h) == 0);
        while (!atomic_load(&h.held))
            sleep_ms(1);
        pid_t pid = fork_child(&w);
        check_child_exit(pid);
        pthread_join(t, NULL);
        check_parent_works(&w);
        world_close(&w);
        if (failures)
            fprintf(stderr, "  (with dev->%s held at the fork)\n", locks[i].name);
    }
}

/* ------------------------------------------------------------------ */
/* Fork while threads churn and keep-alive runs                        */
/* ------------------------------------------------------------------ */

typedef struct churner {
    cm_device_t *dev;
    cm_pool_t *pool;
    unsigned index;
    atomic_bool *stop;
    uint64_t rounds;
    int error;                        /* first failing status             */
} churner_t;

static void *churn(void *arg)
{
    churner_t *c = arg;
    while (!atomic_load(c->stop) && c->error == CM_OK) {
        cm_alloc_result_t a, b;
        cm_cmdbuf_t *cb = NULL;
        uint64_t len = PAGE * (1 + c->index);
        int rc = cm_pool_alloc(c->pool, len, 0, &a);
        if (rc != CM_OK) {
            c->error = rc;
            break;
        }
        rc = cm_storage_alloc(c->dev, len, &b);
        if (rc == CM_OK) {
            if ((rc = cm_cmdbuf_create(c->dev, &cb)) == CM_OK &&
                (rc = cm_cmdbuf_copy(cb, a.storage, 0, b.storage, 0, len)) == CM_OK &&
                (rc = cm_cmdbuf_commit(cb)) == CM_OK && c->rounds % 2 == 0)
                rc = cm_cmdbuf_wait(cb);
            cm_cmdbuf_release(cb);
            cm_storage_release(b.storage);
        }
        cm_storage_release(a.storage);
        c->error = rc;
        c->rounds++;
    }
    return NULL;
}

static void test_fork_while_threads_churn(void)
{
    enum { NCHURN = 3 };
    int rounds = RUNNING_ON_VALGRIND ? 6 : 40;
    world_t w;
    world_open(&w);
    CHECK_OK(cm_residency_set_keepalive(w.dev, 60, 0.001));
    atomic_bool stop = false;
    churner_t c[NCHURN];
    pthread_t t[NCHURN];
    for (unsigned i = 0; i < NCHURN; i++) {
        c[i] = (churner_t){w.dev, w.pool, i, &stop, 0, CM_OK};
        CHECK(pthread_create(&t[i], NULL, churn, &c[i]) == 0);
    }
    int before = failures;
    for (int round = 0; round < rounds && failures == before; round++) {
        sleep_ms(2);
        pid_t pid = fork_child(&w);
        check_child_exit(pid);
        check_parent_works(&w);
    }
    atomic_store(&stop, true);
    for (unsigned i = 0; i < NCHURN; i++) {
        pthread_join(t[i], NULL);
        CHECK_EQ_U(c[i].error, CM_OK);
        CHECK(c[i].rounds > 0);
    }
    cm_residency_info_t rinfo;
    CHECK_OK(cm_residency_info(w.dev, &rinfo));
    CHECK(rinfo.keepalive_requests > 0);
    world_close(&w);
}

/* A grandchild inherits the device twice over and sees the same. */
static void test_grandchild(void)
{
    world_t w;
    world_open(&w);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(child_seconds());
        /* The grandchild's refusals name the process that opened the
         * device, not its own parent. */
        pid_t grand = fork_child(&w);
        check_child_exit(grand);
        child_checks(&w);
        child_end();
    }
    check_child_exit(pid);
    check_parent_works(&w);
    world_close(&w);
}

/* ------------------------------------------------------------------ */
/* Fork with work in flight                                            */
/* ------------------------------------------------------------------ */

/* The release of an external storage, run by the queue worker when the
 * first command buffer completes, holds the worker until the gate opens:
 * the second command buffer is then surely in flight at the fork. */
typedef struct gate {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool entered, open;
} gate_t;

static void gate_hold(void *ctx)
{
    gate_t *g = ctx;
    pthread_mutex_lock(&g->lock);
    g->entered = true;
    pthread_cond_broadcast(&g->cond);
    while (!g->open)
        pthread_cond_wait(&g->cond, &g->lock);
    pthread_mutex_unlock(&g->lock);
}

static void gate_set(gate_t *g, bool *flag)
{
    pthread_mutex_lock(&g->lock);
    *flag = true;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static void test_work_in_flight_never_finishes_in_the_child(void)
{
    static uint8_t memory[PAGE];
    gate_t gate = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, false, false};
    cm_device_t *dev = open_host(0);
    cm_alloc_result_t ext;
    CHECK_OK(cm_storage_wrap_external(dev, memory, sizeof memory, 1, gate_hold, &gate, &ext));
    cm_cmdbuf_t *first = NULL, *second = NULL;
    CHECK_OK(cm_cmdbuf_create(dev, &first));
    CHECK_OK(cm_cmdbuf_fill(first, ext.storage, 0, PAGE, 1));
    cm_storage_release(ext.storage);  /* first's hold is the last         */
    CHECK_OK(cm_cmdbuf_commit(first));
    pthread_mutex_lock(&gate.lock);
    while (!gate.entered)
        pthread_cond_wait(&gate.cond, &gate.lock);
    pthread_mutex_unlock(&gate.lock);
    cm_storage_t *big = alloc_filled(dev, NULL, BIG_BYTES, 0);
    CHECK_OK(cm_cmdbuf_create(dev, &second));
    CHECK_OK(cm_cmdbuf_fill(second, big, 0, BIG_BYTES, 3));
    CHECK_OK(cm_cmdbuf_commit(second));
    pid_t parent = getpid();
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        alarm(child_seconds());
        cm_storage_info_t info;
        CHECK_OK(cm_storage_info(big, &info));
        CHECK_EQ_U(info.inflight_writers, 1);
        check_refused(cm_storage_wait_idle(big), parent);
        check_refused(cm_cmdbuf_wait(second), parent);
        CHECK_EQ_U(cm_cmdbuf_status(second), CM_CB_COMMITTED);
        CHECK(all_bytes(info.contents, BIG_BYTES, 0)); /* the fill never runs here */
        check_new_device_works();
        /* Held by the buffer that never completes here: not freed. */
        cm_storage_release(big);
        cm_cmdbuf_release(second);
        cm_cmdbuf_release(first);
        cm_device_release(dev);
        child_end();
    }
    gate_set(&gate, &gate.open);
    check_child_exit(pid);
    CHECK_OK(cm_cmdbuf_wait(second));
    cm_storage_info_t info;
    CHECK_OK(cm_storage_info(big, &info));
    CHECK(all_bytes(info.contents, BIG_BYTES, 3));
    CHECK_OK(cm_cmdbuf_wait(first));
    cm_storage_release(big);
    cm_cmdbuf_release(second);
    cm_cmdbuf_release(first);
    cm_device_release(dev);
}

/* ------------------------------------------------------------------ */
/* Fork from a thread that holds a command buffer's encoder lock       */
/* ------------------------------------------------------------------ */

/* The one place where code outside the core runs under a core lock: an
 * external storage's release, when discarding a command buffer drops its
 * holds under cb->enc_lock. A fork from there must not deadlock, and the
 * child (running on inside that release) finds the buffer readable. */
typedef struct forking_owner {
    cm_cmdbuf_t *cb;
    pid_t child;
} forking_owner_t;

static void release_and_fork(void *ctx)
{
    forking_owner_t *o = ctx;
    fflush(stdout);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        alarm(child_seconds());
        check_new_device_works();
        /* This thread holds cb's enc_lock here: the counts skip it. */
        CHECK_EQ_U(cm_cmdbuf_op_count(o->cb), 1);
        check_refused(cm_cmdbuf_commit(o->cb), parent);
        child_end();
    }
    o->child = pid;
}

static void test_fork_from_a_release_under_the_encoder_lock(void)
{
    cm_device_t *dev = open_host(0);
    static uint8_t memory[PAGE];
    forking_owner_t owner = {NULL, -1};
    cm_alloc_result_t r;
    CHECK_OK(cm_storage_wrap_external(dev, memory, sizeof memory, 1, release_and_fork, &owner, &r));
    CHECK_OK(cm_cmdbuf_create(dev, &owner.cb));
    CHECK_OK(cm_cmdbuf_fill(owner.cb, r.storage, 0, PAGE, 1));
    cm_storage_release(r.storage);    /* the buffer's hold is the last    */
    CHECK_OK(cm_cmdbuf_discard(owner.cb));
    CHECK(owner.child > 0);
    check_child_exit(owner.child);
    cm_cmdbuf_release(owner.cb);
    cm_device_release(dev);
}

/* With an argument, runs only the test of that name. */
int main(int argc, char **argv)
{
    /* A fork that deadlocks in the parent fails the run instead of
     * hanging it. */
    alarm(RUNNING_ON_VALGRIND ? 1800 : 300);
    static const test_case_t tests[] = {
        {"fork_while_each_lock_held", test_fork_while_each_device_lock_is_held},
        {"fork_while_threads_churn", test_fork_while_threads_churn},
        {"grandchild", test_grandchild},
        {"work_in_flight", test_work_in_flight_never_finishes_in_the_child},
        {"fork_from_release_callback", test_fork_from_a_release_under_the_encoder_lock},
    };
    size_t n = sizeof tests / sizeof tests[0];
    for (size_t i = 0; argc > 1 && i < n; i++)
        if (strcmp(tests[i].name, argv[1]) == 0)
            return run_tests(&tests[i], 1);
    return run_tests(tests, n);
}
