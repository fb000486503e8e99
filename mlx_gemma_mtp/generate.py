"""``python -m mlx_gemma_mtp.generate``: generate text from the command line."""

import json
import sys
import types

import click
import mlx.core as mx

from .config import ConfigError
from .engine.loop import SCHEDULES
from .generation import (
    DEFAULT_NUM_DRAFT_TOKENS,
    GenerationResponse,
    check_token_ids,
    encode_chat,
    format_stats,
    generate,
    stream_generate,
)
from .media import MediaError


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    """``--prompt-tokens`` ("ID ID ..." or "ID,ID,...") checked against the vocabulary."""
    words = text.replace(",", " ").split()
    ids = [int(w) if w.lstrip("-").isdigit() else w for w in words]
    try:
        return check_token_ids(ids, vocab_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompt-tokens") from None


def build_prompt(
    tokenizer,
    vocab_size,
    prompt,
    prompt_tokens,
    system_prompt,
    ignore_chat_template,
    num_images: int = 0,
    num_audio: int = 0,
) -> list:
    """Token ids from ``--prompt`` (chat template applied unless ignored, with ``num_images``
    image and ``num_audio`` audio entries before the text) or ``--prompt-tokens``."""
    if (prompt is None) == (prompt_tokens is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-tokens")
    if prompt_tokens is not None:
        return parse_token_ids(prompt_tokens, vocab_size)
    if tokenizer is None:
        raise click.UsageError("the model folder has no tokenizer: use --prompt-tokens")
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    if ignore_chat_template or not tokenizer.has_chat_template:
        return tokenizer.encode(prompt)
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": user_content(prompt, num_images, num_audio)})
    return encode_chat(tokenizer, messages)


def user_content(text: str, num_images: int = 0, num_audio: int = 0) -> str | list:
    """A user message's content: the text, after one entry per image and audio clip (the chat
    template writes each as its placeholder)."""
    if not num_images and not num_audio:
        return text
    media = [{"type": "image"}] * num_images + [{"type": "audio"}] * num_audio
    return [*media, {"type": "text", "text": text}]


def stats_dict(response: GenerationResponse, tokens: list, args: dict) -> dict:
    return {
        "prompt_tokens": response.prompt_tokens,
        "generation_tokens": response.generation_tokens,
        "prompt_tps": response.prompt_tps,
        "generation_tps": response.generation_tps,
        "num_draft_tokens": args["num_draft_tokens"] if response.mode == "mtp" else 0,
        "draft_schedule": args["draft_schedule"],
        **response.mtp_stats(),
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
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="PATH",
    help="An image for the prompt (repeatable; at the prompt's image placeholders, else first).",
)
@click.option(
    "--audio",
    "audio",
    multiple=True,
    metavar="PATH",
    help="A 16 kHz PCM WAV clip for the prompt (repeatable; at audio placeholders, else first).",
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
        target.args.vocab_size,
        args["prompt"],
        args["prompt_tokens"],
        args["system_prompt"],
        args["ignore_chat_template"],
        len(args["images"]),
        len(args["audio"]),
    )
    if args["verbose"]:
        click.echo(f"Prompt: {len(prompt)} tokens: {prompt}", err=True)
    tokens, response = [], None
    responses = stream_generate(
        target,
        tokenizer,
        prompt,
        args["max_tokens"],
        drafter,
        num_draft_tokens=args["num_draft_tokens"],
        draft_schedule=args["draft_schedule"],
        full_vocab_draft=args["full_vocab_draft"],
        temp=args["temp"],
        top_p=args["top_p"],
        top_k=args["top_k"],
        min_p=args["min_p"],
        images=args["images"] or None,
        audio=args["audio"] or None,
    )
    try:
        for response in responses:
            tokens.append(response.token)
            click.echo(response.text, nl=False)
            sys.stdout.flush()
    except (MediaError, ConfigError) as e:  # raised before the first token
        raise click.ClickException(str(e)) from None
    click.echo()
    click.echo(format_stats(response), err=True)
    if args["stats_json"]:
        with open(args["stats_json"], "w") as f:
            json.dump(stats_dict(response, tokens, args), f, indent=2)


class _CallableModule(types.ModuleType):
    """Importing this module sets ``mlx_gemma_mtp.generate`` to it, hiding the package's
    ``generate`` function: the module calls through to the function, so both spellings work."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
