/*
 * cfloor: the floor for the fan-out benchmark. A minimal single-threaded epoll WebSocket
 * broadcast server in C: every binary message a client sends is broadcast, as is, to every
 * other open connection, in connection order.
 *
 *   cfloor PORT [--coalesce] [--relay]   (PORT 0 picks a free port; prints "listening PORT")
 *   kill -USR1 PID                  prints "counters writes=W frames=F" (send(2) calls, frames)
 *
 * --relay: the floor for the direct-message benchmark instead, with the protocol of
 * bench/peers/websockets_peer.py --relay: a connection's first message is its id (u32 LE); every
 * later message [u32 LE destination id][payload] is forwarded, as is, to the connection with
 * that id. Nothing is stored.
 *
 * Default mode: one send(2) per message per socket, the moment the message is read ("one frame
 * per message per socket"). --coalesce: frames are appended to per-connection buffers while one
 * epoll batch is processed, and each dirty connection gets ONE send(2) at the end of the batch
 * (the same per-tick coalescing gochat's FanoutWriter does). Only what a broadcast needs is
 * implemented: the upgrade handshake (SHA-1 + base64), masked client frames, close. Not a
 * general-purpose server: no fragmentation, no ping from the server side, no TLS.
 *
 * Build: cc -O2 -o cfloor cfloor.c   (the bench builds it itself into bench/build/).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- SHA-1 (RFC 3174), enough for Sec-WebSocket-Accept ---------------------------------- */
typedef struct { uint32_t h[5]; uint64_t len; uint8_t buf[64]; size_t n; } sha1_ctx;
#define ROL(x, n) (((x) << (n)) | ((x) >> (32 - (n))))
static void sha1_block(sha1_ctx *c, const uint8_t *p) {
    uint32_t w[80], a, b, d, e, f, k, t, cc;
    for (int i = 0; i < 16; i++) w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
    for (int i = 16; i < 80; i++) w[i] = ROL(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3]; e = c->h[4];
    for (int i = 0; i < 80; i++) {
        if (i < 20) { f = (b & cc) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ cc ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & cc) | (b & d) | (cc & d); k = 0x8F1BBCDC; }
        else { f = b ^ cc ^ d; k = 0xCA62C1D6; }
        t = ROL(a, 5) + f + e + k + w[i]; e = d; d = cc; cc = ROL(b, 30); b = a; a = t;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d; c->h[4] += e;
}
static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
    sha1_ctx c = {{0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0}, 0, {0}, 0};
    uint8_t tail[128]; size_t full = len & ~(size_t)63, rem = len - full, tl;
    for (size_t i = 0; i < full; i += 64) sha1_block(&c, data + i);
    memset(tail, 0, sizeof tail); memcpy(tail, data + full, rem); tail[rem] = 0x80;
    tl = rem + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++) tail[tl - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha1_block(&c, tail); if (tl == 128) sha1_block(&c, tail + 64);
    for (int i = 0; i < 5; i++) { out[4*i] = c.h[i] >> 24; out[4*i+1] = c.h[i] >> 16; out[4*i+2] = c.h[i] >> 8; out[4*i+3] = c.h[i]; }
}
static void b64(const uint8_t *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i+1] << 8 : 0) | (i + 2 < n ? in[i+2] : 0);
        out[o++] = t[(v >> 18) & 63]; out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < n ? t[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? t[v & 63] : '=';
    }
    out[o] = 0;
}

/* ---- connections ------------------------------------------------------------------------ */
typedef struct { char *p; size_t len, cap; } buf_t;
typedef struct conn {
    int fd, upgraded, dirty, want_out, closed;
    int64_t id;                 /* --relay: the id from the first message; -1 until then */
    buf_t in, out;
} conn_t;

#define MAX_RELAY_ID (1 << 20)
static conn_t **by_id;          /* --relay: id -> conn */
static int relay;

static conn_t **by_fd;          /* fd -> conn */
static int *order;              /* open upgraded fds in connection order */
static int norder;
static int *dirty_list, ndirty;
static int coalesce, epfd;
static unsigned long long n_writes, n_frames;
static volatile sig_atomic_t dump_counters;
static void on_usr1(int sig) { (void)sig; dump_counters = 1; }

static void buf_put(buf_t *b, const void *d, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        b->p = realloc(b->p, cap); b->cap = cap;
        if (!b->p) { perror("realloc"); exit(1); }
    }
    memcpy(b->p + b->len, d, n); b->len += n;
}
static void buf_drop(buf_t *b, size_t n) {
    memmove(b->p, b->p + n, b->len - n); b->len -= n;
}

