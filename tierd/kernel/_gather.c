/*
 * Reads of a per-page u64 file (/proc/kpageflags, /proc/kpagecgroup,
 * /proc/PID/pagemap) at ascending indices, in C.
 *
 * A mover reads the entries of each batch's pages two or three times (flags
 * before, PFNs before and after). In numpy, cutting the indices into runs and
 * picking the entries out of each run's read takes a dozen passes over the
 * batch, each with its own temporary. Here one
 * pass cuts the runs and reads each: a run without gaps straight into the
 * result, a run with gaps (indices at most `max_gap` apart) into a scratch
 * buffer that the entries are picked from.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../_buffers.h"

#define ENTRY_BYTES 8

struct read_error {
    int no_memory;        /* for a scratch buffer: not the file's error */
    int errnum;           /* 0: none */
    const char *message;  /* NULL: strerror(errnum) */
    uint64_t offset;
};

/* Fill out[0:count] with the entries from `index` on; past the file's end, with `fill`. */
static int read_entries(int fd, uint64_t index, uint64_t *out, size_t count, uint64_t fill,
                        struct read_error *err)
{
    char *bytes = (char *)out;
    size_t want = count * ENTRY_BYTES, done = 0;
    uint64_t offset = index * ENTRY_BYTES;

    while (done < want) {
        ssize_t n = pread(fd, bytes + done, want - done, (off_t)(offset + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            *err = (struct read_error){0, errno, NULL, offset + done};
            return -1;
        }
        if (n == 0)
            break;
        done += (size_t)n;
    }
    if (done % ENTRY_BYTES) {
        *err = (struct read_error){0, EIO, "read ends inside an entry", offset + done};
        return -1;
    }
    for (size_t i = done / ENTRY_BYTES; i < count; i++)
        out[i] = fill;
    return 0;
}

struct scratch {
    uint64_t *buf;
    size_t cap;
};

static uint64_t *scratch_get(struct scratch *s, size_t count, struct read_error *err)
{
    if (count > s->cap) {
        uint64_t *p = realloc(s->buf, count * sizeof *p);
        if (!p) {
            err->no_memory = 1;
            return NULL;
        }
        s->buf = p;
        s->cap = count;
    }
    return s->buf;
}

static int gather_runs(int fd, const uint64_t *keys, size_t n, unsigned shift, uint64_t *out,
                       uint64_t fill, uint64_t max_gap, uint64_t mask, struct read_error *err)
{
    struct scratch scratch = {0};
    int failed = 0;

    for (size_t start = 0, end; start < n && !failed; start = end) {
        uint64_t first = keys[start] >> shift, last = first;
        int gap_free = 1;  /* every index of the run once, none between */
        for (end = start + 1; end < n && (keys[end] >> shift) - last <= max_gap; end++) {
            gap_free &= (keys[end] >> shift) == last + 1;
            last = keys[end] >> shift;
        }
        size_t span = (size_t)(last - first) + 1;
        if (gap_free) {
            failed = read_entries(fd, first, out + start, span, fill, err);
            for (size_t i = start; i < end && mask != UINT64_MAX; i++)
                out[i] &= mask;
            continue;
        }
        uint64_t *buf = scratch_get(&scratch, span, err);
        failed = !buf || read_entries(fd, first, buf, span, fill, err);
        for (size_t i = start; i < end && !failed; i++)
            out[i] = buf[(keys[i] >> shift) - first] & mask;
    }
    free(scratch.buf);
    return failed ? -1 : 0;
}

static PyObject *raise_read_error(const struct read_error *err)
{
    const char *message = err->message ? err->message : strerror(err->errnum);
    PyObject *e = PyObject_CallFunction(PyExc_OSError, "isK", err->errnum, message,
                                        (unsigned long long)err->offset);
    if (e) {
        PyErr_SetObject((PyObject *)Py_TYPE(e), e);
        Py_DECREF(e);
    }
    return NULL;
}

static PyObject *gather_views(int fd, Py_buffer *keys, unsigned shift, Py_buffer *out,
                              uint64_t fill, uint64_t max_gap, uint64_t mask)
{
    size_t n = (size_t)keys->len / 8;
    const uint64_t *key = keys->buf;
    struct read_error err = {0};
    int failed;

    if ((size_t)out->len / 8 != n)
        return PyErr_Format(PyExc_ValueError, "out must hold as many items as keys");
    /* Runs are read ahead of the keys that name them. */
    if (buffers_overlap(out, keys))
        return PyErr_Format(PyExc_ValueError, "out must not overlap keys");
    for (size_t i = 1; i < n; i++) {
        if ((key[i] >> shift) < (key[i - 1] >> shift))
            Py_RETURN_FALSE;
    }
    Py_BEGIN_ALLOW_THREADS
    failed = gather_runs(fd, key, n, shift, out->buf, fill, max_gap, mask, &err);
    Py_END_ALLOW_THREADS
    if (failed)
        return err.no_memory ? PyErr_NoMemory() : raise_read_error(&err);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(gather_doc,
"gather(fd, keys, shift, out, fill, max_gap, mask) -> bool\n\n"
"Read the u64 entry at index keys[i] >> shift of the open file `fd`, ANDed with\n"
"`mask`, into out[i], for ascending `keys` (8-byte integers; repeats allowed);\n"
"returns False, having read nothing, when they do not ascend. Indices at most\n"
"`max_gap` apart are read in one pread. Entries past the file's end read as\n"
"`fill` (masked too). A failed read raises OSError(errno, message, byte offset).");

static PyObject *gather(PyObject *self, PyObject *args)
{
    int fd;
    unsigned int shift;
    unsigned long long fill, max_gap, mask;
    PyObject *keys_obj, *out_obj;
    Py_buffer keys, out;
    PyObject *result = NULL;

    (void)self;
    if (!PyArg_ParseTuple(args, "iOIOKKK:gather", &fd, &keys_obj, &shift, &out_obj, &fill,
                          &max_gap, &mask))
        return NULL;
    if (shift > 63)
        return PyErr_Format(PyExc_ValueError, "shift %u is not below 64", shift);
    if (get_u64_buffer(keys_obj, &keys, 0, "keys") < 0)
        return NULL;
    if (get_u64_buffer(out_obj, &out, 1, "out") == 0) {
        result = gather_views(fd, &keys, shift, &out, fill, max_gap, mask);
        PyBuffer_Release(&out);
    }
    PyBuffer_Release(&keys);
    return result;
}

static PyMethodDef methods[] = {
    {"gather", gather, METH_VARARGS, gather_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_gather",
    "Reads of per-page u64 files at ascending indices, in C (see _gather.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__gather(void)
{
    return PyModule_Create(&module);
}
