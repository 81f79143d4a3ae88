/*
 * The splice engine (issue 14): relays bytes between the two sockets of spliced pairs
 * on a thread of its own, in C, so that no Python code runs per byte or per read.
 *
 * What Python does (epsproxy/proxy/splice_engine.py): hands over a connected pair of
 * non-blocking sockets with add(), keeps its socket objects open (it alone closes them),
 * and learns of each pair's end from collect() when the notification descriptor becomes
 * readable.  The engine never touches a pair's descriptors after reporting it, and
 * never frees a pair: collect() does, on Python's thread, once reported.  So a handle
 * Python still holds always names live memory.
 *
 * The relay's policy is the Python splice's (epsproxy/proxy/splice.py):
 *  - a read is no larger than what the receiving socket is known to take whole (half of
 *    its send buffer less its queue, SIOCOUTQ), so a slow receiver leaves next to nothing
 *    in user space; a direction whose receiver has less room than is worth a read waits
 *    until the kernel says the receiver is writable, then reads once; the kernel is
 *    asked the room only when what was last learnt of it, less all sent since, does not
 *    already promise a whole read (room()), and not before one of the direction's reads
 *    has filled SLOW_READ_BYTES (until then its reads are no larger: a short
 *    connection never asks);
 *  - reads go into one buffer shared by every pair (this thread makes one read at a
 *    time) and are sent straight from it; only what a send did not take is copied, and
 *    the direction reads nothing more until that is sent;
 *  - end-of-stream from one side shuts down the write side of the other once what it
 *    holds is sent; the pair is finished when both directions are;
 *  - an error on one side cuts the pair: the other side is closed with a reset
 *    (SO_LINGER 0), so a cut stream never looks complete;
 *  - no bytes either way for the pair's idle timeout closes it (with resets).
 *
 * Epoll is edge-triggered: each descriptor is registered for input and the peer's
 * half-close (by add() itself for a pair with nothing to send yet, so that handing a
 * pair over wakes nobody: hand_over_quietly), and for output too from the first time a
 * direction holds bytes for it or waits for its room.  The engine remembers which
 * socket may have data until a read returns less than asked (or EAGAIN): a short read
 * emptied the socket, unless the event said the peer has closed, then the reads go on
 * to the end-of-stream.  A direction makes at most READS_PER_EVENT reads a turn, then
 * waits on a ready list served after the other pairs' events, so one fast pair cannot
 * hold the thread.  When a direction decides to wait for its receiver's room (no send
 * failed, so the kernel would not wake it), the receiver is re-armed (EPOLL_CTL_MOD
 * polls it again, which asks the kernel for a wake-up once it is writable).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <linux/sockios.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUFFER_BYTES (1024 * 1024) /* the shared read buffer: the largest read_bytes */
#define SLOW_READ_BYTES (16 * 1024)
#define WAIT_BELOW_FRACTION 4
#define READS_PER_EVENT 4
#define EVENTS 256
#define SWEEP_MS 1000
#define ET_EVENTS (EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)
#define ET_IN_EVENTS (EPOLLIN | EPOLLRDHUP | EPOLLET) /* until a direction waits to send */

enum outcome {
    FINISHED = 0,  /* both directions ended normally */
    CUT_LEFT = 1,  /* the left socket failed; the right one was reset */
    CUT_RIGHT = 2, /* the right socket failed; the left one was reset */
    IDLE = 3,      /* idle timeout; both reset */
    ABORTED = 4,   /* abort() asked for it; both reset */
};

