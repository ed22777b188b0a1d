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
 * A writable mount makes file opens free the same way (its file handle is the inode
 * anyway, and the kernel's lookup count keeps an unlinked file alive while it is open):
 * writes and fsyncs then carry handle 0 too (FLUSH is answered ENOSYS), and atomic
 * O_TRUNC is turned off, so that an open with O_TRUNC arrives as a SETATTR of size 0.
 * Its directories keep their opens (a listing is a snapshot that must stay stable while
 * entries change).  The kernel sends no RELEASE for a file opened without OPEN; a file
 * made by CREATE still gets one.
 * A writable mount also asks for the writeback cache (see shim_init).
 *
 * Fast paths: pyfuse3 answers every request with a coroutine on its trio loop, which costs
 * more than the handlers themselves.  Requests whose handlers never wait (lookup, getattr,
 * getxattr, listxattr, readlink, read, readdirplus, write, flush, release, forget, and a
 * writable mount's opendir, releasedir and changes: setattr, create, mknod, mkdir,
 * symlink, link, unlink, rmdir, rename, statfs) can instead be answered here by plain
 * Python callables, and the requests already waiting are then drained in the same call
 * (see drain()).  The rest still go through pyfuse3 (coroutine_counts() says which).
 *
 * Nothing else of pyfuse3 is touched.  If this module is missing, mounts still work (more
 * slowly); holes then read as zeros but are not reported by lseek, fallocate fails with
 * EOPNOTSUPP, and setxattr ignores its flags.
 *
 * The contract with pyfuse3 and libfuse (written against and tested with pyfuse3 3.5.0 and
 * libfuse 3.14.0; what the fast paths assume of pyfuse3's private request loop; how they
 * are turned off) is docs/shim.md.  imagefs/mount/shim.py loads this module and turns the
 * fast paths off for versions it does not know.  SHIM_API below changes whenever the
 * Python side must change with this file: shim.py does not use a build of another API.
 */
#define _GNU_SOURCE  /* ppoll */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/statvfs.h>
#include <unistd.h>

/* The interface shim.py expects (configure's arguments, the functions below); a build
 * with another number is stale and not used (shim.py: API). */
#define SHIM_API 8

/* lseek (3.8) and FUSE_CAP_CACHE_SYMLINKS (3.10) are needed. */
#if FUSE_MAJOR_VERSION != 3 || FUSE_MINOR_VERSION < 10
#error "_fuseshim needs the libfuse 3.10 or newer headers (libfuse3-dev)"
#endif
#define SHIM_STR(x) #x
#define SHIM_XSTR(x) SHIM_STR(x)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *,
                                               const struct fuse_lowlevel_ops *, size_t,
                                               void *);
typedef int (*reply_lseek_fn)(fuse_req_t, off_t);
typedef int (*reply_err_fn)(fuse_req_t, int);

static PyObject *lseek_handler;   /* callable(ino, offset, whence) -> offset or -errno */
static PyObject *fallocate_handler; /* callable(ino, mode, offset, length) -> 0 or -errno */
static PyObject *setxattr_handler;  /* callable(ino, name, value, flags) -> 0 or -errno */

/* Fast paths: requests answered synchronously by a Python callable, without pyfuse3's
 * per-request coroutine (most of a request's cost in the driver).  Only for handlers that
 * never block.  Each returns its answer or a negative errno (an int). */
enum { FAST_LOOKUP, FAST_GETATTR, FAST_READLINK, FAST_GETXATTR, FAST_LISTXATTR, FAST_READ,
       FAST_WRITE, FAST_RELEASE, FAST_FORGET, FAST_FLUSH, FAST_READDIR, FAST_OPENDIR,
       FAST_RELEASEDIR, FAST_SETATTR, FAST_CREATE, FAST_MKNOD, FAST_MKDIR, FAST_SYMLINK,
       FAST_LINK, FAST_UNLINK, FAST_RMDIR, FAST_RENAME, FAST_STATFS, FAST_COUNT };
static const char *fast_names[FAST_COUNT] = {
    "lookup", "getattr", "readlink", "getxattr", "listxattr", "read", "write", "release",
    "forget", "flush", "readdir", "opendir", "releasedir", "setattr", "create", "mknod",
    "mkdir", "symlink", "link", "unlink", "rmdir", "rename", "statfs"};
static PyObject *fast[FAST_COUNT];

/* Draining: after a fast request is answered, the requests already waiting on /dev/fuse
 * are received and processed right here, without returning to pyfuse3's trio loop (which
 * spends more on epoll and task switches per request than the handlers do).  Only while
 * they are fast ones: the first request that goes to a pyfuse3 coroutine ends the drain,
 * and pyfuse3's loop awaits that coroutine as soon as control returns to it. */
#define DRAIN_MAX 64
static struct fuse_session *the_session;
static int draining;
/* How long a drain waits for the next request (set_drain_wait; 0: only those waiting).  A
 * reader like tar sends its next request a few microseconds after its answer: waiting
 * for it here, with the GIL released, costs nothing, where going back to the trio loop
 * costs an epoll round and task switches per request.  The loop's other tasks then wait
 * at most DRAIN_MAX requests' time. */
static long drain_wait_us;
/* The first drain_spin_us of that wait are spent polling without sleeping.  A sleeping
 * driver must be woken by the reader's request, and under a hypervisor that wakeup (an
 * IPI, taken while the kernel holds the FUSE input queue's lock) costs more than the
 * request: `find -ls` of bookworm-web spent a sixth of its samples spinning on that lock
 * in fuse_dev_poll.  A driver still polling is not asleep, so nobody has to wake it. */
