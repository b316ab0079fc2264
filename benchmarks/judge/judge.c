/*
 * judge: a QEMU TCG plugin that counts the guest's memory accesses per
 * 4 KiB page of guest RAM and publishes cumulative totals per NUMA node.
 *
 * tierbench judges placement with it: which node served the accesses, as
 * the emulator saw them, with no trust in any tiering system's own evidence.
 *
 *   -plugin judge.so,out=FILE,node0=0x0-0x30000000,node1=0x30000000-0x90000000
 *           [,user=on][,vcpu=1][,interval_ms=1000]
 *
 * nodeN=START-END[:START-END...]  byte ranges [START, END) of node N in the
 *               addresses qemu_plugin_hwaddr_phys_addr() reports (in QEMU 7.2
 *               not guest-physical: see plugin_ram_ranges in tests/lab/vm.py)
 * user=on       count only accesses whose virtual address is in the canonical
 *               lower half (user space): the kernel's page copies during
 *               migration and its scans are not the application's traffic
 * vcpu=N       count only the accesses of vCPU N: the harness pins the workload
 *               there and everything else elsewhere, so only its traffic counts
 * out=FILE      every interval_ms, and at exit, one line is appended:
 *               "<seconds since start> <node0 total> ... <nodeN total> <other>"
 *               where "other" is accesses outside every node (MMIO, ROM, ...)
 *
 * Counters are atomic: under multi-threaded TCG every vCPU calls back from
 * its own thread.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <qemu/qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define PAGE_SHIFT 12
#define MAX_NODES 8
#define MAX_RANGES 32
/* x86-64: user addresses are the canonical lower half. */
#define USER_TOP 0x0000800000000000ULL

struct range {
    uint64_t start, end; /* bytes, [start, end) */
    int node;
};

static struct range ranges[MAX_RANGES];
static int nr_ranges, nr_nodes;
static uint64_t *pages; /* accesses per 4 KiB page, index = reported address >> 12 */
static uint64_t nr_pages;
static uint64_t other;
static bool user_only;
static long only_vcpu = -1;
static long interval_ms = 1000;
static FILE *out;
static struct timespec started;
static pthread_t publisher;
static pthread_mutex_t publish_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t stop_cond = PTHREAD_COND_INITIALIZER;
static bool stopping;

static void vcpu_mem(unsigned int vcpu, qemu_plugin_meminfo_t info, uint64_t vaddr,
                     void *udata)
{
    struct qemu_plugin_hwaddr *hw;
    uint64_t pfn;

    if ((user_only && vaddr >= USER_TOP) || (only_vcpu >= 0 && vcpu != only_vcpu))
        return;
    hw = qemu_plugin_get_hwaddr(info, vaddr);
    if (!hw || qemu_plugin_hwaddr_is_io(hw)) {
        __atomic_fetch_add(&other, 1, __ATOMIC_RELAXED);
        return;
    }
    pfn = qemu_plugin_hwaddr_phys_addr(hw) >> PAGE_SHIFT;
    if (pfn < nr_pages)
        __atomic_fetch_add(&pages[pfn], 1, __ATOMIC_RELAXED);
    else
        __atomic_fetch_add(&other, 1, __ATOMIC_RELAXED);
}

static void vcpu_tb_trans(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);

    for (size_t i = 0; i < n; i++)
        qemu_plugin_register_vcpu_mem_cb(qemu_plugin_tb_get_insn(tb, i), vcpu_mem,
                                         QEMU_PLUGIN_CB_NO_REGS, QEMU_PLUGIN_MEM_RW, NULL);
}

static double seconds_since_start(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - started.tv_sec) + (now.tv_nsec - started.tv_nsec) / 1e9;
}

/* One line of cumulative totals; pages outside every node range count as "other". */
static void publish(void)
{
    uint64_t totals[MAX_NODES] = {0};
    uint64_t in_nodes = 0, all = 0;

    for (int r = 0; r < nr_ranges; r++) {
        uint64_t end = ranges[r].end >> PAGE_SHIFT;

        for (uint64_t pfn = ranges[r].start >> PAGE_SHIFT; pfn < end && pfn < nr_pages; pfn++)
            totals[ranges[r].node] += __atomic_load_n(&pages[pfn], __ATOMIC_RELAXED);
    }
    for (uint64_t pfn = 0; pfn < nr_pages; pfn++)
        all += __atomic_load_n(&pages[pfn], __ATOMIC_RELAXED);
    pthread_mutex_lock(&publish_lock);
    fprintf(out, "%.3f", seconds_since_start());
    for (int node = 0; node < nr_nodes; node++) {
        fprintf(out, " %" PRIu64, totals[node]);
        in_nodes += totals[node];
    }
    fprintf(out, " %" PRIu64 "\n", all - in_nodes + __atomic_load_n(&other, __ATOMIC_RELAXED));
    fflush(out);
    pthread_mutex_unlock(&publish_lock);
}

