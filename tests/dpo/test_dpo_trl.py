"""DPO against TRL's ``DPOTrainer`` (the common reference implementation), fp32 CPU.

The same weights go into transformers' NemotronH (policy and a reference with other
weights, as TRL holds them) and into ours; TRL computes its loss on its padded
[chosen..., rejected...] batch, we on our packed row (both replies of both pairs in
one row, positions restarting per document). Loss and the gradient of every
parameter must agree to 1e-5 relative.
"""

import dataclasses

import torch

from nemotron_testing import build_model, hf_reference, random_args, randomize_
from test_parity_hf import load_hf_into_ours, rel_err

from torchtitan_nemotron3.dpo.data import PAIR_KEY, SEGMENT_KEY, PairDocuments, pair_row
from torchtitan_nemotron3.dpo.loss import dpo_terms, reply_logps, token_logps
from torchtitan_nemotron3.sft.packing import make_document

BETA, RTOL = 0.1, 1e-5
# (prompt, chosen, rejected) token ids: replies of different lengths
PAIRS = [
    ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14]),
    ([20, 21], [22, 23, 24, 25, 26], [27]),
    ([30, 31, 32], [33], [34, 35, 36, 37]),
]


def _documents(prompt, reply):
    tokens = prompt + reply
    trained = [False] * len(prompt) + [True] * len(reply)
    doc, note = make_document(tokens, trained, seq_len=64, overflow="drop")
    assert doc is not None, note
    return doc


def _our_terms(model_policy, model_ref, args):
    docs = [
        PairDocuments(i, _documents(p, c), _documents(p, r))
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    row, labels = pair_row(docs, seq_len=40, pad_id=0)
    batch = {k: v[None] for k, v in row.items()}
    labels = labels[None]
    segment = batch.pop(SEGMENT_KEY)
    batch.pop(PAIR_KEY)
    head = torch.nn.Identity()  # our model returns logits (no chunked loss here)
    with torch.no_grad():
        ref = reply_logps(
            token_logps(model_ref(batch["input"], positions=batch["positions"]), head, labels),
            segment,
        )[0]
    policy, counts = reply_logps(
        token_logps(model_policy(batch["input"], positions=batch["positions"]), head, labels, 7),
        segment,
    )
    present = counts[..., 0] > 0
    assert int(present.sum()) == len(PAIRS)
    return dpo_terms(policy[present], ref[present], counts[present][:, 0], beta=BETA)


def _trl_loss(hf_policy, hf_ref, tokenizer, tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # TRL insists on a text dataset to build; the batch we score is pre-tokenized.
    dummy = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}])
    trainer = DPOTrainer(
        model=hf_policy,
        ref_model=hf_ref,
        args=DPOConfig(
            output_dir=str(tmp_path / "trl"),
            beta=BETA,
            report_to=[],
            use_cpu=True,
            bf16=False,  # TRL's default on a bf16-capable CPU: autocast in its reference pass
            # Our DPO adds no balance loss (the router is frozen); TRL would add
            # the HF config's router aux loss to the DPO loss.
            router_aux_loss_coef=0.0,
        ),
        train_dataset=dummy,
        processing_class=tokenizer,
    )
    batch = trainer.data_collator(
        [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in PAIRS]
    )
    hf_policy.train()
    return trainer.compute_loss(hf_policy, batch)


def test_loss_and_gradients_equal_trl(tmp_path):
    from transformers import AutoTokenizer

    from torchtitan_nemotron3.sft.assets import ensure_debug_sft_assets

    tokenizer = AutoTokenizer.from_pretrained(ensure_debug_sft_assets()[0])
    args = dataclasses.replace(random_args(3, num_layers=6), vocab_size=64)
    hf_policy, hf_ref = hf_reference(args), hf_reference(args)
    randomize_(hf_policy, 0)
    randomize_(hf_ref, 1)
    ours_policy, ours_ref = build_model(args), build_model(args)
    mapping = load_hf_into_ours(hf_policy, ours_policy, args)
    load_hf_into_ours(hf_ref, ours_ref, args)

    ref_loss = _trl_loss(hf_policy, hf_ref, tokenizer, tmp_path)
    ref_loss.backward()
    terms = _our_terms(ours_policy, ours_ref, args)
    loss = terms.loss.mean()
    loss.backward()

    assert abs(loss.item() - ln2()) > 1e-3  # the reference differs: not the trivial point
    assert rel_err(loss.detach(), ref_loss.detach()) <= RTOL, (loss.item(), ref_loss.item())
    ours = dict(ours_policy.named_parameters())
    checked = 0
    for hf_name, p in hf_policy.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, hf_name
        for name, rows in mapping[hf_name]:
            err = rel_err(ours[name].grad, p.grad[rows])
            assert err <= RTOL, (name, err)
            checked += 1
    assert checked == len(ours)


def ln2() -> float:
    return float(torch.log(torch.tensor(2.0)))
