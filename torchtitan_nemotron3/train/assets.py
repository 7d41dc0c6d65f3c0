"""Offline assets for debug training runs: a small English corpus and a BPE tokenizer.

The TorchTitan wheel ships no test assets (no ``tests/assets/tokenizer``, no
``c4_test``), and CI machines have no network. A debug run therefore needs a corpus
and a tokenizer it can build itself. Both are generated here, deterministically:

* the corpus is produced by a small hand-written grammar (word lists and sentence
  templates written for this file; no third-party text), so it is real English with
  enough regularity that a tiny model's loss visibly drops within a few steps;
* the tokenizer is a byte-level BPE trained in-process with ``tokenizers`` on that
  corpus, saved as ``tokenizer.json`` + ``tokenizer_config.json`` so TorchTitan's
  ``HuggingFaceTokenizer`` (and ``transformers.AutoTokenizer``) load it from a dir.

Wiring into ``Trainer.Config`` (see :func:`use_debug_assets`):

* ``hf_assets_path = <tokenizer_dir>``;
* ``dataloader = HuggingFaceTextDataLoader.Config(dataset="c4_test",
  dataset_path=<dataset_dir>)``. TorchTitan's ``c4_test`` entry loads its path with
  ``datasets.load_dataset(path, split="train")`` and reads ``sample["text"]``; for a
  local directory holding ``train.jsonl`` that is exactly the JSON builder, so no
  dataset registration (a mutation of TorchTitan's global ``DATASETS``) is needed.

Assets are generated on first use into a cache directory, built in a temporary
sibling directory and renamed into place, so concurrent ranks (each calling
:func:`ensure_debug_assets`) never observe a half-written directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Bump when the generator or tokenizer recipe changes: cached assets live in a
# versioned sub-directory, so a stale cache is never silently reused.
ASSETS_VERSION = 1

DEFAULT_SEED = 1234
DEFAULT_NUM_DOCS = 3000
DEFAULT_VOCAB_SIZE = 2048

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"

ASSETS_ENV_VAR = "TORCHTITAN_NEMOTRON3_ASSETS"

TOKENIZER_SUBDIR = "tokenizer"
DATASET_SUBDIR = "dataset"
DATASET_FILE = "train.jsonl"

# --------------------------------------------------------------------------- corpus
# Word lists written for this module. Verbs carry (present 3rd person, past) forms so
# the generator can keep tense consistent within a story.

# fmt: off
_NAMES = [
    "Ada", "Bruno", "Clara", "Dmitri", "Elena", "Felix", "Greta", "Hugo", "Ines",
    "Jonas", "Kira", "Leo", "Mira", "Nils", "Olga", "Pavel", "Rosa", "Samir",
    "Tara", "Ugo", "Vera", "Wim", "Yara", "Zeno", "Amara", "Bastian", "Cosima",
    "Dario", "Edith", "Florin", "Gideon", "Hanna", "Ilario", "Jasper", "Katalin",
    "Lucian", "Maren", "Octavia", "Quentin", "Rafael", "Solveig", "Thaddeus",
]
_ANIMALS = [
    "cat", "dog", "fox", "owl", "horse", "goat", "rabbit", "crow", "duck", "bear",
    "mouse", "sparrow", "badger", "otter", "hedgehog", "deer", "heron", "squirrel",
    "tortoise", "falcon", "lizard", "beaver",
]
_PLACES = [
    "the old mill", "the market", "the river bank", "the village square",
    "the library", "the harbor", "the orchard", "the bakery", "the train station",
    "the hill behind the school", "the quiet garden", "the workshop", "the forest edge",
    "the lighthouse", "the bridge", "the small museum",
]
_OBJECTS = [
    "a red kite", "a wooden box", "a brass key", "a loaf of bread", "a paper map",
    "a blue umbrella", "a basket of apples", "an old clock", "a green bicycle",
    "a letter", "a lantern", "a jar of honey", "a pair of boots", "a silver coin",
    "a small drum", "a notebook", "a woolen scarf", "a cracked mirror",
    "a fishing net", "a violin", "a copper kettle",
]
_ADJECTIVES = [
    "quiet", "bright", "cold", "warm", "busy", "calm", "windy", "gentle", "strange",
    "happy", "tired", "curious", "careful", "brave", "sleepy", "cheerful", "clumsy",
    "patient", "restless", "stubborn", "graceful", "nervous",
]
_WEATHER = [
    "the sun was shining", "it was raining softly", "a cold wind was blowing",
    "the sky was grey", "snow covered the roofs", "the air smelled of rain",
    "the morning was foggy", "the evening was warm",
]
_TIMES = [
    "In the morning", "After lunch", "Later that day", "In the evening",
    "The next day", "On Sunday", "Before sunrise", "At noon", "Late at night",
    "One autumn afternoon",
]
# (base, 3rd person present, past, takes an object)
_VERBS = [
    ("find", "finds", "found", True), ("carry", "carries", "carried", True),
    ("open", "opens", "opened", True), ("paint", "paints", "painted", True),
    ("repair", "repairs", "repaired", True), ("lose", "loses", "lost", True),
    ("share", "shares", "shared", True), ("hide", "hides", "hid", True),
    ("sell", "sells", "sold", True), ("buy", "buys", "bought", True),
    ("walk", "walks", "walked", False), ("sing", "sings", "sang", False),
    ("rest", "rests", "rested", False), ("wait", "waits", "waited", False),
    ("laugh", "laughs", "laughed", False), ("listen", "listens", "listened", False),
]
_FEELINGS = [
    "glad", "surprised", "proud", "worried", "relieved", "puzzled", "delighted",
    "calm",
]
_CONNECTORS = ["Then", "After that", "Soon", "Meanwhile", "Finally", "Suddenly"]
_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen", "twenty",
]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]


# fmt: on


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _story(rng: random.Random) -> str:
    """A short past-tense story about one protagonist and one companion animal."""
    hero = rng.choice(_NAMES)
    friend = rng.choice([n for n in _NAMES if n != hero])
    animal = rng.choice(_ANIMALS)
    place = rng.choice(_PLACES)
    sentences = [
        f"{rng.choice(_TIMES)}, {rng.choice(_WEATHER)} and {hero} went to {place}.",
        f"{hero} had a {rng.choice(_ADJECTIVES)} {animal} that followed everywhere.",
    ]
    for _ in range(rng.randint(2, 6)):
        _, _, past, transitive = rng.choice(_VERBS)
        who = rng.choice([hero, friend, f"the {animal}"])
        if transitive:
            s = f"{who} {past} {rng.choice(_OBJECTS)} near {rng.choice(_PLACES)}."
        else:
            s = f"{who} {past} for a while at {rng.choice(_PLACES)}."
        if rng.random() < 0.5:
            s = f"{rng.choice(_CONNECTORS)}, {s}"
        sentences.append(_cap(s))
    sentences.append(
        f"When {friend} arrived, {hero} felt {rng.choice(_FEELINGS)}, "
        f"and the {animal} was {rng.choice(_ADJECTIVES)}."
    )
    return " ".join(sentences)


def _habits(rng: random.Random) -> str:
    """Present-tense habits: subject-verb agreement the model can learn."""
    name = rng.choice(_NAMES)
    day = rng.randrange(len(_DAYS))
    lines = []
    for i in range(rng.randint(3, 6)):
        base, third, _, transitive = rng.choice(_VERBS)
        d = _DAYS[(day + i) % len(_DAYS)]
        obj = f" {rng.choice(_OBJECTS)}" if transitive else ""
        if rng.random() < 0.5:
            lines.append(f"On {d}, {name} {third}{obj} at {rng.choice(_PLACES)}.")
        else:
            lines.append(
                f"On {d}, {name} and {rng.choice(_NAMES)} {base}{obj} together."
            )
    return " ".join(lines)


def _arithmetic(rng: random.Random) -> str:
    """Small sums written in words: a deterministic pattern that lowers loss fast."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        a = rng.randint(0, 10)
        b = rng.randint(0, 10)
        lines.append(
            f"{_cap(_NUMBER_WORDS[a])} plus {_NUMBER_WORDS[b]} is {_NUMBER_WORDS[a + b]}."
        )
    return " ".join(lines)


