"""Speculative generation with a Gemma 4 target and its assistant drafter: Python API and CLI.

``stream_generate`` and ``generate`` follow mlx-lm's functions of the same names; with
``drafter=None`` (or ``num_draft_tokens=0``) they decode plainly through the same code.
"""

import json
import sys
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

import click
import mlx.core as mx
from mlx_lm.generate import GenerationResponse as MLXGenerationResponse
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import make_logits_processors
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import ConfigError
from .costs import Costs
from .engine import DEFAULT_NUM_DRAFT_TOKENS, SCHEDULES, SpeculativeGenerator, Stats
from .sampling import SamplingParams, TokenPolicy


@dataclass
class GenerationResponse(MLXGenerationResponse):
    """mlx-lm's response plus the speculative counters so far."""

    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    target_forwards: int = 0
    mode: str = "mtp"  # "plain" when no drafter is used
    acceptance_rule: str = "match"  # "speculative": lossless speculative sampling
    draft_path: str = "none"  # says whether drafting is compiled and centroid-masked
    k_histogram: dict | None = None  # rounds per number of drafts (0: plain steps)
    parked_seconds: float = 0.0  # time in plain steps while a drafter was loaded

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
    drafts are then accepted only where they equal the sampler's draw (lossless, less accepted).
    mlx-lm's repetition penalty reads only the last ``repetition_context_size`` tokens, so it
    keeps the pipelined loop; custom ``logits_processors`` may read the whole history."""
    params = SamplingParams(temp, top_p, min_p, min_tokens_to_keep, top_k)
    processors = list(logits_processors or [])
    window = None if processors else repetition_context_size
    processors += make_logits_processors(
        repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
    )
    return TokenPolicy(sampler, params, processors, window, repetition_penalty)


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
    draft_schedule: str = "auto",
    full_vocab_draft: bool = False,
    prefill_step_size: int = 512,
    stop: Sequence[str] = (),
    eos_token_ids: Sequence[int] | None = None,
    costs: Costs | None = None,
    **sampling: Any,
) -> Generator[GenerationResponse, None, None]:
    """Yield one ``GenerationResponse`` per generated token (the last one has a
    ``finish_reason``: ``"stop"`` for EOS or a stop string, ``"length"`` for ``max_tokens``).

    ``prompt`` is text (needs ``tokenizer``) or token ids. ``sampling`` takes mlx-lm's options:
    ``sampler`` or ``temp``/``top_p``/``min_p``/``min_tokens_to_keep``/``top_k``, and
    ``logits_processors``/``repetition_penalty``/``repetition_context_size``. ``eos_token_ids``
    defaults to all of the tokenizer's. ``costs`` (``mlx_gemma_mtp.costs.Costs``) overrides the
    ``auto`` schedule's measured costs. Closing the generator early cancels the generation.
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
        costs=costs,
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
        acceptance_rule=stats.acceptance_rule,
        draft_path=stats.draft_path,
        k_histogram=stats.k_histogram,
        parked_seconds=stats.parked_seconds,
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


def build_prompt(tokenizer, prompt, prompt_tokens, system_prompt, ignore_chat_template) -> list:
    """Token ids from ``--prompt`` (chat template applied unless ignored) or ``--prompt-tokens``."""
    if (prompt is None) == (prompt_tokens is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-tokens")
    if prompt_tokens is not None:
        try:
            return [int(t) for t in prompt_tokens.replace(",", " ").split()]
        except ValueError:
            raise click.BadParameter(
                "expected integers separated by spaces", param_hint="--prompt-tokens"
            ) from None
    if tokenizer is None:
        raise click.UsageError("the model folder has no tokenizer: use --prompt-tokens")
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def stats_dict(response: GenerationResponse, tokens: list, args: dict) -> dict:
    return {
        "prompt_tokens": response.prompt_tokens,
        "generation_tokens": response.generation_tokens,
        "prompt_tps": response.prompt_tps,
        "generation_tps": response.generation_tps,
        "mode": response.mode,
        "num_draft_tokens": args["num_draft_tokens"] if response.mode == "mtp" else 0,
        "draft_schedule": args["draft_schedule"],
        "acceptance_rule": response.acceptance_rule,
        "draft_path": response.draft_path,
        "k_histogram": response.k_histogram,
        "parked_seconds": response.parked_seconds,
        "drafted": response.drafted,
        "accepted": response.accepted,
        "acceptance_rate": response.acceptance_rate,
        "rounds": response.rounds,
        "target_forwards": response.target_forwards,
        "tokens_per_target_forward": response.tokens_per_target_forward,
        "peak_memory_gb": response.peak_memory,
        "finish_reason": response.finish_reason,
        "tokens": tokens,
    }


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--model", required=True, help="Gemma 4 target: MLX or Hugging Face folder, or hub id."
)
@click.option("--draft-model", help="Its Gemma 4 assistant drafter (omit for plain decoding).")
@click.option("--prompt", help="Prompt text, or - to read it from stdin.")
@click.option("--prompt-tokens", help='Prompt as token ids, "ID ID ..." (no chat template).')
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--top-p", default=0.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--seed", type=int, help="Random seed (for sampling).")
@click.option(
    "--num-draft-tokens",
    default=DEFAULT_NUM_DRAFT_TOKENS,
    show_default=True,
    type=click.IntRange(min=0),
    help="Tokens drafted per round (the most, with 'auto' and 'heuristic'; 0: plain decoding).",
)
@click.option(
    "--draft-schedule",
    type=click.Choice(SCHEDULES),
    default="auto",
    show_default=True,
    help="auto: k chosen every round from measured costs and acceptance (0 parks drafting).",
)
@click.option("--system-prompt", help="System message for the chat template.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt text as is.")
@click.option("--no-draft", is_flag=True, help="Ignore --draft-model: plain decoding.")
@click.option("--full-vocab-draft", is_flag=True, help="Drafter scores the whole vocabulary.")
@click.option("--verbose", is_flag=True, help="Also print the prompt's token ids.")
@click.option(
    "--stats-json", type=click.Path(dir_okay=False, writable=True), help="Write stats here."
)
def main(**args) -> None:
    """Generate text with a Gemma 4 model, drafted by its assistant (MTP speculative decoding)."""
    from . import load

    if args["seed"] is not None:
        mx.random.seed(args["seed"])
    draft_model = None if args["no_draft"] else args["draft_model"]
    try:
        target, drafter, tokenizer = load(args["model"], draft_model)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    prompt = build_prompt(
        tokenizer,
        args["prompt"],
        args["prompt_tokens"],
        args["system_prompt"],
        args["ignore_chat_template"],
    )
    if args["verbose"]:
        click.echo(f"Prompt: {len(prompt)} tokens: {prompt}", err=True)
    tokens, response = [], None
    for response in stream_generate(
        target,
        drafter,
        tokenizer,
        prompt,
        args["max_tokens"],
        num_draft_tokens=args["num_draft_tokens"],
        draft_schedule=args["draft_schedule"],
        full_vocab_draft=args["full_vocab_draft"],
        temp=args["temp"],
        top_p=args["top_p"],
        top_k=args["top_k"],
        min_p=args["min_p"],
    ):
        tokens.append(response.token)
        click.echo(response.text, nl=False)
        sys.stdout.flush()
    click.echo()
    click.echo(format_stats(response, drafter is not None), err=True)
    if args["stats_json"]:
        with open(args["stats_json"], "w") as f:
            json.dump(stats_dict(response, tokens, args), f, indent=2)


if __name__ == "__main__":
    main()
