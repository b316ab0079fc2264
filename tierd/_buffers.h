/*
 * numpy arrays as buffers, for tierd's C extensions (tierd/kernel/_gather.c,
 * tierd/movers/_native.c): 1-d and C-contiguous, of the item kind a function
 * needs, with a TypeError naming the argument otherwise. Include after
 * Python.h.
 */
#ifndef TIERD_BUFFERS_H
#define TIERD_BUFFERS_H

#include <string.h>

static inline int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name,
                             Py_ssize_t itemsize, const char *kinds, const char *expected)
{
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS
                                          | PyBUF_FORMAT) < 0)
        return -1;
    const char *format = view->format ? view->format : "B";
    char kind = format[strlen(format) - 1];
    /* kind first: strchr() finds a '\0' too. */
    if (view->itemsize != itemsize || view->ndim != 1 || !kind || !strchr(kinds, kind)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a 1-d array of %s", name, expected);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static inline int get_u64_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name)
{
    return get_buffer(obj, view, writable, name, 8, "qQlLnN", "8-byte integers");
}

static inline int get_u32_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name)
{
    return get_buffer(obj, view, writable, name, 4, "I", "uint32");
}

static inline int get_bool_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name)
{
    return get_buffer(obj, view, writable, name, 1, "?", "booleans");
}

static inline void release_buffers(Py_buffer *views, int count)
{
    while (count--)
        PyBuffer_Release(&views[count]);
}

/* get_u64_buffer() of objects[0:count] into views; on failure none is held. */
static inline int get_u64_buffers(PyObject *const *objects, Py_buffer *views, int count,
                                  const char *const *names, const int *writable)
{
    for (int i = 0; i < count; i++) {
        if (get_u64_buffer(objects[i], &views[i], writable[i], names[i]) < 0) {
            release_buffers(views, i);
            return -1;
        }
    }
    return 0;
}

/* get_u64_buffers(), then get_u32_buffer() of length_obj (an extent map's lengths) into
 * length; on failure none is held. */
static inline int get_u64_buffers_and_length(PyObject *const *objects, Py_buffer *views,
                                             int count, const char *const *names,
                                             const int *writable, PyObject *length_obj,
                                             Py_buffer *length, int length_writable)
{
    if (get_u64_buffers(objects, views, count, names, writable) < 0)
        return -1;
    if (get_u32_buffer(length_obj, length, length_writable, "length") < 0) {
        release_buffers(views, count);
        return -1;
    }
    return 0;
}

/* Whether two buffers share any byte (an output must not overlap the input it reads). */
static inline int buffers_overlap(const Py_buffer *a, const Py_buffer *b)
{
    return (const char *)a->buf < (const char *)b->buf + b->len
           && (const char *)b->buf < (const char *)a->buf + a->len;
}

#endif
