"""Apply a listed mutation to a copy of the repository and run the tests that must
catch it (tests/MUTATIONS.md says why the habit exists).

    python tests/mutate.py --list                # the mutations, by id
    python tests/mutate.py moe-relu router-softmax   # run these
    python tests/mutate.py --all                 # every one (minutes to an hour)

Each mutation is one exact text replacement in one file (it must occur exactly
once, so a refactor that moves the code makes the entry fail loudly instead of
silently testing nothing). The copy holds the working tree's tracked files, so the
checkout itself is never modified. "caught" means pytest exited 1 with failed
tests (named in the report); anything else (a setup or collection error, no tests,
a crash of pytest itself) is reported as an error, not as caught.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "dpo-no-reference",
        "torchtitan_nemotron3/dpo/loss.py",
        "    ratio_N2 = policy_N2 - reference_N2\n",
        "    ratio_N2 = policy_N2 - 0 * reference_N2\n",
        (
            "tests/dpo/test_dpo_trl.py::test_loss_and_gradients_equal_trl",
            "tests/dpo/test_dpo_objective.py::test_terms_from_the_definition",
        ),
    ),
    Mutation(
        "dpo-pairs-per-micro-batch",
        "torchtitan_nemotron3/dpo/trainer.py",
        "            loss = terms.loss.sum() / self._global_pairs",
        "            loss = terms.loss.mean()",
        (
            ("tests/dpo/test_dpo_train.py::"
            "test_pairs_are_normalised_over_the_global_batch"),
        ),
    ),
    Mutation(
        "experts-reversed",
        "torchtitan_nemotron3/hf/experts.py",
        "return {k: weight[k] for k in range(weight.shape[0])}, None",
        "return {k: weight[weight.shape[0] - 1 - k] for k in range(weight.shape[0])}, None",
        ("tests/hf/test_hf_adapter.py::test_expert_k_is_transformers_expert_k",),
    ),
    Mutation(
        "skip-keeps-counts",
        "torchtitan_nemotron3/train/trainer.py",
        "                        module.moe.tokens_per_expert_E.zero_()",
        "                        pass",
        (
            ("tests/train/test_nonfinite.py::"
            "test_skip_leaves_weights_and_optimizer_unchanged"),
        ),
    ),
    Mutation(
        "no-temperature",
        "torchtitan_nemotron3/generate/sampling.py",
        "logits_BV.float() / config.temperature",
        "logits_BV.float()",
        ("tests/generate/test_sampling.py",),
    ),
    Mutation(
        "decode-no-dt-clamp",
        "torchtitan_nemotron3/generate/mamba_decode.py",
        "        dt_BH = dt_BH.clamp(min=lo, max=hi)",
        "        pass",
        ("tests/generate/test_decode_exact.py::test_binding_time_step_limit",),
    ),
    Mutation(
        "doc-starts-shifted",
        "torchtitan_nemotron3/ops/ssd.py",
        "return F.pad(seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1], (1, 0), value=False)",
        "return F.pad(seq_idx_BL[:, 1:] != seq_idx_BL[:, :-1], (2, 0), value=False)[:, :-1]",
        ("tests/model/test_ssd.py::test_chunked_equals_sequential_packed",),
    ),
    Mutation(
        "lora-no-scale",
        "torchtitan_nemotron3/lora/converter.py",
        "return {fqn: cfg.alpha / cfg.rank for fqn, cfg in adapted_fqns(model_config)}",
        "return {fqn: 1.0 for fqn, cfg in adapted_fqns(model_config)}",
        ("tests/lora/test_lora_trainer.py",),
    ),
    Mutation(
        "nonfinite-zeroed-on-load",
        "torchtitan_nemotron3/hf/io.py",
        "                    if not allow_non_finite:\n"
        "                        check_finite(targets[name], name, file)\n",
        "                    if not allow_non_finite:\n"
        "                        check_finite(targets[name], name, file)\n"
        "                    else:\n"
        "                        targets[name].nan_to_num_(0.0)\n",
        ("tests/hf/test_hf_errors.py::test_non_finite_weight_is_named",),
    ),
    Mutation(
        "grouped-mm-wrong-expert-grad",
        "torchtitan_nemotron3/ops/grouped_mm.py",
        "grad_x = grouped_mm(grad_TF, w_EDF.transpose(-2, -1), offs_E)",
        "grad_x = grouped_mm(grad_TF, w_EDF.flip(0).transpose(-2, -1), offs_E)",
        ("tests/model/test_grouped_mm.py::test_expanded_gradient_is_accepted",),
    ),
    Mutation(
        "tp-dt-unsharded",
        "torchtitan_nemotron3/tensor_parallel.py",
        'for part in ("z", "x", "B", "C", "dt"):\n        getattr(in_proj, part)',
        'for part in ("z", "x", "B", "C"):\n        getattr(in_proj, part)',
        (
            ("tests/parallel/test_tensor_parallel.py::"
            "test_dense_sharding_places_each_parameter_as_intended"),
        ),
    ),
    Mutation(
        "tp-out-proj-colwise",
        "torchtitan_nemotron3/tensor_parallel.py",
        "mamba_cfg.out_proj.sharding_config = rowwise_config(output_sp=enable_sp)",
        "mamba_cfg.out_proj.sharding_config = colwise_config()",
        (
            ("tests/parallel/test_tensor_parallel.py::"
            "test_dense_sharding_places_each_parameter_as_intended"),
        ),
    ),
    Mutation(
        "kernel-norm-bf16-off-2pc",
        "torchtitan_nemotron3/ops/kernel_ops.py",
        "y_BLI, z_BLI, weight_I, float(eps), y_BLI.shape[-1] // n_groups",
        (
            "y_BLI, z_BLI, weight_I * (1.02 if y_BLI.dtype == torch.bfloat16 else 1.0), "
            "float(eps), y_BLI.shape[-1] // n_groups"
        ),
        (
            ("tests/kernels/test_kernel_custom_ops.py::"
            "test_bf16_model_with_kernel_ops_is_as_good_as_torch"),
        ),
    ),
    Mutation(
        "labels-not-shifted",
        "torchtitan_nemotron3/train/trainer.py",
        "        inputs, labels, extra_kwargs = super().post_dataloading_process(input_dict, labels)\n",
        "        inputs, labels, extra_kwargs = super().post_dataloading_process(input_dict, labels)\n"
        "        labels = inputs.clone()\n",
        ("tests/train/test_e2e_train.py::test_debugmodel_one_process_20_steps",),
    ),
    Mutation(
        "mtp-load-balance-sign",
        "torchtitan_nemotron3/train/trainer.py",
        "                        counts_E.mean() - counts_E\n",
        "                        counts_E - counts_E.mean()\n",
        (
            ("tests/model/test_mtp.py::"
            "test_mtp_routing_bias_update_favours_underused_experts"),
        ),
    ),
    # core model features: each against transformers' nemotron_h (fp32, CPU)
    Mutation(
        "moe-relu",
        "torchtitan_nemotron3/model/moe.py",
        "        h_TF = relu2(\n",
        "        h_TF = torch.relu(\n",
        ("tests/test_parity_hf.py",),
    ),
    Mutation(
        "router-softmax",
        "torchtitan_nemotron3/model/router.py",
        'score_func="sigmoid"',
        'score_func="softmax"',
        ("tests/test_parity_hf.py",),
    ),
    Mutation(
        "attention-not-causal",
        "torchtitan_nemotron3/model/attention.py",
        "q_BHLP, k_BHLP, v_BHLP, is_causal=True, enable_gqa=True",
        "q_BHLP, k_BHLP, v_BHLP, is_causal=False, enable_gqa=True",
        ("tests/test_parity_hf.py",),
    ),
    Mutation(
        "mamba-no-D",
        "torchtitan_nemotron3/ops/ssd.py",
        "        y_BLHP = y_BLHP + D_H.to(compute_dtype)[:, None] * x_BLHP.to(compute_dtype)",
        "        pass",
        ("tests/test_parity_hf.py",),
    ),
    Mutation(
        "gated-norm-one-group",
        "torchtitan_nemotron3/ops/torch_ops.py",
        "h_BLGW = h_BLI.unflatten(-1, (n_groups, -1))",
        "h_BLGW = h_BLI.unflatten(-1, (1, -1))",
        ("tests/test_parity_hf.py",),
    ),
]
BY_ID = {m.id: m for m in MUTATIONS}


def copy_repo(dst: Path) -> None:
    """The working tree's tracked files (uncommitted edits included)."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / os.fsdecode(name)
        if src.is_file():
            target = dst / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def run(m: Mutation, timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.id}-") as tmp:
        root = Path(tmp)
        copy_repo(root)
        path = root / m.file
        text = path.read_text()
        if text.count(m.old) != 1:
            return f"ERROR: the text to replace occurs {text.count(m.old)} times in {m.file}"
        path.write_text(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rf", "-p", "no:cacheprovider",
               *m.tests]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd, check=False, cwd=root, env=env, capture_output=True, text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return "ERROR: timed out"
        lines = proc.stdout.strip().splitlines() or ["(no output)"]
        last = lines[-1]
        failed = [ln.split()[1] for ln in lines if ln.startswith("FAILED ")]
        if proc.returncode == 1 and failed:
            return f"caught by {', '.join(failed)} ({last})"
        if proc.returncode == 0:
            return f"NOT CAUGHT ({last})"
        return f"ERROR: pytest exit {proc.returncode} ({last})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="mutation ids (see --list)")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.id:28s} {m.file}  ->  {' '.join(m.tests)}")
        return 0
    unknown = [i for i in args.ids if i not in BY_ID]
    if unknown:
        parser.error(f"unknown mutation ids {unknown}; see --list")
    chosen = MUTATIONS if args.all else [BY_ID[i] for i in args.ids]
    if not chosen:
        parser.error("name mutation ids, or --all")
    results = {m.id: run(m, args.timeout) for m in chosen}
    for mid, result in results.items():
        print(f"{mid:28s} {result}", flush=True)
    return 0 if all(r.startswith("caught") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
