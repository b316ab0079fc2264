/*
 * The movers' per-page loops in C, on numpy buffers (GIL released where they
 * run long): the reverse map's extents from pagemap entries or pages
 * (pagemap_extents, page_extents)
 * and its lookups and splits (extent_find, extent_holders, extent_pieces), folio
 * grouping (folio_starts) and two array primitives (sort_pairs,
 * ascends), each replacing several numpy passes, and their temporaries, with
 * one loop.
 *
 * sort_pairs sorts (key, value) pairs by key: numpy's argsort and two gathers
 * take a temporary as large as the pairs each. Here:
 *
 *   1. one pass cuts the pairs into segments, pairs whose key and value both
 *      step by one (a huge page's pages, in a batch or after a move);
 *   2. a radix sort orders the segments by first key;
 *   3. segments that do not overlap the previous ones are written out in
 *      that order; the overlapping ones are expanded, radix sorted and merged in.
 *
 * So the pairs are touched twice, and the sorting is over segments.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_buffers.h"

#define DIGIT_BITS 11
#define DIGITS (1u << DIGIT_BITS)

struct segments {
    uint64_t *pfn, *owner, *len;
    size_t count, cap, pages;
};

static int segments_push(struct segments *s, uint64_t pfn, uint64_t owner)
{
    if (s->count == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 1024;
        uint64_t *p = realloc(s->pfn, cap * sizeof *p);
        if (p)
            s->pfn = p;
        uint64_t *o = realloc(s->owner, cap * sizeof *o);
        if (o)
            s->owner = o;
        uint64_t *l = realloc(s->len, cap * sizeof *l);
        if (l)
            s->len = l;
        if (!p || !o || !l)
            return -1;
        s->cap = cap;
    }
    s->pfn[s->count] = pfn;
    s->owner[s->count] = owner;
    s->len[s->count] = 1;
    s->count++;
    return 0;
}

/*
 * Stable LSD radix sort of `key` with `value` alongside, over the bits below the
 * largest key; `key_tmp` and `value_tmp` hold as many. The result is in key/value.
 */
static void radix_sort(uint64_t *key, uint64_t *value, uint64_t *key_tmp, uint64_t *value_tmp,
                       size_t n)
{
    uint64_t *key_in = key, *value_in = value, *key_out = key_tmp, *value_out = value_tmp;
    uint64_t largest = 0;
    int sorted = 1;
    size_t count[DIGITS];

    for (size_t i = 0; i < n; i++) {
        largest = key[i] > largest ? key[i] : largest;
        sorted &= i == 0 || key[i] >= key[i - 1];
    }
    if (sorted)
        return;
    for (unsigned shift = 0; shift < 64 && (largest >> shift); shift += DIGIT_BITS) {
        size_t at = 0;

        memset(count, 0, sizeof count);
        for (size_t i = 0; i < n; i++)
            count[(key_in[i] >> shift) & (DIGITS - 1)]++;
        for (size_t d = 0; d < DIGITS; d++) {
            size_t c = count[d];
            count[d] = at;
            at += c;
        }
        for (size_t i = 0; i < n; i++) {
            size_t to = count[(key_in[i] >> shift) & (DIGITS - 1)]++;
            key_out[to] = key_in[i];
            value_out[to] = value_in[i];
        }
        uint64_t *k = key_in, *v = value_in;
        key_in = key_out;
        value_in = value_out;
        key_out = k;
        value_out = v;
    }
    if (key_in != key) {
        memcpy(key, key_in, n * sizeof *key);
        memcpy(value, value_in, n * sizeof *value);
    }
}

/*
 * Steps 2 and 3: the pages of all segments into out_pfn/out_owner, sorted by PFN.
 * Returns -1 when out of memory.
 */
