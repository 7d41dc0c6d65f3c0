"""Our model as an lm-evaluation-harness model, registered as ``nemotron3``.

lm-eval asks three things of a model; each runs through our own code paths:

* ``loglikelihood`` (multiple choice, perplexity): requests packed many to a row
  with restarting positions (``packing.py``), one forward per batch of rows;
* ``loglikelihood_rolling``: lm-eval's own rolling windows, scored as above;
* ``generate_until``: batched incremental decoding with the Mamba states and KV
  caches (``generate/batch.py``), stopping at EOS and at the task's stop strings.

Tokenization, truncation, stop handling and the chat template follow lm-eval's
``hf`` model, so on the same weights the two give the same numbers. Usable from
Python as ``lm_eval.simple_evaluate(model="nemotron3", model_args={...})`` once this
module is imported (``import torchtitan_nemotron3.evaluate``), or with a built model:
``NemotronLM(pretrained=model, tokenizer=tok)``.
"""

import json
import os

import lm_eval.models  # noqa: F401  (fills lm-eval's lazy registry before we add to it)
import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from ..generate.batch import generate_batch
from ..generate.chat import load_tokenizer, stop_token_ids, tokenizer_dir
from ..generate.checkpoint import load_model, resolve_checkpoint
from ..generate.sampling import SamplingConfig
from ..model import NemotronHArgs
from .packing import score_requests

DEFAULT_MAX_LENGTH = 2048  # lm-eval's default when a config names no length
DEFAULT_ROW_TOKENS = 2048


def _dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(  # noqa: TRY004 (a bad value from the command line)
            f"dtype={value!r}: not a torch dtype (e.g. float32, bfloat16)"
        )
    return dtype


def _bool(value) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _config_max_length(path: str) -> int | None:
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            value = json.load(f).get("max_position_embeddings")
        return None if value is None else int(value)
    return None


