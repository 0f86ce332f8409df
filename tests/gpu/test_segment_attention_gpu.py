"""GPU-only: CUDA's flash attention nodes that also write their rows' log-sum-exp (oato_flash_attn_ext_lse,
patches/0009, native/ggml-cuda/oato-fattn-lse.cu), and the segment KV cache's attention built from them on CUDA0.

- supports_op: CUDA takes such nodes where K is F16 or Q8_0 (the log-sum-exp pass reads it), refuses Q4_0 K.
- The node's first DV columns are the stock kernel's output for the same node, bit for bit; column DV is the rows'
  log-sum-exp, against float64; a row that sees no key gets -inf and zeros, as the CPU's; with a logit softcap,
  ALiBi and attention sinks too, for one query and for a batch (the tiled pass; written after the last GPU run,
  not run on a GPU yet).
- oato_attn_segmented on CUDA0 is as close to attention (float64) as the stock graph over [a | b] on CUDA0 is, with
  flash attention off and on, over head sizes, GQA ratios, empty segments, one query and a causal batch."""

from __future__ import annotations

import numpy as np
import pytest

from oatoplan import ggml
from oatoplan.ggml import Backend
from oatoplan.machine import gpu_devices
from test_segment_attention import LSE_OPTIONS, N_HEAD_KV, _lse_node, attention_cases, run_attention

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda0():
    if not any(d.name == "CUDA0" for d in gpu_devices()):
        pytest.skip("no CUDA0 in this llama.cpp build")
    assert ggml.flash_attn_lse() is not None, "run `oatoplan build --cuda` (patches/0006)"
    backend = Backend("CUDA0")
    yield backend
    backend.close()


def test_cuda_takes_lse_nodes_with_f16_or_q8_0_k(cuda0):
    assert _lse_node(cuda0, 128, 8, 256, 1, k_type="Q4_0")[3] is False
    assert _lse_node(cuda0, 128, 8, 256, 1)[3] is True


@pytest.mark.parametrize("n_q", [1, 7, 64])
@pytest.mark.parametrize("n_kv", [40, 256, 1024])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_lse_node_is_stock_output_plus_log_sum_exp(cuda0, head_dim, gqa, n_kv, n_q):
    stock, got, lse, supported = _lse_node(cuda0, head_dim, N_HEAD_KV * gqa, n_kv, n_q)
    assert supported
    seen = np.isfinite(lse[:, 0])   # n_q > n_kv: the first queries see no key (stock: 0/0, this node: 0 and -inf)
    np.testing.assert_array_equal(got[seen, :, :head_dim], stock[seen])
    assert (got[~seen, :, :head_dim] == 0).all() and np.isneginf(got[~seen, :, head_dim]).all()
    err = np.abs(got[seen, :, head_dim] - lse[seen]).max()
    assert err < 1e-3, f"log-sum-exp {err:.3g} from float64"


@pytest.mark.parametrize("n_q", [1, 7, 64])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_lse_node_with_q8_0_cache(cuda0, head_dim, n_q):
    stock, got, lse, supported = _lse_node(cuda0, head_dim, 8, 512, n_q, k_type="Q8_0")
    assert supported
    np.testing.assert_array_equal(got[..., :head_dim], stock)
    err = np.abs(got[..., head_dim] - lse).max()
    assert err < 1e-3, f"log-sum-exp {err:.3g} from float64"


@pytest.mark.parametrize("n_q", [7, 16])   # the one-block-per-row pass, and the tiled one for a batch
def test_row_that_sees_no_key(cuda0, n_q):
    stock, got, lse, _ = _lse_node(cuda0, 128, 8, 256, n_q, masked_rows=(0, 3))
    assert np.isneginf(got[[0, 3], :, 128]).all()
    assert (got[[0, 3], :, :128] == 0).all()
    rest = [i for i in range(n_q) if i not in (0, 3)]
    np.testing.assert_array_equal(got[rest, :, :128], stock[rest])
    assert np.abs(got[rest, :, 128] - lse[rest]).max() < 1e-3


@attention_cases
def test_segmented_on_cuda_as_close_as_stock(cuda0, head_dim, gqa, n_a, n_b, n_q):
    got = run_attention(cuda0, head_dim, N_HEAD_KV * gqa, n_a, n_b, n_q)
    err = {name: np.abs(got[name] - got["exact"]).max() for name in ("stock_off", "stock_on", "seg_off", "seg_on")}
    # the stock graphs compute attention at all (f16 K/V and probabilities: ~1e-3 from float64)
    assert max(err["stock_off"], err["stock_on"]) < 5e-3, err
    # segmented: the stock kernels on each segment plus an f32 merge, so about the stock graph's own error; with
    # flash attention off CUDA's mat-muls round the probabilities to f16 per segment (up to 5e-4 more)
    assert err["seg_off"] <= 2 * err["stock_off"] + 5e-4, err
    assert err["seg_on"] <= 2 * err["stock_on"] + 1e-4, err
    if n_a == 0 or n_b == 0:   # one segment: the stock nodes themselves
        np.testing.assert_array_equal(got["seg_on"], got["stock_on"])


@pytest.mark.parametrize("softcap,max_bias,sinks", LSE_OPTIONS)
@pytest.mark.parametrize("n_q,n_kv", [(1, 1024), (64, 300)])   # the one-block-per-row pass, the tiled one
def test_lse_node_with_softcap_alibi_and_sinks(cuda0, n_q, n_kv, softcap, max_bias, sinks):
    stock, got, lse, supported = _lse_node(cuda0, 128, N_HEAD_KV * 4, n_kv, n_q, softcap=softcap,
                                           max_bias=max_bias, sinks=sinks)
    assert supported
    np.testing.assert_array_equal(got[..., :128], stock)
    err = np.abs(got[..., 128] - lse).max()
    assert err < 1e-3, f"log-sum-exp {err:.3g} from float64"
