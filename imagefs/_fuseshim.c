/*
 * _fuseshim: FUSE capabilities pyfuse3 3.5 does not expose, added beneath it.
 *
 * pyfuse3 registers its low-level operations with fuse_session_new() and has no lseek
 * handler, so SEEK_DATA/SEEK_HOLE on a mount would report a sparse file as all data; nor
 * does it ask for FUSE_CAP_CACHE_SYMLINKS, so every readlink of an immutable image would
 * reach the driver.  This module defines fuse_session_new() itself.  Loaded with
 * RTLD_GLOBAL before pyfuse3, its definition is the one pyfuse3's reference binds to; it
 * copies pyfuse3's operation table, adds `lseek` (answered by a Python callable) and wraps
 * `init` (to ask for symlink caching), then calls libfuse's own fuse_session_new().
 *
 * Writable mounts need two more: `fallocate` (pyfuse3 has no handler; tools that punch
 * holes or preallocate would get EOPNOTSUPP) and `setxattr` with its flags (pyfuse3 drops
 * XATTR_CREATE/XATTR_REPLACE).  Both are answered synchronously by Python callables that
 * return 0 or -errno, in the loop's thread, like lseek.  They also ask for
 * FUSE_CAP_DONT_MASK: the umask comes with each create and the driver applies it, unless
 * the parent's default ACL replaces it (as POSIX wants).
 *
 * For an immutable index it can also make opens free: `open` and `opendir` answer ENOSYS
 * here, which tells the kernel (4.19+) never to send them again and to keep file pages and
 * directory listings cached (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR, the kernel's defaults
 * without open); reads and directory reads then carry handle 0, which is replaced by the
 * inode number before pyfuse3 sees them, so the handle pyfuse3 passes on is the inode.
 *
 * Nothing else of pyfuse3 is touched.  If this module is missing, mounts still work; holes
 * then read as zeros but are not reported by lseek.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <dlfcn.h>
#include <errno.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t,
                                               void *);
typedef int (*reply_lseek_fn)(fuse_req_t, off_t);
typedef int (*reply_err_fn)(fuse_req_t, int);

static PyObject *lseek_handler;   /* callable(ino, offset, whence) -> offset or -errno */
static PyObject *fallocate_handler; /* callable(ino, mode, offset, length) -> 0 or -errno */
static PyObject *setxattr_handler;  /* callable(ino, name, value, flags) -> 0 or -errno */
static int cache_symlinks;
static int dont_mask;             /* the kernel leaves the umask to us (ACL inheritance) */
static int handles_are_inodes;    /* no open/opendir: reads get fh = inode */
typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
static read_fn pyfuse3_read, pyfuse3_readdirplus;
static int installed;             /* set once fuse_session_new() went through here */
static reply_lseek_fn reply_lseek;
static reply_err_fn reply_err;
static void (*pyfuse3_init)(void *, struct fuse_conn_info *);

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    long long result = -EIO;
    (void)fi;
    PyGILState_STATE gil = PyGILState_Ensure();
    if (lseek_handler != NULL) {
        PyObject *r = PyObject_CallFunction(lseek_handler, "KLi", (unsigned long long)ino,
                                            (long long)off, whence);
        if (r != NULL) {
            result = PyLong_AsLongLong(r);
            Py_DECREF(r);
        }
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(lseek_handler);
            result = -EIO;
        }
    }
    PyGILState_Release(gil);
    if (result >= 0)
        reply_lseek(req, (off_t)result);
    else
        reply_err(req, (int)-result);
}

/* Call a handler that answers 0 or -errno, in the loop's thread, and reply with it. */
static void answer_errno(fuse_req_t req, PyObject *handler, PyObject *args)
{
    long long result = -EIO;
    if (args != NULL) {
        PyObject *r = PyObject_CallObject(handler, args);
        Py_DECREF(args);
        if (r != NULL) {
            result = PyLong_AsLongLong(r);
            Py_DECREF(r);
        }
    }
    if (PyErr_Occurred()) {
        PyErr_WriteUnraisable(handler);
        result = -EIO;
    }
    reply_err(req, result < 0 ? (int)-result : 0);
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset,
                           off_t length, struct fuse_file_info *fi)
{
    (void)fi;
    PyGILState_STATE gil = PyGILState_Ensure();
    answer_errno(req, fallocate_handler,
                 Py_BuildValue("(KiLL)", (unsigned long long)ino, mode, (long long)offset,
                               (long long)length));
    PyGILState_Release(gil);
}

