"""The network: one encoder pass, two heads (domain, risk). Training-only (needs torch).

Mean pooling over the attention mask (what all-MiniLM-L6-v2 was trained with), dropout, then a
linear head per task. The ONNX graph returns both heads' raw logits; temperatures and thresholds
are applied outside the graph, from the artifact's metadata, so calibration can change without a
new export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pointsman_classifier.labels import DOMAINS, RISKS

RANDOM_DISTILBERT = "random-distilbert-tiny"


def keep_layers(total: int, keep: int) -> list[int]:
    """``keep`` evenly spaced layer indices out of ``total``, always ending with the last one
    (its output is what the pooling was pretrained on)."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    step = total / keep
    return sorted({total - 1 - int(i * step) for i in range(keep)})


def load_encoder(base: str, layers: int | None = None) -> nn.Module:
    """A pretrained encoder (local path or hub id), or a tiny randomly initialised DistilBERT;
    with ``layers``, a shallower copy that keeps that many of its layers (cheaper per query)."""
    loaded = _load_encoder(base)
    if layers is None:
        return loaded
    model: Any = loaded  # BERT-style (encoder.layer) or DistilBERT (transformer.layer)
    config: Any = model.config
    stack: Any = model.encoder.layer if hasattr(model, "encoder") else model.transformer.layer
    total = len(stack)
    kept = nn.ModuleList([stack[i] for i in keep_layers(total, layers)])
    if hasattr(model, "encoder"):
        model.encoder.layer = kept
        config.num_hidden_layers = layers
    else:
        model.transformer.layer = kept
        config.n_layers = layers
    return loaded


def _load_encoder(base: str) -> nn.Module:
    from transformers import AutoModel, DistilBertConfig, DistilBertModel

    if base == RANDOM_DISTILBERT:
        config = DistilBertConfig(
            vocab_size=30522,
            dim=32,
            n_layers=2,
            n_heads=2,
            hidden_dim=64,
            max_position_embeddings=512,
        )
        return DistilBertModel(config)
    model: nn.Module = AutoModel.from_pretrained(base)
    return model


def hidden_size(encoder: nn.Module) -> int:
    config: Any = encoder.config
    return int(getattr(config, "hidden_size", None) or config.dim)


class TwoHeadClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        size = hidden_size(encoder)
        self.dropout = nn.Dropout(dropout)
        self.domain_head = nn.Linear(size, len(DOMAINS))
        self.risk_head = nn.Linear(size, len(RISKS))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = self.dropout(pooled)
        return self.domain_head(pooled), self.risk_head(pooled)


def export_onnx(model: TwoHeadClassifier, path: Path, opset: int = 17) -> None:
    """fp32 ONNX with dynamic batch and sequence axes."""
    model.eval()
    ids = torch.ones((2, 8), dtype=torch.long)
    mask = torch.ones((2, 8), dtype=torch.long)
    torch.onnx.export(
        model,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["domain_logits", "risk_logits"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "sequence"},
            "attention_mask": {0: "batch", 1: "sequence"},
            "domain_logits": {0: "batch"},
            "risk_logits": {0: "batch"},
        },
        opset_version=opset,
        dynamo=False,
    )
