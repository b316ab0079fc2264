/*
 * The raw kernel cost a mover pays: issue move_pages(2) (or the carried
 * move_phys_pages syscall) over ADDRS in batches of BATCH pages, all to NODE,
 * and count the pages whose status says they reached it.
 *
 *   move_loop pages PID NODE BATCH ADDR_FILE
 *   move_loop phys SYSCALL_NR NODE BATCH ADDR_FILE
 *
 * ADDR_FILE holds native-endian u64 addresses (virtual for "pages",
 * physical for "phys"). With BATCH 0 it holds the calls themselves instead,
 * each a u64 count followed by that many addresses: the exact calls a mover
 * made, replayed.
 */
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

#define MPOL_MF_MOVE (1 << 1)

static uint64_t *read_addrs(const char *path, size_t *count)
{
	FILE *f = fopen(path, "rb");

	if (!f)
		die(path);
	fseek(f, 0, SEEK_END);
	long bytes = ftell(f);
	rewind(f);
	uint64_t *addrs = malloc(bytes ? bytes : 8);
	if (!addrs || fread(addrs, 1, bytes, f) != (size_t)bytes)
		die("read addresses");
	fclose(f);
	*count = bytes / 8;
	return addrs;
}

int main(int argc, char **argv)
{
	if (argc != 6 || (strcmp(argv[1], "pages") && strcmp(argv[1], "phys"))) {
		fprintf(stderr, "usage: %s pages PID NODE BATCH ADDR_FILE | phys SYSCALL_NR NODE BATCH ADDR_FILE\n", argv[0]);
		return 2;
	}
	int phys = !strcmp(argv[1], "phys");
	long arg = strtol(argv[2], NULL, 0);
	int node = atoi(argv[3]);
	size_t batch = strtoull(argv[4], NULL, 0), count, moved = 0, calls = 0, sent = 0;
	uint64_t *addrs = read_addrs(argv[5], &count);
	size_t most = batch;
	for (size_t off = 0; !batch && off < count; off += 1 + addrs[off])
		most = addrs[off] > most ? addrs[off] : most;
	int *nodes = malloc(most * sizeof(int) + 1), *status = malloc(most * sizeof(int) + 1);

	if (!nodes || !status)
		die("malloc");
	for (size_t i = 0; i < most; i++)
		nodes[i] = node;
	double w0 = wall_seconds(), c0 = cpu_seconds();
	for (size_t off = 0; off < count;) {
		size_t n = batch ? (count - off < batch ? count - off : batch) : addrs[off++];
		long rc = phys ? syscall(arg, n, addrs + off, nodes, status, MPOL_MF_MOVE)
			       : syscall(SYS_move_pages, arg, n, addrs + off, nodes, status,
					 MPOL_MF_MOVE);
		if (rc < 0)
			die(argv[1]);
		calls++;
		sent += n;
		for (size_t i = 0; i < n; i++)
			moved += status[i] == node;
		off += n;
	}
	double w1 = wall_seconds(), c1 = cpu_seconds();
	printf("{\"pages\": %zu, \"moved\": %zu, \"calls\": %zu, \"seconds\": %.6f, "
	       "\"cpu_seconds\": %.6f}\n", sent, moved, calls, w1 - w0, c1 - c0);
	return 0;
}