static long drain_spin_us;

static long elapsed_us(const struct timespec *t0)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (t.tv_sec - t0->tv_sec) * 1000000L + (t.tv_nsec - t0->tv_nsec) / 1000L;
}

/* Wait up to drain_wait_us for a request on p (spinning for the first drain_spin_us);
 * called with the GIL released.  poll()'s result. */
static int wait_for_request(struct pollfd *p)
{
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long spent = 0;
    while (spent < drain_spin_us) {
        int n = poll(p, 1, 0);
        if (n != 0)
            return n;
        spent = elapsed_us(&t0);
    }
    long rest = drain_wait_us - spent;
    if (rest <= 0)
        return 0;
    struct timespec wait = {.tv_sec = rest / 1000000, .tv_nsec = (rest % 1000000) * 1000};
    return ppoll(p, 1, &wait, NULL);
}
static int handled_fast;          /* set by every request this module answers itself */
/* Requests this module answered itself, ever: a request during whose processing it did not
 * grow went to a pyfuse3 coroutine (drain runs only inside requests answered here). */
static unsigned long long answered_here;
#define ANSWERED_HERE() (handled_fast = 1, answered_here++)
static int cache_symlinks;
static int dont_mask;             /* the kernel leaves the umask to us (ACL inheritance) */
/* Free opens: 0 none; FREE_OPENS_ALL no open/opendir (an immutable index); FREE_OPENS_FILES
 * no open of files (a writable mount).  Requests then carry fh 0, replaced by the inode. */
enum { FREE_OPENS_ALL = 1, FREE_OPENS_FILES = 2 };
static int handles_are_inodes;
/* Whether a writable mount (FREE_OPENS_FILES) asks for the kernel's writeback cache. */
static int writeback_cache = 1;
typedef void (*read_fn)(fuse_req_t, fuse_ino_t, size_t, off_t, struct fuse_file_info *);
typedef void (*write_buf_fn)(fuse_req_t, fuse_ino_t, struct fuse_bufvec *, off_t,
                             struct fuse_file_info *);
typedef void (*fsync_fn)(fuse_req_t, fuse_ino_t, int, struct fuse_file_info *);
static read_fn pyfuse3_read, pyfuse3_readdirplus;
static write_buf_fn pyfuse3_write_buf;
static fsync_fn pyfuse3_fsync;
static int installed;             /* set once fuse_session_new() went through here */
static reply_lseek_fn reply_lseek;
static reply_err_fn reply_err;
static int (*reply_entry)(fuse_req_t, const struct fuse_entry_param *);
static int (*reply_attr)(fuse_req_t, const struct stat *, double);
static int (*reply_readlink)(fuse_req_t, const char *);
static int (*reply_buf)(fuse_req_t, const char *, size_t);
static int (*reply_write)(fuse_req_t, size_t);
static int (*reply_xattr)(fuse_req_t, size_t);
static void (*reply_none)(fuse_req_t);
static int (*reply_open)(fuse_req_t, const struct fuse_file_info *);
static int (*reply_create)(fuse_req_t, const struct fuse_entry_param *,
                           const struct fuse_file_info *);
static int (*reply_statfs)(fuse_req_t, const struct statvfs *);
static const struct fuse_ctx *(*req_ctx)(fuse_req_t);
static size_t (*add_direntry_plus)(fuse_req_t, char *, size_t, const char *,
                                   const struct fuse_entry_param *, off_t);
static void (*pyfuse3_init)(void *, struct fuse_conn_info *);

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    long long result = -EIO;
    (void)fi;
    ANSWERED_HERE();
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
    ANSWERED_HERE();
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


struct in_header {              /* struct fuse_in_header, as far as needed here */
    uint32_t len;
    uint32_t opcode;
};

/* --- fast paths ------------------------------------------------------------------------ */

static int (*session_fd)(struct fuse_session *);
static int (*receive_buf)(struct fuse_session *, struct fuse_buf *);
static void (*process_buf)(struct fuse_session *, const struct fuse_buf *);

/* pyfuse3's loop and drain() process every request through here.
 * Requests served, by FUSE opcode (request_counts(): what a workload asks of the mount). */
#define OPCODES 64
static unsigned long long request_count[OPCODES];
static unsigned long long coroutine_count[OPCODES];  /* of those, answered by pyfuse3 */

void fuse_session_process_buf(struct fuse_session *se, const struct fuse_buf *buf)
{
    uint32_t op = 0;
    if (!(buf->flags & FUSE_BUF_IS_FD) && buf->size >= sizeof(struct in_header)) {
        op = ((const struct in_header *)buf->mem)->opcode;
        op = op < OPCODES ? op : 0;
        request_count[op]++;
    }
    unsigned long long before = answered_here;
    if (process_buf == NULL) {  /* no session made through here: libfuse's own */
        void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
        process_buf = lib == NULL ? NULL : dlsym(lib, "fuse_session_process_buf");
        if (process_buf == NULL)
            abort();  /* nothing could serve the request */
    }
    process_buf(se, buf);
    if (answered_here == before)
        coroutine_count[op]++;
}

/* Reading requests: this module defines fuse_session_receive_buf(), so pyfuse3's loop
 * reads through here too, and the device is read without blocking.  A request can leave
 * the queue between the poll that saw it and the read (its process was killed: the kernel
 * drops a request no one has read yet); a blocking read would then wait for the next one
 * with the loop's thread, and with it every trio task, such as the one that unmounts when
 * a servicing verb dies.  A read that finds nothing (EAGAIN) is reported as EINTR, which
 * pyfuse3's loop answers by waiting for the device again (it takes EAGAIN for an error). */
