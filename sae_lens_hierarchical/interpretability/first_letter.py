"""The first-letter task of Chanin et al. (2024): words, prompts, cached activations and the ground-truth probe.

Feature absorption (:mod:`sae_lens_hierarchical.interpretability.absorption`) is measured against a probe that knows
each word's first letter. Everything here is built without an SAE, once per model and hook (the activations cached on
disk), so that every SAE, budget and seed is scored against the same words, prompts and probe.

The definition implemented (SAEBench's ``absorption_first_letter``, steps 1 and 2)
----------------------------------------------------------------------------------
1. **Words and prompts.** Words are single vocabulary tokens made of a space and ASCII letters (" cat", " Paris");
   a word's letter is its first letter, lower-cased (26 classes). Each word gets an in-context prompt of
   ``n_icl_examples`` (10) other words from its own split, one per line, ``"{word} has the first letter: C"``, then
   ``"{word} has the first letter:"`` with the answer left out. The residual stream is read at the word's token,
   6 tokens before the end (SAEBench's ``prompt_token_pos = -6``); a prompt whose token there is not the word is
   dropped (counted in ``n_dropped``).
2. **Ground-truth probe.** 26 one-vs-rest logistic regressions, classes weighted to balance (SAEBench's BCE with
   ``pos_weight = negatives / positives``), on the training words' activations. Reported on the held-out words:
   top-1 accuracy (argmax over the 26 scores) and each letter's F1 of ``score > 0``. Which letters are good enough
   to score absorption for is the absorption module's choice (steps 3 and 4 are there too).

Deviations from SAEBench, and why
---------------------------------
- **Sizes.** SAEBench prompts every alphabetic token (86k for Gemma-3's vocabulary); on 2 CPU cores that is hours
  of forward passes, so ``n_words_per_letter`` (160) words per letter are sampled (4,149 words, 87 tokens each:
  361k tokens through 7 blocks, cached once), and split per letter (``train_fraction`` 0.8, SAEBench's split) so
  that every letter, rare ones (x: 149 tokens) too, has about 30 held-out words. Balanced sampling also equalises
  the letters' weight in the probe. Per-letter rates move in steps of 1/30; compare SAEs on the mean over letters.
- **Tokens.** Only tokens with a leading space (SAEBench also takes letter-only tokens without one, i.e. word
  pieces); the word stands alone in its prompt line either way.
- **Seeded.** Sampling, splits and in-context examples come from ``seed``; SAEBench's are unseeded.
- **One set of prompts.** SAEBench re-prompts the held-out words with fresh in-context examples (drawn from the whole
  vocabulary, with a leading newline) before measuring absorption; here the probe's held-out prompts are reused, so
  one cached activation set serves the probe, the k-sparse probes and absorption for every SAE.
- **Solver.** scikit-learn instead of SAEBench's Adam loop: the probe is lbfgs logistic regression (L2,
  ``C = probe_c``, 1 by default, chosen before looking; 0.1 and 10 give held-out accuracy within 0.02 on
  Gemma-3-270M) on activations centred and divided by one global scale, then mapped back, so the direction lives in
  the raw residual stream.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_lens_hierarchical._files import exclusive_lock, write_json_atomically, write_new_directory
from sae_lens_hierarchical.data.activation_cache import DEFAULT_CACHE_ROOT, hook_activations

LETTERS = string.ascii_lowercase
PROMPT_TEMPLATE = "{word} has the first letter:"  # SAEBench's prompt_template
# The word's token sits this many tokens before the end: " word", " has", " the", " first", " letter", ":".
WORD_TOKEN_POSITION = -6
_CACHE_FORMAT = 1
_CACHE_SUBDIR = "first_letter"
_TENSORS_FILE = "activations.safetensors"
_MANIFEST_FILE = "words.json"


def check_range(
    name: str, value: object, low: float, high: float, integer: bool = False, open_low: bool = False
) -> None:
    """One ``ValueError`` naming ``name``, its value and the allowed range, when ``value`` falls outside it."""
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)  # type: ignore[arg-type]
    ok = ok and (value > low if open_low else value >= low) and value <= high  # type: ignore[operator]
    if not ok:
        bracket = "(" if open_low else "["
        allowed = f"an int in {low}..{high}" if integer else f"a number in {bracket}{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}; got {value!r}")


@dataclass(frozen=True)
class FirstLetterTask:
    """Which words and prompts the first-letter task uses; every field is part of the activation cache's key.

    Attributes:
        n_words_per_letter: words sampled per letter (all of a letter's words when it has fewer).
        train_fraction: share of each letter's words that train the probes; the rest are held out.
        n_icl_examples: in-context examples before the word (from the word's own split).
        seed: seeds the sampling, the split and the in-context examples.
    """

    n_words_per_letter: int = 160
    train_fraction: float = 0.8
    n_icl_examples: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("n_words_per_letter", self.n_words_per_letter, 2, 100_000, integer=True)
        check_range("train_fraction", self.train_fraction, 0.0, 0.95, open_low=True)
        check_range("n_icl_examples", self.n_icl_examples, 0, 100, integer=True)
        check_range("seed", self.seed, 0, 2**32 - 1, integer=True)


@dataclass(frozen=True, eq=False)  # eq would compare tensors
class FirstLetterData:
    """Residual-stream activations at each word's token; the first ``n_train`` rows train, the rest are held out.

    Attributes:
        words: ``[n]`` the words, with their leading space.
        letters: ``[n]`` int64 class of each word's first letter (0 = a, ..., 25 = z).
        activations: ``[n, d_in]`` float32 activations at the word's token.
        n_train: rows ``:n_train`` train the probes, rows ``n_train:`` are held out.
        model_name, hook_name: where the activations come from (checked against the SAE's hook).
        n_dropped: prompts left out because the word was not 6 tokens before their end.
    """

    words: list[str]
    letters: torch.Tensor
    activations: torch.Tensor
    n_train: int
    model_name: str = ""
    hook_name: str = ""
    n_dropped: int = 0

    def __post_init__(self) -> None:
        n = len(self.words)
        if self.activations.ndim != 2 or self.activations.shape[0] != n or not self.activations.is_floating_point():
            raise ValueError(
                f"activations must be floating point [n_words={n}, d_in]; got {self.activations.dtype} "
                f"{tuple(self.activations.shape)}"
            )
        if self.letters.shape != (n,) or self.letters.is_floating_point():
            raise ValueError(
                f"letters must be integer [n_words={n}]; got {self.letters.dtype} {tuple(self.letters.shape)}"
            )
        if n and not 0 <= int(self.letters.min()) <= int(self.letters.max()) < len(LETTERS):
            raise ValueError(
                f"letters must be in 0..{len(LETTERS) - 1}; got {self.letters.min()}..{self.letters.max()}"
            )
        check_range("n_train", self.n_train, 1, n - 1, integer=True)
        if not torch.isfinite(self.activations).all():
            raise ValueError("activations must be finite; got NaN or inf")

    @property
    def d_in(self) -> int:
        return int(self.activations.shape[1])

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_train, d_in] activations, [n_train] letters)``."""
        return self.activations[: self.n_train], self.letters[: self.n_train]

    @property
    def test(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([n_test, d_in] activations, [n_test] letters)`` of the held-out words."""
        return self.activations[self.n_train :], self.letters[self.n_train :]


@dataclass(frozen=True, eq=False)
class FirstLetterProbe:
    """The ground-truth probe: ``scores = x @ weight.T + bias`` (``[n, 26]``) on raw activations, and its held-out
    quality (``accuracy``: top-1 over 26 letters; ``letter_f1``: per letter, F1 of ``score > 0``)."""

    data: FirstLetterData
    weight: torch.Tensor  # [26, d_in]
    bias: torch.Tensor  # [26]
    accuracy: float
    letter_f1: list[float]

    @classmethod
    def from_weights(cls, data: FirstLetterData, weight: torch.Tensor, bias: torch.Tensor) -> FirstLetterProbe:
        """A probe with given weights, scored on ``data``'s held-out words."""
        if weight.shape != (len(LETTERS), data.d_in) or bias.shape != (len(LETTERS),):
            raise ValueError(
                f"weight must be [26, d_in={data.d_in}] and bias [26]; got {tuple(weight.shape)}, {tuple(bias.shape)}"
            )
        weight, bias = weight.float(), bias.float()
        x_test, y_test = data.test
        scores = x_test @ weight.T + bias
        accuracy = float((scores.argmax(dim=1) == y_test).float().mean())
        letter_f1 = [f1(y_test.numpy() == letter, scores[:, letter].numpy() > 0) for letter in range(len(LETTERS))]
        return cls(data, weight, bias, accuracy, letter_f1)

    @classmethod
    def fit(cls, data: FirstLetterData, c: float = 1.0, progress: bool = True) -> FirstLetterProbe:
        """Fit 26 balanced one-vs-rest logistic regressions (L2, strength ``c``) on ``data``'s training words.

        They are fit on activations centred and divided by one global scale (lbfgs converges on Gemma's large,
        uneven residual norms; the L2 penalty stays isotropic), then mapped back to raw activations.
        """
        check_range("c", c, 0.0, 1e12, open_low=True)
        x_train, y_train = data.train
        mean = x_train.double().mean(dim=0)
        scale = float((x_train.double() - mean).pow(2).mean().sqrt()) or 1.0
        features = ((x_train.double() - mean) / scale).numpy()
        weight = torch.zeros(len(LETTERS), data.d_in, dtype=torch.float64)
        bias = torch.zeros(len(LETTERS), dtype=torch.float64)
        labels = y_train.numpy()
        for letter in tqdm(range(len(LETTERS)), desc="First-letter probe", leave=False, disable=not progress):
            target = labels == letter
            if not target.any():  # no training word of this letter: never predict it
                bias[letter] = -1.0
                continue
            with threadpool_limits(1):  # BLAS threads only add overhead at these sizes (and on a shared CPU)
                model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(features, target)
            weight[letter] = torch.from_numpy(model.coef_[0]) / scale
            bias[letter] = float(model.intercept_[0]) - float(weight[letter] @ mean)
        return cls.from_weights(data, weight, bias)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, 26]`` probe logits of ``[n, d_in]`` activations; letter L is predicted where its score is > 0."""
        return x.float() @ self.weight.T + self.bias

    @property
    def directions(self) -> torch.Tensor:
        """``[26, d_in]`` unit probe directions."""
        return self.weight / self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def reliable_letters(self, min_f1: float) -> list[int]:
        """Letters whose held-out F1 exceeds ``min_f1``: those absorption can be scored for."""
        return [letter for letter, score in enumerate(self.letter_f1) if score > min_f1]


def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """F1 of boolean predictions against boolean truth (0 when neither has a positive), as scikit-learn's
    ``f1_score(..., zero_division=0)`` without its input checks, which dominate at these sizes."""
    true_positives = int((truth & predicted).sum())
    denominator = int(truth.sum()) + int(predicted.sum())
    return 2 * true_positives / denominator if denominator else 0.0


# ---- words, prompts and the cached activations ----------------------------------------------------------------


def first_letter_vocabulary(tokenizer: Any) -> list[tuple[str, int]]:
    """``(word, token id)`` for every single token that is a space followed by ASCII letters, by token id."""
    words = []
    for token, token_id in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) > 1 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            words.append((text, int(token_id)))
    return sorted(words, key=lambda item: item[1])


def first_letter_prompts(
    vocabulary: Sequence[tuple[str, int]], task: FirstLetterTask
) -> tuple[list[tuple[str, int, str]], int]:
    """``([(word, token id, prompt)], n_train)``: words sampled and split per letter, train words first.

    Each letter's words are shuffled with ``task.seed``; the first ``n_words_per_letter`` are kept and split by
    ``train_fraction`` (at least one on each side). A prompt's in-context examples come from its word's split.
    """
    rng = random.Random(task.seed)
    by_letter: dict[str, list[tuple[str, int]]] = {letter: [] for letter in LETTERS}
    for word, token_id in vocabulary:
        by_letter[word[1].lower()].append((word, token_id))
    splits: tuple[list[tuple[str, int]], list[tuple[str, int]]] = ([], [])
    for letter in LETTERS:
        words = sorted(by_letter[letter], key=lambda item: item[1])
        rng.shuffle(words)
        words = words[: task.n_words_per_letter]
        if len(words) < 2:
            continue
        n_train = min(max(round(len(words) * task.train_fraction), 1), len(words) - 1)
        splits[0].extend(words[:n_train])
        splits[1].extend(words[n_train:])
    prompts = []
    for split in splits:
        rng.shuffle(split)
        # Two tokens may spell the same word: count distinct spellings, so the example draw always ends.
        n_examples = min(task.n_icl_examples, len(dict.fromkeys(word for word, _ in split)) - 1)
        for word, token_id in split:
            prompts.append((word, token_id, _icl_prompt(word, split, n_examples, rng)))
    return prompts, len(splits[0])


def _icl_prompt(word: str, pool: Sequence[tuple[str, int]], n_examples: int, rng: random.Random) -> str:
    """``n_examples`` answered lines of distinct words from ``pool`` (never ``word``), then ``word``'s line
    without its answer."""
    examples: list[str] = []
    while len(examples) < n_examples:
        example = rng.choice(pool)[0]
        if example != word and example not in examples:
            examples.append(example)
    lines = [f"{PROMPT_TEMPLATE.format(word=example)} {example[1].upper()}" for example in examples]
    return "\n".join([*lines, PROMPT_TEMPLATE.format(word=word)])


def first_letter_data(
    model: HookedTransformer,
    hook_name: str,
    task: FirstLetterTask | None = None,
    cache_root: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> FirstLetterData:
    """Activations at ``hook_name`` on the word token of each first-letter prompt, cached on disk.

    The cache lives under ``cache_root`` (default: the package's activation cache root) in ``first_letter/``,
    named by a digest of the model name, hook, task and every prompt, and is written whole or not at all, so
    scoring many SAEs (and seeds) runs the model once. The forward pass stops after the hooked block.
    """
    task = task or FirstLetterTask()
    if hook_name not in model.hook_dict:
        raise ValueError(f"hook_name {hook_name!r} is not a hook of the model; choose one of model.hook_dict")
    vocabulary = first_letter_vocabulary(model.tokenizer)
    prompts, n_train = first_letter_prompts(vocabulary, task)
    if n_train < 1 or len(prompts) - n_train < 1:
        raise ValueError(f"the tokenizer has too few single-token words to split ({len(vocabulary)} found)")
    key = {
        "format": _CACHE_FORMAT,
        "model_name": model.cfg.model_name,
        "hook_name": hook_name,
        "task": asdict(task),
        "prompts": hashlib.sha256("\0".join(p for _, _, p in prompts).encode()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    directory = root / _CACHE_SUBDIR / f"{model.cfg.model_name}-{hook_name}-{digest}".replace("/", "_")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(directory.with_name(f".{directory.name}.lock")):
        if not (directory / _MANIFEST_FILE).is_file():
            activations, keep = _word_activations(model, hook_name, prompts, batch_size, progress)
            kept_words = [word for (word, _, _), kept in zip(prompts, keep, strict=True) if kept]
            manifest = {"key": key, "words": kept_words, "n_train": int(sum(keep[:n_train]))}
            manifest["n_dropped"] = len(prompts) - len(kept_words)
            letters = torch.tensor([LETTERS.index(word[1].lower()) for word in kept_words], dtype=torch.long)

            def write(scratch: Path) -> None:
                save_file({"activations": activations.contiguous(), "letters": letters}, scratch / _TENSORS_FILE)
                write_json_atomically(scratch / _MANIFEST_FILE, manifest)

            write_new_directory(directory, write)
        manifest = json.loads((directory / _MANIFEST_FILE).read_text())
        if manifest["key"] != key:
            raise ValueError(f"first-letter cache {directory} holds a different key: {manifest['key']}")
        tensors = load_file(directory / _TENSORS_FILE)
    return FirstLetterData(
        words=manifest["words"],
        letters=tensors["letters"],
        activations=tensors["activations"],
        n_train=manifest["n_train"],
        model_name=model.cfg.model_name,
        hook_name=hook_name,
        n_dropped=manifest["n_dropped"],
    )


@torch.no_grad()
def _word_activations(
    model: HookedTransformer,
    hook_name: str,
    prompts: Sequence[tuple[str, int, str]],
    batch_size: int,
    progress: bool,
) -> tuple[torch.Tensor, list[bool]]:
    """``([kept, d_in] float32 activations at each kept prompt's word token, [prompts] kept flags)``.

    Prompts are tokenized alone (BOS first) and right-padded in batches: attention is causal, so padding after the
    word cannot change its activation.
    """
    tokenizer = model.tokenizer
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    token_lists = []
    keep = []
    for _, token_id, prompt in prompts:
        ids = bos + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        kept = len(ids) >= -WORD_TOKEN_POSITION and ids[WORD_TOKEN_POSITION] == token_id
        keep.append(kept)
        if kept:
            token_lists.append(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    chunks = []
    with tqdm(total=sum(map(len, token_lists)), desc="First-letter prompts", unit="tok", disable=not progress) as bar:
        for start in range(0, len(token_lists), batch_size):
            batch = token_lists[start : start + batch_size]
            width = max(map(len, batch))
            tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
            acts = hook_activations(model, tokens, hook_name, batch_size=batch_size)  # [batch, width, d_in]
            positions = torch.tensor([len(ids) + WORD_TOKEN_POSITION for ids in batch])
            chunks.append(acts[torch.arange(len(batch)), positions].float())
            bar.update(sum(map(len, batch)))
    activations = torch.cat(chunks) if chunks else torch.zeros(0, model.cfg.d_model)
    return activations, keep


def first_letter_probe(
    model: HookedTransformer,
    hook_name: str,
    task: FirstLetterTask | None = None,
    cache_root: str | Path | None = None,
    probe_c: float = 1.0,
    progress: bool = True,
) -> FirstLetterProbe:
    """The ground-truth first-letter probe at ``hook_name`` (activations cached, see :func:`first_letter_data`).

    ``probe.accuracy`` is its held-out top-1 accuracy over 26 letters; ``probe.letter_f1`` each letter's F1.
    """
    data = first_letter_data(model, hook_name, task, cache_root, progress=progress)
    return FirstLetterProbe.fit(data, probe_c, progress)


__all__ = [
    "LETTERS",
    "FirstLetterData",
    "FirstLetterProbe",
    "FirstLetterTask",
    "first_letter_data",
    "first_letter_probe",
    "first_letter_prompts",
    "first_letter_vocabulary",
]
