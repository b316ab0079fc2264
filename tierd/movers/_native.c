/*
 * The movers' per-page loops in C, on numpy buffers (GIL released where they
 * run long): the reverse map's build step (present_sorted), the lookups and
 * corrections the movers make per batch (first_owners, take_out), folio
 * grouping (folio_starts) and two array primitives (sort_pairs, ascends).
 * Each replaces several numpy passes, and their temporaries, with one loop.
 *
 * The build: the present pages of a run of /proc/PID/pagemap entries, as
 * (PFN, owner) pairs sorted by PFN.
 *
 * numpy needs about a dozen passes over the entries for this (mask, select,
 * offset per run, argsort, two gathers), each with a temporary as large as the
 * entries. Here:
 *
 *   1. one pass over the entries cuts the present pages into segments, pages
 *      whose PFN and owner both step by one (a process's memory is mostly such
 *      runs);
 *   2. a radix sort orders the segments by first PFN;
 *   3. segments that do not overlap the previous ones (all, but for pages that
 *      several processes map) are written out in that order; the overlapping
 *      ones are expanded, radix sorted and merged in.
 *
 * So the pages are touched twice, and the sorting is over segments.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../_buffers.h"

#define PRESENT_BIT 63
#define PFN_MASK ((UINT64_C(1) << 55) - 1)
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

/* Step 1. The owner of entry i of run r is bases[r] + i (mod 2**64). */
static int cut_segments(const uint64_t *entries, const int64_t *bounds, const uint64_t *bases,
                        size_t runs, struct segments *s)
{
    uint64_t next_pfn = 0, next_owner = 0;

    for (size_t r = 0; r < runs; r++) {
        for (int64_t i = bounds[r]; i < bounds[r + 1]; i++) {
            uint64_t entry = entries[i];
            uint64_t pfn = entry & PFN_MASK;
            uint64_t owner = bases[r] + (uint64_t)i;

            /* A PFN of 0: pagemap read without CAP_SYS_ADMIN, of no use. */
            if (!(entry >> PRESENT_BIT) || pfn == 0)
                continue;
            s->pages++;
            if (s->count && pfn == next_pfn && owner == next_owner)
                s->len[s->count - 1]++;
            else if (segments_push(s, pfn, owner))
                return -1;
            next_pfn = pfn + 1;
            next_owner = owner + 1;
        }
    }
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

PyDoc_STRVAR(present_sorted_doc,
"present_sorted(entries, bounds, bases, owners) -> int\n\n"
"The present pages of pagemap `entries` (uint64), sorted by PFN: writes their\n"
"PFNs to entries[:n] and their owners to owners[:n] and returns n. Entries\n"
"bounds[r]:bounds[r+1] (int64, one more than bases) are run r, whose entry i\n"
"has the owner bases[r] + i (uint64, mod 2**64). Pages with PFN 0 are left out.\n"
"`owners` must hold as many items as `entries`.");

/* present_sorted() on buffers already checked to hold 8-byte items. */
static PyObject *index_present(Py_buffer *entries, Py_buffer *bounds, Py_buffer *bases,
                               Py_buffer *owners)
{
    size_t n = (size_t)entries->len / 8, runs = (size_t)bases->len / 8;
    const int64_t *bound = bounds->buf;
    struct segments segs = {0};
    int failed;

    if ((size_t)bounds->len / 8 != runs + 1)
        return PyErr_Format(PyExc_ValueError, "bounds must hold one more item than bases");
    for (size_t r = 0; r < runs; r++) {
        if (bound[r] < 0 || bound[r] > bound[r + 1] || (uint64_t)bound[r + 1] > n)
            return PyErr_Format(PyExc_ValueError, "run %zu: bounds %lld:%lld outside 0:%zu", r,
                                (long long)bound[r], (long long)bound[r + 1], n);
    }
    if ((size_t)owners->len / 8 < n)
        return PyErr_Format(PyExc_ValueError, "owners must hold as many items as entries");
    /* Both are written: the PFNs over the entries as they are read, the owners apart. */
    if (buffers_overlap(owners, entries))
        return PyErr_Format(PyExc_ValueError, "owners must not overlap entries");
    Py_BEGIN_ALLOW_THREADS
    failed = cut_segments(entries->buf, bound, bases->buf, runs, &segs)
             || write_sorted(&segs, entries->buf, owners->buf);
    Py_END_ALLOW_THREADS
    free(segs.pfn);
    free(segs.owner);
    free(segs.len);
    return failed ? PyErr_NoMemory() : PyLong_FromSize_t(segs.pages);
}

static PyObject *present_sorted(PyObject *self, PyObject *args)
{
    static const char *const names[] = {"entries", "bounds", "bases", "owners"};
    static const int writable[] = {1, 0, 0, 1};
    PyObject *objects[4];
    Py_buffer views[4];
    PyObject *result;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOOO:present_sorted", &objects[0], &objects[1], &objects[2],
                          &objects[3])
        || get_u64_buffers(objects, views, 4, names, writable) < 0)
        return NULL;
    result = index_present(&views[0], &views[1], &views[2], &views[3]);
    release_buffers(views, 4);
    return result;
}

