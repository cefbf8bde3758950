// The Xen toolstack libraries as remusd sees them (Debian: libxen-dev; headers only: the
// libraries themselves are opened on first use, see cxen_functions.h), plus the few things
// Swift cannot import: the hypercall-buffer initialiser macro and a logger whose va_list
// callback formats in C and hands Swift a finished string.
//
// Order matters: xenctrl.h first with __XEN_TOOLS__ defined (the domctl/sysctl headers refuse
// to be read without it), then xenguest.h, which needs xenctrl.h's types.
#ifndef CXEN_H
#define CXEN_H

#ifndef __XEN_TOOLS__
#define __XEN_TOOLS__ 1
#endif

#include <stdarg.h>
#include <stdio.h>

#include <xentoollog.h>
#include <xenctrl.h>
#include <xenguest.h>
#include <xenstore.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <libxl.h>
#include <libxl_utils.h>

#include "cxen_functions.h"

// MARK: which release

// The Xen release these headers belong to, which names the sonames to open. The domctl
// interface version changes with every release that matters to us; add a line per release.
#if XEN_DOMCTL_INTERFACE_VERSION == 0x00000015
#define CXEN_XEN_RELEASE "4.17"
#define CXEN_XEN_MINOR 17
#elif XEN_DOMCTL_INTERFACE_VERSION == 0x00000017 && defined(LIBXL_HAVE_BUILDINFO_LLC_COLORS)
// 4.19 has the same domctl version; LLC colouring came with 4.20.
#define CXEN_XEN_RELEASE "4.20"
#define CXEN_XEN_MINOR 20
#else
#error "unknown Xen headers (XEN_DOMCTL_INTERFACE_VERSION): add their release to CXen.h"
#endif

// MARK: loading

/// Opens the Xen libraries once (later calls return the first outcome). Returns 0 when every
/// library and function was found; otherwise -1 with `*failure` naming what was missing (a
/// static string).
int cxen_load(const char **failure);

/// The release whose libraries this build opens, e.g. "4.17".
const char *cxen_xen_release(void);

#define CXEN_DECLARE(lib, ret, name, params, args) ret cxen_##name params;
#define CXEN_DECLARE_VOID(lib, name, params, args) void cxen_##name params;
CXEN_FUNCTIONS(CXEN_DECLARE, CXEN_DECLARE_VOID)
#undef CXEN_DECLARE
#undef CXEN_DECLARE_VOID

// MARK: hypercall buffers

/// Prepares `buffer` as DECLARE_HYPERCALL_BUFFER would: no memory yet, no bounce buffer.
/// Allocate with xc__hypercall_buffer_alloc_pages(xch, buffer, pages) and free with
/// xc__hypercall_buffer_free_pages(xch, buffer, pages); the buffer struct must stay at one
/// address from allocation to free (libxenctrl keeps pointers to it while a hypercall runs).
static inline void cxen_hypercall_buffer_init(xc_hypercall_buffer_t *buffer) {
    buffer->hbuf = NULL;
    buffer->param_shadow = NULL;
    buffer->dir = 0;
    buffer->sz = 0;
    buffer->ubuf = (void *)-1;
}

// MARK: logger

/// Receives one finished log line. `context` and `message` live only for the call.
/// `errnoval` is -1 when the message carries no errno; `level` is XTL_PROGRESS for progress.
typedef void (*cxen_log_sink)(void *owner, xentoollog_level level, int errnoval,
                              const char *context, const char *message);

/// A xentoollog_logger that formats each message and passes it to `sink`.
/// `base` must stay the first member: the libraries call base's function pointers with &base.
typedef struct cxen_logger {
    xentoollog_logger base;
    cxen_log_sink sink;
    void *owner;
} cxen_logger;

/// Longest message handed to the sink, in bytes including the terminating NUL; longer ones
/// are cut (vsnprintf semantics).
#define CXEN_LOG_MESSAGE_MAX 1024

static inline void cxen_logger_vmessage(xentoollog_logger *logger, xentoollog_level level,
                                        int errnoval, const char *context, const char *format,
                                        va_list arguments) {
    cxen_logger *self = (cxen_logger *)logger;
    char message[CXEN_LOG_MESSAGE_MAX];
    vsnprintf(message, sizeof message, format, arguments);
    self->sink(self->owner, level, errnoval, context, message);
}

static inline void cxen_logger_progress(xentoollog_logger *logger, const char *context,
                                        const char *doing_what, int percent,
                                        unsigned long done, unsigned long total) {
    cxen_logger *self = (cxen_logger *)logger;
    char message[CXEN_LOG_MESSAGE_MAX];
    snprintf(message, sizeof message, "%s: %lu/%lu (%d%%)", doing_what ? doing_what : "",
             done, total, percent);
    self->sink(self->owner, XTL_PROGRESS, -1, context, message);
}

// The owner frees the struct; the libraries never call destroy on a logger they were given.
static inline void cxen_logger_destroy(xentoollog_logger *logger) { (void)logger; }

/// Fills in `logger` so that every message goes to `sink(owner, …)`.
static inline void cxen_logger_init(cxen_logger *logger, cxen_log_sink sink, void *owner) {
    logger->base.vmessage = cxen_logger_vmessage;
    logger->base.progress = cxen_logger_progress;
    logger->base.destroy = cxen_logger_destroy;
    logger->sink = sink;
    logger->owner = owner;
}

#endif
