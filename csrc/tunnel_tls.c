/*
 * tunnel_tls.c - the helper's TLS 1.3 tunnel (xcsave-helper --xcsave-1 tunnel).
 *
 * The migration stream must cross the network encrypted and only between
 * hosts that hold a certificate of the same CA (libvirt's model).  This
 * kernel has no kTLS, so the record layer runs here, in user space, with
 * OpenSSL; Python never sees a page:
 *
 *     Python (xcsave.tls)          this process                 the network
 *     sock ==== socketpair ==== plain_fd <-> [ SSL ] <-> io_fd ==== TCP ====
 *
 * The parent keeps one end of an AF_UNIX socketpair and uses it as if it
 * were the TCP socket; we hold the other end (plain_fd) and the TCP socket
 * (io_fd).  After the handshake we relay both directions until both are
 * closed:
 *   - EOF on plain_fd (the parent shut its write side or closed) -> we send
 *     TLS close_notify, and keep relaying the other direction;
 *   - close_notify from the peer -> shutdown(plain_fd, SHUT_WR): the parent
 *     reads a clean EOF;
 *   - EOF on the TCP socket without close_notify is a truncation: an error
 *     (ECONNRESET), never a clean EOF, so a peer (or anyone on the path)
 *     cannot cut a stream short silently.  The error reaches the parent in
 *     log + complete frames, which it has read before our exit closes
 *     plain_fd (complete waits for its reply).
 *
 * Security: TLS 1.3 only; both sides present a certificate and verify the
 * other's against DIR/ca-cert.pem and nothing else (no system CAs); the
 * client checks that the server's certificate names --peer-name (DNS or IP
 * SAN); the server accepts any client certificate the CA signed: the CA is
 * the trust boundary.  DIR/key.pem must not be accessible by group or
 * others (as ssh).  The handshake has a deadline (--handshake-timeout-ms),
 * so a silent or trickling peer is dropped.
 *
 * In TLS 1.3 the client finishes its handshake before the server has looked
 * at the client's certificate.  So that a refused client learns it here (in
 * one line, "alert unknown ca") rather than at its first write, the client
 * counts the peer as authenticated only once the server's first session
 * ticket arrives: an OpenSSL server sends it right after accepting the
 * client's certificate.  (The ticket is not kept; there is no resumption.)
 *
 * Every fd is non-blocking and one ppoll() loop drives both the handshake
 * and the relay; SIGTERM is blocked except inside ppoll (so it cannot slip
 * in between a check of the flag and the wait), and stops us at once
 * without close_notify: the peer then sees a truncation, as it should.
 */

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "helper.h"

#define TUNNEL_CONTEXT "xcsave-helper tls"

#ifndef XCS_HAVE_TLS

int xcs_tunnel(const struct xcs_op *op)
{
    (void)op;
    return xcs_not_built(TUNNEL_CONTEXT, "TLS",
                         "OpenSSL's headers, libssl-dev, were missing");
}

#else /* XCS_HAVE_TLS */

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* One read from either side: many TLS records (16 KiB each) per syscall. */
#define RELAY_BUF (256u * 1024u)

/*
 * Once the parent has closed its end and our close_notify is out, how long
 * we go on reading (and dropping) what the peer sends, waiting for its
 * close_notify: closing a TCP socket with unread data sends RST, which
 * could destroy our last records before the peer has read them.
 */
#define LINGER_NS (2000u * 1000000u)

static volatile sig_atomic_t tunnel_stop;

static void tunnel_sigterm(int signo)
{
    (void)signo;
    tunnel_stop = 1;
}

/* One direction's bytes in flight: [off, len) is still to be written. */
struct relay_buf {
    uint8_t *data;
    size_t off, len;
};

struct tunnel {
    const struct xcs_op *op;
    SSL_CTX *ctx;
    SSL *ssl;
    char peer_addr[INET6_ADDRSTRLEN + 8];
    struct relay_buf up;   /* plain_fd -> TLS */
    struct relay_buf down; /* TLS -> plain_fd */
    struct relay_buf wire; /* TLS records for io_fd (see wire_write) */
    uint64_t wire_flushed; /* bytes of records written to io_fd */
    uint64_t wire_notify;  /* ... once this many, only our close_notify is left */
    int authenticated;     /* the peer's certificate is accepted (see the top) */
    int ticket_seen;       /* client: the server's first session ticket arrived */
    int plain_eof;         /* read EOF on plain_fd */
    int notify_sent;       /* our close_notify is written */
    int tls_eof;           /* the peer's close_notify arrived */
    int plain_shut;        /* shutdown(plain_fd, SHUT_WR) done */
    int plain_gone;        /* the parent closed its end: discard what arrives */
    uint64_t linger_until; /* plain_gone, notify_sent: drain the peer until then */
    uint64_t sent, received, discarded;
    short want_io;         /* poll events the SSL calls asked for on io_fd */
};