static void shim_setxattr(fuse_req_t req, fuse_ino_t ino, const char *name,
                          const char *value, size_t size, int flags)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    answer_errno(req, setxattr_handler,
                 Py_BuildValue("(Ky#y#i)", (unsigned long long)ino, name,
                               (Py_ssize_t)strlen(name), value, (Py_ssize_t)size, flags));
    PyGILState_Release(gil);
}

static void shim_no_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    reply_err(req, ENOSYS);
}

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    pyfuse3_read(req, ino, size, off, fi);
}

static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    pyfuse3_readdirplus(req, ino, size, off, fi);
}

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    if (pyfuse3_init != NULL)
        pyfuse3_init(userdata, conn);
    if (cache_symlinks && (conn->capable & FUSE_CAP_CACHE_SYMLINKS))
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
    if (dont_mask && (conn->capable & FUSE_CAP_DONT_MASK))
        conn->want |= FUSE_CAP_DONT_MASK;
}

struct fuse_session *fuse_session_new(struct fuse_args *args,
                                      const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == NULL)
        lib = dlopen("libfuse3.so.3", RTLD_LAZY);
    if (lib == NULL)
        return NULL;
    session_new_fn real = (session_new_fn)dlsym(lib, "fuse_session_new");
    reply_lseek = (reply_lseek_fn)dlsym(lib, "fuse_reply_lseek");
    reply_err = (reply_err_fn)dlsym(lib, "fuse_reply_err");
    if (real == NULL)
        return NULL;
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof ops);
    memcpy(&ops, op, op_size < sizeof ops ? op_size : sizeof ops);
    if (lseek_handler != NULL && reply_lseek != NULL && reply_err != NULL)
        ops.lseek = shim_lseek;
    if (fallocate_handler != NULL && reply_err != NULL)
        ops.fallocate = shim_fallocate;
    if (setxattr_handler != NULL && reply_err != NULL)
        ops.setxattr = shim_setxattr;
    if (handles_are_inodes && reply_err != NULL && ops.read != NULL
            && ops.readdirplus != NULL) {
        pyfuse3_read = ops.read;
        pyfuse3_readdirplus = ops.readdirplus;
        ops.open = shim_no_open;
        ops.opendir = shim_no_open;
        ops.read = shim_read;
        ops.readdirplus = shim_readdirplus;
        ops.readdir = NULL;
    }
    pyfuse3_init = ops.init;
    ops.init = shim_init;
    installed = 1;
    return real(args, &ops, sizeof ops, userdata);
}

static int set_handler(PyObject **slot, PyObject *handler)
{
    if (handler != Py_None && !PyCallable_Check(handler)) {
        PyErr_SetString(PyExc_TypeError, "a handler must be callable or None");
        return -1;
    }
    Py_XDECREF(*slot);
    *slot = NULL;
    if (handler != Py_None) {
        Py_INCREF(handler);
        *slot = handler;
    }
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    PyObject *handler, *fallocate = Py_None, *setxattr = Py_None;
    int symlinks, inodes, nomask = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "Opp|OOp", &handler, &symlinks, &inodes, &fallocate,
                          &setxattr, &nomask))
        return NULL;
    dont_mask = nomask;
    if (set_handler(&lseek_handler, handler) < 0
            || set_handler(&fallocate_handler, fallocate) < 0
            || set_handler(&setxattr_handler, setxattr) < 0)
        return NULL;
    cache_symlinks = symlinks;
    handles_are_inodes = inodes;
    Py_RETURN_NONE;
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(installed);
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS,
     "configure(lseek, cache_symlinks, handles_are_inodes[, fallocate[, setxattr[, "
     "dont_mask]]]): before pyfuse3.init()"},
    {"active", active, METH_NOARGS,
     "True once pyfuse3's fuse_session_new() call went through this module"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "imagefs._fuseshim",
    "lseek, fallocate, setxattr flags and symlink caching beneath pyfuse3", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
    return PyModule_Create(&module);
}
