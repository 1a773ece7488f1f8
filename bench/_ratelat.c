/* ratelat: a fixed-rate, open-loop HTTP/1.1 load generator for latency measurements.
 *
 * wrk sends the next request on a connection as soon as the previous answer arrives
 * (closed loop), so it has no rate control and hides stalls (coordinated omission);
 * Debian has no wrk2. This program schedules request k at t0 + k/rate, whatever
 * happened before, sends it on an idle keep-alive connection of a fixed pool (or as
 * soon as one becomes idle), and measures its latency from the *scheduled* time to the
 * last byte of the answer (the "corrected" latency, as wrk2 does) and, second figure,
 * from the moment it was actually written. The run ends at most TIMEOUT_S after the last
 * scheduled send: requests not sent or not answered by then count as failed.
 *
 * One thread, epoll with microsecond timeouts (epoll_pwait2), OpenSSL for TLS (no
 * verification of the server, like wrk; optional client certificate for mTLS). Bodies
 * with Content-Length or chunked transfer coding are understood. The bench scripts
 * compile it with gcc (bench/_common.py: build_ratelat) and parse its key=value output.
 *
 * usage: ratelat -a HOST -p PORT [-s] [-c CHAIN -k KEY] [-P PATH] [-H 'Name: value']...
 *                [-F FILE] -r RATE -d SECONDS [-n CONNECTIONS] [-t TIMEOUT_S]
 * -F: one header line per line of FILE; request k carries line k mod N (e.g. N distinct
 * bearer tokens, so a server's token cache cannot answer every request).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUF 65536

typedef struct {
    int fd;
    SSL *ssl;
    int busy;
    long req;            /* index of the outstanding request */
    double sent;         /* when it was written */
    char buf[BUF];
    size_t len;
} conn_t;

static const char *host = "127.0.0.1", *path = "/", *chain = NULL, *keyfile = NULL;
static int port = 0, use_tls = 0, nconn = 16;
static double rate = 500, duration = 10, timeout_s = 5;
static char **requests;
static size_t *request_lens;
static long nrequests = 1;
static SSL_CTX *ctx;
static long non2xx, reconnects;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what) {
    fprintf(stderr, "ratelat: %s: %s\n", what, strerror(errno));
    ERR_print_errors_fp(stderr);
    exit(1);
}

static void open_conn(conn_t *c) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) die("bad address (IPv4 only)");
    c->fd = socket(AF_INET, SOCK_STREAM, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(c->fd, (struct sockaddr *)&sa, sizeof sa) != 0) die("connect");
    c->ssl = NULL;
    if (use_tls) {
        c->ssl = SSL_new(ctx);
        SSL_set_fd(c->ssl, c->fd);
        if (SSL_connect(c->ssl) != 1) die("TLS handshake");
    }
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    c->busy = 0;
    c->len = 0;
}

static void close_conn(conn_t *c) {
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    close(c->fd);
}

/* Write the whole request; waits (rarely) when the socket buffer is full. */
static int send_all(conn_t *c) {
    const char *request = requests[c->req % nrequests];
    size_t request_len = request_lens[c->req % nrequests];
    size_t off = 0;
    while (off < request_len) {
        long n;
        if (c->ssl) {
            n = SSL_write(c->ssl, request + off, (int)(request_len - off));
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, (int)n);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) continue;
                return -1;
            }
        } else {
            n = write(c->fd, request + off, request_len - off);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                return -1;
            }
        }
        off += (size_t)n;
    }
    return 0;
}

/* Read what is available. Returns bytes read, 0 when nothing more now, -1 on close/error. */
static long read_some(conn_t *c) {
    long total = 0;
    for (;;) {
        if (c->len == BUF) return -1; /* an answer larger than the buffer: not ours */
        long n;
        if (c->ssl) {
            n = SSL_read(c->ssl, c->buf + c->len, (int)(BUF - c->len));
            if (n <= 0) {
                int e = SSL_get_error(c->ssl, (int)n);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return total;
                return -1;
            }
        } else {
            n = read(c->fd, c->buf + c->len, BUF - c->len);
            if (n == 0) return -1;
            if (n < 0) return (errno == EAGAIN || errno == EINTR) ? total : -1;
        }
        c->len += (size_t)n;
        total += n;
    }
}

