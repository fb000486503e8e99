"""Quantized pairs as Mac users run them, on the fixture pair: every target x drafter precision,
converted by us or by ``mlx_lm.convert``, affine group sizes 32/64/128, mixed per-layer
quantization, a bf16 (QAT-style) assistant next to a quantized target. Outputs keep the tie-aware
contract (``mlx_gemma_mtp.contract``) against plain decoding of the same quantized target, and
quantized centroid heads keep the centroid path with their dequantized float version's candidates.
"""

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import FIXTURE
from drafting import ALWAYS_DRAFT
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import quantize_model, save_model

from mlx_gemma_mtp import load
from mlx_gemma_mtp.config import read_config
from mlx_gemma_mtp.contract import check_greedy_contract, full_forward_prefers, plain_greedy
from mlx_gemma_mtp.convert import convert
from mlx_gemma_mtp.generation import stream_generate
from mlx_gemma_mtp.loading import load_drafter_model

PROMPT = json.loads((FIXTURE / "held_out_prompts.jsonl").read_text().splitlines()[3])["input_ids"]
MAX_TOKENS = 16
PRECISIONS = ["bf16", "8bit", "4bit"]
# Centroid scores this close at the top-k boundary may select either centroid: quantized matmuls
# and float matmuls over the same (dequantized) weights round differently.
CENTROID_TIE = 1e-4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """``folders(role, precision, group_size=64)``: the fixture model as it is (bf16) or converted
    by us with ``-q``, each conversion made once."""
    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def get(role: str, precision: str, group_size: int = 64) -> Path:
        if precision == "bf16":
            return FIXTURE / role
        key = (role, precision, group_size)
        if key not in made:
            out = root / f"{role}-{precision}-g{group_size}"
            bits = int(precision.removesuffix("bit"))
            made[key] = convert(str(FIXTURE / role), str(out), True, bits, group_size)
        return made[key]

    return get


def assert_keeps_contract(target_path: Path, drafter_path: Path) -> list:
    target, drafter, _ = load(str(target_path), str(drafter_path))
    tokens = [
        r.token
        for r in stream_generate(target, None, PROMPT, MAX_TOKENS, drafter, costs=ALWAYS_DRAFT)
    ]
    check = check_greedy_contract(tokens, plain_greedy(target.model, PROMPT, MAX_TOKENS))
    assert len(tokens) == MAX_TOKENS
    assert check.holds, check
    return tokens


# bf16 and 4-bit on both sides run by default; 8-bit (the same quantized path as 4-bit) and the
# mixed pairs are marked slow.
BY_DEFAULT = {("bf16", "bf16"), ("4bit", "4bit")}
PAIRS = [
    pytest.param(t, d, marks=() if (t, d) in BY_DEFAULT else pytest.mark.slow, id=f"{t}-{d}")
    for t in PRECISIONS
    for d in PRECISIONS
]


@pytest.mark.parametrize("target_precision, drafter_precision", PAIRS)
def test_every_precision_pair_loads_and_keeps_the_contract(
    folders, target_precision, drafter_precision
):
    target_path = folders("target", target_precision)
    drafter_path = folders("assistant", drafter_precision)
    for path, precision in ((target_path, target_precision), (drafter_path, drafter_precision)):
        quantization = read_config(path).get("quantization")
        assert (quantization or {}).get("bits") == (
            None if precision == "bf16" else int(precision[0])
        )
    assert_keeps_contract(target_path, drafter_path)


@pytest.mark.slow
@pytest.mark.parametrize("group_size", [32, 128])
def test_group_sizes(folders, group_size):
    target_path = folders("target", "4bit", group_size)
    drafter_path = folders("assistant", "4bit", group_size)
    target, drafter, _ = load(str(target_path), str(drafter_path))
    assert drafter.model.embed_tokens.group_size == group_size
    assert target.backbone.layers[0].mlp.down_proj.group_size == group_size
    assert_keeps_contract(target_path, drafter_path)


@pytest.mark.parametrize(
    "recipe", [None, pytest.param("mixed_4_6", marks=pytest.mark.slow)], ids=["4bit", "mixed_4_6"]
)
def test_mlx_lm_converted_target(tmp_path, recipe):
    """An mlx-community-style folder (``mlx_lm.convert -q``, plain or with a mixed per-layer
    recipe, which writes per-path overrides into ``quantization``) loads as our target."""
    out = tmp_path / "target"
    mlx_lm_convert(
        str(FIXTURE / "target"), str(out), quantize=True, q_bits=4, quant_predicate=recipe
    )
    quantization = read_config(out)["quantization"]
    overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}
    assert bool(overrides) == (recipe is not None)
    if recipe:
        assert {v["bits"] for v in overrides.values()} == {4, 6}
    assert_keeps_contract(out, FIXTURE / "assistant")