static void set_out_interest(conn_t *c, int on) {
    if (c->want_out == on) return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = on;
}

static void conn_close(conn_t *c) {
    if (c->closed) return;
    c->closed = 1;
    if (c->upgraded) {
        for (int i = 0; i < norder; i++) if (order[i] == c->fd) {
            memmove(order + i, order + i + 1, (size_t)(norder - i - 1) * sizeof(int)); norder--; break;
        }
    }
    if (relay && c->id >= 0 && by_id[c->id] == c) by_id[c->id] = NULL;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    /* freed after the batch (it may still be on the dirty list) */
}

static void conn_flush(conn_t *c) {
    c->dirty = 0;
    if (c->closed || c->out.len == 0) return;
    ssize_t w = send(c->fd, c->out.p, c->out.len, MSG_NOSIGNAL);
    n_writes++;
    if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) { set_out_interest(c, 1); return; }
        conn_close(c); return;
    }
    buf_drop(&c->out, (size_t)w);
    set_out_interest(c, c->out.len > 0);
}

/* Queue one server frame (binary, unmasked) to c. */
static void send_frame(conn_t *c, const uint8_t *payload, size_t n) {
    uint8_t h[10]; size_t hl;
    h[0] = 0x82;
    if (n < 126) { h[1] = (uint8_t)n; hl = 2; }
    else if (n < 65536) { h[1] = 126; h[2] = n >> 8; h[3] = n & 255; hl = 4; }
    else { h[1] = 127; for (int i = 0; i < 8; i++) h[2 + i] = (uint8_t)((uint64_t)n >> (56 - 8 * i)); hl = 10; }
    n_frames++;
    if (!coalesce && c->out.len == 0) {
        /* one send per frame per socket: header and payload in one buffer, one syscall */
        uint8_t tmp[10 + 4096];
        if (n <= 4096) {
            memcpy(tmp, h, hl); memcpy(tmp + hl, payload, n);
            ssize_t w = send(c->fd, tmp, hl + n, MSG_NOSIGNAL);
            n_writes++;
            if (w == (ssize_t)(hl + n)) return;
            if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) { conn_close(c); return; }
            if (w < 0) w = 0;
            buf_put(&c->out, tmp + w, hl + n - (size_t)w);
            set_out_interest(c, 1);
            return;
        }
    }
    buf_put(&c->out, h, hl); buf_put(&c->out, payload, n);
    if (coalesce && !c->dirty && !c->want_out) { c->dirty = 1; dirty_list[ndirty++] = c->fd; }
}

static void broadcast(conn_t *from, const uint8_t *payload, size_t n) {
    for (int i = 0; i < norder; i++) {
        conn_t *c = by_fd[order[i]];
        if (c != from && !c->closed) send_frame(c, payload, n);
    }
}

/* --relay: the first message names the connection, later ones are forwarded to their id. */
static void relay_message(conn_t *c, const uint8_t *payload, size_t n) {
    if (n < 4) return;
    uint32_t id = (uint32_t)payload[0] | (uint32_t)payload[1] << 8 | (uint32_t)payload[2] << 16
                  | (uint32_t)payload[3] << 24;
    if (id >= MAX_RELAY_ID) return;
    if (c->id < 0) { c->id = id; by_id[id] = c; return; }
    conn_t *to = by_id[id];
    if (to && !to->closed) send_frame(to, payload, n);
}

