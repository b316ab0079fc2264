/*
 * The raw kernel cost of one idle-page scan: mark PFNs [start, end) idle by
 * writing all-ones to /sys/kernel/mm/page_idle/bitmap, then read the range
 * back, in chunks of CHUNK bytes (8-byte words, 64 PFNs each). This is the
 * floor any idle collector pays: the write walks every page's rmap.
 *
 *   idle_rw START_PFN END_PFN [CHUNK_BYTES]
 */
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#define BITMAP "/sys/kernel/mm/page_idle/bitmap"

/* Returns the words done: fewer than asked when the range runs past the last PFN. */
static uint64_t sweep(int fd, uint64_t first_word, uint64_t words, size_t chunk, int write_it)
{
	uint64_t *buf = malloc(chunk);

	if (!buf)
		die("malloc");
	uint64_t w = first_word;

	memset(buf, 0xff, chunk);
	while (w < first_word + words) {
		size_t n = chunk / 8;

		if (n > first_word + words - w)
			n = first_word + words - w;
		ssize_t done = write_it ? pwrite(fd, buf, n * 8, w * 8) : pread(fd, buf, n * 8, w * 8);
		if (done < 0)
			die(write_it ? "pwrite bitmap" : "pread bitmap");
		if (done == 0)
			break; /* the kernel's last PFN is inside this word */
		w += done / 8;
	}
	free(buf);
	return w - first_word;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s START_PFN END_PFN [CHUNK_BYTES]\n", argv[0]);
		return 2;
	}
	uint64_t start = strtoull(argv[1], NULL, 0) / 64;
	uint64_t end = (strtoull(argv[2], NULL, 0) + 63) / 64;
	size_t chunk = argc > 3 ? strtoull(argv[3], NULL, 0) : 1 << 16;
	int fd = open(BITMAP, O_RDWR);

	if (fd < 0)
		die(BITMAP);
	double w0 = wall_seconds(), c0 = cpu_seconds();
	uint64_t words = sweep(fd, start, end - start, chunk, 1);
	double w1 = wall_seconds();
	sweep(fd, start, words, chunk, 0);
	double w2 = wall_seconds(), c2 = cpu_seconds();
	printf("{\"pfns\": %llu, \"mark_seconds\": %.6f, \"read_seconds\": %.6f, "
	       "\"seconds\": %.6f, \"cpu_seconds\": %.6f}\n",
	       (unsigned long long)words * 64, w1 - w0, w2 - w1, w2 - w0, c2 - c0);
	return 0;
}