/* Length of a complete answer at the start of buf (0: incomplete); *status gets the code. */
static size_t complete_answer(const char *buf, size_t len, int *status) {
    const char *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) return 0;
    size_t head = (size_t)(end - buf) + 4;
    if (len < 12) return 0;
    *status = atoi(buf + 9);
    long clen = -1;
    int chunked = 0;
    for (const char *p = buf; p < end;) {
        const char *eol = memmem(p, (size_t)(end - p) + 2, "\r\n", 2);
        if (!eol) break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0)
            clen = atol(p + 15);
        else if ((size_t)(eol - p) > 18 && strncasecmp(p, "transfer-encoding:", 18) == 0 &&
                 memmem(p, (size_t)(eol - p), "chunked", 7))
            chunked = 1;
        p = eol + 2;
    }
    if (chunked) {
        size_t pos = head;
        for (;;) {
            const char *eol = memmem(buf + pos, len - pos, "\r\n", 2);
            if (!eol) return 0;
            long size = strtol(buf + pos, NULL, 16);
            pos = (size_t)(eol - buf) + 2;
            if (size == 0) { /* last chunk; no trailers expected */
                return len >= pos + 2 ? pos + 2 : 0;
            }
            if (len < pos + (size_t)size + 2) return 0;
            pos += (size_t)size + 2;
        }
    }
    if (clen < 0) clen = 0;
    return len >= head + (size_t)clen ? head + (size_t)clen : 0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(const double *v, long n, double q) {
    if (n == 0) return -1;
    long i = (long)(q / 100.0 * (double)(n - 1) + 0.5);
    return v[i < n ? i : n - 1];
}