static int handshake(conn_t *c) {
    char *end = memmem(c->in.p, c->in.len, "\r\n\r\n", 4);
    if (!end) return c->in.len > 8192 ? -1 : 0;
    size_t hdr_len = (size_t)(end - c->in.p) + 4;
    char key[128] = {0};
    const char *k = memmem(c->in.p, hdr_len, "Sec-WebSocket-Key:", 18);
    if (!k) k = memmem(c->in.p, hdr_len, "sec-websocket-key:", 18);
    if (!k) return -1;
    k += 18; while (*k == ' ') k++;
    size_t kl = 0; while (k[kl] != '\r' && kl < 100) kl++;
    memcpy(key, k, kl);
    memcpy(key + kl, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    uint8_t dig[20]; char acc[40];
    sha1((uint8_t *)key, kl + 36, dig); b64(dig, 20, acc);
    char resp[256];
    int rl = snprintf(resp, sizeof resp,
                      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
    if (send(c->fd, resp, (size_t)rl, MSG_NOSIGNAL) != rl) return -1;
    buf_drop(&c->in, hdr_len);
    c->upgraded = 1;
    order[norder++] = c->fd;
    return 1;
}

/* Parse complete client frames in c->in; broadcast binary ones. */
static void on_frames(conn_t *c) {
    size_t off = 0;
    uint8_t *p = (uint8_t *)c->in.p;
    while (c->in.len - off >= 2) {
        uint8_t *f = p + off;
        size_t avail = c->in.len - off, hl = 2;
        int op = f[0] & 15, masked = f[1] >> 7;
        uint64_t n = f[1] & 127;
        if (n == 126) { if (avail < 4) break; n = (uint64_t)f[2] << 8 | f[3]; hl = 4; }
        else if (n == 127) { if (avail < 10) break; n = 0; for (int i = 0; i < 8; i++) n = n << 8 | f[2 + i]; hl = 10; }
        if (masked) hl += 4;
        if (avail < hl + n) break;
        uint8_t *payload = f + hl;
        if (masked) {
            const uint8_t *m = f + hl - 4;
            if (m[0] | m[1] | m[2] | m[3]) for (uint64_t i = 0; i < n; i++) payload[i] ^= m[i & 3];
        }
        if ((op == 2 || op == 1) && relay) relay_message(c, payload, (size_t)n);
        else if (op == 2 || op == 1) broadcast(c, payload, (size_t)n);
        else if (op == 8) { conn_close(c); return; }
        else if (op == 9) { uint8_t h[2] = {0x8A, 0}; buf_put(&c->out, h, 2); conn_flush(c); }
        off += hl + n;
    }
    if (off) buf_drop(&c->in, off);
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--coalesce")) coalesce = 1;
        if (!strcmp(argv[i], "--relay")) relay = 1;
    }
    by_id = calloc(MAX_RELAY_ID, sizeof *by_id);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_usr1}; sigaction(SIGUSR1, &sa, NULL);  /* no SA_RESTART */
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    int maxfd = (int)rl.rlim_cur + 16;
    by_fd = calloc((size_t)maxfd, sizeof *by_fd); order = calloc((size_t)maxfd, sizeof(int));
    dirty_list = calloc((size_t)maxfd, sizeof(int));

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); return 1; }
    socklen_t al = sizeof a; getsockname(ls, (struct sockaddr *)&a, &al);
    printf("listening %d\n", ntohs(a.sin_port)); fflush(stdout);

    epfd = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, evs[1024];
    epoll_ctl(epfd, EPOLL_CTL_ADD, ls, &ev);
    conn_t *to_free[1024]; int nfree;
    uint8_t rbuf[65536];
    for (;;) {
        int n = epoll_wait(epfd, evs, 1024, -1);
        if (dump_counters) {
            dump_counters = 0;
            printf("counters writes=%llu frames=%llu\n", n_writes, n_frames); fflush(stdout);
        }
        if (n < 0) { if (errno == EINTR) continue; perror("epoll_wait"); return 1; }
        nfree = 0;
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    if (cfd >= maxfd) { close(cfd); continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c); c->fd = cfd; c->id = -1; by_fd[cfd] = c;
                    struct epoll_event ce = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, cfd, &ce);
                }
                continue;
            }
            conn_t *c = by_fd[fd];
            if (!c || c->closed) continue;
            if (evs[i].events & EPOLLOUT) conn_flush(c);
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = recv(fd, rbuf, sizeof rbuf, 0);
                if (r <= 0) {
                    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
                    conn_close(c);
                } else {
                    buf_put(&c->in, rbuf, (size_t)r);
                    if (!c->upgraded) {
                        int h = handshake(c);
                        if (h < 0) conn_close(c);
                        else if (h > 0) on_frames(c);
                    } else {
                        on_frames(c);
                    }
                }
            }
            if (c->closed && nfree < 1024) to_free[nfree++] = c;
        }
        for (int i = 0; i < ndirty; i++) { conn_t *c = by_fd[dirty_list[i]]; if (c) conn_flush(c); }
        ndirty = 0;
        for (int i = 0; i < nfree; i++) {
            conn_t *c = to_free[i];
            if (by_fd[c->fd] == c) by_fd[c->fd] = NULL;
            free(c->in.p); free(c->out.p); free(c);
        }
    }
}