def test_mixed_precision_drafter(tmp_path):
    """A drafter quantized per path the way mlx-lm writes it (an 8-bit head, 4-bit layers)."""
    config = read_config(FIXTURE / "assistant")
    drafter = load_drafter_model(FIXTURE / "assistant", config, lazy=True)

    def predicate(path, module):
        return {"group_size": 64, "bits": 8 if "embed_tokens" in path else 4}

    drafter, config = quantize_model(drafter, config, 64, 4, quant_predicate=predicate)
    out = tmp_path / "assistant"
    save_model(out, drafter)
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_drafter_model(out, read_config(out))
    assert loaded.model.embed_tokens.bits == 8
    assert loaded.layers[0].mlp.down_proj.bits == 4
    assert_keeps_contract(FIXTURE / "target", out)


def test_qat_style_bf16_assistant_next_to_a_4bit_target(folders):
    """Google's ``*-qat-q4_0-unquantized-assistant`` drafters: bf16 weights for a 4-bit target."""
    target, drafter, _ = load(str(folders("target", "4bit")), str(FIXTURE / "assistant"))
    assert drafter.model.embed_tokens.weight.dtype == mx.bfloat16
    assert isinstance(target.backbone.embed_tokens, nn.QuantizedEmbedding)
    assert_keeps_contract(folders("target", "4bit"), FIXTURE / "assistant")


def dequantized_copy(drafter_path: Path):
    """The quantized drafter (float32 scales and activations) and the float32 drafter holding its
    dequantized weights."""
    quantized = load_drafter_model(drafter_path, read_config(drafter_path))
    plain = load_drafter_model(FIXTURE / "assistant", read_config(FIXTURE / "assistant"))
    for model in (quantized, plain):
        model.set_dtype(mx.float32)
    weights = {}
    for path, module in quantized.named_modules():
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            weights[f"{path}.weight"] = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
    plain.load_weights(list(weights.items()), strict=False)
    rest = {
        k: v
        for k, v in tree_flatten(quantized.parameters())
        if not k.endswith((".scales", ".biases")) and k not in weights
    }
    plain.load_weights(list(rest.items()), strict=False)
    return quantized, plain


def centroid_scores(drafter, hidden: mx.array) -> np.ndarray:
    centroids = drafter.masked_embedding.centroids
    return np.array(centroids(hidden)[0, 0].astype(mx.float32))


@pytest.mark.parametrize("precision", ["8bit", "4bit"])
def test_quantized_centroid_head_matches_its_dequantized_float_version(folders, precision):
    """Same candidates as the float drafter holding the dequantized weights, at every draft step,
    unless the centroid scores tie (within CENTROID_TIE) at the top-k boundary."""
    quantized, plain = dequantized_copy(folders("assistant", precision))
    target, _, _ = load(str(FIXTURE / "target"), dtype="float32")
    for model in (quantized, plain):
        model.order_lm_head()
    cache = target.make_cache()
    out = target(mx.array([PROMPT]), cache)
    shared_kv = target.shared_kv(cache)
    token, state = mx.argmax(out.logits[:, -1:], axis=-1), out.hidden[:, -1:]
    top_k = quantized.args.centroid_intermediate_top_k
    for step in range(4):
        inputs = mx.concatenate([target.embed(token), state], axis=-1)
        drafts = [m(inputs, shared_kv, len(PROMPT)) for m in (quantized, plain)]
        assert all(d.candidates is not None for d in drafts)  # the centroid path, not a fallback
        ids = [np.sort(np.array(d.candidates[0, 0])) for d in drafts]
        if not np.array_equal(*ids):
            hidden = plain.backbone(inputs, plain.visible_kv(shared_kv), len(PROMPT))
            scores = np.sort(centroid_scores(plain, hidden))[::-1]
            gap = scores[top_k - 1] - scores[top_k]
            assert gap <= CENTROID_TIE, f"step {step}: candidate sets differ without a tie"
        token, state = drafts[1].tokens(), drafts[1].hidden
        assert int(drafts[0].tokens()[0, 0]) == int(token[0, 0]), f"step {step}: greedy token"


def test_contract_check_and_its_diagnosis():
    target, _, _ = load(str(FIXTURE / "target"))
    steps = plain_greedy(target.model, PROMPT, 6)
    plain = [int(t) for t, _ in steps]
    assert check_greedy_contract(plain, steps) == (True, None, None)
    runner_up = int(mx.argsort(steps[3][1])[-2])
    check = check_greedy_contract(plain[:3] + [runner_up], steps)
    assert check.first_difference == 3 and check.holds == (check.top2_gap < 0.25)
    worst = int(mx.argmin(steps[3][1]))
    assert full_forward_prefers(target.model, PROMPT, plain, 3, plain[3])
    assert not full_forward_prefers(target.model, PROMPT, plain, 3, worst)