@register_model("nemotron3", "torchtitan_nemotron3")
class NemotronLM(TemplateLM):
    """``pretrained``: a hub-format directory, a Hub repo id, a DCP checkpoint (with
    ``flavor``, ``config_json`` or ``args``), or a built model. ``batch_size``: rows per forward
    for loglikelihood (each row packs requests up to ``row_tokens``, default
    2048 or ``max_length`` if shorter), prompts per batch for generation. ``pack=False`` scores each
    request in its own row."""

    def __init__(
        self,
        pretrained,
        tokenizer=None,
        flavor: str | None = None,
        config_json: str | None = None,
        args: NemotronHArgs | None = None,
        dtype=None,
        device: str = "cpu",
        batch_size: int | str = 1,
        max_length: int | None = None,
        row_tokens: int | None = None,
        pack: bool = True,
        max_gen_toks: int = 256,
        add_bos_token: bool | None = None,
        chat_template_file: str | None = None,
        kernel_backend: str = "auto",
        seed: int = 0,
        **kwargs,
    ):
        super().__init__()
        if kwargs:  # lm-eval passes its own (e.g. max_batch_size) to every model
            unknown = sorted(k for k in kwargs if k not in ("max_batch_size",))
            if unknown:
                raise ValueError(f"nemotron3 model: unknown model_args {unknown}")
        self._device = torch.device(device)
        path = None
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained.eval()
        else:
            path = resolve_checkpoint(pretrained)
            self.model = load_model(
                path,
                flavor=flavor,
                config_json=config_json,
                args=args,
                dtype=_dtype(dtype),
                device=self._device,
                kernel_backend=kernel_backend,
            )
        if tokenizer is None or isinstance(tokenizer, str | os.PathLike):
            if path is None and tokenizer is None:
                raise ValueError(
                    "a built model needs tokenizer= (a directory or object)"
                )
            tok_path = tokenizer_dir(
                path, None if tokenizer is None else str(tokenizer)
            )
            self.tokenizer = load_tokenizer(tok_path, chat_template_file)
            self._stop_ids = stop_token_ids(
                self.tokenizer, tok_path, *([path] if path else [])
            )
        else:
            self.tokenizer = tokenizer
            self._stop_ids = stop_token_ids(tokenizer)
        self.batch_size_per_gpu = 1 if batch_size == "auto" else int(batch_size)
        self._max_length = (
            int(max_length)
            if max_length is not None
            else (path and _config_max_length(path)) or DEFAULT_MAX_LENGTH
        )
        # a row's cost grows with its length (attention is quadratic in it, the
        # activations linear) while requests are short: rows of a few thousand
        # tokens (a longer request gets a row of its own)
        self.row_tokens = (
            int(row_tokens)
            if row_tokens is not None
            else min(self._max_length, DEFAULT_ROW_TOKENS)
        )
        self.pack = _bool(pack)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = None if add_bos_token is None else _bool(add_bos_token)
        self.seed = int(seed)
        self._rank, self._world_size = 0, 1
        # what results_*.json records (and lm-eval names the output folder after)
        self.model_args = {
            "pretrained": path or type(pretrained).__name__,
            "dtype": str(self.model.lm_head.weight.dtype).removeprefix("torch."),
            "max_length": self._max_length,
            "row_tokens": self.row_tokens,
            "pack": self.pack,
        }

    # -- what lm-eval reads -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        if add_special_tokens is not None:
            special = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        else:
            special = {}
        # a string that already starts with BOS (a chat template's) gets no second one
        if add_special_tokens is None and has_bos_prefix(
            string, self.tokenizer.decode(self.prefix_token_id)
        ):
            special["add_special_tokens"] = False
        return self.tokenizer.encode(string, **special)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.lm_head.weight.dtype),
        }

    # -- scoring ------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        inputs, targets = [], []
        for _, context_enc, continuation_enc in requests:
            # as lm-eval's hf model: left-truncated to max_length, last token dropped
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            targets.append(continuation_enc)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        out = score_requests(
            self.model,
            inputs,
            targets,
            row_tokens=self.row_tokens,
            rows_per_batch=self.batch_size,
            pack=self.pack,
            on_batch=pbar.update,
        )
        pbar.close()
        for (request, _, _), answer in zip(requests, out, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

    def rolling_loglikelihoods(
        self, token_lists, disable_tqdm: bool = False
    ) -> list[float]:
        """Total log-prob of each token list, every token predicted once after the
        prefix token, in lm-eval's disjoint windows of ``max_length``."""
        windows, owner = [], []
        for i, tokens in enumerate(token_lists):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=list(tokens),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(token_lists)
        for i, (logp, _) in zip(owner, scores, strict=True):
            totals[i] += logp
        return totals

    def loglikelihood_rolling(
        self, requests, disable_tqdm: bool = False
    ) -> list[float]:
        totals = self.rolling_loglikelihoods(
            [self.tok_encode(req.args[0]) for req in requests], disable_tqdm
        )
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        # one batch per distinct gen_kwargs, prompts longest first
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(
                json.dumps(req.args[1], sort_keys=True, default=str), []
            ).append(i)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        out: list[str | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idx in groups.values():
            kwargs = normalize_gen_kwargs(requests[idx[0]].args[1], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            max_ctx = self.max_length - max_gen_toks
            if max_ctx <= 0:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a prompt in "
                    f"max_length={self.max_length}"
                )
            sampling = SamplingConfig(
                greedy=not kwargs.get("do_sample", False),
                temperature=float(kwargs.get("temperature", 1.0) or 0.0),
                top_p=float(kwargs.get("top_p", 1.0)),
                seed=self.seed,
            )
            prompts = {i: self.tok_encode(requests[i].args[0])[-max_ctx:] for i in idx}
            idx = sorted(idx, key=lambda i: -len(prompts[i]))

            def hit_stop(row: int, tokens: list[int], until=until) -> bool:
                text = self.tok_decode(tokens)
                return any(s and s in text for s in until)

            for k in range(0, len(idx), self.batch_size):
                chunk = idx[k : k + self.batch_size]
                new = generate_batch(
                    self.model,
                    [prompts[i] for i in chunk],
                    sampling,
                    max_gen_toks,
                    stop_ids=self._stop_ids,
                    should_stop=hit_stop,
                )
                for i, tokens in zip(chunk, new, strict=True):
                    text = postprocess_generated_text(
                        self.tok_decode(tokens), until, None
                    )
                    out[i] = text
                    self.cache_hook.add_partial(
                        "generate_until", requests[i].args, text
                    )
                pbar.update(len(chunk))
        pbar.close()
        return out