static int write_sorted(const struct segments *s, uint64_t *out_pfn, uint64_t *out_owner)
{
    size_t n = s->count, spread = 0, done = 0, next = 0;
    uint64_t *order = malloc(n * sizeof *order), *key = malloc(n * sizeof *key);
    uint64_t *tmp_a = malloc(n * sizeof *tmp_a), *tmp_b = malloc(n * sizeof *tmp_b);
    uint64_t *side_pfn = NULL, *side_owner = NULL, *side_tmp_a = NULL, *side_tmp_b = NULL;
    /*
     * After the sort the keys are not read again: their array marks, in sorted
     * order, the segments set aside.
     */
    uint64_t *aside = key;
    uint64_t last = 0;  /* the last key of the segments kept so far (none: kept == 0) */
    int kept = 0, ret = -1;

    if (n && (!order || !key || !tmp_a || !tmp_b))
        goto out;
    memcpy(key, s->pfn, n * sizeof *key);
    for (size_t i = 0; i < n; i++)
        order[i] = i;
    radix_sort(key, order, tmp_a, tmp_b, n);

    /* Segments that start at or before the last key kept go aside. */
    for (size_t i = 0; i < n; i++) {
        size_t seg = order[i];
        aside[i] = kept && s->pfn[seg] <= last;
        if (aside[i])
            spread += s->len[seg];
        else {
            last = s->pfn[seg] + (s->len[seg] - 1);
            kept = 1;
        }
    }
    if (spread) {
        side_pfn = malloc(spread * sizeof *side_pfn);
        side_owner = malloc(spread * sizeof *side_owner);
        side_tmp_a = malloc(spread * sizeof *side_tmp_a);
        side_tmp_b = malloc(spread * sizeof *side_tmp_b);
        if (!side_pfn || !side_owner || !side_tmp_a || !side_tmp_b)
            goto out;
        for (size_t i = 0, at = 0; i < n; i++) {
            size_t seg = order[i];
            if (!aside[i])
                continue;
            for (uint64_t j = 0; j < s->len[seg]; j++, at++) {
                side_pfn[at] = s->pfn[seg] + j;
                side_owner[at] = s->owner[seg] + j;
            }
        }
        radix_sort(side_pfn, side_owner, side_tmp_a, side_tmp_b, spread);
    }

    /* Merge: the kept segments' pages in order, the set-aside pages before any larger PFN. */
    for (size_t i = 0; i < n; i++) {
        size_t seg = order[i];
        if (aside[i])
            continue;
        for (uint64_t j = 0; j < s->len[seg]; j++) {
            uint64_t pfn = s->pfn[seg] + j;
            for (; next < spread && side_pfn[next] < pfn; next++, done++) {
                out_pfn[done] = side_pfn[next];
                out_owner[done] = side_owner[next];
            }
            out_pfn[done] = pfn;
            out_owner[done] = s->owner[seg] + j;
            done++;
        }
    }
    for (; next < spread; next++, done++) {
        out_pfn[done] = side_pfn[next];
        out_owner[done] = side_owner[next];
    }
    ret = 0;
out:
    free(order);
    free(key);
    free(tmp_a);
    free(tmp_b);
    free(side_pfn);
    free(side_owner);
    free(side_tmp_a);
    free(side_tmp_b);
    return ret;
}

/*
 * Sort key/value pairs by key in place, as the build sorts its pages: cut them
 * into segments where key and value both step by one (a huge page's pages, in
 * a batch or after a move), radix sort the segments, write the pages out.
 */
static int sort_by_segments(uint64_t *key, uint64_t *value, size_t n)
{
    struct segments s = {0};
    uint64_t next_key = 0, next_value = 0;
    int sorted = 1, failed = 0;

    for (size_t i = 1; i < n && sorted; i++)
        sorted = key[i] >= key[i - 1];
    if (sorted)
        return 0;
    for (size_t i = 0; i < n && !failed; i++) {
        /* next_key 0: the key before was the largest; no segment wraps around. */
        if (s.count && next_key && key[i] == next_key && value[i] == next_value)
            s.len[s.count - 1]++;
        else
            failed = segments_push(&s, key[i], value[i]);
        next_key = key[i] + 1;
        next_value = value[i] + 1;
    }
    failed = failed || write_sorted(&s, key, value);
    free(s.pfn);
    free(s.owner);
    free(s.len);
    return failed ? -1 : 0;
}

PyDoc_STRVAR(sort_pairs_doc,
"sort_pairs(keys, values) -> None\n\n"
"Sort `keys` (uint64) in place with `values` (8-byte integers, as many) moved\n"
"alongside; equal keys come in no particular order. Runs where key and value\n"
"both step by one (huge pages) are sorted as one; sorted keys cost one pass.");

