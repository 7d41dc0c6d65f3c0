"""Anchored module-FQN patterns (``keep_bf16``): a regex must match the whole name, so
``layers\\.1\\.mixer\\.up_proj`` does not also match ``mtp.layers.1.mixer.up_proj``
(TorchTitan's ``filter_fqns`` / ``fqns`` match substrings)."""

import re


def anchored(patterns: list[str], what: str = "low_precision.keep_bf16") -> list[re.Pattern]:
    """Compile FQN patterns that must match a whole name (``re.fullmatch``)."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"{what}: {p!r} is not a valid regular expression ({e})") from None
    return compiled


def kept(fqn: str, patterns: list[re.Pattern]) -> bool:
    return any(p.fullmatch(fqn) for p in patterns)
