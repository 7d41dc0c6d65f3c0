"""The attention backends (``attention.DocumentCausalAttention``) on CPU.

"flex" runs eager ``flex_attention`` forward on CPU (torch has no CPU backward
for it), which checks the document block mask the GPU path compiles: packed rows
whose documents cross mask blocks equal the exact masked SDPA (fp32, ≤ 1e-5);
"varlen"'s ``cu_seqlens`` are the documents (flash varlen and compiled flex
run on a GPU in ``tests/kernels/test_attention_cuda.py``, which
``benchmarks/gpu_check.sh`` runs). The model builds the mask once per forward and
every attention layer reads it. "auto" is SDPA on CPU; a bad name
is one line.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, create_mask

from torchtitan_nemotron3 import model_registry
from torchtitan_nemotron3.model import attention as attention_mod
from torchtitan_nemotron3.model import build_model_config
from torchtitan_nemotron3.model.args import NemotronHArgs
from torchtitan_nemotron3.model.attention import (
    DocumentCausalAttention,
    check_attention_backend,
    document_causal_mask,
)
from torchtitan_nemotron3.model.attention_cp import (
    document_causal_block_mask,
    document_varlen_metadata,
)
from torchtitan_nemotron3.model.model import seq_idx_from_positions

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention called without")

# Three rows of 64: documents across the 8- and 16-token mask blocks, single-token
# documents, a row that starts mid-document (positions never 0 at its start) and
# a row that is one document.
DOCS = [[5, 20, 7, 1, 31], [9, 1, 22, 16, 16], [64]]
CPU = torch.device("cpu")


def _positions() -> torch.Tensor:
    rows = [torch.cat([torch.arange(n) for n in row]) for row in DOCS]
    rows[1][: DOCS[1][0]] += 3
    return torch.stack(rows)


def _qkv(L: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, L, h, 8, generator=g, dtype=dtype) for h in (4, 2, 2)]


def _inner(backend: str, block_size: int = 128) -> DocumentCausalAttention:
    cfg = DocumentCausalAttention.Config(backend=backend)
    cfg.flex.block_size = block_size
    return cfg.build()


@pytest.mark.parametrize("block_size", [8, 16, 128])
def test_flex_block_mask_is_the_documents(block_size):
    seq_idx = seq_idx_from_positions(_positions())
    L = seq_idx.size(1)
    mask = document_causal_block_mask(
        seq_idx, 3, L, CPU, block_size=block_size, create_fn=create_block_mask
    )
    dense = create_mask(mask.mask_mod, 3, None, L, L, device="cpu")
    assert torch.equal(dense, document_causal_mask(seq_idx))


@pytest.mark.parametrize("block_size", [8, 128])
def test_flex_forward_equals_masked_sdpa(block_size):
    seq_idx = seq_idx_from_positions(_positions())
    q, k, v = _qkv(seq_idx.size(1))
    ref = _inner("sdpa")(q, k, v, seq_idx_BL=seq_idx)
    flex = _inner("flex", block_size)
    got = flex(q, k, v, seq_idx_BL=seq_idx)
    assert (got - ref).abs().max() <= 1e-5
    # The mask handed in (as the model does) gives the same.
    masks = flex.document_masks(seq_idx, 3, seq_idx.size(1), CPU)
    assert isinstance(masks, BlockMask)
    again = flex(q, k, v, seq_idx_BL=seq_idx, attention_masks=masks)
    assert torch.equal(again, got)
    # Rows without documents: SDPA's causal kernel, no mask.
    assert flex.document_masks(None, 3, seq_idx.size(1), CPU) is None
    torch.testing.assert_close(flex(q, k, v), _inner("sdpa")(q, k, v))


def test_varlen_metadata_is_the_documents():
    seq_idx = seq_idx_from_positions(_positions())
    L = seq_idx.size(1)
    meta = document_varlen_metadata(seq_idx)
    lengths = [n for row in DOCS for n in row]
    assert meta.cu_seq_q.tolist() == [0, *itertools.accumulate(lengths)]
    assert torch.equal(meta.cu_seq_k, meta.cu_seq_q)
    assert meta.max_q == meta.max_k == max(lengths)
    built = _inner("varlen").document_masks(seq_idx, 3, L, CPU)
    assert torch.equal(built.cu_seq_q, meta.cu_seq_q)
    # Attention per cu_seqlens segment (what flash varlen computes) equals the
    # masked SDPA on the packed rows.
    q, k, v = _qkv(L, torch.float64)
    ref = _inner("sdpa")(q, k, v, seq_idx_BL=seq_idx)
    flat = [t.flatten(0, 1) for t in (q, k, v)]
    got = torch.cat(
        [
            F.scaled_dot_product_attention(
                *(t[a:b].transpose(0, 1)[None] for t in flat),
                is_causal=True,
                enable_gqa=True,
            )[0].transpose(0, 1)
            for a, b in itertools.pairwise(meta.cu_seq_q.tolist())
        ]
    ).view_as(ref)
    assert (got - ref).abs().max() <= 1e-12


def _args(pattern: str = "M*-*") -> NemotronHArgs:
    return NemotronHArgs(
        vocab_size=64,
        hidden_size=32,
        hybrid_override_pattern=pattern,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
    )


def _model(attn_backend: str, block_size: int = 128):
    cfg = build_model_config(_args(), kernel_backend="torch", attn_backend=attn_backend)
    for layer in cfg.layers:
        if layer.layer_type == "*":
            layer.mixer.inner_attention.flex.block_size = block_size
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_states()
    return model


def test_model_flex_equals_sdpa_mask_built_once(monkeypatch):
    """The whole model on packed rows: flex logits equal sdpa's, and the forward
    builds one block mask for its two attention layers."""
    sdpa, flex = _model("sdpa"), _model("flex", block_size=16)
    flex.load_state_dict(sdpa.state_dict())
    positions = _positions()
    tokens = torch.randint(
        0, 64, positions.shape, generator=torch.Generator().manual_seed(1)
    )
    calls = []
    build = attention_mod.document_causal_block_mask

    def counting(*args, **kwargs):
        calls.append(args[1:3])
        return build(*args, **kwargs)

    monkeypatch.setattr(attention_mod, "document_causal_block_mask", counting)
    with torch.no_grad():
        ref = sdpa(tokens, positions=positions)
        assert calls == []
        got = flex(tokens, positions=positions)
    assert calls == [(3, positions.size(1))]
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_backend_selection():
    # "auto": flex on CUDA tensors, sdpa on CPU (no mask built).
    auto = _inner("auto")
    assert auto.backend_for(CPU) == "sdpa"
    assert auto.backend_for(torch.device("cuda")) == "flex"
    seq_idx = seq_idx_from_positions(_positions())
    assert auto.document_masks(seq_idx, 3, seq_idx.size(1), CPU) is None
    assert _inner("flex").backend_for(CPU) == "flex"
    assert _inner("varlen").backend_for(torch.device("cuda")) == "varlen"
    # The default, threaded from the registry.
    cfg = build_model_config(_args())
    attn = [layer.mixer for layer in cfg.layers if layer.layer_type == "*"]
    assert {a.inner_attention.backend for a in attn} == {"auto"}
    spec = model_registry("debugmodel", attn_backend="sdpa")
    assert {
        layer.mixer.inner_attention.backend
        for layer in spec.model.layers
        if layer.layer_type == "*"
    } == {"sdpa"}


def test_bad_backend_is_one_line():
    with pytest.raises(ValueError, match="'flash'") as err:
        build_model_config(_args(), attn_backend="flash")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="'varlen' has no context-parallel") as err:
        check_attention_backend("varlen", cp=2)
    assert "\n" not in str(err.value)
    check_attention_backend("flex", cp=4)