static void *publish_loop(void *arg)
{
    struct timespec next;

    clock_gettime(CLOCK_MONOTONIC, &next);
    pthread_mutex_lock(&publish_lock);
    while (!stopping) {
        next.tv_nsec += (interval_ms % 1000) * 1000000L;
        next.tv_sec += interval_ms / 1000 + next.tv_nsec / 1000000000L;
        next.tv_nsec %= 1000000000L;
        /* The condition variable's clock is CLOCK_MONOTONIC (set in install). */
        if (pthread_cond_timedwait(&stop_cond, &publish_lock, &next) == ETIMEDOUT) {
            pthread_mutex_unlock(&publish_lock);
            publish();
            pthread_mutex_lock(&publish_lock);
        }
    }
    pthread_mutex_unlock(&publish_lock);
    return NULL;
}

static void plugin_exit(qemu_plugin_id_t id, void *p)
{
    pthread_mutex_lock(&publish_lock);
    stopping = true;
    pthread_cond_signal(&stop_cond);
    pthread_mutex_unlock(&publish_lock);
    pthread_join(publisher, NULL);
    publish();
    fclose(out);
}

/* "START-END[:START-END...]" of node `node`; false on a malformed list. */
static bool parse_ranges(int node, char *list)
{
    for (char *item = strtok(list, ":"); item; item = strtok(NULL, ":")) {
        char *dash, *end;
        struct range *r = &ranges[nr_ranges];

        if (nr_ranges == MAX_RANGES || !(dash = strchr(item, '-')))
            return false;
        r->start = strtoull(item, &end, 0);
        if (end != dash)
            return false;
        r->end = strtoull(dash + 1, &end, 0);
        if (*end || r->end <= r->start)
            return false;
        r->node = node;
        nr_ranges++;
        if (r->end >> PAGE_SHIFT > nr_pages)
            nr_pages = (r->end + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT;
    }
    return true;
}

static bool parse_arg(const char *arg)
{
    char key[32], *eq = strchr(arg, '='), *value;
    int node;

    if (!eq || (size_t)(eq - arg) >= sizeof(key))
        return false;
    memcpy(key, arg, eq - arg);
    key[eq - arg] = '\0';
    value = eq + 1;
    if (strcmp(key, "out") == 0)
        return (out = fopen(value, "a")) != NULL;
    if (strcmp(key, "user") == 0)
        return qemu_plugin_bool_parse(key, value, &user_only);
    if (strcmp(key, "vcpu") == 0)
        return (only_vcpu = strtol(value, NULL, 10)) >= 0;
    if (strcmp(key, "interval_ms") == 0)
        return (interval_ms = strtol(value, NULL, 10)) > 0;
    if (sscanf(key, "node%d", &node) == 1 && node >= 0 && node < MAX_NODES) {
        char *copy = strdup(value);
        bool ok = parse_ranges(node, copy);

        free(copy);
        if (node + 1 > nr_nodes)
            nr_nodes = node + 1;
        return ok;
    }
    return false;
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    pthread_condattr_t attr;

    for (int i = 0; i < argc; i++) {
        if (!parse_arg(argv[i])) {
            fprintf(stderr, "judge: bad argument %s\n", argv[i]);
            return -1;
        }
    }
    if (!out || nr_ranges == 0) {
        fprintf(stderr, "judge: needs out=FILE and at least one nodeN=START-END\n");
        return -1;
    }
    pages = calloc(nr_pages, sizeof(*pages));
    if (!pages) {
        fprintf(stderr, "judge: no memory for %" PRIu64 " page counters\n", nr_pages);
        return -1;
    }
    clock_gettime(CLOCK_MONOTONIC, &started);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&stop_cond, &attr);
    if (pthread_create(&publisher, NULL, publish_loop, NULL) != 0) {
        fprintf(stderr, "judge: cannot start the publisher thread\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, vcpu_tb_trans);
    qemu_plugin_register_atexit_cb(id, plugin_exit, NULL);
    return 0;
}
