"""Loading a hub checkpoint straight into a QLoRA model: each NF4 tensor equals
``to_nf4`` of its hub tensor, every other tensor equals the hub's, and the
memory held while loading (counted by an allocation tracker) stays within NF4
total + one layer's bf16 expert bank + the non-expert weights."""

import weakref

import pytest
import torch
from qlora_testing import build, debug_config, markov_batch, nf4_twin
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from torchtitan_nemotron3 import save_pretrained
from torchtitan_nemotron3.qlora import nf4_targets
from torchtitan_nemotron3.qlora.load import load_nf4_base
from torchtitan_nemotron3.qlora.nf4 import NF4Tensor, tensor_nbytes, to_nf4


class LiveBytes(TorchDispatchMode):
    """Bytes of CPU storages alive, counted from every op's outputs and every
    tensor read from disk (``track``); a storage is counted once, until the
    last tracked tensor viewing it is freed. ``peak``: the most alive at once."""

    def __init__(self):
        super().__init__()
        self.live, self.refs, self.now, self.peak = {}, {}, 0, 0

    def track(self, t):
        if not isinstance(t, torch.Tensor) or isinstance(t, NF4Tensor):
            return
        if t.device.type != "cpu":
            return
        key = t.untyped_storage().data_ptr()
        if key == 0:
            return
        if key not in self.live:
            self.live[key] = t.untyped_storage().nbytes()
            self.refs[key] = 0
            self.now += self.live[key]
            self.peak = max(self.peak, self.now)
        self.refs[key] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.now -= self.live.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    model = build(debug_config(None))
    path = tmp_path_factory.mktemp("hf") / "debug"
    save_pretrained(model, path, dtype=torch.bfloat16)
    return path, {k: v.bfloat16() for k, v in model.state_dict().items()}


def test_streaming_load_equals_to_nf4_of_the_hub_tensors(hub_dir):
    path, state = hub_dir
    with torch.device("meta"):
        model = debug_config(8, 16.0).build()
    load_nf4_base(model, path)
    n = 0
    for fqn, module, names in nf4_targets(model):
        for name in names:
            p, ref = getattr(module, name), state[f"{fqn}.{name}"]
            assert isinstance(p, NF4Tensor) and not p.requires_grad
            q = to_nf4(ref.reshape(-1, ref.shape[-1]), 64, p.scaler_block_size)
            for k in ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean"):
                assert torch.equal(getattr(p, k), getattr(q, k)), f"{fqn}.{name} {k}"
            n += 1
    assert n > 50
    for name, p in model.named_parameters():
        if isinstance(p, NF4Tensor):
            continue
        if ".lora_b." in name:
            assert torch.equal(p, torch.zeros_like(p))  # step 0 = the base
        elif ".lora_a." not in name:
            want = state[name].float() if ".router.gate." in name else state[name]
            assert torch.equal(p, want.to(p.dtype)), name


def test_streaming_load_peak_is_nf4_plus_one_bank_plus_non_expert(hub_dir):
    path, state = hub_dir
    with torch.device("meta"):
        model = debug_config(8, 16.0).build()
    tracker = LiveBytes()
    with tracker:
        load_nf4_base(model, path, on_read=tracker.track)
    nf4 = sum(tensor_nbytes(p) for p in model.parameters() if isinstance(p, NF4Tensor))
    plain = sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if not isinstance(p, NF4Tensor)
    ) + sum(b.numel() * b.element_size() for b in model.buffers())
    bank = max(v.numel() * 2 for k, v in state.items() if k.endswith("w1_EFD"))
    bound = nf4 + bank + plain
    print(
        f"peak {tracker.peak / 2**20:.2f} MiB; bound {bound / 2**20:.2f} MiB = NF4 "
        f"{nf4 / 2**20:.2f} + bank {bank / 2**20:.2f} + non-NF4 {plain / 2**20:.2f}"
    )
    assert tracker.peak <= bound
    # the tracker sees a whole bf16 base when one is made (mutation check)
    whole = LiveBytes()
    with whole:
        kept = [v.clone() for v in state.values()]
    assert whole.peak >= sum(v.numel() * 2 for v in state.values())
    del kept