static PyObject *sort_pairs(PyObject *self, PyObject *args)
{
    PyObject *keys_obj, *values_obj;
    Py_buffer keys, values;
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OO:sort_pairs", &keys_obj, &values_obj))
        return NULL;
    if (get_u64_buffer(keys_obj, &keys, 1, "keys") < 0)
        return NULL;
    if (get_u64_buffer(values_obj, &values, 1, "values") < 0) {
        PyBuffer_Release(&keys);
        return NULL;
    }
    size_t n = (size_t)keys.len / 8;
    if ((size_t)values.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "values must hold as many items as keys");
    } else if (buffers_overlap(&values, &keys)) {
        PyErr_SetString(PyExc_ValueError, "values must not overlap keys");
    } else {
        int failed;
        Py_BEGIN_ALLOW_THREADS
        failed = sort_by_segments(keys.buf, values.buf, n);
        Py_END_ALLOW_THREADS
        result = failed ? PyErr_NoMemory() : Py_NewRef(Py_None);
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&keys);
    return result;
}

PyDoc_STRVAR(ascends_doc,
"ascends(a, strictly) -> bool\n\n"
"Whether the uint64 items of `a` ascend (strictly: with no repeats): one pass\n"
"where numpy takes two, a compare into a new array and its all().");

static PyObject *ascends(PyObject *self, PyObject *args)
{
    PyObject *obj;
    int strictly, ok = 1;
    Py_buffer a;

    (void)self;
    if (!PyArg_ParseTuple(args, "Op:ascends", &obj, &strictly))
        return NULL;
    if (get_u64_buffer(obj, &a, 0, "a") < 0)
        return NULL;
    const uint64_t *v = a.buf;
    size_t n = (size_t)a.len / 8;
    for (size_t i = 1; i < n && ok; i++)
        ok = strictly ? v[i] > v[i - 1] : v[i] >= v[i - 1];
    PyBuffer_Release(&a);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(folio_starts_doc,
"folio_starts(pfns, flags, tail_mask, vaddrs, page_size, out) -> int\n\n"
"Per page: does it start a folio group (out[i], bool) rather than continue the\n"
"page before it? A page continues it when its PFN is the next one, its flags\n"
"(kpageflags) have a bit of `tail_mask` set, and, where `vaddrs` is not None,\n"
"its address is the next page's. Returns how many groups start.");

static PyObject *folio_starts(PyObject *self, PyObject *args)
{
    PyObject *pfns_obj, *flags_obj, *vaddrs_obj, *out_obj;
    unsigned long long tail_mask, page_size;
    Py_buffer pfns, flags, vaddrs = {0}, out;
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOKOKO:folio_starts", &pfns_obj, &flags_obj, &tail_mask,
                          &vaddrs_obj, &page_size, &out_obj))
        return NULL;
    if (get_u64_buffer(pfns_obj, &pfns, 0, "pfns") < 0)
        return NULL;
    if (get_u64_buffer(flags_obj, &flags, 0, "flags") < 0)
        goto release_pfns;
    if (vaddrs_obj != Py_None && get_u64_buffer(vaddrs_obj, &vaddrs, 0, "vaddrs") < 0)
        goto release_flags;
    if (get_bool_buffer(out_obj, &out, 1, "out") < 0)
        goto release_vaddrs;

    size_t n = (size_t)pfns.len / 8;
    if ((size_t)flags.len / 8 != n || (size_t)out.len != n
        || (vaddrs.buf && (size_t)vaddrs.len / 8 != n)) {
        PyErr_SetString(PyExc_ValueError, "flags, vaddrs and out must match pfns in size");
    } else {
        const uint64_t *pfn = pfns.buf, *flag = flags.buf, *vaddr = vaddrs.buf;
        char *start = out.buf;
        size_t groups = 0;
        for (size_t i = 0; i < n; i++) {
            int joins = i > 0 && pfn[i] == pfn[i - 1] + 1 && (flag[i] & tail_mask)
                        && (!vaddr || vaddr[i] == vaddr[i - 1] + page_size);
            start[i] = !joins;
            groups += !joins;
        }
        result = PyLong_FromSize_t(groups);
    }
    PyBuffer_Release(&out);
release_vaddrs:
    if (vaddrs.buf)
        PyBuffer_Release(&vaddrs);
release_flags:
    PyBuffer_Release(&flags);
