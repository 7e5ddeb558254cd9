// The CUDA kernels of every pets op, for the CUDA dispatch key (built only with PETS_WITH_CUDA, by CUDAExtension).
#ifdef PETS_WITH_CUDA

#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(pets, CUDA, m) {
  m.impl("lora_delta", &pets::cuda::lora_delta);
  m.impl("linear_delta", &pets::cuda::linear_delta);
  m.impl("bias_delta", &pets::cuda::bias_delta);
  m.impl("scale", &pets::cuda::scale);
  m.impl("gelu_delta", &pets::cuda::gelu_delta);
  m.impl("row_delta", &pets::cuda::row_delta);
  m.impl("layer_norm", &pets::cuda::layer_norm);
  m.impl("segmented_linear", &pets::cuda::segmented_linear);
  m.impl("sparse_delta", &pets::cuda::sparse_delta);
  m.impl("embedding_delta", &pets::cuda::embedding_delta);
  m.impl("adapter", &pets::cuda::adapter);
}

#endif  // PETS_WITH_CUDA
