// Instantiates the CUDA kernels for float logits (one file per dtype: they compile in parallel).
#include "cuda/launch.cuh"

namespace fused_ce::cuda {
FUSED_CE_INSTANTIATE_CUDA_KERNELS(float)
}  // namespace fused_ce::cuda