release_pfns:
    PyBuffer_Release(&pfns);
    return result;
}

/* /proc/PID/pagemap: bit 63 present, bits 0-54 the PFN. */
#define PM_PRESENT (1ull << 63)
#define PM_PFN_MASK ((1ull << 55) - 1)

struct extent_out {
    uint64_t *start, *owner;
    uint32_t *length;
    size_t count;
};

/* Page pfn at owner onto the extents in out: the last one grows while the PFN and
 * the owner both step by one, short of a block boundary; else a new one starts. */
static inline void extent_push(struct extent_out *out, uint64_t pfn, uint64_t owner,
                               uint64_t block_pfns)
{
    size_t n = out->count;

    if (n && pfn == out->start[n - 1] + out->length[n - 1]
        && owner == out->owner[n - 1] + out->length[n - 1] && pfn % block_pfns) {
        out->length[n - 1]++;
        return;
    }
    out->start[n] = pfn;
    out->owner[n] = owner;
    out->length[n] = 1;
    out->count = n + 1;
}

/* Extents of entries[] (the pages of the [first, last) runs in bounds[], concatenated)
 * into out, in the order of the pages. */
static void extents_of(const uint64_t *entries, const uint64_t *bounds, size_t runs,
                       uint64_t base, uint64_t block_pfns, struct extent_out *out)
{
    size_t at = 0;

    out->count = 0;
    for (size_t r = 0; r < runs; r++) {
        for (uint64_t vpn = bounds[2 * r]; vpn < bounds[2 * r + 1]; vpn++, at++) {
            uint64_t entry = entries[at], pfn = entry & PM_PFN_MASK;
            if ((entry & PM_PRESENT) && pfn)
                extent_push(out, pfn, base + vpn, block_pfns);
        }
    }
}

PyDoc_STRVAR(pagemap_extents_doc,
"pagemap_extents(entries, bounds, base, block_pfns, start, owner, length) -> int\n\n"
"The present pages of `entries` (uint64 pagemap entries of the [first, last)\n"
"virtual page runs in `bounds`, flat pairs, concatenated) as extents, in page\n"
"order: start PFN, owner (`base` + virtual page) and length (uint32), written\n"
"to the arrays given, each at least as long as `entries`. An extent goes on while\n"
"PFN and owner both step by one and ends at a multiple of `block_pfns`.\n"
"Returns how many extents were written.");

static PyObject *pagemap_extents(PyObject *self, PyObject *args)
{
    PyObject *objects[5];
    unsigned long long base, block_pfns;
    Py_buffer views[4], length;
    static const char *const names[] = {"entries", "bounds", "start", "owner"};
    static const int writable[] = {0, 0, 1, 1};
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOKKOOO:pagemap_extents", &objects[0], &objects[1], &base,
                          &block_pfns, &objects[2], &objects[3], &objects[4]))
        return NULL;
    if (get_u64_buffers_and_length(objects, views, 4, names, writable, objects[4],
                                   &length, 1) < 0)
        return NULL;
    size_t n = (size_t)views[0].len / 8, runs = (size_t)views[1].len / 16, pages = 0;
    const uint64_t *bounds = views[1].buf;
    int ok = views[1].len % 16 == 0 && block_pfns > 0;
    for (size_t r = 0; r < runs && ok; r++) {
        ok = bounds[2 * r] <= bounds[2 * r + 1] && bounds[2 * r + 1] - bounds[2 * r] <= n - pages;
        pages += ok ? bounds[2 * r + 1] - bounds[2 * r] : 0;
    }
    if (!ok || pages != n) {
        PyErr_SetString(PyExc_ValueError,
                        "bounds must be [first, last) pairs covering as many pages as entries");
    } else if ((size_t)views[2].len / 8 < n || (size_t)views[3].len / 8 < n
               || (size_t)length.len / 4 < n) {
        PyErr_SetString(PyExc_ValueError, "start, owner and length must hold len(entries)");
    } else if (buffers_overlap(&views[2], &views[0]) || buffers_overlap(&views[3], &views[0])
               || buffers_overlap(&length, &views[0]) || buffers_overlap(&views[2], &views[3])
               || buffers_overlap(&length, &views[2]) || buffers_overlap(&length, &views[3])) {
        PyErr_SetString(PyExc_ValueError, "the outputs must not overlap entries or each other");
    } else {
        struct extent_out out = {views[2].buf, views[3].buf, length.buf, 0};
        Py_BEGIN_ALLOW_THREADS
        extents_of(views[0].buf, bounds, runs, base, block_pfns, &out);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(out.count);
    }
    PyBuffer_Release(&length);
    release_buffers(views, 4);
    return result;
}