static int nonblocking_fd = -1;

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    if (receive_buf == NULL || session_fd == NULL) {  /* no session made through here */
        void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
        receive_buf = lib == NULL ? NULL : dlsym(lib, "fuse_session_receive_buf");
        session_fd = lib == NULL ? NULL : dlsym(lib, "fuse_session_fd");
        if (receive_buf == NULL || session_fd == NULL)
            abort();  /* nothing could read the request */
    }
    int fd = session_fd(se);
    if (fd != nonblocking_fd) {
        int flags = fcntl(fd, F_GETFL);
        if (flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0)
            nonblocking_fd = fd;
    }
    int res = receive_buf(se, buf);
    return res == -EAGAIN ? -EINTR : res;
}

/* Called with the GIL held, at the end of a fast request. */
static void drain(void)
{
    if (draining || the_session == NULL || receive_buf == NULL)
        return;
    draining = 1;
    struct fuse_buf buf;
    memset(&buf, 0, sizeof buf);
    struct pollfd p = {.fd = session_fd(the_session), .events = POLLIN};
    for (int i = 0; i < DRAIN_MAX; i++) {
        p.revents = 0;
        int n;
        if (drain_wait_us > 0) {
            Py_BEGIN_ALLOW_THREADS
            n = wait_for_request(&p);
            Py_END_ALLOW_THREADS
        } else {
            n = poll(&p, 1, 0);
        }
        if (n != 1 || !(p.revents & POLLIN))
            break;
        if (fuse_session_receive_buf(the_session, &buf) <= 0)
            break;  /* gone meanwhile (EINTR, see above), or the end */
        handled_fast = 0;
        fuse_session_process_buf(the_session, &buf);
        if (!handled_fast)
            break;  /* a pyfuse3 coroutine is pending: its loop must await it now */
    }
    free(buf.mem);
    draining = 0;
}

/* An error answer (an int <= 0, or an exception: EIO) → reply and return 1; else 0. */
static int replied_error(fuse_req_t req, PyObject *r, PyObject *handler)
{
    if (r == NULL) {
        PyErr_WriteUnraisable(handler);
        reply_err(req, EIO);
        return 1;
    }
    if (PyLong_Check(r)) {
        long long v = PyLong_AsLongLong(r);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(handler);
            v = -EIO;
        }
        Py_DECREF(r);
        reply_err(req, v < 0 ? (int)-v : 0);
        return 1;
    }
    return 0;
}

/* (ino, mode, nlink, uid, gid, rdev, size, blocks, atime_ns, mtime_ns, ctime_ns, timeout) */
static int to_stat(PyObject *t, struct stat *st, double *timeout)
{
    unsigned long long ino, nlink, rdev, size, blocks;
    unsigned int mode, uid, gid;
    long long at, mt, ct;
    if (!PyArg_ParseTuple(t, "KIKIIKKKLLLd", &ino, &mode, &nlink, &uid, &gid, &rdev, &size,
                          &blocks, &at, &mt, &ct, timeout))
        return -1;
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = mode;
    st->st_nlink = nlink;
    st->st_uid = uid;
    st->st_gid = gid;
    st->st_rdev = rdev;
    st->st_size = (off_t)size;
    st->st_blksize = 4096;
    st->st_blocks = (blkcnt_t)blocks;
    st->st_atim.tv_sec = at / 1000000000LL;
    st->st_atim.tv_nsec = at % 1000000000LL;
    st->st_mtim.tv_sec = mt / 1000000000LL;
    st->st_mtim.tv_nsec = mt % 1000000000LL;
    st->st_ctim.tv_sec = ct / 1000000000LL;
    st->st_ctim.tv_nsec = ct % 1000000000LL;
    if (at < 0 && st->st_atim.tv_nsec) { st->st_atim.tv_sec--; st->st_atim.tv_nsec += 1000000000LL; }
    if (mt < 0 && st->st_mtim.tv_nsec) { st->st_mtim.tv_sec--; st->st_mtim.tv_nsec += 1000000000LL; }
    if (ct < 0 && st->st_ctim.tv_nsec) { st->st_ctim.tv_sec--; st->st_ctim.tv_nsec += 1000000000LL; }
    return 0;
}

/* An entry answer: the attribute tuple (to_stat) → fuse_entry_param; 0, or -1 (EIO sent). */
static int to_entry(fuse_req_t req, PyObject *r, PyObject *h, struct fuse_entry_param *e)
{
    double timeout;
    memset(e, 0, sizeof *e);
    if (to_stat(r, &e->attr, &timeout) < 0) {
        PyErr_WriteUnraisable(h);
        reply_err(req, EIO);
        return -1;
    }
    e->ino = e->attr.st_ino;
    e->attr_timeout = timeout;
    e->entry_timeout = timeout;
    return 0;
}

/* Answer a request whose handler returns an entry (lookup, mkdir, ...) or -errno. */
static void answer_entry(fuse_req_t req, PyObject *r, PyObject *h)
{
    if (!replied_error(req, r, h)) {
        struct fuse_entry_param e;
        if (to_entry(req, r, h, &e) == 0)
            reply_entry(req, &e);
        Py_DECREF(r);
    }
}

/* Answer a request whose handler returns attributes (getattr, setattr) or -errno. */
static void answer_attr(fuse_req_t req, PyObject *r, PyObject *h)
{
    if (!replied_error(req, r, h)) {
        struct stat st;
        double timeout;
        if (to_stat(r, &st, &timeout) < 0) {
            PyErr_WriteUnraisable(h);
            reply_err(req, EIO);
        } else {
            reply_attr(req, &st, timeout);
        }
        Py_DECREF(r);
    }
}