def _calendar(rng: random.Random) -> str:
    """Ordered sequences (days, months) that the model can continue."""
    if rng.random() < 0.5:
        start = rng.randrange(len(_DAYS))
        days = [_DAYS[(start + i) % 7] for i in range(rng.randint(3, 7))]
        return (
            f"The days went by: {', '.join(days)}. "
            f"After {days[-1]} comes {_DAYS[(start + len(days)) % 7]}."
        )
    start = rng.randrange(len(_MONTHS))
    months = [_MONTHS[(start + i) % 12] for i in range(rng.randint(3, 6))]
    return (
        f"The months passed: {', '.join(months)}. "
        f"After {months[-1]} comes {_MONTHS[(start + len(months)) % 12]}."
    )


# fmt: off
# (goods, unit, plural unit)
_GOODS = [
    ("apples", "kilo", "kilos"), ("flour", "bag", "bags"), ("candles", "box", "boxes"),
    ("nails", "pack", "packs"), ("cheese", "wheel", "wheels"), ("rope", "meter", "meters"),
    ("ink", "bottle", "bottles"), ("soap", "bar", "bars"), ("tea", "tin", "tins"),
    ("wool", "ball", "balls"), ("salt", "jar", "jars"), ("paper", "sheet", "sheets"),
    ("buttons", "dozen", "dozen"), ("coffee", "pound", "pounds"),
    ("thread", "spool", "spools"), ("oats", "sack", "sacks"),
]


