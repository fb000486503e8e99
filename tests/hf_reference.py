"""transformers 5.23.0 reference for the parity tests (test-only: imports torch and transformers).

``make_pair`` saves tiny random float32 target/assistant pairs with ``save_pretrained``;
``reference_outputs`` runs the target prefill and the drafter exactly as transformers'
``SinglePositionMultiTokenCandidateGenerator.get_candidates`` does right after it.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import (
    Gemma4AssistantConfig,
    Gemma4AssistantForCausalLM,
    Gemma4AudioConfig,
    Gemma4Config,
    Gemma4ForCausalLM,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4UnifiedAssistantConfig,
    Gemma4UnifiedAssistantForCausalLM,
    Gemma4UnifiedAudioConfig,
    Gemma4UnifiedConfig,
    Gemma4UnifiedForCausalLM,
    Gemma4UnifiedForConditionalGeneration,
    Gemma4UnifiedTextConfig,
    Gemma4UnifiedVisionConfig,
    Gemma4VisionConfig,
    GenerationConfig,
)
from transformers.generation.candidate_generator import (
    SinglePositionMultiTokenCandidateGenerator,
)
from transformers.models.gemma4 import configuration_gemma4, modeling_gemma4
from transformers.models.gemma4_unified import configuration_gemma4_unified

S, F = "sliding_attention", "full_attention"
VOCAB = 512
SLIDING_WINDOW = 8


def patch_transformers() -> None:
    """Work around transformers 5.23.0 bugs that stop it from serving as the reference.

    1. ``Gemma4TextConfig.kv_sharing_modes`` raises ("The set of layer types producing a cache is
       different than the set of layer types using them") when every layer reuses K/V, which
       ``Gemma4AssistantConfig`` requires: no assistant can even be constructed. Patched: all
       layers "reuse" (what the assistant's attention expects).
    2. For a target without K/V sharing (``num_kv_shared_layers == 0``: 31B-, 26B-A4B-like) the
       property returns all ``None``: no layer is marked "store", so ``return_shared_kv_states``
       returns an empty dict and ``get_candidates`` cannot run. Patched: the last layer of each
       type "store"s its K/V, as the last non-shared layer of each type does in KV-sharing
       targets (it changes nothing else: only "reuse" layers read the stored states).
    3. ``Gemma4TextModel._maybe_slice_kv_shared_inputs`` crashes for multi-token forwards of a
       KV-sharing model without per-layer inputs, e.g. the assistant with several queries (it
       slices ``per_layer_inputs``, which is None).
       Disabled: it only drops positions whose outputs are not needed, so the numbers are the same.

    ``Gemma4UnifiedTextConfig`` (12B) carries a copy of the same property, with bugs 1 and 2, and
    gets the same patch; its model never slices ``per_layer_inputs`` (it has none), so 3 does not
    apply to it.
    """
    patch_kv_sharing(configuration_gemma4.Gemma4TextConfig)
    patch_kv_sharing(configuration_gemma4_unified.Gemma4UnifiedTextConfig)
    modeling_gemma4.Gemma4TextModel._maybe_slice_kv_shared_inputs = no_slicing


def no_slicing(self, hidden_states, per_layer_inputs, position_embeddings, masks, *_, **__):
    return hidden_states, per_layer_inputs, position_embeddings, masks


def patch_kv_sharing(config_class: type) -> None:
    if getattr(config_class.kv_sharing_modes.fget, "_parity_patched", False):
        return
    original = config_class.kv_sharing_modes.fget

    def kv_sharing_modes(self):
        num_layers, num_shared = self.num_hidden_layers, self.num_kv_shared_layers
        if num_shared and num_shared >= num_layers:
            return ["reuse"] * num_layers
        if not num_shared:
            modes = [None] * num_layers
            for layer_type in set(self.layer_types):
                last = max(i for i, t in enumerate(self.layer_types) if t == layer_type)
                modes[last] = "store"
            return modes
        return original(self)

    kv_sharing_modes._parity_patched = True
    config_class.kv_sharing_modes = property(kv_sharing_modes)


# Tiny configurations keeping the architectural features of each real target family.
COMMON = dict(
    vocab_size=VOCAB,
    num_attention_heads=4,
    head_dim=16,
    global_head_dim=32,
    sliding_window=SLIDING_WINDOW,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=1,
    tie_word_embeddings=True,
)
TARGET_CONFIGS = {
    # E2B/E4B: per-layer inputs, KV-shared layers with double-wide MLPs, final softcapping.
    "e2b": dict(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=6,
        layer_types=[S, S, F, S, S, F],
        num_key_value_heads=1,
        num_kv_shared_layers=2,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=VOCAB,
        final_logit_softcapping=30.0,
    ),
    # 31B: full-attention keys are values, with their own K/V head count; no sharing, no PLE.
    "31b": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=5,
        layer_types=[S, S, F, S, F],
        num_key_value_heads=2,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=30.0,
    ),
    # 26B-A4B: MoE block next to the dense MLP, plus attention_k_eq_v.
    "26b": dict(
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=4,
        layer_types=[S, F, S, F],
        num_key_value_heads=2,
        attention_k_eq_v=True,
        num_global_key_value_heads=1,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=32,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        final_logit_softcapping=30.0,
    ),
    # 12B (gemma4_unified): no per-layer inputs, no MoE, no K/V sharing, 5 sliding : 1 full.
    "12b": dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=6,
        layer_types=[S, S, S, S, S, F],
        num_key_value_heads=2,
        final_logit_softcapping=30.0,
    ),
}
UNIFIED = {"12b"}  # kinds built with transformers' Gemma4Unified* classes
PLE_MOE_KEYS = ("hidden_size_per_layer_input", "vocab_size_per_layer_input", "enable_moe_block")
NUM_CENTROIDS, CENTROID_TOP_K = 32, 4
TINY_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    patch_size=4,
    position_embedding_size=64,
)
TINY_AUDIO = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    subsampling_conv_channels=[4, 4],
    output_proj_dims=16,
)
# The 12B's image embedder: 2x2 patches merged 2x2 into 4-pixel model patches. Its projection into
# the text model reads output_proj_dims features from an embedder that writes mm_embed_dim ones, and
# transformers defaults output_proj_dims to 3840 on its own: a tiny config must set both (the 12B
# has 3840 for each), or no forward with an image can run. mm_posemb_size covers the positions of
# the smallest image budget (70 soft tokens along one side).
TINY_UNIFIED_VISION = dict(
    patch_size=2, pooling_kernel_size=2, mm_embed_dim=16, output_proj_dims=16, mm_posemb_size=70
)
TINY_UNIFIED_AUDIO = dict(audio_embed_dim=8)
QK_NORM = re.compile(r"\.[qk]_norm\.weight$")


def text_config(kind: str, **fields):
    """The family's text config class; unified (12B) configs have no PLE/MoE fields at all."""
    if kind in UNIFIED:
        fields = {k: v for k, v in fields.items() if k not in PLE_MOE_KEYS}
        return Gemma4UnifiedTextConfig(**fields)
    return Gemma4TextConfig(**fields)


def assistant_config(
    kind: str, sliding_window: int = SLIDING_WINDOW, ordered: bool | None = None
) -> Gemma4AssistantConfig | Gemma4UnifiedAssistantConfig:
    """``ordered`` (centroid-masked head) defaults to the real family's: E2B/E4B only."""
    target = TARGET_CONFIGS[kind]
    text = dict(COMMON, sliding_window=sliding_window)
    text.update(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_kv_shared_layers=4,
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        use_double_wide_mlp=False,
        final_logit_softcapping=None,
        # The drafter attends to the target's K/V: same head counts per layer type.
        num_key_value_heads=target["num_key_value_heads"],
        attention_k_eq_v=target.get("attention_k_eq_v", False),
        num_global_key_value_heads=target.get("num_global_key_value_heads"),
    )
    ordered = kind == "e2b" if ordered is None else ordered
    config_class = Gemma4UnifiedAssistantConfig if kind in UNIFIED else Gemma4AssistantConfig
    return config_class(
        text_config=text_config(kind, **text),
        backbone_hidden_size=target["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=NUM_CENTROIDS,
        centroid_intermediate_top_k=CENTROID_TOP_K,
    )


def randomize(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Unit-scale weights (HF's 0.02 init gives near-uniform logits), norm scales and layer scalars
    away from 1 so that a missed one shows, and a random ``token_ordering``.

    Branch outputs (``post_*`` norms) are scaled by 0.3 and q/k norms by 0.5: with unit scales a
    random network is so chaotic that transformers' own float32 result is 5e-5 (relative) away from
    its float64 result after 4 draft steps; with these it is below 1e-6, far inside the tolerance.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                scale = 0.3 if ".post_" in name else 0.5 if QK_NORM.search(name) else 1.0
                param.copy_(scale * (1 + 0.2 * torch.randn(param.shape, generator=generator)))
            else:
                std = param.shape[-1] ** -0.5
                param.copy_(std * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("layer_scalar"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
            elif name.endswith("token_ordering"):
                buffer.copy_(torch.randperm(buffer.numel(), generator=generator))


@dataclass
class Pair:
    kind: str
    target: Path
    assistant: Path


def make_pair(
    kind: str,
    tmp_path: Path,
    target_class: str = "causal",
    seed: int = 0,
    sliding_window: int = SLIDING_WINDOW,
    ordered: bool | None = None,
) -> Pair:
    """Save a random float32 target (``Gemma4ForCausalLM`` or, for ``target_class="conditional"``,
    a ``Gemma4ForConditionalGeneration`` with the same text model; their ``Gemma4Unified*`` forms
    for the 12B) and its assistant under ``tmp_path / pair_name(...)``."""
    patch_transformers()
    generator = torch.Generator().manual_seed(seed)
    unified = kind in UNIFIED
    fields = dict(COMMON, sliding_window=sliding_window, **TARGET_CONFIGS[kind])
    config = text_config(kind, **fields)
    target = (Gemma4UnifiedForCausalLM if unified else Gemma4ForCausalLM)(config).float()
    randomize(target, generator)
    if target_class == "conditional":
        causal = target
        # Tiny vision and audio parts: real checkpoints have them, the converter must drop them.
        if unified:
            wrapper = Gemma4UnifiedConfig(
                text_config=config,
                vision_config=Gemma4UnifiedVisionConfig(**TINY_UNIFIED_VISION),
                audio_config=Gemma4UnifiedAudioConfig(**TINY_UNIFIED_AUDIO),
            )
            target = Gemma4UnifiedForConditionalGeneration(wrapper).float()
        else:
            wrapper = Gemma4Config(
                text_config=config,
                vision_config=Gemma4VisionConfig(**TINY_VISION),
                audio_config=Gemma4AudioConfig(**TINY_AUDIO),
            )
            target = Gemma4ForConditionalGeneration(wrapper).float()
        target.model.language_model.load_state_dict(causal.model.state_dict())
    elif target_class != "causal":
        raise ValueError(f"unknown target_class {target_class!r}")
    assistant_class = Gemma4UnifiedAssistantForCausalLM if unified else Gemma4AssistantForCausalLM
    assistant = assistant_class(assistant_config(kind, sliding_window, ordered)).float()
    randomize(assistant, generator)
    folder = Path(tmp_path) / pair_name(kind, target_class, sliding_window, ordered)
    pair = Pair(kind, folder / "target", folder / "assistant")
    target.save_pretrained(pair.target)
    assistant.save_pretrained(pair.assistant)
    return pair


def pair_name(kind: str, target_class: str, sliding_window: int, ordered: bool | None) -> str:
    ordering = "" if ordered is None else "-ordered" if ordered else "-plain"
    return f"{kind}-{target_class}-w{sliding_window}{ordering}"


def load_hf(model_dir: Path) -> torch.nn.Module:
    patch_transformers()
    model_type = json.loads((Path(model_dir) / "config.json").read_text())["model_type"]
    model_class = {
        "gemma4_text": Gemma4ForCausalLM,
        "gemma4": Gemma4ForConditionalGeneration,
        "gemma4_assistant": Gemma4AssistantForCausalLM,
        "gemma4_unified_text": Gemma4UnifiedForCausalLM,
        "gemma4_unified": Gemma4UnifiedForConditionalGeneration,
        "gemma4_unified_assistant": Gemma4UnifiedAssistantForCausalLM,
    }[model_type]
    model = model_class.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@dataclass
class DraftStep:
    logits: np.ndarray  # [V] as returned (centroid-masked: a fill value off the candidates)
    full_logits: np.ndarray  # [V] plain lm_head logits of the same hidden state
    post_projection: np.ndarray  # [backbone hidden] fed back as the next step's hidden
    token: int
    candidates: np.ndarray | None  # sorted candidate token ids (ordered embeddings only)
    centroid_logits: np.ndarray | None  # [num_centroids]


@dataclass
class Reference:
    logits: np.ndarray  # [T, V]
    hidden: np.ndarray  # [T, H] final-norm hidden states
    shared_kv: dict  # layer type -> (keys, values), each [kv_heads, T, head_dim]
    pending: int  # x_T, the greedy token after the prompt
    steps: list


def to_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().numpy()


def reference_outputs(
    target_dir: Path, assistant_dir: Path, input_ids: list, num_steps: int
) -> Reference:
    """Target prefill over ``input_ids`` (positions 0..T-1), then ``num_steps`` greedy draft steps
    through the real ``get_candidates`` at position T, as assisted generation runs them."""
    target, assistant = load_hf(target_dir), load_hf(assistant_dir)
    ids = torch.tensor([input_ids])
    norm_out = []
    text_model = target.get_decoder()
    hook = text_model.norm.register_forward_hook(lambda m, i, o: norm_out.append(o))
    with torch.no_grad():
        out = target(
            input_ids=ids, use_cache=True, output_hidden_states=True, return_shared_kv_states=True
        )
    hook.remove()
    hidden = out.hidden_states[-1]
    # The hidden state get_candidates feeds the drafter is the final-norm output.
    assert torch.equal(hidden, norm_out[0])
    pending = int(out.logits[0, -1].argmax())

    steps, inner_hidden = [], []

    def record(module, args, kwargs, output):
        inner = inner_hidden.pop()
        assert torch.equal(module.post_projection(inner), output.last_hidden_state)
        full = module.lm_head(inner)[0, -1]
        candidates = centroid_logits = None
        if module.config.use_ordered_embeddings:
            me = module.masked_embedding
            centroid_logits = me.centroids(inner)[0, -1]
            top = torch.topk(centroid_logits, me.centroid_intermediate_top_k).indices
            clusters = me.token_ordering.view(me.num_centroids, -1)
            candidates = np.sort(clusters[top].reshape(-1).numpy())
            centroid_logits = to_numpy(centroid_logits)
        steps.append(
            DraftStep(
                logits=to_numpy(output.logits[0, -1]),
                full_logits=to_numpy(full),
                post_projection=to_numpy(output.last_hidden_state[0, -1]),
                token=int(output.logits[0, -1].argmax()),
                candidates=candidates,
                centroid_logits=centroid_logits,
            )
        )

    assistant.generation_config.num_assistant_tokens = num_steps
    generator = SinglePositionMultiTokenCandidateGenerator(
        assistant_model=assistant,
        target_model_input_embeddings=target.get_input_embeddings(),
        generation_config=GenerationConfig(max_length=len(input_ids) + num_steps + 2),
    )
    with_pending = torch.tensor([input_ids + [pending]])
    hooks = [
        assistant.model.register_forward_hook(
            lambda m, i, o: inner_hidden.append(o.last_hidden_state)
        ),
        assistant.register_forward_hook(record, with_kwargs=True),
    ]
    with torch.no_grad():
        candidate_ids, _ = generator.get_candidates(
            with_pending,
            {"attention_mask": torch.ones_like(with_pending)},
            out,
            is_first_iteration=False,
            n_last_matches=0,
        )
    for hook in hooks:
        hook.remove()
    assert [s.token for s in steps] == candidate_ids[0, len(input_ids) + 1 :].tolist()
    return Reference(
        logits=to_numpy(out.logits[0]),
        hidden=to_numpy(hidden[0]),
        shared_kv={
            t: (to_numpy(k[0]), to_numpy(v[0])) for t, (k, v) in out.shared_kv_states.items()
        },
        pending=pending,
        steps=steps,
    )