static void fast_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_LOOKUP];
    answer_entry(req, PyObject_CallFunction(h, "Ky#", (unsigned long long)parent, name,
                                            (Py_ssize_t)strlen(name)), h);
    drain();
    PyGILState_Release(gil);
}

/* --- a writable mount's changes (fast paths; handlers answer synchronously) ----------- */

/* The caller's uid, gid and umask, for the handlers that make an inode. */
static void caller(fuse_req_t req, unsigned int *uid, unsigned int *gid, unsigned int *umask)
{
    const struct fuse_ctx *c = req_ctx(req);
    *uid = c->uid;
    *gid = c->gid;
    *umask = c->umask;
}

static void fast_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                       dev_t rdev)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    unsigned int uid, gid, umask;
    caller(req, &uid, &gid, &umask);
    PyObject *h = fast[FAST_MKNOD];
    answer_entry(req, PyObject_CallFunction(h, "Ky#IKIII", (unsigned long long)parent, name,
                                            (Py_ssize_t)strlen(name), (unsigned int)mode,
                                            (unsigned long long)rdev, uid, gid, umask), h);
    drain();
    PyGILState_Release(gil);
}

static void fast_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    unsigned int uid, gid, umask;
    caller(req, &uid, &gid, &umask);
    PyObject *h = fast[FAST_MKDIR];
    answer_entry(req, PyObject_CallFunction(h, "Ky#IIII", (unsigned long long)parent, name,
                                            (Py_ssize_t)strlen(name), (unsigned int)mode,
                                            uid, gid, umask), h);
    drain();
    PyGILState_Release(gil);
}

static void fast_symlink(fuse_req_t req, const char *target, fuse_ino_t parent,
                         const char *name)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    unsigned int uid, gid, umask;
    caller(req, &uid, &gid, &umask);
    PyObject *h = fast[FAST_SYMLINK];
    answer_entry(req, PyObject_CallFunction(h, "Ky#y#III", (unsigned long long)parent, name,
                                            (Py_ssize_t)strlen(name), target,
                                            (Py_ssize_t)strlen(target), uid, gid, umask), h);
    drain();
    PyGILState_Release(gil);
}

static void fast_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t newparent, const char *name)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_LINK];
    answer_entry(req, PyObject_CallFunction(h, "KKy#", (unsigned long long)ino,
                                            (unsigned long long)newparent, name,
                                            (Py_ssize_t)strlen(name)), h);
    drain();
    PyGILState_Release(gil);
}

static void fast_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                        struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    unsigned int uid, gid, umask;
    caller(req, &uid, &gid, &umask);
    PyObject *h = fast[FAST_CREATE];
    PyObject *r = PyObject_CallFunction(h, "Ky#IiIII", (unsigned long long)parent, name,
                                        (Py_ssize_t)strlen(name), (unsigned int)mode,
                                        fi->flags, uid, gid, umask);
    if (!replied_error(req, r, h)) {
        struct fuse_entry_param e;
        if (to_entry(req, r, h, &e) == 0) {
            fi->fh = e.ino;  /* a writable mount's file handle is the inode */
            fi->keep_cache = 1;  /* as pyfuse3's FileInfo() */
            fi->direct_io = 0;
            fi->nonseekable = 0;
            reply_create(req, &e, fi);
        }
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

/* Nanoseconds since the epoch, now (setattr's *_NOW). */
static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static PyObject *opt_long(int set, long long v)
{
    return set ? PyLong_FromLongLong(v) : Py_NewRef(Py_None);
}

static long long ns_of(const struct timespec *t)
{
    return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static void fast_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    (void)fi;
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_SETATTR];
    long long now = (to_set & (FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)) ? now_ns() : 0;
    int atime = to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW);
    int mtime = to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW);
    /* (ino, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns), None for what stays */
    PyObject *r = PyObject_CallFunction(
        h, "KNNNNNNN", (unsigned long long)ino,
        opt_long(to_set & FUSE_SET_ATTR_MODE, attr->st_mode),
        opt_long(to_set & FUSE_SET_ATTR_UID, attr->st_uid),
        opt_long(to_set & FUSE_SET_ATTR_GID, attr->st_gid),
        opt_long(to_set & FUSE_SET_ATTR_SIZE, attr->st_size),
        opt_long(atime, (to_set & FUSE_SET_ATTR_ATIME_NOW) ? now : ns_of(&attr->st_atim)),
        opt_long(mtime, (to_set & FUSE_SET_ATTR_MTIME_NOW) ? now : ns_of(&attr->st_mtim)),
        opt_long(to_set & FUSE_SET_ATTR_CTIME, ns_of(&attr->st_ctim)));
    answer_attr(req, r, h);
    drain();
    PyGILState_Release(gil);
}

/* unlink and rmdir: handler(parent, name) -> 0 or -errno. */
static void answer_named(fuse_req_t req, int which, fuse_ino_t parent, const char *name)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[which];
    PyObject *r = PyObject_CallFunction(h, "Ky#", (unsigned long long)parent, name,
                                        (Py_ssize_t)strlen(name));
    if (!replied_error(req, r, h)) {  /* not an int: a wrong answer */
        Py_DECREF(r);
        reply_err(req, EIO);
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    answer_named(req, FAST_UNLINK, parent, name);
}

static void fast_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    answer_named(req, FAST_RMDIR, parent, name);
}

