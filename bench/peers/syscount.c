/*
 * syscount: an LD_PRELOAD shim that counts the write-family calls a server makes on its sockets,
 * so the fan-out bench can report "socket writes per frame" for every target, not only for the
 * ones that keep their own counter (gochat, the C floor).
 *
 *   BENCH_SYSCOUNT_DIR=/some/dir LD_PRELOAD=/path/libsyscount.so server ...
 *
 * Every process that loads the shim with BENCH_SYSCOUNT_DIR set creates DIR/<pid>.cnt (one page),
 * maps it MAP_SHARED and counts into it with relaxed atomics: the bench reads (or maps) the file
 * at any time, no signal, no cooperation from the server. A child that forks without exec keeps
 * counting into its parent's page; one that execs (and keeps the environment) gets its own file.
 * The reader sums all files of the directory.
 *
 * Interposed (dlsym(RTLD_NEXT)): write, writev, send, sendto, sendmsg, sendmmsg. A call is counted
 * as a socket write when its fd is a socket (fstat S_ISSOCK, cached per fd in a byte array). The
 * cache entry of an fd is reset when the process closes it or gets it back from socket, accept,
 * accept4, socketpair, dup, dup2, dup3 (all interposed too), so a reused fd number is looked at
 * again. Calls on other fds (eventfds, pipes, log files) are counted apart ("other").
 *
 * What it cannot see: syscalls that do not go through libc's exported symbols: Go binaries
 * (nats-server) issue theirs directly; libc's internal calls (e.g. fclose's close) bypass the
 * PLT, which is why fds returned by the socket-creating calls are re-checked.
 *
 * Build: cc -O2 -shared -fPIC -o libsyscount.so syscount.c -ldl   (the bench builds it itself).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* The shared page. Layout (little endian u64s), read by bench/syscount.py: */
enum { C_WRITE, C_WRITEV, C_SEND, C_SENDTO, C_SENDMSG, C_SENDMMSG, C_NCALLS };
struct counters {
    char magic[8];               /* "SYSCNT01" */
    uint64_t pid;
    uint64_t calls[C_NCALLS];    /* socket write calls, per function */
    uint64_t bytes;              /* bytes the kernel took (sum of positive returns; sendmmsg: 0) */
    uint64_t eagain;             /* socket write calls that returned EAGAIN/EWOULDBLOCK */
    uint64_t other;              /* write-family calls on fds that are not sockets */
    uint64_t msgs;               /* messages sent by sendmmsg calls (each call is one syscall) */
};

static struct counters dummy;    /* until (or unless) the page is mapped */
static struct counters *cnt = &dummy;

#define CACHE 65536              /* fds below this are cached; above: fstat on every call */
enum { UNKNOWN = 0, SOCK = 1, NOTSOCK = 2 };
static uint8_t kind[CACHE];

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_writev)(int, const struct iovec *, int);
static ssize_t (*real_send)(int, const void *, size_t, int);
static ssize_t (*real_sendto)(int, const void *, size_t, int, const struct sockaddr *, socklen_t);
static ssize_t (*real_sendmsg)(int, const struct msghdr *, int);
static int (*real_sendmmsg)(int, struct mmsghdr *, unsigned int, int);
static int (*real_close)(int);
static int (*real_socket)(int, int, int);
static int (*real_socketpair)(int, int, int, int[2]);
static int (*real_accept)(int, struct sockaddr *, socklen_t *);
static int (*real_accept4)(int, struct sockaddr *, socklen_t *, int);
static int (*real_dup)(int);
static int (*real_dup2)(int, int);
static int (*real_dup3)(int, int, int);

