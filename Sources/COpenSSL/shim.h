// OpenSSL (Debian's libssl-dev, 3.x) for RemusTLS, plus what Swift cannot import from it: calls
// that are macros over SSL_CTX_ctrl / BIO_ctrl, option bits built by macros, and the variadic
// key generation call. Nothing else lives here.
#ifndef REMUS_COPENSSL_SHIM_H
#define REMUS_COPENSSL_SHIM_H

#include <openssl/ssl.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <openssl/bio.h>

// SSL_CTX_set_min_proto_version / _max_ are macros: TLS 1.3 and nothing older.
static inline int remus_ssl_ctx_tls13_only(SSL_CTX *ctx) {
    return SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION) == 1
        && SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) == 1;
}

// SSL_OP_ENABLE_KTLS is built with the SSL_OP_BIT macro (0 where the headers predate kTLS).
static inline uint64_t remus_ssl_op_enable_ktls(void) {
#ifdef SSL_OP_ENABLE_KTLS
    return SSL_OP_ENABLE_KTLS;
#else
    return 0;
#endif
}

static inline uint64_t remus_ssl_op_no_ticket(void) { return SSL_OP_NO_TICKET; }
static inline uint64_t remus_ssl_op_no_renegotiation(void) { return SSL_OP_NO_RENEGOTIATION; }
// A peer that vanishes without close_notify reads as end of input; the stream's own records
// (STREAM_END, CHECKPOINT_END) tell a clean end from a cut one.
static inline uint64_t remus_ssl_op_ignore_unexpected_eof(void) { return SSL_OP_IGNORE_UNEXPECTED_EOF; }

// SSL_CTX_set_mode is a macro over SSL_CTX_ctrl.
static inline void remus_ssl_ctx_set_mode(SSL_CTX *ctx, long mode) { SSL_CTX_set_mode(ctx, mode); }

// BIO_get_ktls_send / BIO_get_ktls_recv are macros over BIO_ctrl: whether the kernel took over
// the record layer of this direction.
static inline int remus_bio_ktls_send(BIO *bio) {
#ifdef BIO_get_ktls_send
    return bio != NULL && BIO_get_ktls_send(bio) == 1;
#else
    (void)bio;
    return 0;
#endif
}

static inline int remus_bio_ktls_recv(BIO *bio) {
#ifdef BIO_get_ktls_recv
    return bio != NULL && BIO_get_ktls_recv(bio) == 1;
#else
    (void)bio;
    return 0;
#endif
}

// BIO_get_mem_data is a macro: the bytes a memory BIO holds (not copied; owned by the BIO).
static inline long remus_bio_mem_data(BIO *bio, char **data) { return BIO_get_mem_data(bio, data); }

// EVP_EC_gen is a macro over the variadic EVP_PKEY_Q_keygen: an ECDSA P-256 key.
static inline EVP_PKEY *remus_ec_p256_keygen(void) { return EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"); }

#endif
