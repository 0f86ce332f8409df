#pragma once

// oatoplan: CUDA flash attention that also writes each row's log-sum-exp (oato_flash_attn_ext_lse,
// op_params[OATO_FA_LSE_PARAM] != 0; wired into ggml-cuda.cu by patches/0009)

#include "common.cuh"

// dst: [DV + 1, n_head, n_q, ne3] F32; columns 0..DV-1 = the stock kernel's output, column DV = the row's
// log-sum-exp of its scaled, softcapped, masked scores plus the sink (-INFINITY for a row that sees no key)
void oato_cuda_flash_attn_ext_lse(ggml_backend_cuda_context & ctx, ggml_tensor * dst);

// whether the stock kernels take the node without its extra column and the log-sum-exp pass can read K (F16, Q8_0)
bool oato_cuda_flash_attn_ext_lse_supported(int device, const ggml_tensor * dst);
