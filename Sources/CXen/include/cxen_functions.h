// Every Xen toolstack function remusd calls, in one list. remusd does not link the Xen
// libraries: they are opened with dlopen the first time the Xen backend is used (cxen_load), so
// a host without Xen runs the simulated guest with the same binary. Swift calls the `cxen_`
// trampolines declared from this list; calling the libraries' own names does not link.
//
// One entry: CXEN_FN(library, return type, name, (parameters), (arguments)), or CXEN_VOID for
// a function that returns nothing. `library` is an index into cxen_library_names (cxen.c).
//
// Adding a function: add its line here, nothing else.
#ifndef CXEN_FUNCTIONS_H
#define CXEN_FUNCTIONS_H

#define CXEN_LIB_TOOLLOG 0
#define CXEN_LIB_CTRL 1
#define CXEN_LIB_GUEST 2
#define CXEN_LIB_STORE 3
#define CXEN_LIB_EVTCHN 4
#define CXEN_LIB_FOREIGNMEMORY 5
#define CXEN_LIB_LIGHT 6
#define CXEN_LIB_COUNT 7

#define CXEN_FUNCTIONS(CXEN_FN, CXEN_VOID) \
    CXEN_VOID(CXEN_LIB_TOOLLOG, xtl_logv, \
        (struct xentoollog_logger *logger, xentoollog_level level, int errnoval, const char *context, const char *format, va_list arguments), \
        (logger, level, errnoval, context, format, arguments)) \
    CXEN_VOID(CXEN_LIB_TOOLLOG, xtl_progress, \
        (struct xentoollog_logger *logger, const char *context, const char *doing_what, unsigned long done, unsigned long total), \
        (logger, context, doing_what, done, total)) \
    CXEN_FN(CXEN_LIB_CTRL, xc_interface *, xc_interface_open, \
        (xentoollog_logger *logger, xentoollog_logger *dombuild_logger, unsigned open_flags), \
        (logger, dombuild_logger, open_flags)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_interface_close, (xc_interface *xch), (xch)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_version, (xc_interface *xch, int cmd, void *arg), (xch, cmd, arg)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_domain_pause, (xc_interface *xch, uint32_t domid), (xch, domid)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_domain_unpause, (xc_interface *xch, uint32_t domid), (xch, domid)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_domain_getinfolist, \
        (xc_interface *xch, uint32_t first_domain, unsigned int max_domains, xc_domaininfo_t *info), \
        (xch, first_domain, max_domains, info)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_physinfo, (xc_interface *xch, xc_physinfo_t *info), (xch, info)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_hvm_param_get, \
        (xc_interface *handle, uint32_t dom, uint32_t param, uint64_t *value), (handle, dom, param, value)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_domain_shutdown, (xc_interface *xch, uint32_t domid, int reason), (xch, domid, reason)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_vcpu_getcontext, \
        (xc_interface *xch, uint32_t domid, uint32_t vcpu, vcpu_guest_context_any_t *ctxt), (xch, domid, vcpu, ctxt)) \
    CXEN_FN(CXEN_LIB_CTRL, int, xc_vcpu_setcontext, \
        (xc_interface *xch, uint32_t domid, uint32_t vcpu, vcpu_guest_context_any_t *ctxt), (xch, domid, vcpu, ctxt)) \
    CXEN_FN(CXEN_LIB_CTRL, void *, xc__hypercall_buffer_alloc_pages, \
        (xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages), (xch, b, nr_pages)) \
    CXEN_VOID(CXEN_LIB_CTRL, xc__hypercall_buffer_free_pages, \
        (xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages), (xch, b, nr_pages)) \
    CXEN_FN(CXEN_LIB_GUEST, int, xc_domain_save, \
        (xc_interface *xch, int io_fd, uint32_t dom, uint32_t flags, struct save_callbacks *callbacks, xc_stream_type_t stream_type, int recv_fd), \
        (xch, io_fd, dom, flags, callbacks, stream_type, recv_fd)) \
    CXEN_FN(CXEN_LIB_GUEST, int, xc_domain_resume, (xc_interface *xch, uint32_t domid, int fast), (xch, domid, fast)) \
    CXEN_FN(CXEN_LIB_GUEST, int, xc_suspend_evtchn_init_sane, \
        (xc_interface *xch, struct xenevtchn_handle *xce, uint32_t domid, int port, int *lockfd), \
        (xch, xce, domid, port, lockfd)) \
    CXEN_FN(CXEN_LIB_GUEST, int, xc_suspend_evtchn_release, \
        (xc_interface *xch, struct xenevtchn_handle *xce, uint32_t domid, int suspend_evtchn, int *lockfd), \
        (xch, xce, domid, suspend_evtchn, lockfd)) \
    CXEN_FN(CXEN_LIB_STORE, struct xs_handle *, xs_open, (unsigned long flags), (flags)) \
    CXEN_VOID(CXEN_LIB_STORE, xs_close, (struct xs_handle *xsh), (xsh)) \
    CXEN_FN(CXEN_LIB_STORE, void *, xs_read, \
        (struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len), (h, t, path, len)) \
    CXEN_FN(CXEN_LIB_STORE, bool, xs_write, \
        (struct xs_handle *h, xs_transaction_t t, const char *path, const void *data, unsigned int len), (h, t, path, data, len)) \
    CXEN_FN(CXEN_LIB_STORE, bool, xs_resume_domain, (struct xs_handle *h, unsigned int domid), (h, domid)) \
    CXEN_FN(CXEN_LIB_STORE, char **, xs_directory, \
        (struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num), (h, t, path, num)) \
    CXEN_FN(CXEN_LIB_EVTCHN, xenevtchn_handle *, xenevtchn_open, (struct xentoollog_logger *logger, unsigned int flags), (logger, flags)) \
    CXEN_FN(CXEN_LIB_EVTCHN, int, xenevtchn_close, (xenevtchn_handle *xce), (xce)) \
    CXEN_FN(CXEN_LIB_EVTCHN, int, xenevtchn_fd, (xenevtchn_handle *xce), (xce)) \
    CXEN_FN(CXEN_LIB_EVTCHN, int, xenevtchn_notify, (xenevtchn_handle *xce, evtchn_port_t port), (xce, port)) \
    CXEN_FN(CXEN_LIB_EVTCHN, xenevtchn_port_or_error_t, xenevtchn_pending, (xenevtchn_handle *xce), (xce)) \
    CXEN_FN(CXEN_LIB_EVTCHN, int, xenevtchn_unmask, (xenevtchn_handle *xce, evtchn_port_t port), (xce, port)) \
    CXEN_FN(CXEN_LIB_FOREIGNMEMORY, xenforeignmemory_handle *, xenforeignmemory_open, \
        (struct xentoollog_logger *logger, unsigned int open_flags), (logger, open_flags)) \
    CXEN_FN(CXEN_LIB_FOREIGNMEMORY, int, xenforeignmemory_close, (xenforeignmemory_handle *fmem), (fmem)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_ctx_alloc, \
        (libxl_ctx **pctx, int version, unsigned flags, xentoollog_logger *lg), (pctx, version, flags, lg)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_ctx_free, (libxl_ctx *ctx), (ctx)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_childproc_setmode, \
        (libxl_ctx *ctx, const libxl_childproc_hooks *hooks, void *user), (ctx, hooks, user)) \
    CXEN_FN(CXEN_LIB_LIGHT, const char *, libxl_error_to_string, (libxl_error p), (p)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_name_to_domid, (libxl_ctx *ctx, const char *name, uint32_t *domid), (ctx, name, domid)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_config_init, (libxl_domain_config *d_config), (d_config)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_config_dispose, (libxl_domain_config *d_config), (d_config)) \
    CXEN_FN(CXEN_LIB_LIGHT, char *, libxl_domain_config_to_json, (libxl_ctx *ctx, libxl_domain_config *p), (ctx, p)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_config_from_json, \
        (libxl_ctx *ctx, libxl_domain_config *p, const char *s), (ctx, p, s)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_retrieve_domain_configuration, \
        (libxl_ctx *ctx, uint32_t domid, libxl_domain_config *d_config, const libxl_asyncop_how *ao_how), \
        (ctx, domid, d_config, ao_how)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_restore_params_init, (libxl_domain_restore_params *p), (p)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_restore_params_dispose, (libxl_domain_restore_params *p), (p)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_create_restore, \
        (libxl_ctx *ctx, libxl_domain_config *d_config, uint32_t *domid, int restore_fd, int send_back_fd, \
         const libxl_domain_restore_params *params, const libxl_asyncop_how *ao_how, \
         const libxl_asyncprogress_how *aop_console_how), \
        (ctx, d_config, domid, restore_fd, send_back_fd, params, ao_how, aop_console_how)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_unpause, \
        (libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how), (ctx, domid, ao_how)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_destroy, \
        (libxl_ctx *ctx, uint32_t domid, const libxl_asyncop_how *ao_how), (ctx, domid, ao_how)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_rename, \
        (libxl_ctx *ctx, uint32_t domid, const char *old_name, const char *new_name), (ctx, domid, old_name, new_name)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_sched_params_init, (libxl_domain_sched_params *p), (p)) \
    CXEN_VOID(CXEN_LIB_LIGHT, libxl_domain_sched_params_dispose, (libxl_domain_sched_params *p), (p)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_sched_params_get, \
        (libxl_ctx *ctx, uint32_t domid, libxl_domain_sched_params *params), (ctx, domid, params)) \
    CXEN_FN(CXEN_LIB_LIGHT, int, libxl_domain_sched_params_set, \
        (libxl_ctx *ctx, uint32_t domid, const libxl_domain_sched_params *params), (ctx, domid, params))

#endif