typedef struct direction {
    char *held;          /* bytes read and not yet sent (only after a short send) */
    size_t held_mapped;  /* the size of its pages */
    size_t held_len;
    size_t held_off;
    int eof;             /* the source sent end-of-stream */
    int shut;            /* the receiver's write side is shut down */
    int waiting;         /* waiting for the receiver's room before reading */
    uint64_t bytes;      /* read from the source (read by Python with atomics) */
    uint64_t waits;      /* (atomics) */
    uint64_t held_now;   /* held_len - held_off, for Python (atomics) */
    uint64_t peak_held;
    /* What the receiver was last known to hold (room()): its send buffer, and its queue
       then plus every byte sent to it since.  The queue only drains meanwhile, so the
       room worked out from these is never more than the receiver's (unless the kernel
       shrinks the send buffer, under memory pressure: then a send takes less, and the
       rest is held as after any short send). */
    long sndbuf;
    long queued;
    int known;
    /* A direction is not asked its receiver's room until one of its reads has filled
       SLOW_READ_BYTES: before that its reads are at most that large, and whatever a
       send leaves is held as after any short send (one read, as always).  A short
       connection (a TLS handshake, a request and its answer) then never asks. */
    int bulk;
    uint64_t reads;      /* (atomics) */
    uint64_t queries;    /* times the receiver was asked (atomics) */
} direction;

typedef struct pair {
    struct pair *prev, *next; /* the engine's live pairs (engine thread only) */
    struct pair *queued;      /* incoming or done list */
    int fd[2];                /* 0: left, 1: right */
    int readable[2];          /* the socket may have data (edge-triggered) */
    int hup[2];               /* an event said the peer closed or failed: read to the end */
    int out_armed[2];         /* the socket is watched for writability too */
    int registered;           /* add() put both sockets in the epoll set itself */
    direction dir[2];         /* 0: left -> right, 1: right -> left */
    size_t read_bytes;
    size_t slow;
    size_t wait_below;
    int64_t idle_ms;          /* 0: none */
    int64_t last_active;      /* monotonic ms (engine thread) */
    int abort_requested;      /* set by Python, read by the engine (atomics) */
    int outcome;
    int reported;             /* engine thread only */
    int ready;                /* on the ready list (engine thread only) */
    struct pair *ready_next;
} pair;

static struct {
    int started;
    int ep;
    int wake_fd;   /* Python -> engine: new pairs, aborts */
    int notify_fd; /* engine -> Python: ended pairs */
    pthread_t thread;
    pthread_mutex_t lock;
    pair *incoming;
    pair *done;
    int incoming_signalled; /* a wake-up is on its way for the incoming list */
    int done_signalled;
    int aborts;    /* aborts asked since the engine last looked (atomics) */
    pair live;     /* list head */
    pair *ready;   /* pairs with more to read than one turn reads (engine thread only) */
    char *buffer;
    int64_t last_sweep;
    int sweep_ms;        /* how often idle pairs are looked for (atomics) */
    uint64_t live_count; /* atomics */
} E = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void signal_fd(int fd)
{
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof(one));
    (void)r; /* an eventfd write fails only on overflow: a signal is pending then */
}

/*
 * The hand-over lists (new pairs to the engine, ended ones to Python) and the eventfd
 * that tells the other thread.  The taker reads the descriptor before it takes the
 * list, so a giver that finds a signal on its way for the list need not signal again:
 * its taker has yet to take the list (one system call less per pair in a burst).  (A
 * pair add() registered itself is queued without a signal: hand_over_quietly.)
 */
static void give(pair **list, int *signalled, pair *items, int fd)
{
    pair *last = items;
    while (last->queued)
        last = last->queued;
    pthread_mutex_lock(&E.lock);
    int first = !*signalled;
    *signalled = 1;
    last->queued = *list;
    *list = items;
    pthread_mutex_unlock(&E.lock);
    if (first)
        signal_fd(fd);
}

static pair *take(pair **list, int *signalled, int fd)
{
    uint64_t count;
    ssize_t r = read(fd, &count, sizeof(count));
    (void)r;
    pthread_mutex_lock(&E.lock);
    pair *items = *list;
    *list = NULL;
    *signalled = 0;
    pthread_mutex_unlock(&E.lock);
    return items;
}

/*
 * Held bytes (a short send's remainder, or bytes given to add() that the socket did not
 * take at once) live in pages of their own, returned to the system as soon as they are
 * sent: a slow receiver's backlog does not stay resident in a heap afterwards.
 */
