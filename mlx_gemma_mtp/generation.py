"""Speculative generation with a Gemma 4 target and its assistant drafter: the Python API.

``stream_generate`` and ``generate`` follow mlx-lm's functions of the same names; with
``draft_model=None`` (or ``num_draft_tokens=0``) they decode plainly through the same code.
"""

import functools
import inspect
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchResponse, generation_stream, wired_limit
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse
from mlx_lm.generate_utils import BatchCountersSnapshot
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import ASSISTANT_TYPES, TARGET_TYPES
from .costs import Costs
from .engine.batch import BatchGenerator
from .engine.loop import DEFAULT_NUM_DRAFT_TOKENS, SpeculativeGenerator, Stats
from .engine.prompt_cache import (
    DEFAULT_MAX_DRAFT_TOKENS,
    PromptCache,
    check_prompt_cache,
    empty_prompt_cache,
    make_cache_for,
)
from .engine.sampling import SamplingParams, TokenPolicy, make_sampler_params
from .loading import validate_pair
from .media import Media, build_media_prompt
from .models.gemma4_assistant import Model as Drafter
from .models.target import Target
from .state import kept_for
from .text import TextStream

CLEAR_CACHE_EVERY = 256  # generated tokens between mx.clear_cache() calls, as mlx-lm


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response plus the speculative counters so far."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    mode: str = "mtp"  # "plain" when no drafter is used
    acceptance_rule: str = "match"  # "coupled": sampling with the position's noise
    draft_path: str = "none"  # says whether drafting is compiled and centroid-masked
    k_histogram: dict | None = None  # rounds per number of drafts (0: plain steps)
    parked_seconds: float = 0.0  # time in plain steps while a drafter was loaded

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.generation_tokens / self.target_forwards if self.target_forwards else 0.0

    def mtp_stats(self) -> dict:
        """The speculative counters so far, with their rates: what ``--stats-json``, the server's
        ``usage.mtp`` and the benchmarks report."""
        return mtp_stats(self, self.generation_tokens)


def make_policy(
    sampler=None,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    logits_processors: list | None = None,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float | None = None,
    presence_context_size: int = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int = 20,
) -> TokenPolicy:
    """A ``TokenPolicy`` from mlx-lm's options. The options (``temp``, ``top_p``, ...) sample
    coupled, which a seed fixes whatever the draft schedule; so does a ``sampler`` from mlx-lm's
    ``make_sampler`` (its options are taken over). Any other ``sampler`` is honoured exactly, but
    its draws depend on how many rows each round verifies (it draws from MLX's random state), so
    a seed fixes its output only for one draft schedule (a warning says so, once).
    mlx-lm's repetition penalty reads only the last ``repetition_context_size`` tokens, so it
    keeps the pipelined loop; custom ``logits_processors`` may read the whole history, and so
    do ``logit_bias`` and the presence and frequency penalties (mlx-lm's processors: the target
    and the drafter both apply them, so drafts are verified under them)."""
    params = SamplingParams(temp, top_p, min_p, min_tokens_to_keep, top_k)
    if sampler is not None and params.greedy:
        taken_over = make_sampler_params(sampler)
        if taken_over is not None:
            sampler, params = None, taken_over
        else:
            warn_once(CUSTOM_SAMPLER_WARNING)
    processors = list(logits_processors or [])
    processors += make_logits_processors(
        logit_bias=logit_bias,
        presence_penalty=presence_penalty,
        presence_context_size=presence_context_size,
        frequency_penalty=frequency_penalty,
        frequency_context_size=frequency_context_size,
    )
    window = None if processors else repetition_context_size
    processors += make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return TokenPolicy(sampler, params, processors, window, repetition_penalty)


CUSTOM_SAMPLER_WARNING = (
    "mlx_gemma_mtp: this sampler is not one of mlx_lm.sample_utils.make_sampler's without XTC, so "
    "its options cannot be taken over for coupled sampling. It is honoured exactly (drafts are "
    "accepted when they equal its draws), but drafts are accepted less often and a seed "
    "reproduces the output only for one draft schedule. Pass temp/top_p/min_p/top_k instead to "
    "sample coupled."
)