/*
 * The write side of the SSL object is this BIO, not the socket: OpenSSL
 * writes one record (16 KiB) per BIO write, and one write() syscall each
 * cost more than the copy into t->wire; relay_step() sends the collected
 * records in large writes.  A full buffer is a retry (SSL_ERROR_WANT_WRITE),
 * and "flush" is a no-op: the relay loop writes t->wire out before it
 * waits, whatever state the handshake or the stream is in.
 */
static BIO_METHOD *wire_method;

static int wire_write(BIO *b, const char *data, int len)
{
    struct tunnel *t = BIO_get_data(b);
    size_t room = RELAY_BUF - t->wire.len;

    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (room == 0) {
        BIO_set_retry_write(b);
        return -1;
    }
    if ((size_t)len > room)
        len = (int)room;
    memcpy(t->wire.data + t->wire.len, data, (size_t)len);
    t->wire.len += (size_t)len;
    return len;
}

static long wire_ctrl(BIO *b, int cmd, long num, void *ptr)
{
    struct tunnel *t = BIO_get_data(b);

    (void)num;
    (void)ptr;
    switch (cmd) {
    case BIO_CTRL_FLUSH:
        return 1;
    case BIO_CTRL_WPENDING:
        return (long)(t->wire.len - t->wire.off);
    default:
        return 0;
    }
}

static int wire_create(BIO *b)
{
    BIO_set_init(b, 1);
    return 1;
}

static BIO *wire_bio(struct tunnel *t)
{
    BIO *b;

    if (!wire_method) {
        wire_method = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "xcsave wire");
        if (!wire_method || BIO_meth_set_write(wire_method, wire_write) != 1 ||
            BIO_meth_set_ctrl(wire_method, wire_ctrl) != 1 ||
            BIO_meth_set_create(wire_method, wire_create) != 1)
            return NULL;
    }
    b = BIO_new(wire_method);
    if (b)
        BIO_set_data(b, t);
    return b;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* "192.0.2.7:4000" or "[::1]:4000" for messages; "?" if unknown. */
static void format_peer(int fd, char *out, size_t size)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;

    snprintf(out, size, "?");
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) < 0)
        return;
    if (ss.ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)&ss;
        inet_ntop(AF_INET, &sin->sin_addr, host, sizeof(host));
        port = ntohs(sin->sin_port);
        snprintf(out, size, "%s:%u", host, port);
    } else if (ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, host, sizeof(host));
        port = ntohs(sin6->sin6_port);
        snprintf(out, size, "[%s]:%u", host, port);
    }
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);

    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
        return -1;
    return 0;
}

/* The oldest queued OpenSSL error as "reason (detail)"; clears the queue. */
static void ssl_reason(char *out, size_t size, unsigned long *first)
{
    unsigned long e = ERR_peek_error();
    const char *why = e ? ERR_reason_error_string(e) : NULL;

    *first = e;
    if (why)
        snprintf(out, size, "%s", why);
    else if (e)
        ERR_error_string_n(e, out, size);
    else
        snprintf(out, size, "unknown error");
    ERR_clear_error();
}

/*
 * errno for a failed handshake: EACCES when a certificate was refused, by
 * us (verify failed, none presented) or by the peer (its alert); EPROTO
 * for anything else that is not TLS 1.3 from a peer of ours (plaintext,
 * an old version).
 */
static int handshake_errno(unsigned long e)
{
    int reason = ERR_GET_REASON(e);

    if (ERR_GET_LIB(e) != ERR_LIB_SSL)
        return EPROTO;
    switch (reason) {
    case SSL_R_CERTIFICATE_VERIFY_FAILED:
    case SSL_R_PEER_DID_NOT_RETURN_A_CERTIFICATE:
    case SSL_R_TLSV13_ALERT_CERTIFICATE_REQUIRED:
    case SSL_R_SSLV3_ALERT_BAD_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_UNSUPPORTED_CERTIFICATE:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_REVOKED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED:
    case SSL_R_SSLV3_ALERT_CERTIFICATE_UNKNOWN:
    case SSL_R_TLSV1_ALERT_UNKNOWN_CA:
    case SSL_R_TLSV1_ALERT_ACCESS_DENIED:
        return EACCES;
    default:
        return EPROTO;
    }
}

