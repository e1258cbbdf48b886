/* A minimal NVTX injection library for tests: it records every push/pop/mark of every domain.
 *
 * NVTX loads the library named by NVTX_INJECTION64_PATH at the first NVTX call and asks it to fill
 * the callback tables. Each event is appended as one line to the file named by WB_NVTX_LOG
 * (suffixed with the process id):  push <domain> <message> <payload>  |  pop <domain>  |  mark ...
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <nvtx3/nvToolsExt.h>

typedef struct { char name[128]; } Named;  /* domains and registered strings are handed back as these */

static FILE *out;

static const char *domain_name(nvtxDomainHandle_t d) { return d ? ((Named *)d)->name : "(default)"; }

static void message_of(const nvtxEventAttributes_t *a, char *buf, size_t n) {
    if (!a) { snprintf(buf, n, "?"); return; }
    if (a->messageType == NVTX_MESSAGE_TYPE_ASCII) snprintf(buf, n, "%s", a->message.ascii);
    else if (a->messageType == NVTX_MESSAGE_TYPE_REGISTERED) snprintf(buf, n, "%s", ((Named *)a->message.registered)->name);
    else snprintf(buf, n, "?");
}

static long long payload_of(const nvtxEventAttributes_t *a) {
    if (!a) return -1;
    switch (a->payloadType) {
        case NVTX_PAYLOAD_TYPE_INT64: return (long long)a->payload.llValue;
        case NVTX_PAYLOAD_TYPE_UNSIGNED_INT64: return (long long)a->payload.ullValue;
        case NVTX_PAYLOAD_TYPE_INT32: return a->payload.iValue;
        case NVTX_PAYLOAD_TYPE_UNSIGNED_INT32: return a->payload.uiValue;
        default: return -1;
    }
}

static nvtxDomainHandle_t NVTX_API domain_create(const char *name) {
    Named *d = calloc(1, sizeof(Named));
    snprintf(d->name, sizeof d->name, "%s", name);
    return (nvtxDomainHandle_t)d;
}

static nvtxStringHandle_t NVTX_API register_string(nvtxDomainHandle_t d, const char *s) {
    (void)d;
    Named *h = calloc(1, sizeof(Named));
    snprintf(h->name, sizeof h->name, "%s", s);
    return (nvtxStringHandle_t)h;
}

static int NVTX_API push(nvtxDomainHandle_t d, const nvtxEventAttributes_t *a) {
    char msg[256];
    message_of(a, msg, sizeof msg);
    fprintf(out, "push %s %s %lld %u\n", domain_name(d), msg, payload_of(a), a ? a->category : 0);
    fflush(out);
    return 0;
}

static int NVTX_API pop(nvtxDomainHandle_t d) {
    fprintf(out, "pop %s\n", domain_name(d));
    fflush(out);
    return 0;
}

static void NVTX_API mark(nvtxDomainHandle_t d, const nvtxEventAttributes_t *a) {
    char msg[256];
    message_of(a, msg, sizeof msg);
    fprintf(out, "mark %s %s %lld\n", domain_name(d), msg, payload_of(a));
    fflush(out);
}

int NVTX_API InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_table) {
    const char *path = getenv("WB_NVTX_LOG");
    char name[1024];
    snprintf(name, sizeof name, "%s.%d", path ? path : "/tmp/wb-nvtx", (int)getpid());
    out = fopen(name, "w");
    if (!out) return 0;
    const NvtxExportTableCallbacks *cb = (const NvtxExportTableCallbacks *)get_table(NVTX_ETID_CALLBACKS);
    NvtxFunctionTable table = 0;
    unsigned int size = 0;
    if (!cb || !cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &size)) return 0;
    *table[NVTX_CBID_CORE2_DomainCreateA] = (NvtxFunctionPointer)domain_create;
    *table[NVTX_CBID_CORE2_DomainRegisterStringA] = (NvtxFunctionPointer)register_string;
    *table[NVTX_CBID_CORE2_DomainRangePushEx] = (NvtxFunctionPointer)push;
    *table[NVTX_CBID_CORE2_DomainRangePop] = (NvtxFunctionPointer)pop;
    *table[NVTX_CBID_CORE2_DomainMarkEx] = (NvtxFunctionPointer)mark;
    return 1;
}
