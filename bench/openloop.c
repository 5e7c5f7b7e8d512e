/* An open-loop HTTP/1.1 load client: requests sent on a fixed schedule, latency from each one's scheduled time.
 *
 *     openloop -p PORT -r RATE -d SECONDS [-c CONNECTIONS] [-m METHOD] [-H 'Name: value']... [-b BODYFILE] PATH
 *
 * Request i is due at start + i / RATE. It goes out on the first keep-alive connection free at or after that time,
 * and its latency is measured from the time it was due, not from when it was sent: a server that stalls is charged
 * for every request that waited behind the stall (what wrk2's -R measures, and plain wrk, a closed loop, cannot).
 * The client's own lateness is reported apart (lag: sent minus due), so a run where the client could not keep
 * its schedule can be told from one where the server could not. One thread, epoll, no allocation per request:
 * a few microseconds a request, where a Python client on the same two cores fell behind at ~6,000 a second.
 *
 * Prints one JSON object: requests, completed, failures (a status >= 400, a connection error, no Content-Length),
 * p50_ms, p90_ms, p99_ms, max_ms (latency from due time), lag_p50_ms, lag_p99_ms, seconds (first due to last done).
 * Built by bench/api_load.py with the system's C compiler (cc -O2); nothing else needs it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 16384

typedef struct {
    int fd;
    long req;          /* the request in flight, or -1 when idle */
    size_t sent;       /* bytes of the request written so far */
    char head[HEAD_MAX];
    size_t head_len;   /* bytes of the response's head read so far (until its blank line) */
    long body_left;    /* bytes of the body still to read once the head is whole, -1 before */
    int status;
} Conn;

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int port, epfd;
static char *request;
static size_t request_len;

static int dial(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) { close(fd); return -1; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void watch(Conn *c, int op, unsigned events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, op, c->fd, &ev);
}

static int redial(Conn *c) {
    if (c->fd >= 0) { epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); }
    c->fd = dial();
    c->req = -1;
    if (c->fd < 0) return -1;
    watch(c, EPOLL_CTL_ADD, EPOLLIN);
    return 0;
}

/* The head is whole: its status and Content-Length; 0 when it is not a response we can follow. */
static int parse_head(Conn *c, size_t end) {
    c->head[end] = 0;
    if (strncmp(c->head, "HTTP/1.", 7) != 0) return 0;
    c->status = atoi(c->head + 9);
    char *line = strstr(c->head, "\r\n");
    while (line && line < c->head + end) {
        line += 2;
        if (strncasecmp(line, "content-length:", 15) == 0) { c->body_left = atol(line + 15); return 1; }
        line = strstr(line, "\r\n");
    }
    return 0;
}

static long noted;

/* The first few failures, on stderr (their reason and a number: a status or errno). */
static void note(const char *why, int number) {
    if (noted++ < 10) fprintf(stderr, "openloop: %s %d\n", why, number);
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, long n, double p) { return n ? v[(long)(p * (double)(n - 1))] : 0.0; }

