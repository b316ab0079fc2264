/*
 * The raw kernel cost a reverse map pays: read /proc/PID/pagemap over every
 * mapping in /proc/PID/maps, CHUNK pages per pread, and count present pages.
 *
 *   pagemap_read PID [CHUNK_PAGES]
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096ULL
#define PRESENT (1ULL << 63)

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PID [CHUNK_PAGES]\n", argv[0]);
		return 2;
	}
	size_t chunk = argc > 2 ? strtoull(argv[2], NULL, 0) : 4096;
	char path[64];
	uint64_t *buf = malloc(chunk * 8);
	unsigned long long pages = 0, present = 0, start, end;
	char line[512];

	if (!buf)
		die("malloc");
	snprintf(path, sizeof(path), "/proc/%s/maps", argv[1]);
	FILE *maps = fopen(path, "r");
	if (!maps)
		die(path);
	snprintf(path, sizeof(path), "/proc/%s/pagemap", argv[1]);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die(path);
	double w0 = wall_seconds(), c0 = cpu_seconds();
	while (fgets(line, sizeof(line), maps)) {
		if (sscanf(line, "%llx-%llx", &start, &end) != 2)
			continue;
		for (uint64_t page = start / PAGE; page < end / PAGE;) {
			size_t n = chunk < end / PAGE - page ? chunk : end / PAGE - page;
			ssize_t done = pread(fd, buf, n * 8, page * 8);
			if (done <= 0)
				break; /* [vsyscall] and friends are not readable */
			for (size_t i = 0; i < (size_t)done / 8; i++)
				present += (buf[i] & PRESENT) != 0;
			pages += done / 8;
			page += done / 8;
		}
	}
	double w1 = wall_seconds(), c1 = cpu_seconds();
	printf("{\"pages\": %llu, \"present\": %llu, \"seconds\": %.6f, \"cpu_seconds\": %.6f}\n",
	       pages, present, w1 - w0, c1 - c0);
	return 0;
}