/*
 * Report a failed SSL call (ret, from SSL_get_error) in one line and return
 * -1 with errno set.  `doing` is "TLS handshake with" or "TLS stream with".
 */
static int ssl_failed(struct tunnel *t, int err, const char *doing)
{
    char why[256];
    unsigned long first = 0;
    int saved = errno;
    int eno;

    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
        /* EOF or a socket error with nothing on OpenSSL's queue. */
        if (saved == 0 || saved == EPIPE || saved == ECONNRESET) {
            eno = ECONNRESET;
            snprintf(why, sizeof(why), "%s",
                     t->authenticated ? "the connection ended without close_notify "
                                        "(the stream was cut short)"
                                      : "the peer closed the connection");
        } else {
            eno = saved;
            snprintf(why, sizeof(why), "%s", strerror(saved));
        }
    } else {
        ssl_reason(why, sizeof(why), &first);
        if (ERR_GET_LIB(first) == ERR_LIB_SSL &&
            ERR_GET_REASON(first) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
            eno = ECONNRESET;
            if (t->authenticated)
                snprintf(why, sizeof(why), "the connection ended without close_notify "
                                           "(the stream was cut short)");
        } else {
            eno = t->authenticated ? EPROTO : handshake_errno(first);
        }
        if (ERR_GET_REASON(first) == SSL_R_CERTIFICATE_VERIFY_FAILED) {
            long v = SSL_get_verify_result(t->ssl);
            size_t n = strlen(why);
            if (v != X509_V_OK && n < sizeof(why))
                snprintf(why + n, sizeof(why) - n, " (%s)",
                         X509_verify_cert_error_string(v));
        }
    }
    xcs_log(XCS_LOG_ERROR, eno, TUNNEL_CONTEXT, "%s %s failed: %s", doing,
            t->peer_addr, why);
    errno = eno;
    return -1;
}

/* The client's new-session callback: the server has accepted our certificate. */
static int ticket_arrived(SSL *ssl, SSL_SESSION *sess)
{
    struct tunnel *t = SSL_get_app_data(ssl);

    (void)sess;
    t->ticket_seen = 1;
    return 0; /* we did not keep a reference to sess */
}

/*
 * key.pem: refused unless only its owner (us or root) can read it, as ssh
 * does; read from the fd we checked (no race with a rename of the path).
 */
static int load_key(struct tunnel *t, const char *path)
{
    struct stat st;
    EVP_PKEY *key = NULL;
    FILE *f = NULL;
    int fd = -1;
    int rc = -1;

    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        xcs_log(XCS_LOG_ERROR, errno, TUNNEL_CONTEXT, "%s: %s", path, strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) < 0) {
        xcs_log(XCS_LOG_ERROR, errno, TUNNEL_CONTEXT, "%s: %s", path, strerror(errno));
        goto out;
    }
    if ((st.st_mode & 077) || (st.st_uid != geteuid() && st.st_uid != 0)) {
        errno = EPERM;
        xcs_log(XCS_LOG_ERROR, EPERM, TUNNEL_CONTEXT,
                "%s: refusing a private key accessible by others (mode %04o, owner uid %u);"
                " it must be mode 0600 and ours", path, (unsigned)(st.st_mode & 07777),
                (unsigned)st.st_uid);
        goto out;
    }
    f = fdopen(fd, "r");
    if (!f) {
        xcs_log(XCS_LOG_ERROR, errno, TUNNEL_CONTEXT, "%s: %s", path, strerror(errno));
        goto out;
    }
    fd = -1; /* owned by f now */
    key = PEM_read_PrivateKey(f, NULL, NULL, NULL);
    if (!key || SSL_CTX_use_PrivateKey(t->ctx, key) != 1) {
        char why[256];
        unsigned long e;
        ssl_reason(why, sizeof(why), &e);
        errno = EINVAL;
        xcs_log(XCS_LOG_ERROR, EINVAL, TUNNEL_CONTEXT, "%s: not a usable private key: %s",
                path, why);
        goto out;
    }
    rc = 0;
out:
    EVP_PKEY_free(key);
    if (f)
        fclose(f);
    if (fd >= 0)
        close(fd);
    return rc;
}