@functools.cache
def warn_once(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


def check_token_ids(ids: Sequence[int] | mx.array, vocab_size: int) -> list[int]:
    """``ids`` as a list, or a ``ValueError`` naming the first id that is not an integer in
    ``[0, vocab_size)``: MLX's gather does not bound-check, so a bad id must never reach it."""
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise ValueError(f"token ids must be integers, got an array of {ids.dtype}")
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    for i, token in enumerate(ids):
        integer = isinstance(token, numbers.Integral) and not isinstance(token, bool)
        if not integer or not 0 <= token < vocab_size:
            what = "is not an integer" if not integer else "is outside the vocabulary"
            raise ValueError(
                f"token id {token!r} at position {i} {what}: token ids must be integers in "
                f"[0, {vocab_size}) (the model's vocabulary size is {vocab_size})"
            )
    return [int(token) for token in ids]


def encode_prompt(tokenizer, prompt: str | Sequence[int] | mx.array, vocab_size: int) -> list:
    """Token ids of ``prompt`` (text is encoded as mlx-lm does), checked against the vocabulary."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
    ids = check_token_ids(prompt, vocab_size)
    if not ids:
        raise ValueError("the prompt is empty")
    return ids


def encode_chat(tokenizer, messages: list[dict], **template_kwargs: Any) -> list[int]:
    """Token ids of ``messages`` through the chat template, ready for the model's reply;
    ``template_kwargs`` (``tools=``, ``enable_thinking=``, ...) go to the template."""
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **template_kwargs
    )
    return tokenizer.encode(text, add_special_tokens=False)


def as_target(model) -> Target:
    """Our ``Target`` for what ``load`` or ``mlx_lm.load`` returned: for an mlx-lm model, one per
    live model, kept by the package (``state.kept_for``), not on the model."""
    if isinstance(model, Target) or (
        not isinstance(model, nn.Module) and hasattr(model, "make_cache")
    ):
        return model  # ours, or a wrapper around ours (a profiler's, say)
    args = getattr(getattr(model, "language_model", model), "args", None)
    if not isinstance(model, nn.Module) or getattr(args, "model_type", None) not in TARGET_TYPES:
        raise TypeError(
            f"model must be a Gemma 4 target from mlx_gemma_mtp.load or mlx_lm.load, "
            f"got {type(model).__name__}"
        )
    return kept_for("target", lambda: Target(model, hold=False), model)


def check_drafter(target: Target, draft_model) -> None:
    """``draft_model`` must be ``None`` or a Gemma 4 assistant that fits ``target``."""
    if isinstance(draft_model, Drafter):
        validate_pair(target, draft_model)
        return
    args = getattr(draft_model, "args", None)
    kind = getattr(args, "model_type", None)
    if isinstance(draft_model, nn.Module) and kind not in ASSISTANT_TYPES:  # a wrapper may pass
        kind = kind or type(draft_model).__name__
        raise TypeError(
            f"draft_model must be a Gemma 4 assistant drafter (model_type gemma4_assistant, "
            f"loaded with mlx_gemma_mtp.load(target_path, drafter_path)); got a {kind} model. "
            "A classic draft model drafts with mlx-lm's own loop: "
            "mlx_lm.stream_generate(model, tokenizer, prompt, draft_model=...)"
        )


def check_max_kv_size(max_kv_size: int | None) -> None:
    if max_kv_size is not None:
        raise ValueError(
            f"max_kv_size={max_kv_size} is not supported: a Gemma 4 target's sliding-attention "
            "layers keep only their window and its full-attention layers the whole context "
            "(mlx-lm ignores max_kv_size for Gemma 4 too: the model's make_cache decides). "
            "Leave it unset: the context is bounded by the prompt and max_tokens."
        )


def make_prompt_cache(
    model,
    max_kv_size: int | None = None,
    *,
    draft_model=None,
    max_draft_tokens: int = DEFAULT_MAX_DRAFT_TOKENS,
) -> PromptCache:
    """A cache an app keeps between turns (mlx-lm's meaning): after each call it stands for the
    prompt and every emitted token, and the next call's prompt is only what comes after them.
    mlx-lm's signature: ``max_kv_size`` must be ``None`` (see ``check_max_kv_size``). Drafting
    with up to ``max_draft_tokens`` tokens per round can roll it back. ``draft_model`` only
    checks the pair (the drafter reads the target's cache and keeps none); passed second, as
    this package's first releases took it, it is still the drafter."""
    if isinstance(max_kv_size, nn.Module):
        max_kv_size, draft_model = None, max_kv_size
    check_max_kv_size(max_kv_size)
    target = as_target(model)
    check_drafter(target, draft_model)
    return make_cache_for(target, max_draft_tokens)


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    draft_model=None,
    *,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    draft_schedule: str = "auto",
    full_vocab_draft: bool = False,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    prompt_cache: list | None = None,
    max_kv_size: int | None = None,
    prefill_step_size: int = 512,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    stop: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    costs: Costs | None = None,
    logit_bias: dict[int, float] | None = None,
    presence_penalty: float | None = None,
    presence_context_size: int = 20,
    frequency_penalty: float | None = None,
    frequency_context_size: int = 20,
    images: Sequence[Media] | None = None,
    audio: Sequence[Media] | None = None,
) -> Generator[GenerationResponse, None, None]:
    """Yield one ``GenerationResponse`` per generated token (the last one has a
    ``finish_reason``: ``"stop"`` for EOS or a stop string, ``"length"`` for ``max_tokens``).

    mlx-lm's call shape and meanings: ``model`` from ``load`` or ``mlx_lm.load``, ``prompt`` text
    (needs ``tokenizer``) or token ids, ``max_tokens=-1`` for no limit, ``draft_model`` the Gemma 4
    assistant (``None`` or ``num_draft_tokens=0``: plain decoding), ``sampler``,
    ``logits_processors``, ``prompt_cache`` (from ``make_prompt_cache`` or ``load_prompt_cache``:
    afterwards it stands for the prompt and every emitted token, also when the caller stops
    early; the logits processors' history starts with the tokens it already holds, so a cached
    conversation gets the tokens a fresh run over the whole conversation would), ``max_kv_size``
    (``None`` only: see ``check_max_kv_size``), ``prefill_step_size``,
    ``prompt_progress_callback(processed, total)`` (an exception it raises stops the prompt fill
    between chunks and propagates; after any exception ``prompt_cache`` is left empty). Ours:
    ``temp``/``top_p``/``min_p``/``min_tokens_to_keep``/``top_k`` (coupled sampling: a seed fixes
    the output, whatever the drafting), ``repetition_penalty``/
    ``repetition_context_size``, mlx-lm's ``logit_bias`` and presence/frequency penalties (with
    their context sizes), ``draft_schedule``, ``full_vocab_draft``, ``stop`` strings and
    ``eos_token_ids`` (default: all of the tokenizer's), ``costs`` (``mlx_gemma_mtp.costs.Costs``
    for the ``auto`` schedule instead of the measured ones), ``images`` and ``audio`` (paths or
    encoded bytes; audio as 16 kHz PCM WAV), one per placeholder of the prompt, or put in front of
    a prompt without any; the prompt cache keys their positions on their content). Closing the
    generator cancels.
    """
    if max_tokens == 0 or max_tokens < -1:
        raise ValueError(f"max_tokens must be >= 1, or -1 for no limit; got {max_tokens}")
    limit = sys.maxsize if max_tokens == -1 else max_tokens
    check_max_kv_size(max_kv_size)
    target = as_target(model)
    check_drafter(target, draft_model)
    if tokenizer is not None and not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    ids = encode_prompt(tokenizer, prompt, target.args.vocab_size)
    media, cache_keys = None, ids
    if images or audio:
        ids, media, cache_keys = build_media_prompt(target, ids, images or (), audio or ())
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
    if prompt_cache is not None:
        check_prompt_cache(prompt_cache, target)
    progress = prompt_progress_callback or (lambda *_: None)
    policy = make_policy(
        sampler,
        temp,
        top_p,
        min_p,
        min_tokens_to_keep,
        top_k,
        logits_processors,
        repetition_penalty,
        repetition_context_size,
        logit_bias,
        presence_penalty,
        presence_context_size,
        frequency_penalty,
        frequency_context_size,
    )
    engine = SpeculativeGenerator(
        target,
        draft_model,
        policy,
        num_draft_tokens=num_draft_tokens,
        draft_schedule=draft_schedule,
        full_vocab_draft=full_vocab_draft,
        prefill_step_size=prefill_step_size,
        eos_token_ids=eos_token_ids,
        cache=prompt_cache,
        prompt_progress_callback=progress,
        costs=costs,
        context=prompt_cache.tokens if isinstance(prompt_cache, PromptCache) else (),
        media=media,
    )
    texts = TextStream(tokenizer, stop)
    count = 0
    with wired_limit(target.model, [generation_stream]), mx.stream(generation_stream):
        tic = time.perf_counter()
        progress(0, len(ids))
        blocks = engine.generate(mx.array(ids, mx.int32), limit)
        prompt_tps = 0.0
        failed = False
        try:
            for block in blocks:
                if count == 0:
                    prompt_tps = len(ids) / (time.perf_counter() - tic)
                    progress(len(ids), len(ids))
                    tic = time.perf_counter()
                for i, token in enumerate(block.tokens):
                    count += 1
                    is_eos = token in engine.eos_token_ids
                    text, stopped = texts.add(token, is_eos, is_eos or count == limit)
                    last = stopped or is_eos or count == limit
                    yield GenerationResponse(
                        text=text,
                        token=token,
                        logprobs=block.logprobs[i],
                        from_draft=i < block.num_from_draft,
                        prompt_tokens=len(ids),
                        prompt_tps=prompt_tps,
                        generation_tokens=count,
                        generation_tps=count / max(time.perf_counter() - tic, 1e-9),
                        peak_memory=mx.get_peak_memory() / 1e9,
                        finish_reason=("stop" if stopped or is_eos else "length") if last else None,
                        **counters(engine.stats),
                    )
                    if last:
                        return
                    if count % CLEAR_CACHE_EVERY == 0:
                        mx.clear_cache()
        except Exception:
            failed = True
            raise
        finally:
            blocks.close()
            if prompt_cache is not None and failed:
                # Settling could mean filling the rest of an abandoned prompt (a callback that
                # raises cancels it): the half-filled cache is emptied instead.
                empty_prompt_cache(prompt_cache)
            elif prompt_cache is not None:
                engine.settle(count)
                if isinstance(prompt_cache, PromptCache):
                    prompt_cache.tokens += cache_keys + engine.emitted[:count]


# The engine's counters (``Stats``) that every response carries, under the same names.
COUNTERS = (
    "mode",
    "acceptance_rule",
    "draft_path",
    "k_histogram",
    "parked_seconds",
    "drafted",
    "accepted",
    "rounds",
    "target_forwards",
)


def mtp_stats(source, generated: int) -> dict:
    """``COUNTERS`` of ``source`` (a ``Stats`` or a response) for ``generated`` tokens, with the
    acceptance rate and the tokens per target forward."""
    forwards = source.target_forwards
    rates = {
        "acceptance_rate": source.acceptance_rate,
        "tokens_per_target_forward": generated / forwards if forwards else 0.0,
    }
    return {**counters(source), **rates}


def counters(source: Stats) -> dict:
    return {name: getattr(source, name) for name in COUNTERS}


def generate(model, tokenizer, prompt, verbose: bool = False, **kwargs: Any) -> str:
    """The whole generated text; ``verbose`` streams it and prints statistics (as mlx-lm).
    ``kwargs`` are ``stream_generate``'s."""
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print(format_stats(response), file=sys.stderr)
    return text


def format_stats(response: GenerationResponse) -> str:
    lines = [
        "=" * 10,
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
    ]
    if response.mode == "mtp":
        lines.append(
            f"Drafts: {response.accepted}/{response.drafted} accepted "
            f"({response.acceptance_rate:.3f}, {response.acceptance_rule} rule), "
            f"{response.tokens_per_target_forward:.2f} tokens per target forward "
            f"({response.target_forwards} forwards, {response.rounds} speculative rounds)"
        )
        histogram = ", ".join(f"{k}: {n}" for k, n in (response.k_histogram or {}).items())
        lines.append(
            f"Draft lengths (k: rounds): {histogram or '-'}; parked "
            f"{response.parked_seconds:.2f} s; drafting: {response.draft_path}"
        )
    else:
        lines.append("Drafts: none (plain decoding)")
    lines.append(f"Peak memory: {response.peak_memory:.3f} GB")
    return "\n".join(lines)


def per_prompt(media: Sequence | None, name: str, prompts: Sequence) -> list:
    """``batch_generate``'s ``images`` or ``audio``: a list (or None) per prompt."""
    if media is None:
        return [None] * len(prompts)
    if isinstance(media, str | bytes) or len(media) != len(prompts):
        given = "a single item" if isinstance(media, str | bytes) else f"{len(media)} entries"
        raise ValueError(
            f"{name} must have one entry per prompt (a list of that prompt's {name}, or None): "
            f"got {given} for {len(prompts)} prompts"
        )
    for i, items in enumerate(media):
        if isinstance(items, str | bytes | Path):
            raise ValueError(
                f"{name}[{i}] must be a list of prompt {i}'s {name} (or None), got one item: "
                f"write [{items!r}]"
            )
    return list(media)


def batch_generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int] | str],
    prompt_caches: Sequence[list] | None = None,
    max_tokens: int | Sequence[int] = 128,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    *,
    draft_model=None,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    draft_schedule: str = "auto",
    full_vocab_draft: bool = False,
    completion_batch_size: int = 8,
    prefill_batch_size: int = 1,
    prefill_step_size: int = 512,
    seed: int | None = None,
    costs: Costs | None = None,
    images: Sequence[Sequence[Media] | None] | None = None,
    audio: Sequence[Sequence[Media] | None] | None = None,
    **sampling: Any,
) -> BatchResponse:
    """Generate for every prompt, decoding them together with MTP (continuous batching):
    mlx-lm's ``batch_generate`` call shape and ``BatchResponse``. ``prompts``: token ids (or
    text); ``prompt_caches``: a cache per prompt (``make_prompt_cache``; the prompt is what
    comes after it), returned settled with ``return_prompt_caches``; ``max_tokens`` per prompt
    or for all; ``completion_batch_size`` rows decode at once, ``prefill_batch_size`` prompts
    fill at once. ``sampling``: ``stream_generate``'s sampling options (``temp``, ``top_p``,
    ``min_p``, ``min_tokens_to_keep``, ``top_k``, ``repetition_penalty``,
    ``repetition_context_size``, ``sampler``, ``logits_processors``) for every row; ``seed``:
    row ``i`` samples with seed ``seed + i``, the output it would have alone with that seed.
    ``images`` and ``audio``: per prompt, its media as ``stream_generate`` takes them (``None``
    or ``[]`` for none)."""
    target = as_target(model)
    if isinstance(draft_model, Drafter):
        validate_pair(target, draft_model)
    if tokenizer is not None and not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    unknown = set(sampling) - set(inspect.signature(make_policy).parameters)
    if unknown:
        raise TypeError(f"batch_generate() got unexpected keyword arguments {sorted(unknown)}")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    caches = list(prompt_caches) if prompt_caches is not None else [None] * len(prompts)
    if len(limits) != len(prompts) or len(caches) != len(prompts):
        raise ValueError("max_tokens and prompt_caches must have one entry per prompt")
    images, audio = per_prompt(images, "images", prompts), per_prompt(audio, "audio", prompts)
    for cache in caches:
        if cache is not None:
            check_prompt_cache(cache, target)
    engine = BatchGenerator(
        target,
        draft_model,
        num_draft_tokens=num_draft_tokens,
        draft_schedule=draft_schedule,
        full_vocab_draft=full_vocab_draft,
        prefill_step_size=prefill_step_size,
        max_rows=completion_batch_size,
        prompt_concurrency=prefill_batch_size,
        costs=costs,
    )
    eos = tokenizer.eos_token_ids if tokenizer is not None else ()
    uids = []
    policy = make_policy(**sampling)  # rows keep their own history; the policy holds none
    for i, (prompt, limit, cache) in enumerate(zip(prompts, limits, caches, strict=True)):
        ids = encode_prompt(tokenizer, prompt, target.args.vocab_size)
        media = None
        if images[i] or audio[i]:
            ids, media, _ = build_media_prompt(target, ids, images[i] or (), audio[i] or ())
        row_seed = None if seed is None else seed + i
        uids.append(engine.insert(ids, max_tokens=limit, policy=policy, eos_token_ids=eos,
                                  cache=cache, seed=row_seed, media=media))  # fmt: skip
    tokens = {uid: [] for uid in uids}
    logprobs = {uid: [] for uid in uids}
    settled = {}
    start = BatchCountersSnapshot()
    with wired_limit(target.model, [generation_stream]), mx.stream(generation_stream):
        while engine.active:
            for out in engine.step():
                kept = out.tokens[:-1] if out.finish_reason == "stop" else out.tokens
                tokens[out.uid] += kept
                if return_logprobs:
                    rows = out.logprobs[: len(kept)]
                    logprobs[out.uid] += [rows[j, t].item() for j, t in enumerate(kept)]
                if out.finish_reason is not None:
                    settled[out.uid] = out.cache
                    if verbose:
                        print(f"[batch_generate] Finished {len(settled)}/{len(uids)}", end="\r")
    end = BatchCountersSnapshot(**vars(engine.counters))
    stats = BatchCountersSnapshot.between(start, end)
    if verbose:
        print(f"\n[batch_generate] Generation: {stats.generation_tokens} tokens, "
              f"{stats.generation_tps:.3f} tokens-per-sec; peak memory "
              f"{stats.peak_memory:.3f} GB")  # fmt: skip
    decode = tokenizer.decode if tokenizer is not None else str
    return BatchResponse(
        texts=[decode(tokens[uid]) for uid in uids],
        stats=stats,
        caches=[settled[uid] for uid in uids] if return_prompt_caches else None,
        token_ids=[tokens[uid] for uid in uids] if return_token_ids else None,
        logprobs=[logprobs[uid] for uid in uids] if return_logprobs else None,
    )
