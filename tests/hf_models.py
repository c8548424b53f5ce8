"""Tiny Hugging Face models built from configs (nothing is downloaded).

Every builder returns ``(model, example_inputs)``: a freshly initialised model in eval
mode (seeded) and a dict of keyword tensors for its ``forward``. All share one shape:
2 layers, hidden size 64, 4 attention heads (2 key/value heads where the architecture
has grouped-query attention), MLP width 128. Decoders are built with ``use_cache=False``
so their outputs are plain tensors.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    ViTConfig,
    ViTModel,
)

LAYERS, HIDDEN, HEADS, KV_HEADS, MLP = 2, 64, 4, 2, 128
VOCAB, SEQ, BATCH = 100, 8, 2


def _text_inputs(seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[1, -2:] = 0  # one padded sequence, so the mask matters
    return {"input_ids": ids, "attention_mask": mask}


def bert(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A BERT-style encoder (post-norm, GELU MLP, pooler)."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        max_position_embeddings=4 * SEQ,
        attn_implementation="sdpa",
    )
    return BertModel(config).eval(), _text_inputs(seed)


def gpt2(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A GPT-2-style decoder (pre-norm, packed qkv ``Conv1D``, tanh-GELU MLP)."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=MLP,
        n_positions=4 * SEQ,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return GPT2Model(config).eval(), _text_inputs(seed)


def llama(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A Llama-style decoder: RMSNorm, rotary embeddings, GQA (4 query / 2 kv heads), SwiGLU."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=MLP,
        max_position_embeddings=4 * SEQ,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return LlamaModel(config).eval(), _text_inputs(seed)


def vit(seed: int = 0) -> tuple[nn.Module, dict[str, Tensor]]:
    """A ViT encoder on 16x16 images with 4x4 patches (pre-norm, GELU MLP, no pooler)."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        attn_implementation="sdpa",
    )
    g = torch.Generator().manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False).eval()
    return model, {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}


BUILDERS = {"bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit}


class RootBranch(nn.Module):
    """fx cannot trace this forward (it branches on a size at the root); export can."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.size(0) > 1:
            return self.fc(x) * 2
        return self.fc(x)


def root_branch() -> nn.Module:
    """A factory for the command-line tests (``hf_models:root_branch``)."""
    torch.manual_seed(0)
    return RootBranch()


def linear_count(model: nn.Module) -> int:
    """The model's own linear layers: ``nn.Linear`` and GPT-2's transposed ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    return sum(isinstance(m, (nn.Linear, Conv1D)) for m in model.modules())