PyDoc_STRVAR(page_extents_doc,
"page_extents(pfns, owners, block_pfns, start, owner, length) -> int\n\n"
"The pages (pfns[i] mapped at owners[i], uint64; PFN 0 is none) as extents in\n"
"the order given, written to start, owner and length (uint32), each at least\n"
"as long as `pfns`: an extent goes on while PFN and owner both step by one and\n"
"ends at a multiple of `block_pfns`. Returns how many extents were written.");

static PyObject *page_extents(PyObject *self, PyObject *args)
{
    PyObject *objects[4], *length_obj;
    unsigned long long block_pfns;
    Py_buffer views[4], length;
    static const char *const names[] = {"pfns", "owners", "start", "owner"};
    static const int writable[] = {0, 0, 1, 1};
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOKOOO:page_extents", &objects[0], &objects[1], &block_pfns,
                          &objects[2], &objects[3], &length_obj))
        return NULL;
    if (get_u64_buffers_and_length(objects, views, 4, names, writable, length_obj,
                                   &length, 1) < 0)
        return NULL;
    size_t n = (size_t)views[0].len / 8;
    if ((size_t)views[1].len / 8 != n || block_pfns == 0) {
        PyErr_SetString(PyExc_ValueError, "owners must match pfns; block_pfns > 0");
    } else if ((size_t)views[2].len / 8 < n || (size_t)views[3].len / 8 < n
               || (size_t)length.len / 4 < n) {
        PyErr_SetString(PyExc_ValueError, "start, owner and length must hold len(pfns)");
    } else if (buffers_overlap(&views[2], &views[0]) || buffers_overlap(&views[2], &views[1])
               || buffers_overlap(&views[3], &views[0]) || buffers_overlap(&views[3], &views[1])
               || buffers_overlap(&length, &views[0]) || buffers_overlap(&length, &views[1])
               || buffers_overlap(&views[2], &views[3]) || buffers_overlap(&length, &views[2])
               || buffers_overlap(&length, &views[3])) {
        PyErr_SetString(PyExc_ValueError, "the outputs must not overlap the pages or each other");
    } else {
        const uint64_t *pfns = views[0].buf, *owners = views[1].buf;
        struct extent_out out = {views[2].buf, views[3].buf, length.buf, 0};
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++)
            if (pfns[i])
                extent_push(&out, pfns[i], owners[i], block_pfns);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(out.count);
    }
    PyBuffer_Release(&length);
    release_buffers(views, 4);
    return result;
}

/* The extent holding pfn, the last by start, or -1: a binary search, then a walk back
 * over the extents starting in pfn's block (none crosses a block boundary). */
static int64_t holder(const uint64_t *start, const uint32_t *length, size_t n, uint64_t pfn,
                      uint64_t block_pfns)
{
    size_t low = 0, high = n;
    uint64_t block = pfn - pfn % block_pfns;

    while (low < high) {  /* the first extent starting after pfn */
        size_t mid = low + (high - low) / 2;
        if (start[mid] <= pfn)
            low = mid + 1;
        else
            high = mid;
    }
    for (size_t i = low; i-- > 0 && start[i] >= block;)
        if (pfn - start[i] < length[i])
            return (int64_t)i;
    return -1;
}

PyDoc_STRVAR(extent_find_doc,
"extent_find(start, length, owner, block_pfns, pfns, index, owners) -> int\n\n"
"For each of `pfns`, the extent (start, length uint32, owner; sorted by start,\n"
"none crossing a multiple of `block_pfns`) holding it, the last by start:\n"
"its position into `index` (int64, -1 for none) and the PFN's owner into\n"
"`owners` (2**64 - 1 for none). Returns how many PFNs have one.");

