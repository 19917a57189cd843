/* An NVTX injection library for runtime_nvtx_ranges_test (CUDA builds): NVTX
 * loads it from NVTX_INJECTION64_PATH, as Nsight Systems' own, and it counts
 * the ranges of the "moe" domain, printing them at exit. No GPU needed. */
#include <nvtx3/nvToolsExt.h>
#include <stdio.h>
#include <stdlib.h>

static int pushes, pops, depth, max_depth, with_layer, unbalanced;
static char first[8][96];

static int PushEx(nvtxDomainHandle_t d, const nvtxEventAttributes_t* a) {
  (void)d;
  const int layer = a->payloadType == NVTX_PAYLOAD_TYPE_INT32 ? a->payload.iValue : -1;
  if (pushes < 8)
    snprintf(first[pushes], sizeof(first[0]), "%s cat %u layer %d", a->message.ascii, a->category, layer);
  if (layer >= 0) with_layer++;
  pushes++;
  if (++depth > max_depth) max_depth = depth;
  return 0;
}
static int Pop(nvtxDomainHandle_t d) {
  (void)d;
  pops++;
  if (--depth < 0) unbalanced++;
  return 0;
}
static nvtxDomainHandle_t Create(const char* name) {
  fprintf(stderr, "nvtx-inject: domain '%s'\n", name);
  return (nvtxDomainHandle_t)1;
}
static void NameCategory(nvtxDomainHandle_t d, uint32_t category, const char* name) {
  (void)d;
  fprintf(stderr, "nvtx-inject: category %u = %s\n", category, name);
}
static void Report(void) {
  fprintf(stderr, "nvtx-inject: pushes %d pops %d unbalanced %d max depth %d with layer payload %d\n", pushes,
          pops, unbalanced, max_depth, with_layer);
  for (int i = 0; i < 8 && i < pushes; ++i) fprintf(stderr, "nvtx-inject:   %s\n", first[i]);
}

int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get) {
  const NvtxExportTableCallbacks* cb = (const NvtxExportTableCallbacks*)get(NVTX_ETID_CALLBACKS);
  NvtxFunctionTable table = 0;
  unsigned int size = 0;
  if (cb == 0 || !cb->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &size)) return 0;
  *table[NVTX_CBID_CORE2_DomainRangePushEx] = (NvtxFunctionPointer)PushEx;
  *table[NVTX_CBID_CORE2_DomainRangePop] = (NvtxFunctionPointer)Pop;
  *table[NVTX_CBID_CORE2_DomainCreateA] = (NvtxFunctionPointer)Create;
  *table[NVTX_CBID_CORE2_DomainNameCategoryA] = (NvtxFunctionPointer)NameCategory;
  atexit(Report);
  return 1;
}
