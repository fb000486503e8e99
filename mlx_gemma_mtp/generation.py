"""Speculative generation with a Gemma 4 target and its assistant drafter: the Python API.

``stream_generate`` and ``generate`` follow mlx-lm's functions of the same names; with
``drafter=None`` (or ``num_draft_tokens=0``) they decode plainly through the same code.
"""

import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .engine import SpeculativeGenerator, Stats
from .sampling import SamplingParams, TokenPolicy

DEFAULT_NUM_DRAFT_TOKENS = 4


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response plus the speculative counters so far."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    mode: str = "mtp"  # "plain" when no drafter is used

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_target_forward(self) -> float:
        return self.generation_tokens / self.target_forwards if self.target_forwards else 0.0


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
) -> TokenPolicy:
    """A ``TokenPolicy`` from mlx-lm's options. A custom ``sampler`` is honoured exactly, but
    drafts are then accepted only where they equal the sampler's draw (lossless, less accepted)."""
    params = SamplingParams(temp, top_p, min_p, min_tokens_to_keep, top_k)
    processors = list(logits_processors or [])
    processors += make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return TokenPolicy(sampler, params, processors)


def encode_prompt(tokenizer, prompt: str | Sequence[int] | mx.array) -> mx.array:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        bos = tokenizer.bos_token
        prompt = tokenizer.encode(
            prompt, add_special_tokens=bos is None or not prompt.startswith(bos)
        )
    prompt = mx.array(prompt).reshape(-1)
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    return prompt.astype(mx.int32)


class StopStrings:
    """Finds stop strings in streamed text; holds back text that may begin one."""

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.held = ""

    def feed(self, segment: str) -> tuple[str, bool]:
        """Text that is safe to emit now, and whether a stop string was completed."""
        text = self.held + segment
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = max((self._overlap(text, s) for s in self.stop), default=0)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
        for size in range(min(len(text), len(stop) - 1), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


class TextStream:
    """Streamed text of the generated tokens (EOS adds none), cut at the first stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detokenizer = tokenizer.detokenizer if tokenizer is not None else None
        if self.detokenizer is not None:
            self.detokenizer.reset()
        self.stops = StopStrings(stop)

    def add(self, token: int, is_eos: bool, final: bool) -> tuple[str, bool]:
        """Text to emit for ``token``, and whether a stop string ended the generation."""
        segment = ""
        if self.detokenizer is not None:
            if not is_eos:
                self.detokenizer.add_token(token)
            if final:
                self.detokenizer.finalize()
            segment = self.detokenizer.last_segment
        text, stopped = self.stops.feed(segment)
        if final and not stopped:
            text += self.stops.flush()
        return text, stopped


def stream_generate(
    target,
    drafter,
    tokenizer,
    prompt: str | Sequence[int] | mx.array,
    max_tokens: int = 256,
    *,
    num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
    draft_schedule: str = "constant",
    full_vocab_draft: bool = False,
    prefill_step_size: int = 512,
    stop: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    **sampling: Any,
) -> Generator[GenerationResponse, None, None]:
    """Yield one ``GenerationResponse`` per generated token (the last one has a
    ``finish_reason``: ``"stop"`` for EOS or a stop string, ``"length"`` for ``max_tokens``).

    ``prompt`` is text (needs ``tokenizer``) or token ids. ``sampling`` takes mlx-lm's options:
    ``sampler`` or ``temp``/``top_p``/``min_p``/``min_tokens_to_keep``/``top_k``, and
    ``logits_processors``/``repetition_penalty``/``repetition_context_size``. ``eos_token_ids``
    defaults to all of the tokenizer's. Closing the generator early cancels the generation.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if tokenizer is not None and not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = encode_prompt(tokenizer, prompt)
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_token_ids if tokenizer is not None else ()
    engine = SpeculativeGenerator(
        target,
        drafter,
        make_policy(**sampling),
        num_draft_tokens=num_draft_tokens,
        draft_schedule=draft_schedule,
        full_vocab_draft=full_vocab_draft,
        prefill_step_size=prefill_step_size,
        eos_token_ids=eos_token_ids,
    )
    texts = TextStream(tokenizer, stop)
    blocks = engine.generate(prompt, max_tokens)
    with mx.stream(generation_stream):
        tic = time.perf_counter()
        prompt_tps, count = 0.0, 0
        try:
            for block in blocks:
                if count == 0:
                    prompt_tps = prompt.size / (time.perf_counter() - tic)
                    tic = time.perf_counter()
                for i, token in enumerate(block.tokens):
                    count += 1
                    is_eos = token in engine.eos_token_ids
                    text, stopped = texts.add(token, is_eos, is_eos or count == max_tokens)
                    last = stopped or is_eos or count == max_tokens
                    yield GenerationResponse(
                        text=text,
                        token=token,
                        logprobs=block.logprobs[i],
                        from_draft=i < block.num_from_draft,
                        prompt_tokens=prompt.size,
                        prompt_tps=prompt_tps,
                        generation_tokens=count,
                        generation_tps=count / max(time.perf_counter() - tic, 1e-9),
                        peak_memory=mx.get_peak_memory() / 1e9,
                        finish_reason=("stop" if stopped or is_eos else "length") if last else None,
                        **_counters(engine.stats),
                    )
                    if last:
                        return
        finally:
            blocks.close()


def _counters(stats: Stats) -> dict:
    return dict(
        drafted=stats.drafted,
        accepted=stats.accepted,
        rounds=stats.rounds,
        target_forwards=stats.target_forwards,
        mode=stats.mode,
    )


def generate(target, drafter, tokenizer, prompt, verbose: bool = False, **kwargs: Any) -> str:
    """The whole generated text; ``verbose`` streams it and prints statistics (as mlx-lm)."""
    text, response = "", None
    for response in stream_generate(target, drafter, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print(format_stats(response, drafter is not None), file=sys.stderr)
    return text


def format_stats(response: GenerationResponse, drafting: bool) -> str:
    lines = [
        "=" * 10,
        f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec",
        f"Generation: {response.generation_tokens} tokens, "
        f"{response.generation_tps:.3f} tokens-per-sec",
    ]
    if drafting:
        lines.append(
            f"Drafts: {response.accepted}/{response.drafted} accepted "
            f"({response.acceptance_rate:.3f}), {response.tokens_per_target_forward:.2f} tokens "
            f"per target forward ({response.target_forwards} forwards, {response.rounds} rounds)"
        )
    else:
        lines.append("Drafts: none (plain decoding)")
    lines.append(f"Peak memory: {response.peak_memory:.3f} GB")
    return "\n".join(lines)