int main(int argc, char **argv) {
    const char *headers[64], *rotate = NULL;
    int nheaders = 0, opt;
    while ((opt = getopt(argc, argv, "a:p:sc:k:P:H:F:r:d:n:t:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 's': use_tls = 1; break;
        case 'c': chain = optarg; break;
        case 'k': keyfile = optarg; break;
        case 'P': path = optarg; break;
        case 'H': if (nheaders < 64) headers[nheaders++] = optarg; break;
        case 'F': rotate = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'n': nconn = atoi(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        default: fprintf(stderr, "see the usage at the top of _ratelat.c\n"); return 2;
        }
    }
    if (port <= 0 || rate <= 0 || duration <= 0 || nconn <= 0) {
        fprintf(stderr, "ratelat: -p PORT, -r RATE > 0, -d SECONDS > 0 are required\n");
        return 2;
    }
    char head[16384];
    int off = snprintf(head, sizeof head, "GET %s HTTP/1.1\r\nHost: %s:%d\r\n", path, host,
                       port);
    for (int i = 0; i < nheaders && off < (int)sizeof head; i++)
        off += snprintf(head + off, sizeof head - (size_t)off, "%s\r\n", headers[i]);
    char **lines = NULL;
    if (rotate) { /* one request per line of the file */
        FILE *f = fopen(rotate, "r");
        if (!f) die(rotate);
        size_t cap = 0;
        nrequests = 0;
        char *line = NULL;
        size_t lcap = 0;
        ssize_t got;
        while ((got = getline(&line, &lcap, f)) > 0) {
            while (got > 0 && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
            if (got == 0) continue;
            if ((size_t)nrequests == cap) {
                cap = cap ? cap * 2 : 1024;
                lines = realloc(lines, cap * sizeof(char *));
            }
            lines[nrequests++] = strdup(line);
        }
        fclose(f);
        free(line);
        if (nrequests == 0) {
            fprintf(stderr, "ratelat: %s has no lines\n", rotate);
            return 2;
        }
    }
    requests = malloc(sizeof(char *) * (size_t)nrequests);
    request_lens = malloc(sizeof(size_t) * (size_t)nrequests);
    for (long i = 0; i < nrequests; i++) {
        const char *extra = lines ? lines[i] : NULL;
        size_t cap = (size_t)off + (extra ? strlen(extra) : 0) + 8;
        requests[i] = malloc(cap);
        int n = snprintf(requests[i], cap, "%.*s%s%s\r\n", off, head, extra ? extra : "",
                         extra ? "\r\n" : "");
        request_lens[i] = (size_t)n;
    }
    if (use_tls) {
        ctx = SSL_CTX_new(TLS_client_method());
        if (chain && (SSL_CTX_use_certificate_chain_file(ctx, chain) != 1 ||
                      SSL_CTX_use_PrivateKey_file(ctx, keyfile, SSL_FILETYPE_PEM) != 1))
            die("client certificate");
    }
    prctl(PR_SET_TIMERSLACK, 1UL); /* wake up on time (default slack: 50 us) */
    conn_t *conns = calloc((size_t)nconn, sizeof(conn_t));
    int *idle = malloc(sizeof(int) * (size_t)nconn), nidle = 0;
    int ep = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        open_conn(&conns[i]);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, conns[i].fd, &ev);
        idle[nidle++] = i;
    }
    long total = (long)(rate * duration);
    double *lat = malloc(sizeof(double) * (size_t)total);
    double *raw = malloc(sizeof(double) * (size_t)total);
    long done = 0, sent = 0, backlog_max = 0;
    double t0 = now() + 0.05, late_max = 0;
    struct epoll_event events[256];
    double deadline = t0 + duration + timeout_s; /* an overloaded server cannot stretch the run */
    for (;;) {
        double t = now();
        if (t > deadline) break; /* what is unsent or unanswered by now counts as failed */
        long due = t < t0 ? 0 : (long)((t - t0) * rate) + 1;
        if (due > total) due = total;
        if (due - sent > backlog_max) backlog_max = due - sent;
        while (sent < due && nidle > 0) {
            conn_t *c = &conns[idle[--nidle]];
            double intended = t0 + (double)sent / rate;
            c->busy = 1;
            c->req = sent;
            c->sent = now();
            if (c->sent - intended > late_max) late_max = c->sent - intended;
            if (send_all(c) != 0) { /* the request is lost: counted in failed */
                c->busy = 0;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close_conn(c);
                open_conn(c);
                reconnects++;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)(c - conns)};
                epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                idle[nidle++] = (int)(c - conns);
            }
            sent++;
        }
        if (sent >= total && nidle == nconn) break;
        double wait;
        if (sent < total && nidle > 0) {
            wait = t0 + (double)sent / rate - now();
            if (wait < 0) wait = 0;
        } else {
            wait = timeout_s;
        }
        double left = deadline - now();
        if (wait > left) wait = left > 0 ? left : 0;
        struct timespec ts = {.tv_sec = (time_t)wait,
                              .tv_nsec = (long)((wait - (double)(time_t)wait) * 1e9)};
        int n = epoll_pwait2(ep, events, 256, &ts, NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2");
        if (n == 0 && wait >= timeout_s) break; /* answers overdue: count as errors */
        for (int i = 0; i < n; i++) {
            int idx = (int)events[i].data.u32;
            conn_t *c = &conns[idx];
            long r = read_some(c);
            double t_done = now();
            int status = 0;
            size_t alen = c->busy ? complete_answer(c->buf, c->len, &status) : 0;
            if (alen > 0) {
                lat[done] = t_done - (t0 + (double)c->req / rate);
                raw[done] = t_done - c->sent;
                done++;
                if (status < 200 || status > 399) non2xx++;
                memmove(c->buf, c->buf + alen, c->len - alen);
                c->len -= alen;
                c->busy = 0;
                idle[nidle++] = idx;
            }
            if (r < 0) { /* closed by the server (or garbage): reconnect */
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                close_conn(c);
                int was_idle = !c->busy;
                open_conn(c);
                reconnects++;
                struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)idx};
                epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
                if (!was_idle) idle[nidle++] = idx;
            }
        }
    }
    double elapsed = now() - t0;
    long missing = total - done;
    qsort(lat, (size_t)done, sizeof(double), cmp);
    qsort(raw, (size_t)done, sizeof(double), cmp);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
                 ru.ru_stime.tv_usec / 1e6;
    printf("requests=%ld\ndone=%ld\nfailed=%ld\nnon2xx=%ld\nreconnects=%ld\n", total, done,
           missing, non2xx, reconnects);
    printf("rate=%.1f\nbacklog_max=%ld\nlate_max_us=%.0f\n", (double)done / elapsed, backlog_max,
           late_max * 1e6);
    printf("p50_us=%.1f\np90_us=%.1f\np99_us=%.1f\np999_us=%.1f\nmax_us=%.1f\n",
           pct(lat, done, 50) * 1e6, pct(lat, done, 90) * 1e6, pct(lat, done, 99) * 1e6,
           pct(lat, done, 99.9) * 1e6, done ? lat[done - 1] * 1e6 : -1);
    printf("raw_p50_us=%.1f\nraw_p99_us=%.1f\n", pct(raw, done, 50) * 1e6,
           pct(raw, done, 99) * 1e6);
    printf("cpu_us_per_req=%.1f\n", done ? cpu / (double)done * 1e6 : -1);
    return 0;
}
