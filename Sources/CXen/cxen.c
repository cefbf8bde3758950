// The Xen toolstack libraries, opened on first use. See include/cxen_functions.h.
#include "CXen.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// The sonames of the release whose headers this file is compiled against: libxenctrl,
// libxenguest and libxenlight carry the Xen release in their soname; the small libraries
// have stable sonames. The release comes from CXEN_XEN_RELEASE (include/CXen.h).
static const char *const cxen_library_names[CXEN_LIB_COUNT] = {
    [CXEN_LIB_TOOLLOG] = "libxentoollog.so.1",
    [CXEN_LIB_CTRL] = "libxenctrl.so." CXEN_XEN_RELEASE,
    [CXEN_LIB_GUEST] = "libxenguest.so." CXEN_XEN_RELEASE,
    [CXEN_LIB_STORE] = "libxenstore.so.4",
    [CXEN_LIB_EVTCHN] = "libxenevtchn.so.1",
    [CXEN_LIB_FOREIGNMEMORY] = "libxenforeignmemory.so.1",
    [CXEN_LIB_LIGHT] = "libxenlight.so." CXEN_XEN_RELEASE,
};

// One pointer per function, filled by cxen_load_once.
#define CXEN_POINTER(lib, ret, name, params, args) static ret(*cxen_p_##name) params;
#define CXEN_POINTER_VOID(lib, name, params, args) static void(*cxen_p_##name) params;
CXEN_FUNCTIONS(CXEN_POINTER, CXEN_POINTER_VOID)

// A call before a successful cxen_load is a bug in remusd (every handle's initialiser loads
// first): say which function, rather than jump through a null pointer.
static void cxen_not_loaded(const char *name) {
    fprintf(stderr, "remusd: internal error: %s called before the Xen libraries were loaded\n", name);
    abort();
}

// The trampolines Swift calls. cxen_load must have succeeded first (RemusXen's XenLibraries
// ensures it before any handle is opened).
#define CXEN_TRAMPOLINE(lib, ret, name, params, args) \
    ret cxen_##name params { \
        if (cxen_p_##name == NULL) cxen_not_loaded(#name); \
        return cxen_p_##name args; \
    }
#define CXEN_TRAMPOLINE_VOID(lib, name, params, args) \
    void cxen_##name params { \
        if (cxen_p_##name == NULL) cxen_not_loaded(#name); \
        cxen_p_##name args; \
    }
CXEN_FUNCTIONS(CXEN_TRAMPOLINE, CXEN_TRAMPOLINE_VOID)

static pthread_once_t cxen_once = PTHREAD_ONCE_INIT;
static char cxen_failure[512];

static void cxen_load_once(void) {
    void *handles[CXEN_LIB_COUNT] = {0};
    for (int i = 0; i < CXEN_LIB_COUNT; i++) {
        // RTLD_GLOBAL: libxenlight finds libxenctrl's symbols as if linked.
        handles[i] = dlopen(cxen_library_names[i], RTLD_NOW | RTLD_GLOBAL);
        if (handles[i] == NULL) {
            const char *why = dlerror();
            snprintf(cxen_failure, sizeof cxen_failure, "%s", why ? why : cxen_library_names[i]);
            return;
        }
    }
    void *symbol;
#define CXEN_RESOLVE(lib, ret, name, params, args)                                              \
    symbol = dlsym(handles[lib], #name);                                                         \
    if (symbol == NULL) {                                                                        \
        snprintf(cxen_failure, sizeof cxen_failure, "%s has no symbol %s", cxen_library_names[lib], #name); \
        return;                                                                                  \
    }                                                                                            \
    memcpy(&cxen_p_##name, &symbol, sizeof symbol);
#define CXEN_RESOLVE_VOID(lib, name, params, args) CXEN_RESOLVE(lib, void, name, params, args)
    CXEN_FUNCTIONS(CXEN_RESOLVE, CXEN_RESOLVE_VOID)
    // Loaded libraries stay loaded for the life of the process.
}

int cxen_load(const char **failure) {
    pthread_once(&cxen_once, cxen_load_once);
    if (cxen_failure[0] != '\0') {
        *failure = cxen_failure;
        return -1;
    }
    *failure = NULL;
    return 0;
}

const char *cxen_xen_release(void) { return CXEN_XEN_RELEASE; }