/*
 * The map's lookups and corrections, for the movers: per PFN of a batch, a
 * search of the map's sorted PFNs. A batch's PFNs come ascending, so each
 * search gallops on from where the last one ended (a few probes) instead of
 * bisecting the whole map; in numpy the same took a dozen passes over the
 * batch around two binary searches, more than the kernel's reads for it.
 */

#define DEAD UINT64_MAX  /* the owner of a tombstone: its page left this PFN */

/* The first position in the sorted a[0:n] whose value is not below key; `hint`
 * is the previous answer (keys mostly ascend). */
static size_t lower_bound(const uint64_t *a, size_t n, uint64_t key, size_t hint)
{
    size_t lo = 0, hi = n;

    if (hint > n)
        hint = n;
    if (hint > 0 && a[hint - 1] >= key) {
        hi = hint;  /* a key below the previous one: bisect what lies before */
    } else {
        size_t step = 1, probe = hint;
        lo = hint;  /* everything before `hint` is below key */
        while (probe < n && a[probe] < key) {
            lo = probe + 1;
            probe = lo + step;
            step *= 2;
        }
        hi = probe < n ? probe : n;
    }
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (a[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Per key: the owner of its first entry, or DEAD when it has none or that one is a
 * tombstone. Returns how many keys had a live entry. */
static size_t find_first_owners(const uint64_t *pfn, const uint64_t *owner, size_t n,
                                const uint64_t *keys, size_t count, uint64_t *out)
{
    size_t found = 0, at = 0;

    for (size_t i = 0; i < count; i++) {
        at = lower_bound(pfn, n, keys[i], at);
        out[i] = at < n && pfn[at] == keys[i] ? owner[at] : DEAD;
        found += out[i] != DEAD;
    }
    return found;
}

/* Tombstone every entry of each key. Where follow[i] and the key has live entries,
 * followers[i] is the first one's owner (the entry that follows the page), else DEAD;
 * the slots of the other entries taken out are flagged in stale_slots. Returns how
 * many entries became tombstones, or -1 for an owner whose slot is past stale_slots. */
static int64_t tombstone(const uint64_t *pfn, uint64_t *owner, size_t n, const uint64_t *keys,
                         const char *follow, size_t count, uint64_t *followers,
                         char *stale_slots, size_t slots, unsigned slot_shift)
{
    size_t at = 0;
    int64_t taken = 0;

    for (size_t i = 0; i < count; i++) {
        at = lower_bound(pfn, n, keys[i], at);
        followers[i] = DEAD;
        if (at == n || pfn[at] != keys[i] || owner[at] == DEAD)
            continue;  /* no entry, or tombstones only: every entry of a PFN is one or none */
        size_t j = at;
        if (follow[i])
            followers[i] = owner[j++];
        for (; j < n && pfn[j] == keys[i]; j++) {
            if ((owner[j] >> slot_shift) >= slots)
                return -1;
            stale_slots[owner[j] >> slot_shift] = 1;
        }
        for (j = at; j < n && pfn[j] == keys[i]; j++, taken++)
            owner[j] = DEAD;
    }
    return taken;
}

PyDoc_STRVAR(first_owners_doc,
"first_owners(pfn, owner, keys, out) -> int\n\n"
"For each of `keys` (uint64; fastest ascending), the owner of its first entry in\n"
"the map (pfn sorted, owner alongside) into out[i], or 2**64-1 where it has none\n"
"or that entry is a tombstone. Returns how many keys had a live entry.");

static PyObject *first_owners(PyObject *self, PyObject *args)
{
    static const char *const names[] = {"pfn", "owner", "keys", "out"};
    static const int writable[] = {0, 0, 0, 1};
    PyObject *objects[4];
    Py_buffer views[4];
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOOO:first_owners", &objects[0], &objects[1], &objects[2],
                          &objects[3])
        || get_u64_buffers(objects, views, 4, names, writable) < 0)
        return NULL;
    size_t n = (size_t)views[0].len / 8, count = (size_t)views[2].len / 8, found;
    if ((size_t)views[1].len / 8 != n || (size_t)views[3].len / 8 != count) {
        PyErr_SetString(PyExc_ValueError,
                        "owner must match pfn, and out must match keys, in size");
    } else {
        Py_BEGIN_ALLOW_THREADS
        found = find_first_owners(views[0].buf, views[1].buf, n, views[2].buf, count,
                                  views[3].buf);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSize_t(found);
    }
    release_buffers(views, 4);
    return result;
}

PyDoc_STRVAR(take_out_doc,
"take_out(pfn, owner, keys, follow, followers, stale_slots, slot_shift) -> int\n\n"
"Turn every entry of each of `keys` into a tombstone (owner 2**64-1) in the map\n"
"(pfn sorted, owner alongside, written). Where follow[i] (bool) and the key has\n"
"live entries, followers[i] is the first one's owner, else 2**64-1; stale_slots\n"
"(bool, one per slot) flags the slots (owner >> slot_shift) of the other entries\n"
"taken out. Returns how many entries became tombstones. An owner whose slot is\n"
"past stale_slots raises ValueError, with the keys before it already taken out.");

static PyObject *take_out(PyObject *self, PyObject *args)
{
    PyObject *pfn_obj, *owner_obj, *keys_obj, *follow_obj, *followers_obj, *stale_obj;
    unsigned int slot_shift;
    Py_buffer pfn, owner, keys, follow, followers, stale;
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOOOI:take_out", &pfn_obj, &owner_obj, &keys_obj,
                          &follow_obj, &followers_obj, &stale_obj, &slot_shift))
        return NULL;
    if (slot_shift > 63)
        return PyErr_Format(PyExc_ValueError, "slot_shift %u is not below 64", slot_shift);
    if (get_u64_buffer(pfn_obj, &pfn, 0, "pfn") < 0)
        return NULL;
    if (get_u64_buffer(owner_obj, &owner, 1, "owner") < 0)
        goto release_pfn;
    if (get_u64_buffer(keys_obj, &keys, 0, "keys") < 0)
        goto release_owner;
    if (get_bool_buffer(follow_obj, &follow, 0, "follow") < 0)
        goto release_keys;
    if (get_u64_buffer(followers_obj, &followers, 1, "followers") < 0)
        goto release_follow;
    if (get_bool_buffer(stale_obj, &stale, 1, "stale_slots") < 0)
        goto release_followers;

    size_t n = (size_t)pfn.len / 8, count = (size_t)keys.len / 8;
    if ((size_t)owner.len / 8 != n || (size_t)follow.len != count
        || (size_t)followers.len / 8 != count) {
        PyErr_SetString(PyExc_ValueError, "owner must match pfn, and follow and followers "
                                          "keys, in size");
    } else {
        int64_t taken;
        Py_BEGIN_ALLOW_THREADS
        taken = tombstone(pfn.buf, owner.buf, n, keys.buf, follow.buf, count, followers.buf,
                          stale.buf, (size_t)stale.len, slot_shift);
        Py_END_ALLOW_THREADS
        if (taken < 0)
            PyErr_SetString(PyExc_ValueError, "an owner's slot is past stale_slots");
        else
            result = PyLong_FromLongLong(taken);
    }
    PyBuffer_Release(&stale);
release_followers:
    PyBuffer_Release(&followers);
release_follow:
    PyBuffer_Release(&follow);
release_keys:
    PyBuffer_Release(&keys);
release_owner:
    PyBuffer_Release(&owner);
release_pfn:
    PyBuffer_Release(&pfn);
    return result;
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

static PyMethodDef methods[] = {
    {"present_sorted", present_sorted, METH_VARARGS, present_sorted_doc},
    {"first_owners", first_owners, METH_VARARGS, first_owners_doc},
    {"take_out", take_out, METH_VARARGS, take_out_doc},
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