# fmt: on


def _ledger(rng: random.Random) -> str:
    """A shop ledger with digits and prices: gives the BPE numbers to merge."""
    shop = rng.choice(_NAMES)
    day = rng.randint(1, 28)
    lines = [
        f"Ledger of {shop}'s shop, {rng.choice(_MONTHS)} {day}, {rng.randint(1850, 1999)}."
    ]
    total = 0
    for _ in range(rng.randint(3, 6)):
        goods, unit, units = rng.choice(_GOODS)
        qty = rng.randint(1, 40)
        cents = rng.randint(5, 950)
        total += qty * cents
        lines.append(
            f"Sold {qty} {unit if qty == 1 else units} of {goods} at "
            f"{cents // 100}.{cents % 100:02d} each."
        )
    lines.append(f"Total for the day: {total // 100}.{total % 100:02d}.")
    return " ".join(lines)


def _timetable(rng: random.Random) -> str:
    """Train departures: times, platforms and places in a fixed format."""
    hour = rng.randint(5, 20)
    minute = rng.randrange(0, 60, 5)
    lines = []
    for _ in range(rng.randint(3, 5)):
        dest = rng.choice(_PLACES).removeprefix("the ")
        lines.append(
            f"The {hour:02d}:{minute:02d} train to {dest} leaves from platform "
            f"{rng.randint(1, 12)} with {rng.randint(20, 400)} seats."
        )
        minute += rng.randrange(5, 50, 5)
        hour, minute = hour + minute // 60, minute % 60
    return " ".join(lines)


_GENERATORS = [
    (_story, 0.45),
    (_habits, 0.15),
    (_arithmetic, 0.1),
    (_calendar, 0.1),
    (_ledger, 0.1),
    (_timetable, 0.1),
]


def generate_corpus(
    num_docs: int = DEFAULT_NUM_DOCS, seed: int = DEFAULT_SEED
) -> list[str]:
    """Return ``num_docs`` English documents; identical for identical arguments."""
    rng = random.Random(seed)
    fns = [g for g, _ in _GENERATORS]
    weights = [w for _, w in _GENERATORS]
    docs = []
    for _ in range(num_docs):
        parts = [f(rng) for f in rng.choices(fns, weights, k=rng.randint(1, 3))]
        docs.append(" ".join(parts))
    return docs


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE (GPT-2 style pre-tokenization) on ``docs``.

    The special tokens take the first ids (bos=0, eos=1, pad=2); every id is below
    ``vocab_size``, so any model whose embedding has at least ``vocab_size`` rows can
    consume its output. Byte-level with the full 256-byte initial alphabet means any
    text (not only the training corpus) round-trips through encode/decode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tokenizer