#define RESOLVE(name)                                                                 \
    do {                                                                              \
        if (!real_##name) real_##name = (__typeof__(real_##name))dlsym(RTLD_NEXT, #name); \
    } while (0)

static void add(uint64_t *p, uint64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

static void forget(int fd) {
    if (fd >= 0 && fd < CACHE) __atomic_store_n(&kind[fd], UNKNOWN, __ATOMIC_RELAXED);
}

static int is_socket(int fd) {
    if (fd < 0) return 0;
    uint8_t k = fd < CACHE ? __atomic_load_n(&kind[fd], __ATOMIC_RELAXED) : UNKNOWN;
    if (k == UNKNOWN) {
        struct stat st;
        int saved = errno;
        k = (fstat(fd, &st) == 0 && S_ISSOCK(st.st_mode)) ? SOCK : NOTSOCK;
        errno = saved;
        if (fd < CACHE) __atomic_store_n(&kind[fd], k, __ATOMIC_RELAXED);
    }
    return k == SOCK;
}

/* Count one call on fd that returned r (errno as the call left it). */
static void count(int which, int fd, ssize_t r) {
    int saved = errno;
    if (is_socket(fd)) {
        add(&cnt->calls[which], 1);
        if (r > 0 && which != C_SENDMMSG) add(&cnt->bytes, (uint64_t)r);
        else if (r < 0 && (saved == EAGAIN || saved == EWOULDBLOCK)) add(&cnt->eagain, 1);
    } else {
        add(&cnt->other, 1);
    }
    errno = saved;
}

__attribute__((constructor)) static void syscount_init(void) {
    RESOLVE(write); RESOLVE(writev); RESOLVE(send); RESOLVE(sendto); RESOLVE(sendmsg);
    RESOLVE(sendmmsg); RESOLVE(close); RESOLVE(socket); RESOLVE(socketpair); RESOLVE(accept);
    RESOLVE(accept4); RESOLVE(dup); RESOLVE(dup2); RESOLVE(dup3);
    const char *dir = getenv("BENCH_SYSCOUNT_DIR");
    if (!dir || !*dir) return;
    char path[4096];
    snprintf(path, sizeof path, "%s/%d.cnt", dir, (int)getpid());
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    long page = sysconf(_SC_PAGESIZE);
    size_t size = (size_t)(page > 0 ? page : 4096);
    /* same pid again (taskset exec'ing the server): keep the page, it only grows */
    if (ftruncate(fd, (off_t)size) == 0) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p != MAP_FAILED) {
            struct counters *c = p;
            c->pid = (uint64_t)getpid();
            memcpy(c->magic, "SYSCNT01", 8);
            cnt = c;
        }
    }
    real_close(fd);
}

/* ---- counted ---------------------------------------------------------------------------- */
ssize_t write(int fd, const void *buf, size_t n) {
    RESOLVE(write);
    ssize_t r = real_write(fd, buf, n);
    count(C_WRITE, fd, r);
    return r;
}

ssize_t writev(int fd, const struct iovec *iov, int iovcnt) {
    RESOLVE(writev);
    ssize_t r = real_writev(fd, iov, iovcnt);
    count(C_WRITEV, fd, r);
    return r;
}

ssize_t send(int fd, const void *buf, size_t n, int flags) {
    RESOLVE(send);
    ssize_t r = real_send(fd, buf, n, flags);
    count(C_SEND, fd, r);
    return r;
}

ssize_t sendto(int fd, const void *buf, size_t n, int flags, const struct sockaddr *addr, socklen_t alen) {
    RESOLVE(sendto);
    ssize_t r = real_sendto(fd, buf, n, flags, addr, alen);
    count(C_SENDTO, fd, r);
    return r;
}

ssize_t sendmsg(int fd, const struct msghdr *msg, int flags) {
    RESOLVE(sendmsg);
    ssize_t r = real_sendmsg(fd, msg, flags);
    count(C_SENDMSG, fd, r);
    return r;
}

int sendmmsg(int fd, struct mmsghdr *vec, unsigned int vlen, int flags) {
    RESOLVE(sendmmsg);
    int r = real_sendmmsg(fd, vec, vlen, flags);
    count(C_SENDMMSG, fd, r);
    if (r > 0) {
        int saved = errno;
        add(&cnt->msgs, (uint64_t)r);
        errno = saved;
    }
    return r;
}

/* ---- fd lifetime: forget what we knew about a number that is closed or handed out again ---- */
int close(int fd) {
    RESOLVE(close);
    int r = real_close(fd);
    forget(fd);
    return r;
}

int socket(int domain, int type, int protocol) {
    RESOLVE(socket);
    int fd = real_socket(domain, type, protocol);
    forget(fd);
    return fd;
}

int socketpair(int domain, int type, int protocol, int sv[2]) {
    RESOLVE(socketpair);
    int r = real_socketpair(domain, type, protocol, sv);
    if (r == 0) { forget(sv[0]); forget(sv[1]); }
    return r;
}

int accept(int fd, struct sockaddr *addr, socklen_t *alen) {
    RESOLVE(accept);
    int c = real_accept(fd, addr, alen);
    forget(c);
    return c;
}

int accept4(int fd, struct sockaddr *addr, socklen_t *alen, int flags) {
    RESOLVE(accept4);
    int c = real_accept4(fd, addr, alen, flags);
    forget(c);
    return c;
}

int dup(int fd) {
    RESOLVE(dup);
    int r = real_dup(fd);
    forget(r);
    return r;
}

int dup2(int fd, int fd2) {
    RESOLVE(dup2);
    int r = real_dup2(fd, fd2);
    forget(fd2);
    return r;
}

int dup3(int fd, int fd2, int flags) {
    RESOLVE(dup3);
    int r = real_dup3(fd, fd2, flags);
    forget(fd2);
    return r;
}
