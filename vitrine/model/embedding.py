"""Which vector a CLIP-family model produces, and how dual encoders are assembled from separate towers.

This module is the single definition of "the embedding" for every model Vitrine supports, used by
the encoder at index and query time *and* by contrastive training, so the two can never disagree
(train/serve skew is the classic silent failure of retrieval systems).

- ``CLIPModel`` / ``SiglipModel``: the model's own ``get_image_features`` / ``get_text_features``
  (transformers 5 returns an output object; the projected vector is its ``pooler_output``).
- ``VisionTextDualEncoderModel``: transformers pools both towers with ``pooler_output``. That is wrong
  for towers whose pooler was never trained: DeiT/ViT classification checkpoints carry no pooler
  weights (transformers initialises a random one), and a sentence-transformers text model was trained
  with mean pooling. ``build_dual_encoder`` records the right choice in ``config.vitrine_pooling``
  (``{"vision": "cls"|"pooler"|"mean", "text": "mean"|"cls"|"pooler"}``) and the functions below obey it.
  Dual encoders without that key (e.g. trained elsewhere with the HF example script) keep the
  transformers default, which is what they were trained with.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

POOLING_KEY = "vitrine_pooling"
POOLINGS = ("cls", "mean", "pooler")


def model_kind(model: nn.Module) -> str:
    """``clip`` | ``siglip`` | ``dual`` — the three families with different pooling and text padding."""
    model_type = getattr(model.config, "model_type", "")
    if model_type == "vision-text-dual-encoder":
        return "dual"
    if model_type in ("siglip",):
        return "siglip"
    if hasattr(model, "get_image_features") and hasattr(model, "get_text_features"):
        return "clip"
    raise ValueError(f"unsupported model type {model_type!r}: expected a CLIP-family dual encoder")


def pooling_of(model: nn.Module) -> dict[str, str]:
    """The pooling actually applied to each tower (``pooler`` = the model's own definition)."""
    if model_kind(model) != "dual":
        return {"vision": "pooler", "text": "pooler"}
    chosen = getattr(model.config, POOLING_KEY, None) or {}
    return {"vision": chosen.get("vision", "pooler"), "text": chosen.get("text", "pooler")}


def pool(output: Any, how: str, attention_mask: torch.Tensor | None) -> torch.Tensor:
    hidden = output.last_hidden_state
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    if how == "pooler":
        if output.pooler_output is None:
            raise ValueError("this tower has no pooler: set config.vitrine_pooling to 'cls' or 'mean'")
        return output.pooler_output
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLINGS}")


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features; older versions a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected (not yet normalised) image embeddings, with gradients if the caller wants them."""
    if model_kind(model) != "dual":
        return _features(model.get_image_features(pixel_values=pixel_values))
    out = model.vision_model(pixel_values=pixel_values, return_dict=True)
    return model.visual_projection(pool(out, pooling_of(model)["vision"], None))


def text_features(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Projected (not yet normalised) text embeddings."""
    if model_kind(model) != "dual":
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None and model_kind(model) != "siglip":
            kwargs["attention_mask"] = attention_mask  # SigLIP was trained without a text mask
        return _features(model.get_text_features(**kwargs))
    out = model.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    return model.text_projection(pool(out, pooling_of(model)["text"], attention_mask))


def text_limit(model: nn.Module, tokenizer: Any, max_length: int | None = None) -> int:
    """Tokens kept per text: what both the text tower and the tokenizer accept.

    ``max_length`` may shorten it (training keeps captions short for speed), except for SigLIP, which
    was trained on texts padded to its full length: its padding is part of the input.
    """
    positions = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)
    limit = min(positions or 512, tokenizer.model_max_length or 512)
    if max_length and model_kind(model) != "siglip":
        limit = min(limit, max_length)
    return limit


def tokenize(tokenizer: Any, texts: Sequence[str], *, kind: str, limit: int) -> dict[str, torch.Tensor]:
    """Tokenise as the model was trained, for serving and training alike: SigLIP pads to ``limit``,
    the others to the batch's longest text; everything is truncated at ``limit`` (see :func:`text_limit`).
    Takes the model's ``kind`` rather than the model so DataLoader workers need not receive it."""
    padding = "max_length" if kind == "siglip" else True
    return tokenizer(list(texts), padding=padding, truncation=True, max_length=limit, return_tensors="pt")


def sentence_transformers_pooling(folder: str | Path) -> str | None:
    """The pooling a sentence-transformers checkpoint was trained with, or None for a plain model."""
    config = Path(folder) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    modes = json.loads(config.read_text())
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    return None


def _tower_pooling(loading_info: dict, st_pooling: str | None, model: nn.Module) -> str:
    """Pick the pooled vector a tower was trained to produce.

    A pooler whose weights were missing from the checkpoint is random: never use it.
    """
    if st_pooling:
        return st_pooling
    missing = loading_info.get("missing_keys", set())
    has_trained_pooler = getattr(model, "pooler", None) is not None and not any(
        k.startswith("pooler.") for k in missing
    )
    if getattr(model.config, "model_type", "") == "clip_vision_model":
        return "pooler"  # CLIP's vision pooler is post-layernorm(CLS), part of the pretrained model
    return "pooler" if has_trained_pooler and getattr(model.config, "model_type", "") != "vit" else "cls"


def build_dual_encoder(
    vision_model: str | Path,
    text_model: str | Path,
    *,
    projection_dim: int = 512,
    logit_scale_init: float = 2.6592,
    output_dir: str | Path | None = None,
) -> tuple[nn.Module, Any, Any]:
    """Assemble a ``VisionTextDualEncoderModel`` from two pretrained towers with correct pooling.

    The projections are new (random) layers: the result needs contrastive training before its
    embeddings mean anything across modalities. ``output_dir`` saves model, image processor and
    tokenizer together, loadable by ``Encoder.from_pretrained`` and plain transformers alike.
    Returns ``(model, image_processor, tokenizer)``.
    """
    from transformers import (
        AutoImageProcessor,
        AutoModel,
        AutoTokenizer,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
    )

    vision, vision_info = AutoModel.from_pretrained(str(vision_model), output_loading_info=True)
    vision = getattr(vision, "vision_model", vision) if vision.config.model_type == "clip" else vision
    text, text_info = AutoModel.from_pretrained(str(text_model), output_loading_info=True)
    model = VisionTextDualEncoderModel(vision_model=vision, text_model=text)
    pooling = {
        "vision": _tower_pooling(vision_info, None, vision),
        "text": _tower_pooling(text_info, sentence_transformers_pooling(text_model), text),
    }
    setattr(model.config, POOLING_KEY, pooling)
    model.config.projection_dim = projection_dim
    model.visual_projection = nn.Linear(vision.config.hidden_size, projection_dim, bias=False)
    model.text_projection = nn.Linear(text.config.hidden_size, projection_dim, bias=False)
    model.logit_scale.data.fill_(logit_scale_init)
    image_processor = AutoImageProcessor.from_pretrained(str(vision_model), backend="pil")
    tokenizer = AutoTokenizer.from_pretrained(str(text_model))
    if output_dir is not None:
        model.save_pretrained(output_dir)
        VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(
            output_dir
        )
    return model, image_processor, tokenizer