def _tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json content: what TorchTitan reads to find bos/eos.

    ``HuggingFaceTokenizer`` takes ``bos_token``/``eos_token`` from here and the
    ``add_*_token`` defaults; the dataloader passes ``add_bos=True, add_eos=True``
    explicitly, so documents are framed as ``<bos> text <eos>`` either way.
    """
    added = {}
    for tok in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN):
        added[str(tokenizer.token_to_id(tok))] = {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }


# -------------------------------------------------------------------------- on disk


def default_assets_root() -> Path:
    """``$TORCHTITAN_NEMOTRON3_ASSETS``, else ``<repo>/assets/debug`` (gitignored).

    When the package is installed outside a source checkout (no ``pyproject.toml``
    next to the package), fall back to ``~/.cache/torchtitan_nemotron3/debug``.
    """
    env = os.environ.get(ASSETS_ENV_VAR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "assets" / "debug"
    return Path.home() / ".cache" / "torchtitan_nemotron3" / "debug"


def _write_assets(out: Path, num_docs: int, vocab_size: int, seed: int) -> None:
    docs = generate_corpus(num_docs=num_docs, seed=seed)
    data_dir = out / DATASET_SUBDIR
    data_dir.mkdir(parents=True)
    with open(data_dir / DATASET_FILE, "w", encoding="utf-8") as f:
        f.writelines(
            json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs
        )

    tok_dir = out / TOKENIZER_SUBDIR
    tok_dir.mkdir(parents=True)
    tokenizer = train_tokenizer(docs, vocab_size=vocab_size)
    tokenizer.save(str(tok_dir / "tokenizer.json"))
    with open(tok_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(tokenizer), f, indent=2, sort_keys=True)
        f.write("\n")


def ensure_debug_assets(
    root: str | os.PathLike | None = None,
    *,
    num_docs: int = DEFAULT_NUM_DOCS,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = DEFAULT_SEED,
) -> tuple[str, str]:
    """Create (once) and return ``(tokenizer_dir, dataset_dir)`` as absolute paths.

    ``root`` defaults to :func:`default_assets_root`. Assets for each recipe live in
    ``<root>/v<version>-docs<n>-vocab<v>-seed<s>/``; an existing directory is
    reused as is. Generation happens in a temporary directory next to the target
    that is renamed into place: if another process wins the race, its result is
    kept and ours is discarded (both are identical by construction).
    """
    root = Path(root) if root is not None else default_assets_root()
    name = f"v{ASSETS_VERSION}-docs{num_docs}-vocab{vocab_size}-seed{seed}"
    final = (root / name).resolve()
    tok_dir, data_dir = final / TOKENIZER_SUBDIR, final / DATASET_SUBDIR
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            _write_assets(tmp, num_docs=num_docs, vocab_size=vocab_size, seed=seed)
            try:
                os.rename(tmp, final)
            except OSError:
                # Lost the race to a concurrent writer: theirs is complete.
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(tok_dir), str(data_dir)


def use_debug_assets(config, root: str | os.PathLike | None = None) -> None:
    """Point a ``Trainer.Config`` at the generated debug tokenizer and corpus.

    Sets ``hf_assets_path`` and replaces ``dataloader`` by a
    ``HuggingFaceTextDataLoader.Config`` reading the local JSONL directory (other
    dataloader settings such as ``infinite`` and ``num_workers`` are kept when the
    current dataloader already is one).
    """
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

    tokenizer_dir, dataset_dir = ensure_debug_assets(root)
    config.hf_assets_path = tokenizer_dir
    if not isinstance(config.dataloader, HuggingFaceTextDataLoader.Config):
        config.dataloader = HuggingFaceTextDataLoader.Config()
    # "c4_test" = load_dataset(<dir>, split="train") + sample["text"]: a plain
    # local JSON loader under TorchTitan's registered name.
    config.dataloader.dataset = "c4_test"
    config.dataloader.dataset_path = dataset_dir
