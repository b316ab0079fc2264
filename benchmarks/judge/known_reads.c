/*
 * A workload with a known answer for the judge plugin: PAGES pages placed on
 * NODE by move_pages(2), then PASSES passes that load one word of each page,
 * so the plugin must count PAGES * PASSES user accesses on NODE.
 *
 *   known_reads PAGES NODE PASSES
 *
 * Prints "ready" once the pages are placed and waits for a line on stdin
 * (the harness reads the plugin's totals meanwhile), reads, prints
 * "done <checksum>" and waits for another line before it exits, so nothing
 * it does between the two lines touches memory but the reads themselves.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PAGE 4096
#define MPOL_MF_MOVE (1 << 1)

static void wait_line(void)
{
    char line[64];

    if (!fgets(line, sizeof(line), stdin))
        exit(0);
}

int main(int argc, char **argv)
{
    long pages, node, passes;
    volatile uint64_t *buf;
    void **addrs;
    int *nodes, *status;
    uint64_t sum = 0;

    if (argc != 4) {
        fprintf(stderr, "usage: known_reads PAGES NODE PASSES\n");
        return 2;
    }
    pages = atol(argv[1]);
    node = atol(argv[2]);
    passes = atol(argv[3]);
    buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    addrs = calloc(pages, sizeof(*addrs));
    nodes = calloc(pages, sizeof(*nodes));
    status = calloc(pages, sizeof(*status));
    if (buf == MAP_FAILED || !addrs || !nodes || !status) {
        perror("known_reads: allocation");
        return 1;
    }
    for (long i = 0; i < pages; i++) {
        buf[i * (PAGE / 8)] = i;
        addrs[i] = (void *)&buf[i * (PAGE / 8)];
        nodes[i] = node;
    }
    if (syscall(SYS_move_pages, 0, pages, addrs, nodes, status, MPOL_MF_MOVE) < 0) {
        perror("known_reads: move_pages");
        return 1;
    }
    /* Ask again: a huge page's tails sent after its head report -EBUSY though they moved. */
    if (syscall(SYS_move_pages, 0, pages, addrs, NULL, status, 0) < 0) {
        perror("known_reads: move_pages (query)");
        return 1;
    }
    for (long i = 0; i < pages; i++) {
        if (status[i] != node) {
            fprintf(stderr, "known_reads: page %ld is on node %d, not %ld\n", i, status[i],
                    node);
            return 1;
        }
    }
    printf("ready\n");
    fflush(stdout);
    wait_line();
    for (long pass = 0; pass < passes; pass++)
        for (long i = 0; i < pages; i++)
            sum += buf[i * (PAGE / 8)];
    printf("done %llu\n", (unsigned long long)sum);
    fflush(stdout);
    wait_line();
    return 0;
}