static char *hold_alloc(size_t size, size_t *mapped)
{
    size_t page = 4096;
    *mapped = (size + page - 1) / page * page;
    void *p = mmap(NULL, *mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void hold_free(direction *d)
{
    if (d->held)
        munmap(d->held, d->held_mapped);
    d->held = NULL;
    d->held_len = d->held_off = d->held_mapped = 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Waiting for writability pays only if it frees much more than is free now: the kernel
   wakes writers when a third of the buffer is free. */
static size_t wait_threshold(long sndbuf, const pair *p)
{
    size_t eighth = (size_t)sndbuf / 8;
    size_t at = eighth > p->slow ? eighth : p->slow;
    return at < p->wait_below ? at : p->wait_below;
}

/*
 * Bytes the receiver ``fd`` (of direction ``d``) is sure to take whole now; ``cap`` when
 * it cannot say.  The kernel is asked (SIOCOUTQ and SO_SNDBUF, two system calls) only
 * when what is known already does not promise ``cap``: after a read of ``cap`` sent
 * whole, the receiver's queue has grown by at most that, so while half of its send
 * buffer less the queue known (plus all sent since) still holds ``cap``, so does the
 * real room.  A fast receiver is asked about once every few reads; a slow one, whose
 * room runs short, every time, as before.  A direction none of whose reads has yet
 * filled SLOW_READ_BYTES (d->bulk) reads that much at most and asks nothing.
 */
static size_t room(int fd, size_t cap, size_t *wait_at, const pair *p, direction *d)
{
    if (!d->bulk) {
        *wait_at = 0;
        return cap < p->slow ? cap : p->slow;
    }
    if (d->known && (d->sndbuf - d->queued) / 2 >= (long)cap) {
        *wait_at = wait_threshold(d->sndbuf, p);
        return cap;
    }
    int queued = 0, sndbuf = 0;
    socklen_t len = sizeof(sndbuf);
    __atomic_add_fetch(&d->queries, 1, __ATOMIC_RELAXED);
    if (ioctl(fd, SIOCOUTQ, &queued) < 0
        || getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) < 0) {
        d->known = 0;
        *wait_at = p->slow;
        return cap;
    }
    d->sndbuf = sndbuf;
    d->queued = queued;
    d->known = 1;
    *wait_at = wait_threshold(sndbuf, p);
    long free_ = ((long)sndbuf - (long)queued) / 2;
    if (free_ <= 0)
        return 0;
    return (size_t)free_ < cap ? (size_t)free_ : cap;
}

static void rearm(int fd, pair *p, int side)
{
    struct epoll_event ev = {.events = ET_EVENTS, .data.u64 = (uint64_t)(uintptr_t)p | side};
    epoll_ctl(E.ep, EPOLL_CTL_MOD, fd, &ev);
    p->out_armed[side] = 1;
}

/* A direction holds bytes for ``side``: make sure its writability wakes the engine. */
static void arm_out(pair *p, int side)
{
    if (!p->out_armed[side])
        rearm(p->fd[side], p, side);
}

/*
 * Move what direction ``i`` can move now.  Returns -1, or the side (0, 1) whose socket
 * failed.
 */
static int pump(pair *p, int i, int64_t now)
{
    direction *d = &p->dir[i];
    int src = p->fd[i], dst = p->fd[1 - i];
    if (d->held) {
        ssize_t sent = send(dst, d->held + d->held_off, d->held_len - d->held_off,
                            MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return -1;
            return 1 - i;
        }
        d->held_off += (size_t)sent;
        d->queued += (long)sent;
        __atomic_store_n(&d->held_now, (uint64_t)(d->held_len - d->held_off),
                         __ATOMIC_RELAXED);
        if (d->held_off < d->held_len)
            return -1;
        hold_free(d);
    }
    if (d->eof) {
        if (!d->shut) {
            shutdown(dst, SHUT_WR);
            d->shut = 1;
        }
        return -1;
    }
    if (!p->readable[i])
        return -1;
    int was_waiting = d->waiting;
    d->waiting = 0;
    for (int k = 0; k < READS_PER_EVENT; k++) {
        size_t wait_at;
        size_t size = room(dst, p->read_bytes, &wait_at, p, d);
        if (size < wait_at) {
            if (was_waiting && k == 0) {
                size = p->slow; /* woken for room: read at least a little */
            } else {
                d->waiting = 1;
                __atomic_add_fetch(&d->waits, 1, __ATOMIC_RELAXED);
                rearm(dst, p, 1 - i);
                return -1;
            }
        }
        ssize_t n = recv(src, E.buffer, size, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                p->readable[i] = 0;
                return -1;
            }
            if (errno == EINTR)
                return -1;
            return i;
        }
        if (n == 0) {
            p->readable[i] = 0;
            d->eof = 1;
            shutdown(dst, SHUT_WR);
            d->shut = 1;
            return -1;
        }
        __atomic_add_fetch(&d->bytes, (uint64_t)n, __ATOMIC_RELAXED);
        if ((size_t)n == size)
            d->bulk = 1; /* a read filled its size: size the next ones to the room */
        p->last_active = now;
        __atomic_add_fetch(&d->reads, 1, __ATOMIC_RELAXED);
        ssize_t sent = send(dst, E.buffer, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                return 1 - i;
            sent = 0;
        }
        d->queued += (long)sent;
        if (sent < n) {
            size_t rest = (size_t)(n - sent);
            d->held = hold_alloc(rest, &d->held_mapped);
            if (d->held == NULL)
                return i; /* out of memory: cut the pair rather than lose bytes */
            memcpy(d->held, E.buffer + sent, rest);
            d->held_len = rest;
            d->held_off = 0;
            __atomic_store_n(&d->held_now, (uint64_t)rest, __ATOMIC_RELAXED);
            if (rest > d->peak_held)
                d->peak_held = rest;
            arm_out(p, 1 - i);
            return -1;
        }
        if ((size_t)n < size && !p->hup[i]) {
            /* A read that did not fill its size emptied the socket.  An end-of-stream
               already behind it came with an event that said so (EPOLLRDHUP: then
               hup[i], and the reads go on until it is read); one that arrives later is
               an edge of its own, as are more bytes (epoll reports a socket's state as
               it delivers the event).  So no read is made only to be told EAGAIN, and
               no room asked for it. */
            p->readable[i] = 0;
            return -1;
        }
    }
    /* READS_PER_EVENT reads and no EAGAIN yet: the socket may hold more, and no new
       edge comes for bytes (or an end-of-stream) already there.  Read on after the
       other pairs' events (fairness), without waiting for one. */
    if (!p->ready) {
        p->ready = 1;
        p->ready_next = E.ready;
        E.ready = p;
    }
    return -1;
}

static void reset_on_close(int fd)
{
    struct linger lg = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
}

/* Take the pair out of the engine and queue it for Python (``ended``: this batch). */
static void end_pair(pair *p, int outcome, pair **ended)
{
    if (p->reported)
        return;
    p->reported = 1;
    p->outcome = outcome;
    if (p->ready) {
        for (pair **at = &E.ready; *at; at = &(*at)->ready_next) {
            if (*at == p) {
                *at = p->ready_next;
                break;
            }
        }
        p->ready = 0;
    }
    for (int s = 0; s < 2; s++)
        epoll_ctl(E.ep, EPOLL_CTL_DEL, p->fd[s], NULL);
    if (outcome == CUT_LEFT) {
        reset_on_close(p->fd[1]);
    } else if (outcome == CUT_RIGHT) {
        reset_on_close(p->fd[0]);
    } else if (outcome != FINISHED) {
        reset_on_close(p->fd[0]);
        reset_on_close(p->fd[1]);
    }
    p->prev->next = p->next;
    p->next->prev = p->prev;
    p->prev = p->next = NULL;
    __atomic_sub_fetch(&E.live_count, 1, __ATOMIC_RELAXED);
    p->queued = *ended;
    *ended = p;
}

static void service(pair *p, int64_t now, pair **ended)
{
    for (int i = 0; i < 2; i++) {
        int failed = pump(p, i, now);
        if (failed >= 0) {
            end_pair(p, failed == 0 ? CUT_LEFT : CUT_RIGHT, ended);
            return;
        }
    }
    direction *a = &p->dir[0], *b = &p->dir[1];
    if (a->eof && b->eof && a->shut && b->shut && !a->held && !b->held)
        end_pair(p, FINISHED, ended);
}

static int socket_error(int fd)
{
    int err = 0;
    socklen_t len = sizeof(err);
    if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
        return errno;
    return err;
}

static void take_incoming(int64_t now, pair **ended)
{
    pair *in = take(&E.incoming, &E.incoming_signalled, E.wake_fd);
    int aborts = __atomic_exchange_n(&E.aborts, 0, __ATOMIC_ACQ_REL);
    /* The list is newest first: start the oldest first. */
    pair *ordered = NULL;
    while (in) {
        pair *next = in->queued;
        in->queued = ordered;
        ordered = in;
        in = next;
    }
    while (ordered) {
        pair *p = ordered;
        ordered = p->queued;
        p->queued = NULL;
        p->next = E.live.next;
        p->prev = &E.live;
        E.live.next->prev = p;
        E.live.next = p;
        if (p->registered)
            continue; /* its events come as any pair's (the first one adopted it) */
        p->last_active = now;
        int ok = 1;
        for (int s = 0; s < 2; s++) {
            struct epoll_event ev = {.events = ET_EVENTS,
                                     .data.u64 = (uint64_t)(uintptr_t)p | (uint64_t)s};
            if (epoll_ctl(E.ep, EPOLL_CTL_ADD, p->fd[s], &ev) < 0)
                ok = 0;
            p->out_armed[s] = 1;
        }
        if (!ok) {
            end_pair(p, ABORTED, ended);
            continue;
        }
        p->readable[0] = p->readable[1] = 1;
        service(p, now, ended);
    }
    if (aborts) {
        for (pair *p = E.live.next; p != &E.live;) {
            pair *next = p->next;
            if (__atomic_load_n(&p->abort_requested, __ATOMIC_ACQUIRE))
                end_pair(p, ABORTED, ended);
            p = next;
        }
    }
}

static void sweep(int64_t now, pair **ended)
{
    for (pair *p = E.live.next; p != &E.live;) {
        pair *next = p->next;
        if (p->idle_ms > 0 && now - p->last_active >= p->idle_ms)
            end_pair(p, IDLE, ended);
        p = next;
    }
}

static void *engine_main(void *arg)
{
    (void)arg;
    struct epoll_event events[EVENTS];
    E.last_sweep = now_ms();
    for (;;) {
        int every = __atomic_load_n(&E.sweep_ms, __ATOMIC_RELAXED);
        int n = epoll_wait(E.ep, events, EVENTS, E.ready ? 0 : every);
        int64_t now = now_ms();
        pair *ended = NULL;
        for (int k = 0; k < n; k++) {
            uint64_t data = events[k].data.u64;
            if (data == 0) {
                take_incoming(now, &ended);
                continue;
            }
            pair *p = (pair *)(uintptr_t)(data & ~(uint64_t)1);
            int side = (int)(data & 1);
            uint32_t ev = events[k].events;
            if (p->reported)
                continue; /* ended earlier in this batch */
            if (p->next == NULL) {
                /* Registered by add() and not adopted yet (it is queued: add() held
                   the lock until it was): adopt it, then its event. */
                take_incoming(now, &ended);
                if (p->reported || p->next == NULL)
                    continue; /* aborted meanwhile */
            }
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                p->readable[side] = 1;
            if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                p->hup[side] = 1;
            if (ev & EPOLLERR) {
                if (socket_error(p->fd[side]) != 0) {
                    end_pair(p, side == 0 ? CUT_LEFT : CUT_RIGHT, &ended);
                    continue;
                }
            }
            service(p, now, &ended);
        }
        pair *ready = E.ready;
        E.ready = NULL;
        while (ready) {
            pair *p = ready;
            ready = p->ready_next;
            p->ready = 0;
            if (!p->reported)
                service(p, now, &ended);
        }
        if (now - E.last_sweep >= every) {
            E.last_sweep = now;
            take_incoming(now, &ended); /* pairs registered by add() with no event yet */
            sweep(now, &ended);
        }
        if (ended)
            give(&E.done, &E.done_signalled, ended, E.notify_fd);
    }
    return NULL;
}

/* A forked child has no engine thread: its first pair starts one of its own (what the
   parent's engine held stays the parent's). */
static void forked_child(void)
{
    E.started = 0;
    E.incoming = E.done = E.ready = NULL;
    E.incoming_signalled = E.done_signalled = 0;
    E.aborts = 0;
    pthread_mutex_init(&E.lock, NULL);
    __atomic_store_n(&E.live_count, 0, __ATOMIC_RELAXED);
}

static int start(void)
{
    static int atfork_done = 0;
    if (E.started)
        return 0;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, forked_child);
        atfork_done = 1;
    }
    /* Page-aligned (the kernel copies to and from it fastest so: a buffer from malloc,
       16 bytes into a page, relayed at three quarters of the speed), and resident
       only once touched. */
    E.buffer = mmap(NULL, BUFFER_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                    -1, 0);
    if (E.buffer == MAP_FAILED)
        E.buffer = NULL;
    E.ep = epoll_create1(EPOLL_CLOEXEC);
    E.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    E.notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (E.buffer == NULL || E.ep < 0 || E.wake_fd < 0 || E.notify_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    E.live.next = E.live.prev = &E.live;
    E.sweep_ms = SWEEP_MS;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 0};
    if (epoll_ctl(E.ep, EPOLL_CTL_ADD, E.wake_fd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* signals stay with Python's thread */
    int err = pthread_create(&E.thread, NULL, engine_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_detach(E.thread);
    E.started = 1;
    return 0;
}

/* -- the Python interface */

static PyObject *py_notify_fd(PyObject *self, PyObject *unused)
{
    if (start() < 0)
        return NULL;
    return PyLong_FromLong(E.notify_fd);
}

/*
 * Bytes to send before anything relayed (``view``, towards ``fd``): sent now if the
 * socket takes them (it nearly always does: nothing was sent on it yet), and only what
 * it does not take copied for the engine.  So the bytes a party sent before its partner
 * arrived are not copied a second time on their way.
 */
static int copy_in(direction *d, Py_buffer *view, int fd)
{
    size_t len = (size_t)view->len, sent = 0;
    if (len == 0)
        return 0;
    ssize_t n = send(fd, view->buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0)
        sent = (size_t)n; /* an error: the engine's own send finds it again */
    d->bytes = (uint64_t)len; /* relayed, as the Python splice counts them */
    if (sent == len)
        return 0;
    d->held = hold_alloc(len - sent, &d->held_mapped);
    if (d->held == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(d->held, (char *)view->buf + sent, len - sent);
    d->held_len = len - sent;
    d->held_now = (uint64_t)(len - sent);
    return 0;
}

/*
 * A pair with nothing to send yet and no end-of-stream to pass on (nearly every pair:
 * the bytes given were sent by copy_in) is put in the epoll set here, for input only,
 * and queued without waking the engine: its first event (or the next sweep, or an
 * abort) makes the engine adopt it.  So handing a pair over costs no thread wake-up,
 * no eventfd write and read, and no reads that would find nothing.  The list's lock
 * is held across the registration, so the engine, woken by the pair's first event,
 * finds it queued.  False if epoll refused a socket (then the engine tries, and ends
 * the pair).
 */
static int hand_over_quietly(pair *p)
{
    pthread_mutex_lock(&E.lock);
    int added = 0;
    for (; added < 2; added++) {
        struct epoll_event ev = {.events = ET_IN_EVENTS,
                                 .data.u64 = (uint64_t)(uintptr_t)p | (uint64_t)added};
        if (epoll_ctl(E.ep, EPOLL_CTL_ADD, p->fd[added], &ev) < 0)
            break;
    }
    if (added == 2) {
        p->registered = 1;
        p->queued = E.incoming;
        E.incoming = p;
    } else if (added == 1) {
        epoll_ctl(E.ep, EPOLL_CTL_DEL, p->fd[0], NULL);
    }
    pthread_mutex_unlock(&E.lock);
    return added == 2;
}

static PyObject *py_add(PyObject *self, PyObject *args)
{
    int left, right, left_eof, right_eof;
    Py_buffer to_left, to_right;
    Py_ssize_t read_bytes;
    double idle;
    if (!PyArg_ParseTuple(args, "iiy*y*ppnd", &left, &right, &to_left, &to_right,
                          &left_eof, &right_eof, &read_bytes, &idle))
        return NULL;
    PyObject *result = NULL;
    pair *p = NULL;
    if (left < 0 || right < 0 || left == right) {
        PyErr_SetString(PyExc_ValueError, "two distinct open descriptors are needed");
        goto out;
    }
    if (read_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "read_bytes must be positive");
        goto out;
    }
    if (start() < 0)
        goto out;
    p = calloc(1, sizeof(pair));
    if (p == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    p->fd[0] = left;
    p->fd[1] = right;
    p->read_bytes = read_bytes < BUFFER_BYTES ? (size_t)read_bytes : BUFFER_BYTES;
    p->slow = p->read_bytes < SLOW_READ_BYTES ? p->read_bytes : SLOW_READ_BYTES;
    size_t quarter = p->read_bytes / WAIT_BELOW_FRACTION;
    p->wait_below = quarter > p->slow ? quarter : p->slow;
    p->idle_ms = idle > 0 ? (int64_t)(idle * 1000.0) : 0;
    if (p->idle_ms == 0 && idle > 0)
        p->idle_ms = 1;
    if (p->idle_ms > 0) {
        /* A pair is closed within a quarter of its idle timeout after it (at most a
           second): the sweep runs that often from now on. */
        int quarter_ms = p->idle_ms / 4 > 10 ? (int)(p->idle_ms / 4) : 10;
        if (quarter_ms < __atomic_load_n(&E.sweep_ms, __ATOMIC_RELAXED))
            __atomic_store_n(&E.sweep_ms, quarter_ms, __ATOMIC_RELAXED);
    }
    /* dir[0] is left -> right: bytes for the right side go first there. */
    if (copy_in(&p->dir[0], &to_right, right) < 0 || copy_in(&p->dir[1], &to_left, left) < 0) {
        hold_free(&p->dir[0]);
        hold_free(&p->dir[1]);
        free(p);
        goto out;
    }
    p->dir[0].eof = left_eof;
    p->dir[1].eof = right_eof;
    __atomic_add_fetch(&E.live_count, 1, __ATOMIC_RELAXED);
    p->last_active = now_ms();
    if (p->dir[0].held || p->dir[1].held || left_eof || right_eof || !hand_over_quietly(p))
        give(&E.incoming, &E.incoming_signalled, p, E.wake_fd); /* the engine adds it */
    result = PyLong_FromVoidPtr(p);
out:
    PyBuffer_Release(&to_left);
    PyBuffer_Release(&to_right);
    return result;
}

static pair *handle(PyObject *arg)
{
    pair *p = PyLong_AsVoidPtr(arg);
    if (p == NULL && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "not a pair's handle");
    return p;
}

static PyObject *py_abort(PyObject *self, PyObject *arg)
{
    pair *p = handle(arg);
    if (p == NULL)
        return NULL;
    __atomic_store_n(&p->abort_requested, 1, __ATOMIC_RELEASE);
    __atomic_add_fetch(&E.aborts, 1, __ATOMIC_ACQ_REL);
    signal_fd(E.wake_fd);
    Py_RETURN_NONE;
}

static PyObject *py_counts(PyObject *self, PyObject *arg)
{
    pair *p = handle(arg);
    if (p == NULL)
        return NULL;
    direction *a = &p->dir[0], *b = &p->dir[1];
    return Py_BuildValue(
        "KKKKKKK", (unsigned long long)__atomic_load_n(&a->bytes, __ATOMIC_RELAXED),
        (unsigned long long)__atomic_load_n(&b->bytes, __ATOMIC_RELAXED),
        (unsigned long long)(__atomic_load_n(&a->waits, __ATOMIC_RELAXED)
                             + __atomic_load_n(&b->waits, __ATOMIC_RELAXED)),
        (unsigned long long)__atomic_load_n(&a->held_now, __ATOMIC_RELAXED),
        (unsigned long long)__atomic_load_n(&b->held_now, __ATOMIC_RELAXED),
        (unsigned long long)(__atomic_load_n(&a->reads, __ATOMIC_RELAXED)
                             + __atomic_load_n(&b->reads, __ATOMIC_RELAXED)),
        (unsigned long long)(__atomic_load_n(&a->queries, __ATOMIC_RELAXED)
                             + __atomic_load_n(&b->queries, __ATOMIC_RELAXED)));
}

static PyObject *py_collect(PyObject *self, PyObject *unused)
{
    if (!E.started)
        return PyList_New(0);
    pair *done = take(&E.done, &E.done_signalled, E.notify_fd);
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL; /* the pairs stay unreported; the next collect finds them */
    while (done) {
        pair *p = done;
        PyObject *item = Py_BuildValue(
            "(NiKKKK)", PyLong_FromVoidPtr(p), p->outcome,
            (unsigned long long)p->dir[0].bytes, (unsigned long long)p->dir[1].bytes,
            (unsigned long long)(p->dir[0].waits + p->dir[1].waits),
            (unsigned long long)(p->dir[0].peak_held > p->dir[1].peak_held
                                     ? p->dir[0].peak_held
                                     : p->dir[1].peak_held));
        if (item == NULL || PyList_Append(list, item) < 0) {
            Py_XDECREF(item);
            /* the rest, for the next collect */
            give(&E.done, &E.done_signalled, done, E.notify_fd);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(item);
        done = p->queued;
        hold_free(&p->dir[0]);
        hold_free(&p->dir[1]);
        free(p);
    }
    return list;
}

static PyObject *py_live(PyObject *self, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&E.live_count, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"notify_fd", py_notify_fd, METH_NOARGS,
     "notify_fd() -> int: start the engine (once) and return the descriptor that becomes "
     "readable when pairs have ended (then call collect())."},
    {"add", py_add, METH_VARARGS,
     "add(left_fd, right_fd, to_left, to_right, left_eof, right_eof, read_bytes, "
     "idle_timeout) -> handle: relay between two connected non-blocking sockets until "
     "both directions end; the caller keeps both descriptors open until collect() "
     "reports the pair."},
    {"abort", py_abort, METH_O, "abort(handle): end the pair with resets, soon."},
    {"counts", py_counts, METH_O,
     "counts(handle) -> (left_to_right, right_to_left, waits, held_for_right, "
     "held_for_left, reads, room_queries): bytes relayed so far, waits for a receiver's "
     "room, bytes held unsent now, reads that returned bytes, and times a receiver's "
     "room was asked of the kernel."},
    {"collect", py_collect, METH_NOARGS,
     "collect() -> [(handle, outcome, left_to_right, right_to_left, waits, peak_held)]: "
     "the pairs ended since the last call; their handles are invalid afterwards."},
    {"live", py_live, METH_NOARGS, "live() -> int: pairs added and not yet ended."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_splice_engine",
    "The splice engine's C part: see epsproxy/proxy/splice_engine.py.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__splice_engine(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "FINISHED", FINISHED) < 0
        || PyModule_AddIntConstant(m, "CUT_LEFT", CUT_LEFT) < 0
        || PyModule_AddIntConstant(m, "CUT_RIGHT", CUT_RIGHT) < 0
        || PyModule_AddIntConstant(m, "IDLE", IDLE) < 0
        || PyModule_AddIntConstant(m, "ABORTED", ABORTED) < 0
        || PyModule_AddIntConstant(m, "BUFFER_BYTES", BUFFER_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
