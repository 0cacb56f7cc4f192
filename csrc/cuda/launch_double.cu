// Instantiates the CUDA kernels for double logits (one file per dtype: they compile in parallel).
#include "cuda/launch.cuh"

namespace fused_ce::cuda {
FUSED_CE_INSTANTIATE_CUDA_KERNELS(double)
}  // namespace fused_ce::cuda