static void fast_rename(fuse_req_t req, fuse_ino_t parent, const char *name,
                        fuse_ino_t newparent, const char *newname, unsigned int flags)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_RENAME];
    PyObject *r = PyObject_CallFunction(h, "Ky#Ky#I", (unsigned long long)parent, name,
                                        (Py_ssize_t)strlen(name),
                                        (unsigned long long)newparent, newname,
                                        (Py_ssize_t)strlen(newname), flags);
    if (!replied_error(req, r, h)) {
        Py_DECREF(r);
        reply_err(req, EIO);
    }
    drain();
    PyGILState_Release(gil);
}

/* statfs: (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, namemax). */
static void fast_statfs(fuse_req_t req, fuse_ino_t ino)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_STATFS];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)ino);
    if (!replied_error(req, r, h)) {
        struct statvfs v;
        unsigned long bsize, frsize, namemax;
        unsigned long long blocks, bfree, bavail, files, ffree, favail;
        memset(&v, 0, sizeof v);
        if (!PyArg_ParseTuple(r, "kkKKKKKKk", &bsize, &frsize, &blocks, &bfree, &bavail,
                              &files, &ffree, &favail, &namemax)) {
            PyErr_WriteUnraisable(h);
            reply_err(req, EIO);
        } else {
            v.f_bsize = bsize;
            v.f_frsize = frsize;
            v.f_blocks = blocks;
            v.f_bfree = bfree;
            v.f_bavail = bavail;
            v.f_files = files;
            v.f_ffree = ffree;
            v.f_favail = favail;
            v.f_namemax = namemax;
            reply_statfs(req, &v);
        }
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)fi;
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_GETATTR];
    answer_attr(req, PyObject_CallFunction(h, "K", (unsigned long long)ino), h);
    drain();
    PyGILState_Release(gil);
}

/* Reply with the bytes of r (any buffer), or as an xattr answer when size_limit >= 0. */
static void reply_bytes(fuse_req_t req, PyObject *r, PyObject *h, long long size_limit)
{
    Py_buffer view;
    if (PyObject_GetBuffer(r, &view, PyBUF_SIMPLE) < 0) {
        PyErr_WriteUnraisable(h);
        reply_err(req, EIO);
        return;
    }
    if (size_limit == 0)
        reply_xattr(req, (size_t)view.len);
    else if (size_limit > 0 && view.len > size_limit)
        reply_err(req, ERANGE);
    else
        reply_buf(req, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
}

static void fast_readlink(fuse_req_t req, fuse_ino_t ino)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_READLINK];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)ino);
    if (!replied_error(req, r, h)) {
        const char *target = PyBytes_Check(r) ? PyBytes_AsString(r) : NULL;
        if (target == NULL) {
            PyErr_Clear();
            reply_err(req, EIO);
        } else {
            reply_readlink(req, target);
        }
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_GETXATTR];
    PyObject *r = PyObject_CallFunction(h, "Ky#", (unsigned long long)ino, name,
                                        (Py_ssize_t)strlen(name));
    if (!replied_error(req, r, h)) {
        reply_bytes(req, r, h, (long long)size);
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_listxattr(fuse_req_t req, fuse_ino_t ino, size_t size)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_LISTXATTR];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)ino);
    if (!replied_error(req, r, h)) {
        reply_bytes(req, r, h, (long long)size);
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

/* A handler of (fh, offset, size): read and readdir.  Called with the GIL held. */
static PyObject *call_ranged(PyObject *h, fuse_ino_t ino, off_t off, size_t size,
                             struct fuse_file_info *fi)
{
    unsigned long long fh = (fi != NULL && fi->fh != 0) ? fi->fh : ino;
    return PyObject_CallFunction(h, "KLn", fh, (long long)off, (Py_ssize_t)size);
}

static void fast_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_READ];
    PyObject *r = call_ranged(h, ino, off, size, fi);
    if (!replied_error(req, r, h)) {
        reply_bytes(req, r, h, -1);
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size,
                       off_t off, struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_WRITE];
    unsigned long long fh = (fi != NULL && fi->fh != 0) ? fi->fh : ino;
    PyObject *mv = PyMemoryView_FromMemory((char *)buf, (Py_ssize_t)size, PyBUF_READ);
    PyObject *r = mv == NULL ? NULL : PyObject_CallFunction(h, "KLO", fh, (long long)off, mv);
    if (mv != NULL) {
        /* The handler must not keep the view: release it now, so a kept one fails. */
        PyObject *rel = PyObject_CallMethod(mv, "release", NULL);
        Py_XDECREF(rel);
        if (rel == NULL)
            PyErr_Clear();
        Py_DECREF(mv);
    }
    if (r == NULL) {
        PyErr_WriteUnraisable(h);
        reply_err(req, EIO);
    } else {
        long long v = PyLong_AsLongLong(r);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(h);
            v = -EIO;
        }
        Py_DECREF(r);
        if (v < 0)
            reply_err(req, (int)-v);
        else
            reply_write(req, (size_t)v);
    }
    drain();
    PyGILState_Release(gil);
}

/* flush (each close): the handler answers 0 or -errno. */
static void fast_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_FLUSH];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)(fi && fi->fh ? fi->fh : ino));
    if (!replied_error(req, r, h)) {
        Py_DECREF(r);
        reply_err(req, 0);
    }
    drain();
    PyGILState_Release(gil);
}

/* release and releasedir: the handler (slot) is told the handle; the answer is always 0. */
static void fast_released(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi, int slot)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[slot];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)(fi ? fi->fh : ino));
    if (r == NULL)
        PyErr_WriteUnraisable(h);
    Py_XDECREF(r);
    reply_err(req, 0);
    drain();
    PyGILState_Release(gil);
}

static void fast_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fast_released(req, ino, fi, FAST_RELEASE);
}

