// Instantiates the CUDA kernels for bfloat16 logits (one file per dtype: they compile in parallel).
#include "cuda/launch.cuh"

namespace fused_ce::cuda {
FUSED_CE_INSTANTIATE_CUDA_KERNELS(c10::BFloat16)
}  // namespace fused_ce::cuda
