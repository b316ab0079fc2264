/* Shared by the raw baselines: wall and CPU clocks, one JSON line out. */
#ifndef TIERBENCH_COMMON_H
#define TIERBENCH_COMMON_H

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static inline double clock_seconds(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static inline double wall_seconds(void) { return clock_seconds(CLOCK_MONOTONIC); }
static inline double cpu_seconds(void) { return clock_seconds(CLOCK_PROCESS_CPUTIME_ID); }

static inline void die(const char *what)
{
	perror(what);
	exit(1);
}

#endif