/*
 * Whoever can write the TLS directory or one of its files chooses whom we
 * trust (a CA of theirs) or who we are: refuse one that group or others can
 * write, as ssh refuses such a ~/.ssh.  stat() follows a symlink: what
 * counts is the file read.  Returns 0, or -1 with errno set (logged).
 */
static int check_tls_path(const char *path, int want_read)
{
    struct stat st;
    int e;

    if (stat(path, &st) < 0 || (want_read && access(path, R_OK) < 0)) {
        e = errno;
        xcs_log(XCS_LOG_ERROR, e, TUNNEL_CONTEXT, "%s: %s (make it with: xcsave tls init)",
                path, strerror(e));
        errno = e;
        return -1;
    }
    if (st.st_mode & (S_IWGRP | S_IWOTH)) {
        xcs_log(XCS_LOG_ERROR, EPERM, TUNNEL_CONTEXT,
                "%s: refusing a TLS %s writable by group or others (mode %04o)", path,
                S_ISDIR(st.st_mode) ? "directory" : "file", (unsigned)(st.st_mode & 07777));
        errno = EPERM;
        return -1;
    }
    return 0;
}

/* A file of DIR, or a log line and errno when it cannot be used. */
static int dir_file(const char *dir, const char *name, char *out, size_t size)
{
    if ((size_t)snprintf(out, size, "%s/%s", dir, name) >= size) {
        errno = ENAMETOOLONG;
        xcs_log(XCS_LOG_ERROR, errno, TUNNEL_CONTEXT, "%s/%s: name too long", dir, name);
        return -1;
    }
    return check_tls_path(out, 1);
}

static int setup_ctx(struct tunnel *t)
{
    const struct xcs_op *op = t->op;
    char ca[4096], cert[4096], key[4096], why[256];
    BIO *rbio = NULL, *wbio = NULL;
    unsigned long e;

    if (check_tls_path(op->tls_dir, 0) < 0 ||
        dir_file(op->tls_dir, "ca-cert.pem", ca, sizeof(ca)) < 0 ||
        dir_file(op->tls_dir, "cert.pem", cert, sizeof(cert)) < 0 ||
        dir_file(op->tls_dir, "key.pem", key, sizeof(key)) < 0)
        return -1;
    t->ctx = SSL_CTX_new(op->tls_server ? TLS_server_method() : TLS_client_method());
    if (!t->ctx)
        goto ssl_error;
    if (SSL_CTX_set_min_proto_version(t->ctx, TLS1_3_VERSION) != 1 ||
        SSL_CTX_set_max_proto_version(t->ctx, TLS1_3_VERSION) != 1)
        goto ssl_error;
    /* Only the CA of DIR: no system trust store is ever loaded. */
    if (SSL_CTX_load_verify_locations(t->ctx, ca, NULL) != 1) {
        ssl_reason(why, sizeof(why), &e);
        errno = EINVAL;
        xcs_log(XCS_LOG_ERROR, EINVAL, TUNNEL_CONTEXT, "%s: not a usable CA certificate: %s",
                ca, why);
        return -1;
    }
    if (SSL_CTX_use_certificate_chain_file(t->ctx, cert) != 1) {
        ssl_reason(why, sizeof(why), &e);
        errno = EINVAL;
        xcs_log(XCS_LOG_ERROR, EINVAL, TUNNEL_CONTEXT, "%s: not a usable certificate: %s",
                cert, why);
        return -1;
    }
    if (load_key(t, key) < 0)
        return -1;
    if (SSL_CTX_check_private_key(t->ctx) != 1) {
        errno = EINVAL;
        xcs_log(XCS_LOG_ERROR, EINVAL, TUNNEL_CONTEXT, "%s does not match %s", key, cert);
        ERR_clear_error();
        return -1;
    }
    SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* AES-128-GCM first: as safe here, and faster than AES-256 with AES-NI. */
    if (SSL_CTX_set_ciphersuites(t->ctx, "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:"
                                         "TLS_CHACHA20_POLY1305_SHA256") != 1)
        goto ssl_error;
    /*
     * Relay mode: SSL_write may return after some records (partial writes),
     * and a retried write may come from a buffer we appended to meanwhile.
     * Read-ahead: one read() for a record's header and body.  (A 256 KiB
     * read buffer, many records per read(), measured worse: about 10% more
     * CPU per GiB in the receiving tunnel, mostly in memmove.)
     */
    SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                                 SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_clear_mode(t->ctx, SSL_MODE_RELEASE_BUFFERS);
    SSL_CTX_set_read_ahead(t->ctx, 1);
    if (op->tls_server) {
        /* One ticket: the client's signal that we accepted its certificate. */
        SSL_CTX_set_num_tickets(t->ctx, 1);
        SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_OFF);
    } else {
        SSL_CTX_set_session_cache_mode(t->ctx, SSL_SESS_CACHE_CLIENT |
                                                   SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(t->ctx, ticket_arrived);
    }
    t->ssl = SSL_new(t->ctx);
    if (!t->ssl)
        goto ssl_error;
    /* Reads straight from the socket (read-ahead: a record per read);
     * writes through wire_bio.  SSL_set_bio takes both (freed with ssl). */
    rbio = BIO_new_socket(op->io_fd, BIO_NOCLOSE);
    wbio = wire_bio(t);
    if (!rbio || !wbio)
        goto ssl_error;
    SSL_set_bio(t->ssl, rbio, wbio);
    rbio = wbio = NULL;
    SSL_set_app_data(t->ssl, t);
    if (op->tls_server) {
        SSL_set_accept_state(t->ssl);
    } else {
        /* The name the user typed: an address is checked as an IP SAN. */
        unsigned char addr[sizeof(struct in6_addr)];
        X509_VERIFY_PARAM *vp = SSL_get0_param(t->ssl);
        int is_ip = inet_pton(AF_INET, op->peer_name, addr) == 1 ||
                    inet_pton(AF_INET6, op->peer_name, addr) == 1;
        int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(vp, op->peer_name)
                       : SSL_set1_host(t->ssl, op->peer_name);
        if (ok != 1)
            goto ssl_error;
        SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        SSL_set_connect_state(t->ssl);
    }
    return 0;
ssl_error:
    BIO_free(rbio);
    BIO_free(wbio);
    ssl_reason(why, sizeof(why), &e);
    errno = ENOMEM;
    xcs_log(XCS_LOG_ERROR, ENOMEM, TUNNEL_CONTEXT, "setting up TLS: %s", why);
    return -1;
}

