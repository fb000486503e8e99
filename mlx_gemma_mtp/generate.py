"""``python -m mlx_gemma_mtp.generate``: generate text from the command line, with mlx-lm's flags
(``mlx_lm.generate``'s that cannot apply here are refused with the reason)."""

import json
import sys
import types
from collections.abc import Sequence

import click
import mlx.core as mx
from mlx_lm.sample_utils import make_sampler

from .chat import no_media, resume
from .config import ConfigError
from .engine.loop import SCHEDULES
from .engine.prompt_cache import PromptCache
from .generation import (
    DEFAULT_NUM_DRAFT_TOKENS,
    GenerationResponse,
    check_max_kv_size,
    check_token_ids,
    format_stats,
    generate,
    stream_generate,
)
from .media import MediaError, conversation_suffix, user_content

KV_QUANTIZATION = "a quantized K/V cache is not supported: the drafter reads the target's K/V"
# mlx_lm.generate's flags that cannot apply here, and why (each one is refused when given).
REFUSED = {
    "adapter_path": "adapters are not supported: fuse them into the model first (mlx_lm.fuse)",
    "quantize_activations": "activation quantization is not supported",
    "kv_bits": KV_QUANTIZATION,
    "kv_group_size": KV_QUANTIZATION,
    "quantized_kv_start": KV_QUANTIZATION,
    "use_default_chat_template": (
        "transformers has no default chat templates any more (mlx-lm ignores this flag); the "
        "model's own template is used unless --ignore-chat-template"
    ),
}


def parse_token_ids(text: str, vocab_size: int) -> list[int]:
    """``--prompt-tokens`` ("ID ID ..." or "ID,ID,...") checked against the vocabulary."""
    words = text.replace(",", " ").split()
    ids = [int(w) if w.lstrip("-").isdigit() else w for w in words]
    try:
        return check_token_ids(ids, vocab_size)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--prompt-tokens") from None