static PyObject *extent_find(PyObject *self, PyObject *args)
{
    PyObject *objects[5], *length_obj;
    unsigned long long block_pfns;
    Py_buffer views[5], length;
    static const char *const names[] = {"start", "owner", "pfns", "index", "owners"};
    static const int writable[] = {0, 0, 0, 1, 1};
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOOKOOO:extent_find", &objects[0], &length_obj, &objects[1],
                          &block_pfns, &objects[2], &objects[3], &objects[4]))
        return NULL;
    if (get_u64_buffers_and_length(objects, views, 5, names, writable, length_obj,
                                   &length, 0) < 0)
        return NULL;
    size_t n = (size_t)views[0].len / 8, count = (size_t)views[2].len / 8;
    if ((size_t)views[1].len / 8 != n || (size_t)length.len / 4 != n || block_pfns == 0) {
        PyErr_SetString(PyExc_ValueError, "start, length and owner must match; block_pfns > 0");
    } else if ((size_t)views[3].len / 8 != count || (size_t)views[4].len / 8 != count) {
        PyErr_SetString(PyExc_ValueError, "index and owners must match pfns in size");
    } else {
        const uint64_t *start = views[0].buf, *owner = views[1].buf, *pfns = views[2].buf;
        int64_t *index = views[3].buf;
        uint64_t *owners = views[4].buf;
        size_t hits = 0;
        Py_BEGIN_ALLOW_THREADS
        for (size_t k = 0; k < count; k++) {
            int64_t i = holder(start, length.buf, n, pfns[k], block_pfns);
            index[k] = i;
            owners[k] = i < 0 ? UINT64_MAX : owner[i] + (pfns[k] - start[i]);
            hits += i >= 0;
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(hits);
    }
    PyBuffer_Release(&length);
    release_buffers(views, 5);
    return result;
}

/* The first of sorted a[0:n] not below x. */
static size_t lower_bound(const uint64_t *a, size_t n, uint64_t x)
{
    size_t low = 0, high = n;

    while (low < high) {
        size_t mid = low + (high - low) / 2;
        if (a[mid] < x)
            low = mid + 1;
        else
            high = mid;
    }
    return low;
}

PyDoc_STRVAR(extent_holders_doc,
"extent_holders(start, length, block_pfns, pfns, which, index) -> int\n\n"
"Every (position in `pfns`, extent) pair where the extent (start, length\n"
"uint32; sorted by start, none crossing a multiple of `block_pfns`) holds\n"
"that PFN, in the order of `pfns`, into `which` and `index` (int64). Returns\n"
"how many pairs there are; where that is more than `which` holds, only the\n"
"count is right: call again with arrays that large.");

static PyObject *extent_holders(PyObject *self, PyObject *args)
{
    PyObject *objects[4], *length_obj;
    unsigned long long block_pfns;
    Py_buffer views[4], length;
    static const char *const names[] = {"start", "pfns", "which", "index"};
    static const int writable[] = {0, 0, 1, 1};
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOKOOO:extent_holders", &objects[0], &length_obj, &block_pfns,
                          &objects[1], &objects[2], &objects[3]))
        return NULL;
    if (get_u64_buffers_and_length(objects, views, 4, names, writable, length_obj,
                                   &length, 0) < 0)
        return NULL;
    size_t n = (size_t)views[0].len / 8, count = (size_t)views[1].len / 8;
    size_t room = (size_t)views[2].len / 8;
    if ((size_t)length.len / 4 != n || block_pfns == 0) {
        PyErr_SetString(PyExc_ValueError, "start and length must match; block_pfns > 0");
    } else if ((size_t)views[3].len / 8 != room) {
        PyErr_SetString(PyExc_ValueError, "which and index must match in size");
    } else {
        const uint64_t *start = views[0].buf, *pfns = views[1].buf;
        const uint32_t *len = length.buf;
        int64_t *which = views[2].buf, *index = views[3].buf;
        size_t pairs = 0;
        Py_BEGIN_ALLOW_THREADS
        for (size_t k = 0; k < count; k++) {
            uint64_t pfn = pfns[k];
            size_t i = lower_bound(start, n, pfn - pfn % block_pfns);
            for (; i < n && start[i] <= pfn; i++) {
                if (pfn - start[i] >= len[i])
                    continue;
                if (pairs < room) {
                    which[pairs] = (int64_t)k;
                    index[pairs] = (int64_t)i;
                }
                pairs++;
            }
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(pairs);
    }
    PyBuffer_Release(&length);
    release_buffers(views, 4);
    return result;
}