/* opendir of a writable mount (its directory handles): the handler answers (handle,), or
 * -errno. */
static void fast_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_OPENDIR];
    PyObject *r = PyObject_CallFunction(h, "K", (unsigned long long)ino);
    if (!replied_error(req, r, h)) {
        unsigned long long fh = (unsigned long long)-1;
        if (PyTuple_Check(r) && PyTuple_GET_SIZE(r) == 1)
            fh = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(r, 0));
        else
            PyErr_SetString(PyExc_TypeError, "opendir answers (handle,) or -errno");
        Py_DECREF(r);
        if (PyErr_Occurred()) {
            PyErr_WriteUnraisable(h);
            reply_err(req, EIO);
        } else {
            fi->fh = fh;
            /* The kernel keeps the listing (FOPEN_CACHE_DIR) across opens (KEEP_CACHE)
             * and reads it again only after a change in the directory, which always
             * comes through the kernel (it bumps the directory's version): dbench lists
             * unchanged directories over and over, 2 READDIRPLUS a listing without. */
            fi->cache_readdir = 1;
            fi->keep_cache = 1;
            reply_open(req, fi);
        }
    }
    drain();
    PyGILState_Release(gil);
}

static void fast_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fast_released(req, ino, fi, FAST_RELEASEDIR);
}

static void fast_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_FORGET];
    PyObject *r = PyObject_CallFunction(h, "KK", (unsigned long long)ino,
                                        (unsigned long long)nlookup);
    if (r == NULL)
        PyErr_WriteUnraisable(h);
    Py_XDECREF(r);
    drain();
    PyGILState_Release(gil);
    reply_none(req);
}

static void fast_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *list)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_FORGET];
    for (size_t i = 0; i < count; i++) {
        PyObject *r = PyObject_CallFunction(h, "KK", (unsigned long long)list[i].ino,
                                            (unsigned long long)list[i].nlookup);
        if (r == NULL)
            PyErr_WriteUnraisable(h);
        Py_XDECREF(r);
    }
    drain();
    PyGILState_Release(gil);
    reply_none(req);
}

/* ENOSYS: the kernel does without this request from then on (OPEN, OPENDIR, FLUSH). */
static void shim_enosys(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    (void)fi;
    ANSWERED_HERE();
    reply_err(req, ENOSYS);
}

/* pyfuse3's own handlers of a writable mount with free opens: handle 0 becomes the inode. */
static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv,
                           off_t off, struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    pyfuse3_write_buf(req, ino, bufv, off, fi);
}

static void shim_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    pyfuse3_fsync(req, ino, datasync, fi);
}

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    if (fast[FAST_READ] != NULL)
        fast_read(req, ino, size, off, fi);
    else
        pyfuse3_read(req, ino, size, off, fi);
}

/* The entries of a readdir answer, (name, attributes, next offset) each, packed into buf
 * as READDIRPLUS wants them, as many as fit in size bytes: the bytes used, or -1 for an
 * entry that is not such a tuple. */
static Py_ssize_t pack_direntries(fuse_req_t req, PyObject *seq, char *buf, size_t size)
{
    size_t used = 0;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *attrs;
        const char *name;
        Py_ssize_t name_len;
        long long next;
        struct fuse_entry_param e;
        double timeout;
        memset(&e, 0, sizeof e);
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "y#OL", &name, &name_len,
                              &attrs, &next)
                || to_stat(attrs, &e.attr, &timeout) < 0
                || (Py_ssize_t)strlen(name) != name_len)
            return -1;
        e.ino = e.attr.st_ino;
        e.attr_timeout = timeout;
        e.entry_timeout = timeout;
        size_t need = add_direntry_plus(req, buf + used, size - used, name, &e, next);
        if (need > size - used)
            break;
        used += need;
    }
    return (Py_ssize_t)used;
}

/* READDIRPLUS answered by readdir(fh, offset, size) -> [(name, attributes, next offset)]
 * (or -errno): the entries from offset on, at least as many as fit in size bytes; those
 * that fit are sent.  Each counts as a lookup in the kernel, as with pyfuse3's
 * readdir_reply; only for mounts whose forget has nothing to release (read-only). */
static void fast_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    ANSWERED_HERE();
    PyObject *h = fast[FAST_READDIR];
    PyObject *r = call_ranged(h, ino, off, size, fi);
    if (!replied_error(req, r, h)) {
        char *buf = malloc(size ? size : 1);
        PyObject *seq = PySequence_Fast(r, "readdir must return a list");
        Py_ssize_t used = -1;
        if (buf != NULL && seq != NULL)
            used = pack_direntries(req, seq, buf, size);
        if (used < 0) {
            if (PyErr_Occurred())
                PyErr_WriteUnraisable(h);
            reply_err(req, EIO);
        } else {
            reply_buf(req, buf, (size_t)used);
        }
        Py_XDECREF(seq);
        free(buf);
        Py_DECREF(r);
    }
    drain();
    PyGILState_Release(gil);
}