/* The peer is authenticated: tell the parent who it is. */
static void announce_peer(struct tunnel *t)
{
    X509 *cert = SSL_get1_peer_certificate(t->ssl);
    char subject[512] = "?";
    BIO *mem = NULL;

    if (cert) {
        mem = BIO_new(BIO_s_mem());
        if (mem &&
            X509_NAME_print_ex(mem, X509_get_subject_name(cert), 0, XN_FLAG_RFC2253) >= 0) {
            int n = BIO_read(mem, subject, (int)sizeof(subject) - 1);
            subject[n > 0 ? n : 0] = '\0';
        }
    }
    t->authenticated = 1;
    xcs_stub_tls_peer(subject, t->peer_addr, SSL_get_version(t->ssl),
                      SSL_get_cipher_name(t->ssl));
    xcs_log(XCS_LOG_INFO, 0, TUNNEL_CONTEXT, "TLS with %s (%s) up: %s %s", t->peer_addr,
            subject, SSL_get_version(t->ssl), SSL_get_cipher_name(t->ssl));
    BIO_free(mem);
    X509_free(cert);
}

/* The SSL call's verdict: 1 progress, 0 would block (want_io set), -1 failed. */
static int ssl_wait(struct tunnel *t, int ret, int *err)
{
    *err = SSL_get_error(t->ssl, ret);
    if (*err == SSL_ERROR_WANT_READ) {
        t->want_io |= POLLIN;
        return 0;
    }
    if (*err == SSL_ERROR_WANT_WRITE) {
        t->want_io |= POLLOUT;
        return 0;
    }
    return -1;
}

/*
 * t->wire -> io_fd.  Returns 1 if bytes moved, 0 if none could, -1 on
 * failure (logged).  A peer gone after its own close_notify while only our
 * close_notify was left to send is no failure: nothing is missing; nor is
 * anything OpenSSL still has to say while we linger (see LINGER_NS).
 */
static int flush_wire(struct tunnel *t)
{
    int moved = 0;

    while (t->wire.off < t->wire.len) {
        ssize_t w = write(t->op->io_fd, t->wire.data + t->wire.off, t->wire.len - t->wire.off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN) {
            t->want_io |= POLLOUT;
            break;
        }
        if (w < 0) {
            int e = errno;
            if ((t->tls_eof && t->notify_sent && t->wire_flushed >= t->wire_notify) ||
                t->linger_until) {
                t->wire.off = t->wire.len;
                return 1;
            }
            xcs_log(XCS_LOG_ERROR, e, TUNNEL_CONTEXT, "TLS %s %s failed: %s",
                    t->authenticated ? "stream with" : "handshake with", t->peer_addr,
                    strerror(e));
            errno = e == EPIPE ? ECONNRESET : e;
            return -1;
        }
        t->wire.off += (size_t)w;
        t->wire_flushed += (uint64_t)w;
        moved = 1;
    }
    if (t->wire.off == t->wire.len)
        t->wire.off = t->wire.len = 0;
    return moved;
}

