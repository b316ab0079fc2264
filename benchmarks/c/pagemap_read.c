/*
 * The raw kernel cost a reverse map pays: read /proc/PID/pagemap over every
 * mapping in /proc/PID/maps that tierd reads (readable, not the vdso family),
 * CHUNK pages per pread, and count present pages.
 * With "all", do it for every process in /proc, as a full reverse-map build
 * must (it has to find the processes too; kernel threads have empty maps).
 *
 *   pagemap_read PID|all [CHUNK_PAGES]
 */
#include <ctype.h>
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "common.h"

#define PAGE 4096ULL
#define PRESENT (1ULL << 63)

static unsigned long long pages, present;

/* Read one process's pagemap over its mappings; a process that is gone counts nothing. */
static void read_process(const char *pid, uint64_t *buf, size_t chunk)
{
	char path[64], line[512], perms[5];
	unsigned long long start, end;

	snprintf(path, sizeof(path), "/proc/%s/maps", pid);
	FILE *maps = fopen(path, "r");
	if (!maps)
		return;
	snprintf(path, sizeof(path), "/proc/%s/pagemap", pid);
	int fd = open(path, O_RDONLY);
	if (fd < 0) {
		fclose(maps);
		return;
	}
	while (fgets(line, sizeof(line), maps)) {
		if (sscanf(line, "%llx-%llx %4s", &start, &end, perms) != 3 || perms[0] != 'r' ||
		    strstr(line, "[vsyscall]") || strstr(line, "[vvar") || strstr(line, "[vdso]"))
			continue;
		for (uint64_t page = start / PAGE; page < end / PAGE;) {
			size_t n = chunk < end / PAGE - page ? chunk : end / PAGE - page;
			ssize_t done = pread(fd, buf, n * 8, page * 8);
			if (done <= 0)
				break;
			for (size_t i = 0; i < (size_t)done / 8; i++)
				present += (buf[i] & PRESENT) != 0;
			pages += done / 8;
			page += done / 8;
		}
	}
	close(fd);
	fclose(maps);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s PID|all [CHUNK_PAGES]\n", argv[0]);
		return 2;
	}
	size_t chunk = argc > 2 ? strtoull(argv[2], NULL, 0) : 4096;
	uint64_t *buf = malloc(chunk * 8);
	unsigned long long processes = 0;

	if (!buf)
		die("malloc");
	double w0 = wall_seconds(), c0 = cpu_seconds();
	if (strcmp(argv[1], "all")) {
		read_process(argv[1], buf, chunk);
		processes = 1;
	} else {
		DIR *proc = opendir("/proc");
		struct dirent *entry;

		if (!proc)
			die("/proc");
		while ((entry = readdir(proc)))
			if (isdigit((unsigned char)entry->d_name[0])) {
				read_process(entry->d_name, buf, chunk);
				processes++;
			}
		closedir(proc);
	}
	double w1 = wall_seconds(), c1 = cpu_seconds();
	printf("{\"pages\": %llu, \"present\": %llu, \"processes\": %llu, \"seconds\": %.6f, "
	       "\"cpu_seconds\": %.6f}\n", pages, present, processes, w1 - w0, c1 - c0);
	return 0;
}