static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    if (fi->fh == 0)
        fi->fh = ino;
    if (fast[FAST_READDIR] != NULL && add_direntry_plus != NULL)
        fast_readdirplus(req, ino, size, off, fi);
    else
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
    if (handles_are_inodes == FREE_OPENS_FILES)  /* O_TRUNC as a SETATTR: no OPEN to do it */
        conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
    /* The writeback cache: the kernel keeps written pages and sends them in batches (at the
     * latest on close, fsync and syncfs), keeping size and times itself and sending them
     * with SETATTR.  For a writable mount only: every change comes through this mount.
     * Unless configure() turned it off: with it, every close (FLUSH) marks the file's
     * block count stale, so the next stat of a file closed before asks the mount again. */
    if (handles_are_inodes == FREE_OPENS_FILES && writeback_cache
            && (conn->capable & FUSE_CAP_WRITEBACK_CACHE))
        conn->want |= FUSE_CAP_WRITEBACK_CACHE;
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
    reply_entry = dlsym(lib, "fuse_reply_entry");
    reply_create = dlsym(lib, "fuse_reply_create");
    reply_statfs = dlsym(lib, "fuse_reply_statfs");
    req_ctx = dlsym(lib, "fuse_req_ctx");
    reply_attr = dlsym(lib, "fuse_reply_attr");
    reply_readlink = dlsym(lib, "fuse_reply_readlink");
    reply_buf = dlsym(lib, "fuse_reply_buf");
    reply_write = dlsym(lib, "fuse_reply_write");
    reply_xattr = dlsym(lib, "fuse_reply_xattr");
    reply_none = dlsym(lib, "fuse_reply_none");
    reply_open = dlsym(lib, "fuse_reply_open");
    add_direntry_plus = dlsym(lib, "fuse_add_direntry_plus");
    session_fd = dlsym(lib, "fuse_session_fd");
    receive_buf = dlsym(lib, "fuse_session_receive_buf");
    process_buf = dlsym(lib, "fuse_session_process_buf");
    if (session_fd == NULL || process_buf == NULL)
        receive_buf = NULL;
    if (real == NULL)
        return NULL;
    struct fuse_lowlevel_ops ops;
    memset(&ops, 0, sizeof ops);
    memcpy(&ops, op, op_size < sizeof ops ? op_size : sizeof ops);
    if (lseek_handler != NULL && reply_lseek != NULL && reply_err != NULL)
        ops.lseek = shim_lseek;
    if (fallocate_handler != NULL && reply_err != NULL)
        ops.fallocate = shim_fallocate;
    if (reply_err != NULL && reply_entry != NULL && reply_attr != NULL && reply_readlink != NULL
            && reply_buf != NULL && reply_write != NULL && reply_xattr != NULL
            && reply_none != NULL) {
        if (fast[FAST_LOOKUP] != NULL) ops.lookup = fast_lookup;
        if (fast[FAST_GETATTR] != NULL) ops.getattr = fast_getattr;
        if (fast[FAST_READLINK] != NULL) ops.readlink = fast_readlink;
        if (fast[FAST_GETXATTR] != NULL) ops.getxattr = fast_getxattr;
        if (fast[FAST_LISTXATTR] != NULL) ops.listxattr = fast_listxattr;
        if (fast[FAST_READ] != NULL) ops.read = fast_read;
        if (fast[FAST_WRITE] != NULL) {
            ops.write = fast_write;
            ops.write_buf = NULL;
        }
        if (fast[FAST_FLUSH] != NULL) ops.flush = fast_flush;
        if (fast[FAST_RELEASE] != NULL) ops.release = fast_release;
        if (fast[FAST_OPENDIR] != NULL && fast[FAST_RELEASEDIR] != NULL && reply_open != NULL) {
            ops.opendir = fast_opendir;
            ops.releasedir = fast_releasedir;
        }
        if (fast[FAST_FORGET] != NULL) {
            ops.forget = fast_forget;
            ops.forget_multi = fast_forget_multi;
        }
        if (req_ctx != NULL) {
            if (fast[FAST_MKNOD] != NULL) ops.mknod = fast_mknod;
            if (fast[FAST_MKDIR] != NULL) ops.mkdir = fast_mkdir;
            if (fast[FAST_SYMLINK] != NULL) ops.symlink = fast_symlink;
            if (fast[FAST_CREATE] != NULL && reply_create != NULL) ops.create = fast_create;
        }
        if (fast[FAST_SETATTR] != NULL) ops.setattr = fast_setattr;
        if (fast[FAST_LINK] != NULL) ops.link = fast_link;
        if (fast[FAST_UNLINK] != NULL) ops.unlink = fast_unlink;
        if (fast[FAST_RMDIR] != NULL) ops.rmdir = fast_rmdir;
        if (fast[FAST_RENAME] != NULL) ops.rename = fast_rename;
        if (fast[FAST_STATFS] != NULL && reply_statfs != NULL) ops.statfs = fast_statfs;
    }
    if (setxattr_handler != NULL && reply_err != NULL)
        ops.setxattr = shim_setxattr;
    if (handles_are_inodes == FREE_OPENS_ALL && reply_err != NULL && ops.read != NULL
            && ops.readdirplus != NULL) {
        pyfuse3_read = ops.read;
        pyfuse3_readdirplus = ops.readdirplus;
        ops.open = shim_enosys;
        ops.opendir = shim_enosys;
        ops.read = shim_read;
        ops.readdirplus = shim_readdirplus;
        ops.readdir = NULL;
    }
    if (handles_are_inodes == FREE_OPENS_FILES && reply_err != NULL && ops.read != NULL
            && (ops.write != NULL || ops.write_buf != NULL) && ops.fsync != NULL) {
        pyfuse3_read = ops.read;
        ops.read = shim_read;
        if (ops.write_buf != NULL) {
            pyfuse3_write_buf = ops.write_buf;
            ops.write_buf = shim_write_buf;
        }
        /* FLUSH has nothing to do (pyfuse3's default answers ENOSYS too, without the trip
         * into Python); a close still has the kernel write the file's pages back and report
         * their error. */
        ops.flush = shim_enosys;
        pyfuse3_fsync = ops.fsync;
        ops.fsync = shim_fsync;
        ops.open = shim_enosys;
        /* Directory handles are real here; the handler counts each entry it answers as a
         * lookup and answers only what fits (FUSE_DIRENTPLUS_SIZE), so all are packed. */
        if (fast[FAST_READDIR] != NULL && add_direntry_plus != NULL && reply_buf != NULL)
            ops.readdirplus = fast_readdirplus;
    }
    pyfuse3_init = ops.init;
    ops.init = shim_init;
    installed = 1;
    the_session = real(args, &ops, sizeof ops, userdata);
    return the_session;
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
    PyObject *handler, *fallocate = Py_None, *setxattr = Py_None, *fast_handlers = Py_None;
    int symlinks, inodes, nomask = 0;  /* inodes: 0, FREE_OPENS_ALL or FREE_OPENS_FILES */
    int writeback = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "Opi|OOpOp", &handler, &symlinks, &inodes, &fallocate,
                          &setxattr, &nomask, &fast_handlers, &writeback))
        return NULL;
    if (fast_handlers != Py_None && !PyDict_Check(fast_handlers)) {
        PyErr_SetString(PyExc_TypeError, "fast handlers must be a dict or None");
        return NULL;
    }
    for (int i = 0; i < FAST_COUNT; i++) {
        PyObject *f = fast_handlers == Py_None ? NULL
                      : PyDict_GetItemString(fast_handlers, fast_names[i]);
        if (set_handler(&fast[i], f == NULL ? Py_None : f) < 0)
            return NULL;
    }
    dont_mask = nomask;
    if (set_handler(&lseek_handler, handler) < 0
            || set_handler(&fallocate_handler, fallocate) < 0
            || set_handler(&setxattr_handler, setxattr) < 0)
        return NULL;
    if (inodes < 0 || inodes > FREE_OPENS_FILES) {
        PyErr_SetString(PyExc_ValueError, "free opens: 0, 1 (all) or 2 (files)");
        return NULL;
    }
    cache_symlinks = symlinks;
    handles_are_inodes = inodes;
    writeback_cache = writeback;
    Py_RETURN_NONE;
}

