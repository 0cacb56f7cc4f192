// Which kernel variant runs a launch: the dispatch table, in one place (host code).
//
// A variant is a way to run a row kernel: streaming with 32, 256, 512 or 1024 threads
// per row (kernels.cuh), or single_read, which keeps the row in (cluster) shared memory
// between the statistics and the gradient (single_read.cuh; sm_90, forward passes, rows
// up to a cluster's shared memory -- elsewhere the table's streaming choice runs).
//
// FUSED_CE_CUDA_VARIANT=<name> forces one for every launch, to measure it
// (bench/kernel_times.py sweeps them). It is read once, at the first launch of the
// process: a setting made later, by accident or not, does not change results midway.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

namespace fused_ce::cuda {

enum class Variant : int { kStream32, kStream256, kStream512, kStream1024, kSingleRead };
constexpr int kNumVariants = 5;
constexpr const char* kVariantNames[kNumVariants] = {"stream32", "stream256", "stream512", "stream1024",
                                                     "single_read"};
constexpr const char* kVariantEnv = "FUSED_CE_CUDA_VARIANT";

inline int stream_threads(Variant v) {
  switch (v) {
    case Variant::kStream32: return 32;
    case Variant::kStream256: return 256;
    case Variant::kStream1024: return 1024;
    default: return 512;
  }
}

enum Pass : unsigned {
  kPassForward = 1,   // statistics only
  kPassFused = 2,     // statistics and the gradient in one kernel
  kPassBackward = 4,  // the gradient from saved statistics
  kPassEntropy = 8,   // entropy forward and backward (streaming only)
  kAnyPass = 15,
};

enum DtypeBit : unsigned { kFloat32 = 1, kFloat64 = 2, kFloat16 = 4, kBFloat16 = 8, kAnyDtype = 15 };

template <typename scalar_t>
constexpr unsigned dtype_bit() {
  if constexpr (std::is_same_v<scalar_t, float>) return kFloat32;
  if constexpr (std::is_same_v<scalar_t, double>) return kFloat64;
  if constexpr (std::is_same_v<scalar_t, c10::Half>) return kFloat16;
  return kBFloat16;
}

struct DispatchEntry {
  int min_compute_capability;  // major * 10 + minor, at least
  unsigned dtypes;
  int64_t max_classes;  // the entry covers V <= max_classes
  unsigned passes;
  Variant variant;
  const char* measured;  // the figure the choice comes from
};

constexpr int64_t kAnyLength = std::numeric_limits<int64_t>::max();

// The first entry that matches a launch chooses its variant. A variant a GPU has not yet
// measured is not chosen here (only through FUSED_CE_CUDA_VARIANT); bench/kernel_times.py
// prints the entries its sweep would write. Passes over a read: time / (bytes / copy
// bandwidth), bench/results/<run>/README.md.
inline constexpr DispatchEntry kDispatchTable[] = {
    // cc  dtypes     V up to     passes    variant              measured
    {0, kAnyDtype, 1024, kAnyPass, Variant::kStream32, "not measured: a warp per row, 8 rows per block (heuristic)"},
    {0, kAnyDtype, 8192, kAnyPass, Variant::kStream256, "not measured (heuristic)"},
    {0, kAnyDtype, kAnyLength, kAnyPass, Variant::kStream512,
     "H200 2026-11-28 run 2, 16384x128256 bf16: forward 1.30, fused 5.01, backward 4.42 passes"},
};

inline const DispatchEntry& table_entry(int compute_capability, unsigned dtype, int64_t num_classes, Pass pass,
                                        bool streaming_only) {
  for (const DispatchEntry& e : kDispatchTable) {
    if (compute_capability >= e.min_compute_capability && (e.dtypes & dtype) && num_classes <= e.max_classes &&
        (e.passes & pass) && !(streaming_only && e.variant == Variant::kSingleRead)) {
      return e;
    }
  }
  return kDispatchTable[sizeof(kDispatchTable) / sizeof(kDispatchTable[0]) - 1];  // covers every launch
}

// FUSED_CE_CUDA_VARIANT, parsed.
struct VariantOverride {
  bool set = false;
  Variant variant = Variant::kStream512;
  std::string error;  // a value that names no variant: every launch refuses it
};

inline VariantOverride parse_variant_override(const char* text) {
  VariantOverride o;
  if (text == nullptr || *text == '\0') return o;
  for (int v = 0; v < kNumVariants; ++v) {
    if (std::strcmp(text, kVariantNames[v]) == 0) {
      o.set = true;
      o.variant = static_cast<Variant>(v);
      return o;
    }
  }
  o.error = std::string(kVariantEnv) + " must be one of stream32, stream256, stream512, stream1024, single_read, got '" +
            text + "'";
  return o;
}

// Read at the first call, in a thread-safe static initialisation.
inline const VariantOverride& variant_override() {
  static const VariantOverride o = parse_variant_override(std::getenv(kVariantEnv));
  return o;
}

}  // namespace fused_ce::cuda
