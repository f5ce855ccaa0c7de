/* Write a whole frame (several buffers) to a socket in one GIL-free call; read from one
 * likewise.
 *
 * Why: Python's socket.sendall, on a socket with a timeout, releases the GIL twice per
 * send() it makes (a poll, then the send), and a frame of a header, a chunk header and an
 * 8 MiB payload took three sendall calls. While another Python thread is busy (the agent
 * runs during a pre-copy round) every one of those returns waits the interpreter's
 * switch interval (5 ms): a round of a 256 MiB state spent over a second just in them.
 * Here the buffers go out with sendmsg() (scatter-gather: no join, no copy), poll() for
 * room with the caller's deadline, and the GIL is taken back once. Then one poll() with a
 * zero timeout says whether the peer has sent something (an acknowledgement to read), so
 * the caller needs no select() of its own.
 *
 * Sockets only (sendmsg, recv); each call is MSG_DONTWAIT, so the socket's own blocking
 * mode does not matter where the platform has that flag. On a signal
 * (EINTR) it returns what was written so far: the caller runs the signal's handler and
 * calls again for the rest, as PEP 475 has Python do.
 */
#ifndef CM_SENDV_H
#define CM_SENDV_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *base;
    size_t len;
} cm_part;

#if defined(__unix__) || defined(__APPLE__)
#include <limits.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

#ifndef MSG_NOSIGNAL /* macOS: SO_NOSIGPIPE instead; Python ignores SIGPIPE anyway */
#define MSG_NOSIGNAL 0
#endif
/* Non-blocking whatever the socket's own mode (a blocking one would wait past the
   deadline with the GIL released). */
#ifndef MSG_DONTWAIT
#define MSG_DONTWAIT 0
#endif
#define CM_SEND_MAX_IOV 64

static double cm_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* After a send or recv failed with errno: 0 once fd may be ready for `events` (or the
 * deadline passed, which the caller's next try and this check then report), else the
 * errno value to return (EINTR, ETIMEDOUT, or the call's own error). */
static int cm_wait(int fd, short events, double deadline) {
    if (errno == EINTR)
        return EINTR;
    if (errno != EAGAIN && errno != EWOULDBLOCK)
        return errno;
    double left_s = deadline - cm_now();
    if (left_s <= 0)
        return ETIMEDOUT;
    struct pollfd p;
    p.fd = fd;
    p.events = events;
    p.revents = 0;
    double ms = left_s * 1e3 + 1.0; /* round up: never wake before the deadline */
    if (poll(&p, 1, ms > (double)INT_MAX ? INT_MAX : (int)ms) < 0)
        return errno == EINTR ? EINTR : errno;
    return 0; /* ready, or timed out: the next try fails again and the deadline ends it */
}

/* Write parts[0..n) to fd, skipping their first `skip` bytes (already written), within
 * timeout_s seconds. Returns 0 once every byte is written, else an errno value: ETIMEDOUT
 * (the deadline passed), EINTR (a signal: call again), or the socket's error. *written:
 * the bytes this call wrote. *readable: 1 if, once all was written, the peer had sent
 * something (or closed the connection). */
static int cm_send_parts(int fd, const cm_part *parts, size_t n, uint64_t skip, double timeout_s,
                         uint64_t *written, int *readable) {
    struct iovec v[CM_SEND_MAX_IOV];
    double deadline = cm_now() + timeout_s;
    size_t at = 0; /* parts before `at` are written; v[0] is part `at` from `off` */
    size_t off = 0;
    *written = 0;
    *readable = 0;
    while (at < n && skip >= parts[at].len) {
        skip -= parts[at].len;
        at++;
    }
    off = (size_t)skip;
    while (at < n) {
        if (off == parts[at].len) { /* an empty part, or one just finished */
            at++;
            off = 0;
            continue;
        }
        int k = 0;
        for (size_t i = at; i < n && k < CM_SEND_MAX_IOV; i++) {
            size_t o = i == at ? off : 0;
            v[k].iov_base = (void *)(parts[i].base + o);
            v[k].iov_len = parts[i].len - o;
            k++;
        }
        struct msghdr m;
        m.msg_name = NULL;
        m.msg_namelen = 0;
        m.msg_iov = v;
        m.msg_iovlen = k;
        m.msg_control = NULL;
        m.msg_controllen = 0;
        m.msg_flags = 0;
        ssize_t sent = sendmsg(fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent >= 0) {
            size_t left = (size_t)sent;
            *written += left;
            while (left) { /* advance over what the kernel took */
                size_t room = parts[at].len - off;
                if (left < room) {
                    off += left;
                    left = 0;
                } else {
                    left -= room;
                    at++;
                    off = 0;
                }
            }
            continue;
        }
        int rc = cm_wait(fd, POLLOUT, deadline);
        if (rc)
            return rc;
    }
    struct pollfd p;
    p.fd = fd;
    p.events = POLLIN;
    p.revents = 0;
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR)))
        *readable = 1;
    return 0;
}

/* Read what has arrived (at least one byte, or the end of the stream) into buf[0..n),
 * waiting up to timeout_s seconds; one GIL release where Python's recv_into, on a socket
 * with a timeout, makes two (a poll, then the read). Returns 0 with *got bytes read (0:
 * the peer closed), else an errno value (ETIMEDOUT, EINTR: call again, or the socket's). */
static int cm_recv_some(int fd, uint8_t *buf, size_t n, double timeout_s, uint64_t *got) {
    double deadline = cm_now() + timeout_s;
    *got = 0;
    for (;;) {
        ssize_t k = recv(fd, buf, n, MSG_DONTWAIT);
        if (k >= 0) {
            *got = (uint64_t)k;
            return 0;
        }
        int rc = cm_wait(fd, POLLIN, deadline);
        if (rc)
            return rc;
    }
}

#else /* no sendmsg/poll: the caller uses Python's own sockets */
static int cm_recv_some(int fd, uint8_t *buf, size_t n, double timeout_s, uint64_t *got) {
    (void)fd, (void)buf, (void)n, (void)timeout_s;
    *got = 0;
    return ENOSYS;
}
static int cm_send_parts(int fd, const cm_part *parts, size_t n, uint64_t skip, double timeout_s,
                         uint64_t *written, int *readable) {
    (void)fd, (void)parts, (void)n, (void)skip, (void)timeout_s;
    *written = 0;
    *readable = 0;
    return ENOSYS;
}
#endif

#endif /* CM_SENDV_H */