static PyObject *set_drain_wait(PyObject *self, PyObject *args)
{
    long us, spin = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "l|l", &us, &spin))
        return NULL;
    if (us < 0 || us > 100000 || spin < 0 || spin > us) {
        PyErr_SetString(PyExc_ValueError, "the drain wait is 0 to 100000 microseconds, "
                                          "of which 0 to all are spent spinning");
        return NULL;
    }
    drain_wait_us = us;
    drain_spin_us = spin;
    Py_RETURN_NONE;
}

static PyObject *active(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(installed);
}

/* The version of the libfuse3.so.3 this process runs (pyfuse3's), or None. */
static PyObject *libfuse_version(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
    if (lib == NULL)
        Py_RETURN_NONE;
    const char *(*pkgversion)(void) = (const char *(*)(void))dlsym(lib, "fuse_pkgversion");
    const char *v = pkgversion == NULL ? NULL : pkgversion();
    PyObject *r = v == NULL ? Py_NewRef(Py_None) : PyUnicode_FromString(v);
    dlclose(lib);  /* the reference RTLD_NOLOAD took; pyfuse3 keeps its own */
    return r;
}

static PyObject *counts_dict(const unsigned long long *counts)
{
    PyObject *d = PyDict_New();
    for (int op = 0; d != NULL && op < OPCODES; op++) {
        if (counts[op] == 0)
            continue;
        PyObject *k = PyLong_FromLong(op), *v = PyLong_FromUnsignedLongLong(counts[op]);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0)
            Py_CLEAR(d);
        Py_XDECREF(k);
        Py_XDECREF(v);
    }
    return d;
}

static PyObject *request_counts(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return counts_dict(request_count);
}

static PyObject *coroutine_counts(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return counts_dict(coroutine_count);
}


static PyMethodDef methods[] = {
    {"coroutine_counts", coroutine_counts, METH_NOARGS,
     "{FUSE opcode: requests answered by pyfuse3's coroutines, not here} since the mount began"},
    {"request_counts", request_counts, METH_NOARGS,
     "{FUSE opcode: requests served} since the mount began (0: an unknown opcode)"},
    {"configure", configure, METH_VARARGS,
     "configure(lseek, cache_symlinks, handles_are_inodes[, fallocate[, setxattr[, "
     "dont_mask[, fast[, writeback_cache]]]]]): before pyfuse3.init(); fast: {request "
     "name: callable}; writeback_cache: whether a writable mount asks for it (default)"},
    {"set_drain_wait", set_drain_wait, METH_VARARGS,
     "set_drain_wait(microseconds[, spinning]): how long a drain waits for the next "
     "request, and for how much of that it polls without sleeping"},
    {"active", active, METH_NOARGS,
     "True once pyfuse3's fuse_session_new() call went through this module"},
    {"libfuse_version", libfuse_version, METH_NOARGS,
     "the version of the loaded libfuse3.so.3 (fuse_pkgversion()), or None if not loaded"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "imagefs.mount._fuseshim",
    "lseek, fallocate, setxattr flags, symlink caching and fast paths beneath pyfuse3 "
    "(docs/shim.md)", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* API: see SHIM_API.  LIBFUSE_HEADERS: the libfuse headers this build was compiled
     * with (its struct layouts), "major.minor". */
    if (PyModule_AddIntConstant(m, "API", SHIM_API) < 0
            || PyModule_AddStringConstant(m, "LIBFUSE_HEADERS",
                                          SHIM_XSTR(FUSE_MAJOR_VERSION) "."
                                          SHIM_XSTR(FUSE_MINOR_VERSION)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