/*
 * One pass over everything that can move without waiting.  Returns 1 if
 * something moved, 0 if every step would block, -1 on failure (logged).
 */
static int relay_step(struct tunnel *t)
{
    const char *doing = t->authenticated ? "TLS stream with" : "TLS handshake with";
    int moved = 0, err, r;

    if (!SSL_is_init_finished(t->ssl)) {
        r = SSL_do_handshake(t->ssl);
        if (r != 1) {
            if (ssl_wait(t, r, &err) < 0)
                return ssl_failed(t, err, doing);
            return flush_wire(t);
        }
        moved = 1;
        if (t->op->tls_server)
            announce_peer(t);
    }

    /* TLS -> down buffer (also takes in the client's session ticket). */
    while (!t->tls_eof && t->down.len < RELAY_BUF) {
        size_t got = 0;
        r = SSL_read_ex(t->ssl, t->down.data + t->down.len, RELAY_BUF - t->down.len, &got);
        if (r == 1) {
            t->down.len += got;
            moved = 1;
            continue;
        }
        err = SSL_get_error(t->ssl, r);
        if (err == SSL_ERROR_ZERO_RETURN) {
            t->tls_eof = 1; /* close_notify: a clean end of the peer's stream */
            moved = 1;
            break;
        }
        if (ssl_wait(t, r, &err) < 0) {
            if (t->linger_until) {
                /* Draining after our close: the peer's way of ending is its own. */
                ERR_clear_error();
                t->tls_eof = 1;
                moved = 1;
                break;
            }
            return ssl_failed(t, err, doing);
        }
        break;
    }
    if (!t->authenticated && t->ticket_seen) {
        announce_peer(t);
        moved = 1;
    }
    if (!t->authenticated && t->tls_eof) {
        /* close_notify instead of the ticket: the server ended it. */
        xcs_log(XCS_LOG_ERROR, ECONNRESET, TUNNEL_CONTEXT,
                "TLS handshake with %s failed: the peer closed the connection", t->peer_addr);
        errno = ECONNRESET;
        return -1;
    }
    if (!t->authenticated) {
        r = flush_wire(t);
        return r < 0 ? -1 : (moved | r); /* no plaintext moves before the peer is accepted */
    }

    /* down buffer -> plain_fd (or the bin, once the parent has closed it) */
    while (t->down.off < t->down.len) {
        ssize_t w;
        if (t->plain_gone) {
            t->discarded += t->down.len - t->down.off;
            t->down.off = t->down.len;
            moved = 1;
            break;
        }
        w = write(t->op->plain_fd, t->down.data + t->down.off, t->down.len - t->down.off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w < 0 && (errno == EPIPE || errno == ECONNRESET)) {
            t->plain_gone = 1; /* the parent closed its end: nobody reads */
            continue;
        }
        if (w < 0) {
            int e = errno;
            xcs_log(XCS_LOG_ERROR, e, TUNNEL_CONTEXT, "writing the plaintext socket: %s",
                    strerror(e));
            errno = e;
            return -1;
        }
        t->down.off += (size_t)w;
        t->received += (uint64_t)w;
        moved = 1;
    }
    if (t->down.off == t->down.len) {
        t->down.off = t->down.len = 0;
        if (t->tls_eof && !t->plain_shut) {
            /* The peer's clean end -> a clean EOF for the parent. */
            if (shutdown(t->op->plain_fd, SHUT_WR) < 0 && errno != ENOTCONN)
                t->plain_gone = 1;
            t->plain_shut = 1;
            moved = 1;
        }
    }

    /* plain_fd -> up buffer */
    while (!t->plain_eof && t->up.len < RELAY_BUF) {
        ssize_t n = read(t->op->plain_fd, t->up.data + t->up.len, RELAY_BUF - t->up.len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            break;
        if (n < 0 && errno != ECONNRESET) {
            int e = errno;
            xcs_log(XCS_LOG_ERROR, e, TUNNEL_CONTEXT, "reading the plaintext socket: %s",
                    strerror(e));
            errno = e;
            return -1;
        }
        if (n <= 0) {
            t->plain_eof = 1;
            moved = 1;
            break;
        }
        t->up.len += (size_t)n;
        moved = 1;
    }

    /* up buffer -> TLS; then, at the parent's EOF, close_notify */
    while (t->up.off < t->up.len) {
        size_t put = 0;
        r = SSL_write_ex(t->ssl, t->up.data + t->up.off, t->up.len - t->up.off, &put);
        if (r == 1) {
            t->up.off += put;
            t->sent += put;
            moved = 1;
            continue;
        }
        if (ssl_wait(t, r, &err) < 0)
            return ssl_failed(t, err, "TLS stream with");
        if (t->wire.len < RELAY_BUF)
            break;
        /* Our record buffer is full: send it and try again. */
        r = flush_wire(t);
        if (r < 0)
            return -1;
        if (r == 0)
            break;
    }
    if (t->up.off == t->up.len) {
        t->up.off = t->up.len = 0;
        if (t->plain_eof && !t->notify_sent) {
            t->wire_notify = t->wire_flushed + (t->wire.len - t->wire.off);
            r = SSL_shutdown(t->ssl); /* 0: sent, not yet received; 1: both */
            if (r >= 0) {
                t->notify_sent = 1;
                moved = 1;
            } else if (ssl_wait(t, r, &err) < 0) {
                if (!t->tls_eof)
                    return ssl_failed(t, err, "TLS stream with");
                /*
                 * The peer had ended its side cleanly and has closed the
                 * connection already (EPIPE/ECONNRESET): nothing of its
                 * stream is missing, and it no longer wants ours.
                 */
                ERR_clear_error();
                t->notify_sent = 1;
                moved = 1;
            }
        }
    }
    r = flush_wire(t);
    return r < 0 ? -1 : (moved | r);
}

static int run_tunnel(struct tunnel *t)
{
    const struct xcs_op *op = t->op;
    uint64_t deadline = now_ns() + (uint64_t)op->handshake_timeout_ms * 1000000u;
    sigset_t during_poll;

    sigprocmask(SIG_SETMASK, NULL, &during_poll);
    sigdelset(&during_poll, SIGTERM);
    for (;;) {
        struct pollfd pfd[3];
        struct timespec ts, *tsp = NULL;
        int r, step;

        if (tunnel_stop) {
            xcs_log(XCS_LOG_ERROR, ECANCELED, TUNNEL_CONTEXT,
                    "TLS %s %s stopped by SIGTERM", t->authenticated ? "stream with"
                                                                     : "handshake with",
                    t->peer_addr);
            errno = ECANCELED;
            return -1;
        }
        t->want_io = 0;
        step = relay_step(t);
        if (step < 0)
            return -1;
        if (t->authenticated && t->notify_sent && t->wire.len == 0 && t->tls_eof &&
            (t->plain_shut || t->plain_gone))
            return 0; /* both directions ended cleanly */
        if (t->authenticated && t->notify_sent && t->wire.len == 0 && t->plain_gone &&
            !t->linger_until) {
            /*
             * The parent closed its end (not just its write side): it wants
             * nothing more from the peer.  Our close_notify is out; FIN
             * after it, then drain the peer a little (see LINGER_NS).
             */
            shutdown(op->io_fd, SHUT_WR);
            t->linger_until = now_ns() + LINGER_NS;
            continue;
        }
        if (step > 0)
            continue;

        if (!t->authenticated || t->linger_until) {
            uint64_t now = now_ns(), until = t->linger_until ? t->linger_until : deadline;
            if (now >= until && t->linger_until)
                return 0; /* the peer did not close in time: ours is done */
            if (now >= until) {
                xcs_log(XCS_LOG_ERROR, ETIMEDOUT, TUNNEL_CONTEXT,
                        "TLS handshake with %s failed: no complete handshake within %u ms",
                        t->peer_addr, op->handshake_timeout_ms);
                errno = ETIMEDOUT;
                return -1;
            }
            ts.tv_sec = (time_t)((until - now) / 1000000000u);
            ts.tv_nsec = (long)((until - now) % 1000000000u);
            tsp = &ts;
        }
        pfd[0].fd = op->io_fd;
        pfd[0].events = t->want_io;
        /* POLLHUP is reported even with no events asked: stop polling a
         * plain_fd whose other end is gone, or ppoll would spin on it. */
        pfd[1].fd = t->plain_gone ? -1 : op->plain_fd;
        pfd[1].events = 0;
        if (t->authenticated && !t->plain_eof && t->up.len < RELAY_BUF)
            pfd[1].events |= POLLIN;
        if (t->authenticated && t->down.off < t->down.len && !t->plain_gone)
            pfd[1].events |= POLLOUT;
        /* The parent never writes to our stdin during a tunnel: readable
         * means EOF, the parent has gone (or stopped us). */
        pfd[2].fd = STDIN_FILENO;
        pfd[2].events = POLLIN;
        pfd[0].revents = pfd[1].revents = pfd[2].revents = 0;
        r = ppoll(pfd, 3, tsp, &during_poll);
        if (r < 0 && errno != EINTR) {
            int e = errno;
            xcs_log(XCS_LOG_ERROR, e, TUNNEL_CONTEXT, "ppoll: %s", strerror(e));
            errno = e;
            return -1;
        }
        if (r > 0 && (pfd[1].revents & (POLLHUP | POLLERR))) {
            /*
             * Both directions of the socketpair are shut: the parent closed
             * its end (or both it and we shut our write sides, when nothing
             * is left to write).  What the peer sends from now on has no
             * reader.  What the parent wrote before is still read (reads
             * go on every pass, without polling: never EAGAIN after HUP).
             */
            t->plain_gone = 1;
        }
        if (r > 0 && pfd[2].revents) {
            xcs_log(XCS_LOG_ERROR, EPIPE, TUNNEL_CONTEXT,
                    "TLS with %s: the parent closed the control pipe", t->peer_addr);
            errno = EPIPE;
            return -1;
        }
    }
}

int xcs_tunnel(const struct xcs_op *op)
{
    struct tunnel t;
    uint64_t t0 = now_ns();
    int rc = -1, saved, one = 1;

    memset(&t, 0, sizeof(t));
    t.op = op;
    format_peer(op->io_fd, t.peer_addr, sizeof(t.peer_addr));

    /* SIGTERM sets a flag, seen at the next ppoll() at the latest. */
    if (xcs_sigterm_until_ppoll(tunnel_sigterm) < 0) {
        saved = errno;
        xcs_log(XCS_LOG_ERROR, saved, TUNNEL_CONTEXT, "signals: %s", strerror(saved));
        errno = saved;
        return -1;
    }
    xcs_arm_parent_death();

    /*
     * O_NONBLOCK belongs to the open file description: plain_fd is our own
     * end of the socketpair (the parent's end is another socket, untouched);
     * the TCP socket's description is shared with the parent's copy, which
     * the parent no longer uses once it has handed the socket to us.
     */
    /*
     * Our records leave in large writes already; what Nagle would hold back
     * is the last, small one of a message the peer is waiting for (the
     * migration's handshake).  Not a TCP socket (a test's socketpair): fine.
     */
    (void)setsockopt(op->io_fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (set_nonblock(op->io_fd) < 0 || set_nonblock(op->plain_fd) < 0) {
        saved = errno;
        xcs_log(XCS_LOG_ERROR, saved, TUNNEL_CONTEXT, "O_NONBLOCK: %s", strerror(saved));
        errno = saved;
        return -1;
    }
    t.up.data = malloc(RELAY_BUF);
    t.down.data = malloc(RELAY_BUF);
    t.wire.data = malloc(RELAY_BUF);
    if (!t.up.data || !t.down.data || !t.wire.data) {
        errno = ENOMEM;
        xcs_log(XCS_LOG_ERROR, ENOMEM, TUNNEL_CONTEXT, "out of memory for the relay buffers");
        goto out;
    }
    if (setup_ctx(&t) < 0)
        goto out;
    rc = run_tunnel(&t);
out:
    saved = errno;
    if (rc < 0 && t.wire.off < t.wire.len) {
        /* A failure's alert (e.g. "unknown ca") is still in t->wire: one
         * try to send it, so the peer learns why, not by its timeout. */
        ssize_t w = write(op->io_fd, t.wire.data + t.wire.off, t.wire.len - t.wire.off);
        (void)w;
    }
    if (t.authenticated)
        xcs_stub_tunnel_stats(t.sent, t.received, t.discarded, now_ns() - t0);
    SSL_free(t.ssl);
    SSL_CTX_free(t.ctx);
    free(t.up.data);
    free(t.down.data);
    free(t.wire.data);
    BIO_meth_free(wire_method);
    wire_method = NULL;
    ERR_clear_error();
    errno = saved;
    return rc;
}

#endif /* XCS_HAVE_TLS */