int main(int argc, char **argv) {
    double rate = 0, seconds = 0;
    int nconn = 64, opt;
    const char *method = "GET", *bodyfile = NULL;
    char headers[8192] = "";
    while ((opt = getopt(argc, argv, "p:r:d:c:m:H:b:")) != -1) {
        switch (opt) {
        case 'p': port = atoi(optarg); break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'c': nconn = atoi(optarg); break;
        case 'm': method = optarg; break;
        case 'H':
            if (strlen(headers) + strlen(optarg) + 3 >= sizeof headers) { fprintf(stderr, "headers too long\n"); return 2; }
            strcat(headers, optarg); strcat(headers, "\r\n"); break;
        case 'b': bodyfile = optarg; break;
        default: fprintf(stderr, "usage: openloop -p PORT -r RATE -d SECONDS [-c N] [-m METHOD] [-H h]... [-b FILE] PATH\n"); return 2;
        }
    }
    if (optind >= argc || port <= 0 || rate <= 0 || seconds <= 0 || nconn <= 0) { fprintf(stderr, "missing arguments\n"); return 2; }
    const char *path = argv[optind];
    char *body = NULL;
    long body_len = 0;
    if (bodyfile) {
        FILE *f = fopen(bodyfile, "rb");
        if (!f) { perror(bodyfile); return 2; }
        fseek(f, 0, SEEK_END); body_len = ftell(f); fseek(f, 0, SEEK_SET);
        body = malloc(body_len + 1);
        if (fread(body, 1, body_len, f) != (size_t)body_len) { perror(bodyfile); return 2; }
        fclose(f);
    }
    size_t cap = strlen(method) + strlen(path) + strlen(headers) + body_len + 256;
    request = malloc(cap);
    int k = snprintf(request, cap, "%s %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s", method, path, port, headers);
    if (body) k += snprintf(request + k, cap - k, "Content-Length: %ld\r\n", body_len);
    k += snprintf(request + k, cap - k, "\r\n");
    if (body) { memcpy(request + k, body, body_len); k += body_len; }
    request_len = (size_t)k;

    long n = (long)(rate * seconds);
    double *due = malloc(sizeof(double) * n), *lat = malloc(sizeof(double) * n), *lag = malloc(sizeof(double) * n);
    Conn *conns = calloc(nconn, sizeof(Conn));
    /* Free connections in a ring, the longest free first: each is used again within nconn requests, so none sits
       idle until the server's keep-alive timeout closes it as a request goes out on it. */
    long *idle = malloc(sizeof(long) * nconn), nidle = 0, ihead = 0;
#define PUSH_IDLE(x) (idle[(ihead + nidle++) % nconn] = (x))
    signal(SIGPIPE, SIG_IGN);  /* a write on a connection the server reset fails with EPIPE, not the process */
    epfd = epoll_create1(0);
    for (int i = 0; i < nconn; i++) {
        conns[i].fd = -1;
        if (redial(&conns[i]) < 0) { perror("connect"); return 1; }
        PUSH_IDLE(i);
    }
    double start = now_s() + 0.05;
    for (long i = 0; i < n; i++) due[i] = start + (double)i / rate;
    long next = 0, done = 0, failures = 0, nlat = 0;
    struct epoll_event evs[256];
    while (done < n) {
        double t = now_s();
        while (next < n && due[next] <= t && nidle > 0) {  /* every request due goes out on a free connection */
            Conn *c = &conns[idle[ihead]];
            ihead = (ihead + 1) % nconn; nidle--;
            c->req = next++; c->sent = 0; c->head_len = 0; c->body_left = -1;
            lag[c->req] = (t - due[c->req]) * 1000.0;
            ssize_t w = write(c->fd, request, request_len);
            if (w > 0) c->sent = (size_t)w;
            if (c->sent < request_len) watch(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            if (w < 0 && errno != EAGAIN) {  /* the server closed it while idle: count it, go on with a new one */
                lat[nlat++] = (now_s() - due[c->req]) * 1000.0; failures++; done++; note("write failed, errno", errno);
                if (redial(c) < 0) { perror("connect"); return 1; }
                PUSH_IDLE(c - conns);
            }
        }
        int timeout = -1;
        if (next < n && nidle > 0) {
            double wait = due[next] - now_s();
            timeout = wait <= 0 ? 0 : (int)(wait * 1000.0) + (wait * 1000.0 > (int)(wait * 1000.0));
        }
        int m = epoll_wait(epfd, evs, 256, timeout);
        for (int e = 0; e < m; e++) {
            Conn *c = evs[e].data.ptr;
            if ((evs[e].events & EPOLLOUT) && c->req >= 0 && c->sent < request_len) {
                ssize_t w = write(c->fd, request + c->sent, request_len - c->sent);
                if (w > 0) c->sent += (size_t)w;
                if (c->sent == request_len) watch(c, EPOLL_CTL_MOD, EPOLLIN);
            }
            if (!(evs[e].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) continue;
            int broken = 0;
            const char *broken_why = "";
            int why_errno = 0;
            for (;;) {
                char buf[65536];
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r < 0 && errno == EAGAIN) break;
                if (r <= 0) { broken = 1; broken_why = r == 0 ? "closed by the server" : "read failed, errno"; why_errno = r == 0 ? 0 : errno; break; }
                if (c->req < 0) continue;  /* nothing asked: ignore */
                size_t off = 0;
                if (c->body_left < 0) {
                    size_t take = (size_t)r < HEAD_MAX - 1 - c->head_len ? (size_t)r : HEAD_MAX - 1 - c->head_len;
                    memcpy(c->head + c->head_len, buf, take);
                    size_t before = c->head_len;
                    c->head_len += take;
                    c->head[c->head_len] = 0;
                    char *blank = strstr(c->head, "\r\n\r\n");
                    if (!blank) { if (c->head_len >= HEAD_MAX - 1) { broken = 1; broken_why = "head too long"; break; } continue; }
                    size_t end = (size_t)(blank - c->head) + 4;
                    if (!parse_head(c, end - 4)) { broken = 1; broken_why = "no status or Content-Length"; break; }
                    off = end - before;
                }
                c->body_left -= (long)((size_t)r - off);
                if (c->body_left <= 0) {  /* the response is whole */
                    lat[nlat++] = (now_s() - due[c->req]) * 1000.0;
                    if (c->status >= 400 || c->status < 100) { failures++; note("status", c->status); }
                    done++;
                    if (c->sent < request_len) {  /* answered before its body was all sent: the rest would be a bad request */
                        if (redial(c) < 0) { perror("connect"); return 1; }
                    }
                    c->req = -1;
                    PUSH_IDLE(c - conns);
                }
            }
            if (broken) {
                long was = c->req;  /* -1: closed while free, so in the ring already (it stays there, dialled anew) */
                if (was >= 0) { lat[nlat++] = (now_s() - due[was]) * 1000.0; failures++; done++; note(broken_why, why_errno); }
                if (redial(c) < 0) { perror("connect"); return 1; }
                if (was >= 0) PUSH_IDLE(c - conns);
            }
        }
    }
    double end = now_s();
    qsort(lat, nlat, sizeof(double), cmp);
    qsort(lag, n, sizeof(double), cmp);
    printf("{\"requests\": %ld, \"completed\": %ld, \"failures\": %ld, \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, "
           "\"max_ms\": %.3f, \"lag_p50_ms\": %.3f, \"lag_p99_ms\": %.3f, \"seconds\": %.3f, \"connections\": %d}\n",
           n, nlat, failures, pct(lat, nlat, 0.5), pct(lat, nlat, 0.9), pct(lat, nlat, 0.99), nlat ? lat[nlat - 1] : 0.0,
           pct(lag, n, 0.5), pct(lag, n, 0.99), end - start, nconn);
    return 0;
}
