// Instantiates the CUDA kernels for half logits (one file per dtype: they compile in parallel).
#include "cuda/launch.cuh"

namespace fused_ce::cuda {
FUSED_CE_INSTANTIATE_CUDA_KERNELS(c10::Half)
}  // namespace fused_ce::cuda
