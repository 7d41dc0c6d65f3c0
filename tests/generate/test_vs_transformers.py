"""Our incremental decoding against an independent one: transformers'
``NemotronHForCausalLM.generate`` with its own hybrid cache (conv + SSM states, KV),
loaded from our HF export of the same weights. Greedy tokens equal, and the logits of
every decoded position (fp32)."""

import torch
from nemotron_testing import build_model, randomize_
from transformers import AutoModelForCausalLM

from torchtitan_nemotron3 import flavor_args, save_pretrained
from torchtitan_nemotron3.generate import prefill, step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_greedy_matches_transformers_cached_generate(tmp_path):
    # transformers' torch path floors dt at time_step_min: make ours say so too.
    args = flavor_args("debugmodel").replace(time_step_limit=(1e-3, float("inf")))
    ours = build_model(args, seed=0, kernel_backend="torch").eval()
    randomize_(ours, seed=5)
    save_pretrained(ours, tmp_path / "hf")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs.eval()

    prompt_1L = torch.randint(
        0, args.vocab_size, (1, 100), generator=torch.Generator().manual_seed(6)
    )
    with torch.no_grad():
        out = theirs.generate(
            prompt_1L,
            max_new_tokens=20,
            do_sample=False,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    new_tokens = out.sequences[0, 100:]

    cache, logits_1V = prefill(ours, prompt_1L)
    ours_logits, ours_tokens = [logits_1V], []
    for i in range(20):
        token_1 = logits_1V.argmax(-1)
        ours_tokens.append(token_1.item())
        if i < 19:
            logits_1V = step(ours, cache, token_1)
            ours_logits.append(logits_1V)
    assert ours_tokens == new_tokens.tolist()
    errs = [rel_err(o, t) for o, t in zip(ours_logits, out.logits, strict=True)]
    print(f"max relative error {max(errs):.2e}")
    assert max(errs) <= 1e-5, errs