def build_prompt(
    tokenizer, vocab_size: int, args: dict, template_kwargs: dict, history: list
) -> list:
    """Token ids from ``--prompt`` (chat template applied unless ignored, as mlx_lm.generate
    applies it: system prompt, prefilled response, ``template_kwargs``, after the ``history``
    messages of a saved conversation; an entry for each ``--image`` and ``--audio`` before the
    text) or ``--prompt-tokens``."""
    prompt, prompt_tokens = args["prompt"], args["prompt_tokens"]
    if (prompt is None) == (prompt_tokens is None):
        raise click.UsageError("give exactly one of --prompt and --prompt-tokens")
    if prompt_tokens is not None:
        return parse_token_ids(prompt_tokens, vocab_size)
    if tokenizer is None:
        raise click.UsageError("the model folder has no tokenizer: use --prompt-tokens")
    prompt = sys.stdin.read() if prompt == "-" else prompt.replace("\\n", "\n").replace("\\t", "\t")
    if args["ignore_chat_template"] or not tokenizer.has_chat_template:
        if args["prefill_response"] is not None:
            raise click.UsageError("--prefill-response needs the chat template")
        return tokenizer.encode(prompt)
    system = args["system_prompt"]
    messages = [{"role": "system", "content": system}] if system else list(history)
    content = user_content(prompt, len(args["images"]), len(args["audio"]))
    messages.append({"role": "user", "content": content})
    prefill = args["prefill_response"] is not None
    if prefill:
        messages.append({"role": "assistant", "content": args["prefill_response"]})
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
        **template_kwargs,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def template_options(config: str | None) -> dict:
    """``--chat-template-config``: a JSON object of ``apply_chat_template`` keywords."""
    try:
        options = json.loads(config) if config is not None else {}
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"not JSON ({e})", param_hint="--chat-template-config") from None
    if not isinstance(options, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--chat-template-config")
    return options


def check_refused(args: dict) -> None:
    """mlx_lm.generate's flags that cannot apply here: a usage error that says why."""
    for name, reason in REFUSED.items():
        if not (args[name] is None or args[name] is False or args[name] == ()):
            raise click.UsageError(f"--{name.replace('_', '-')}: {reason}")
    try:
        check_max_kv_size(args["max_kv_size"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--max-kv-size") from None


def make_cli_sampler(tokenizer, args: dict):
    """The sampler mlx_lm.generate makes from these flags. Its options are taken over for
    coupled sampling; with XTC it is honoured with the match rule (XTC's coin flip has no
    distribution to sample coupled)."""
    specials = tokenizer.encode("\n") + list(tokenizer.eos_token_ids) if tokenizer else []
    return make_sampler(
        args["temp"],
        args["top_p"],
        args["min_p"],
        args["min_tokens_to_keep"],
        top_k=args["top_k"],
        xtc_probability=args["xtc_probability"],
        xtc_threshold=args["xtc_threshold"],
        xtc_special_tokens=specials,
    )


def add_eos_tokens(tokenizer, tokens: Sequence[str]) -> None:
    """``--extra-eos-token``: token strings or ids that also end generation."""
    for token in tokens:
        if tokenizer is None:
            raise click.UsageError("--extra-eos-token: the model folder has no tokenizer")
        try:
            tokenizer.add_eos_token(token)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--extra-eos-token") from None


def saved_conversation(target, args: dict) -> tuple[list, dict, PromptCache | None]:
    """``--prompt-cache-file``: the saved messages, their images and audio clips (paths, by
    kind) and cache, checked against ``target``."""
    if not args["prompt_cache_file"]:
        return [], no_media(), None
    try:
        history, media, cache = resume(args["prompt_cache_file"], target)
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--prompt-cache-file") from None
    if history and args["system_prompt"]:
        raise click.UsageError("--system-prompt: a saved conversation keeps its own")
    return history, media, cache


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
@click.option("--prompt", "-p", help="Prompt text, or - to read it from stdin.")
@click.option("--prompt-tokens", help='Prompt as token ids, "ID ID ..." (no chat template).')
@click.option("--max-tokens", "-m", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--temp", default=0.0, show_default=True, help="Sampling temperature (0: greedy).")
@click.option("--top-p", default=0.0, show_default=True)
@click.option("--top-k", default=0, show_default=True)
@click.option("--min-p", default=0.0, show_default=True)
@click.option("--min-tokens-to-keep", default=1, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--xtc-probability",
    default=0.0,
    type=click.FloatRange(0, 1),
    help="mlx-lm's XTC sampling (honoured with the match rule: no coupled sampling).",
)
@click.option("--xtc-threshold", default=0.1, show_default=True, type=click.FloatRange(0, 0.5))
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
@click.option("--prefill-response", help="Start of the reply (continued by the model).")
@click.option("--chat-template-config", help="JSON object of apply_chat_template keywords.")
@click.option("--ignore-chat-template", is_flag=True, help="Use the prompt text as is.")
@click.option("--extra-eos-token", multiple=True, help="Another token that ends generation.")
@click.option("--prefill-step-size", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--no-draft", is_flag=True, help="Ignore --draft-model: plain decoding.")
@click.option("--full-vocab-draft", is_flag=True, help="Drafter scores the whole vocabulary.")
@click.option(
    "--verbose",
    type=click.BOOL,
    default=True,
    show_default=True,
    help="False: print only the generated text, no statistics (mlx-lm's meaning).",
)
@click.option(
    "--stats-json", type=click.Path(dir_okay=False, writable=True), help="Write stats here."
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Accepted for mlx-lm's command lines: Gemma 4 tokenizers run no remote code.",
)
@click.option(
    "--prompt-cache-file",
    type=click.Path(dir_okay=False),
    help="A saved conversation or prompt (save_prompt_cache, the chat's --save-cache): the "
    "prompt follows its messages, and only what the cache does not hold is fed.",
)
@click.option("--max-kv-size", type=int, help="Refused: Gemma 4 caches are sized by the model.")
@click.option("--adapter-path", hidden=True)
@click.option("--quantize-activations", "-qa", is_flag=True, hidden=True)
@click.option("--kv-bits", type=int, hidden=True)
@click.option("--kv-group-size", type=int, hidden=True)
@click.option("--quantized-kv-start", type=int, hidden=True)
@click.option("--use-default-chat-template", is_flag=True, hidden=True)
def main(**args) -> None:
    """Generate text with a Gemma 4 model, drafted by its assistant (MTP speculative decoding).

    mlx_lm.generate's flags for adapters, quantized K/V caches and activations are refused with
    the reason."""
    from . import load

    check_refused(args)
    template_kwargs = template_options(args["chat_template_config"])
    if args["seed"] is not None:
        mx.random.seed(args["seed"])
    draft_model = None if args["no_draft"] else args["draft_model"]
    try:
        target, drafter, tokenizer = load(args["model"], draft_model)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    add_eos_tokens(tokenizer, args["extra_eos_token"])
    history, media, cache = saved_conversation(target, args)
    prompt = build_prompt(tokenizer, target.args.vocab_size, args, template_kwargs, history)
    images, audio = media["image"] + list(args["images"]), media["audio"] + list(args["audio"])
    if cache is not None:
        try:
            prompt, images, audio = conversation_suffix(target, cache, prompt, images, audio)
        except (MediaError, ConfigError) as e:
            raise click.ClickException(str(e)) from None
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
        prefill_step_size=args["prefill_step_size"],
        sampler=make_cli_sampler(tokenizer, args),
        prompt_cache=cache,
        images=images or None,
        audio=audio or None,
    )
    try:
        for response in responses:
            tokens.append(response.token)
            click.echo(response.text, nl=False)
            sys.stdout.flush()
    except (MediaError, ConfigError) as e:  # raised before the first token
        raise click.ClickException(str(e)) from None
    click.echo()
    if args["verbose"]:
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
