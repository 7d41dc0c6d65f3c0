"""Offline assets for debug training runs: a small English corpus and a BPE tokenizer.

TorchTitan's wheel ships no test tokenizer or ``c4_test`` data, and CI machines have
no network, so the debug run uses assets generated here on first use:

* the corpus: 3000 documents from a small hand-written grammar (word lists and
  templates written for this file, no third-party text), regular enough that a tiny
  model's loss drops within a few steps;
* the tokenizer: a 2048-token byte-level BPE trained on it with ``tokenizers``,
  saved as ``tokenizer.json`` + ``tokenizer_config.json`` (what TorchTitan's
  ``HuggingFaceTokenizer`` and ``transformers.AutoTokenizer`` load).

Both are deterministic (seeded) and cached in ``<root>/v1-docs3000-vocab2048-seed1234/``
(``{tokenizer,dataset}/``); the root is ``$TORCHTITAN_NEMOTRON3_ASSETS``, else
``assets/debug`` in a source checkout, else ``~/.cache/torchtitan_nemotron3/debug``.
They are built in a temporary sibling directory renamed into place, so concurrent
ranks never see a half-written one. Changing the output means bumping
``ASSETS_VERSION`` (the debug run's losses depend on these bytes).

The dataset is TorchTitan's ``c4_test`` entry pointed at the local directory: it
loads ``datasets.load_dataset(<dir>, split="train")`` (the JSON builder, for
``train.jsonl``) and reads ``sample["text"]``; nothing is registered.
"""

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ASSETS_VERSION = 1
NUM_DOCS = 3000
VOCAB_SIZE = 2048
SEED = 1234
ASSETS_ENV_VAR = "TORCHTITAN_NEMOTRON3_ASSETS"
# bos, eos, pad: the first ids (0, 1, 2)
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|pad|>")

# --------------------------------------------------------------------------- corpus
# The draws below, their order included, fix the corpus bytes: change nothing here
# without bumping ASSETS_VERSION.

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


_GENERATORS = [_story, _habits, _arithmetic, _calendar, _ledger, _timetable]
_WEIGHTS = [0.45, 0.15, 0.1, 0.1, 0.1, 0.1]


def generate_corpus(num_docs: int = NUM_DOCS, seed: int = SEED) -> list[str]:
    """``num_docs`` documents of 1-3 parts each; identical for identical arguments."""
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        parts = rng.choices(_GENERATORS, _WEIGHTS, k=rng.randint(1, 3))
        docs.append(" ".join(f(rng) for f in parts))
    return docs


# ------------------------------------------------------------------------ tokenizer


def train_tokenizer(docs: list[str]) -> Tokenizer:
    """A byte-level BPE (GPT-2 pre-tokenization) of ``VOCAB_SIZE`` ids, the special
    tokens first. The full 256-byte alphabet makes any text round-trip."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer)
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    """What TorchTitan reads for bos/eos (the dataloader adds both itself)."""
    bos, eos, pad = SPECIAL_TOKENS
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
    }


# -------------------------------------------------------------------------- on disk


def default_assets_root() -> Path:
    env = os.environ.get(ASSETS_ENV_VAR)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / "assets" / "debug"
    return Path.home() / ".cache" / "torchtitan_nemotron3" / "debug"


def _write_assets(out: Path) -> None:
    docs = generate_corpus()
    (out / "dataset").mkdir()
    with open(out / "dataset" / "train.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs)
    (out / "tokenizer").mkdir()
    tokenizer = train_tokenizer(docs)
    tokenizer.save(str(out / "tokenizer" / "tokenizer.json"))
    with open(out / "tokenizer" / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(_tokenizer_config(tokenizer), f, indent=2, sort_keys=True)
        f.write("\n")


def build_once(root: Path, name: str, write: Callable[[Path], None]) -> Path:
    """``root / name`` (absolute), written once by ``write(directory)``: built in a
    temporary sibling and renamed into place, so no reader sees half of it. Racing
    writers (ranks, threads) each build their own; the first rename wins, the
    others discard theirs."""
    final = (root / name).resolve()
    if not final.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            write(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():  # not a lost race
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_debug_assets(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(tokenizer_dir, dataset_dir)``, absolute, generated once under ``root``
    (default :func:`default_assets_root`; :func:`build_once`)."""
    root = Path(root) if root is not None else default_assets_root()
    name = f"v{ASSETS_VERSION}-docs{NUM_DOCS}-vocab{VOCAB_SIZE}-seed{SEED}"
    final = build_once(root, name, _write_assets)
    return str(final / "tokenizer"), str(final / "dataset")


def use_debug_assets(config, root: str | os.PathLike | None = None) -> None:
    """Point a ``Trainer.Config`` at the debug tokenizer (``hf_assets_path``) and
    corpus (``dataloader``: TorchTitan's ``c4_test`` on the local JSONL directory;
    other settings of a ``HuggingFaceTextDataLoader.Config`` are kept)."""
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

    tokenizer_dir, dataset_dir = ensure_debug_assets(root)
    config.hf_assets_path = tokenizer_dir
    if not isinstance(config.dataloader, HuggingFaceTextDataLoader.Config):
        config.dataloader = HuggingFaceTextDataLoader.Config()
    config.dataloader.dataset = "c4_test"
    config.dataloader.dataset_path = dataset_dir


# ------------------------------------------------------------- pre-tokenized corpus

PRETOKENIZED_VERSION = 1
DEBUG_PREFIX = "train_text_document"


def _write_pretokenized(tokenizer_dir: str):
    def write(out: Path) -> None:
        from ..data.indexed import IndexedDatasetWriter, optimal_dtype

        tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
        eos = tokenizer.token_to_id(SPECIAL_TOKENS[1])
        with IndexedDatasetWriter(str(out / DEBUG_PREFIX), optimal_dtype(VOCAB_SIZE)) as w:
            for doc in generate_corpus():
                w.add_document([*tokenizer.encode(doc).ids, eos])
            w.commit()

    return write


def ensure_debug_pretokenized(root: str | os.PathLike | None = None) -> tuple[str, str]:
    """``(tokenizer_dir, prefix)``: the debug corpus tokenized with the debug
    tokenizer into Megatron's indexed format (``<prefix>.bin``/``.idx``), one
    document per corpus text, ended by EOS, no BOS (NVIDIA's framing, what
    ``scripts/prepare_data.py`` writes); generated once beside the other assets
    (:func:`build_once`)."""
    root = Path(root) if root is not None else default_assets_root()
    tokenizer_dir, _ = ensure_debug_assets(root)
    name = (
        f"v{ASSETS_VERSION}-docs{NUM_DOCS}-vocab{VOCAB_SIZE}-seed{SEED}"
        f"-megatron-v{PRETOKENIZED_VERSION}"
    )
    final = build_once(root, name, _write_pretokenized(tokenizer_dir))
    return tokenizer_dir, str(final / DEBUG_PREFIX)


def use_debug_pretraining_data(config, root: str | os.PathLike | None = None) -> None:
    """Point a ``Trainer.Config`` at the debug tokenizer and the pre-tokenized
    debug corpus, read by the pretraining loader (``data/pretrain.py``; other
    settings of a ``PretrainDataLoader.Config`` are kept)."""
    from ..data.pretrain import PretrainDataLoader

    tokenizer_dir, prefix = ensure_debug_pretokenized(root)
    config.hf_assets_path = tokenizer_dir
    if not isinstance(config.dataloader, PretrainDataLoader.Config):
        config.dataloader = PretrainDataLoader.Config()
    config.dataloader.blend = prefix