PyDoc_STRVAR(extent_pieces_doc,
"extent_pieces(start, length, owner, touched, pfns, out_start, out_length, out_owner) -> int\n\n"
"What is left of the extents at the ascending positions `touched` (int64) once\n"
"the sorted PFNs `pfns` are taken out of them: their runs of pages not in\n"
"`pfns`, extent by extent, into the out arrays (length uint32). Returns how\n"
"many pieces there are; where that is more than the out arrays hold, only the\n"
"count is right (len(touched) + the PFNs' holder pairs always suffice).");

static PyObject *extent_pieces(PyObject *self, PyObject *args)
{
    PyObject *objects[6], *length_obj, *out_length_obj;
    Py_buffer views[6], length, out_length;
    static const char *const names[] = {"start", "owner", "touched", "pfns", "out_start",
                                        "out_owner"};
    static const int writable[] = {0, 0, 0, 0, 1, 1};
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOOO:extent_pieces", &objects[0], &length_obj,
                          &objects[1], &objects[2], &objects[3], &objects[4], &out_length_obj,
                          &objects[5]))
        return NULL;
    if (get_u64_buffers(objects, views, 6, names, writable) < 0)
        return NULL;
    if (get_u32_buffer(length_obj, &length, 0, "length") < 0)
        goto release_views;
    if (get_u32_buffer(out_length_obj, &out_length, 1, "out_length") < 0)
        goto release_length;
    size_t n = (size_t)views[0].len / 8, touched = (size_t)views[2].len / 8;
    size_t count = (size_t)views[3].len / 8, room = (size_t)views[4].len / 8;
    const int64_t *at = views[2].buf;
    int ok = (size_t)views[1].len / 8 == n && (size_t)length.len / 4 == n;
    for (size_t t = 0; t < touched && ok; t++)
        ok = at[t] >= 0 && (size_t)at[t] < n && (t == 0 || at[t] > at[t - 1]);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError,
                        "start, length and owner must match; touched must ascend within them");
    } else if ((size_t)views[5].len / 8 != room || (size_t)out_length.len / 4 != room) {
        PyErr_SetString(PyExc_ValueError, "the out arrays must match in size");
    } else {
        const uint64_t *start = views[0].buf, *owner = views[1].buf, *pfns = views[3].buf;
        const uint32_t *len = length.buf;
        uint64_t *out_start = views[4].buf, *out_owner = views[5].buf;
        uint32_t *out_len = out_length.buf;
        size_t pieces = 0;
        Py_BEGIN_ALLOW_THREADS
        for (size_t t = 0; t < touched; t++) {
            size_t i = (size_t)at[t];
            uint64_t first = start[i], end = start[i] + len[i];
            size_t k = lower_bound(pfns, count, first);
            for (uint64_t from = first; from < end; k++) {
                uint64_t to = k < count && pfns[k] < end ? pfns[k] : end;
                if (to > from && pieces < room) {
                    out_start[pieces] = from;
                    out_owner[pieces] = owner[i] + (from - first);
                    out_len[pieces] = (uint32_t)(to - from);
                }
                pieces += to > from;
                from = to + 1;
            }
        }
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(pieces);
    }
    PyBuffer_Release(&out_length);
release_length:
    PyBuffer_Release(&length);
release_views:
    release_buffers(views, 6);
    return result;
}

static PyMethodDef methods[] = {
    {"extent_holders", extent_holders, METH_VARARGS, extent_holders_doc},
    {"extent_pieces", extent_pieces, METH_VARARGS, extent_pieces_doc},
    {"page_extents", page_extents, METH_VARARGS, page_extents_doc},
    {"extent_find", extent_find, METH_VARARGS, extent_find_doc},
    {"pagemap_extents", pagemap_extents, METH_VARARGS, pagemap_extents_doc},
    {"sort_pairs", sort_pairs, METH_VARARGS, sort_pairs_doc},
    {"ascends", ascends, METH_VARARGS, ascends_doc},
    {"folio_starts", folio_starts, METH_VARARGS, folio_starts_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "The movers' per-page loops, in C (see _native.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__native(void)
{
    return PyModule_Create(&module);
}
