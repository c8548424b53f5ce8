"""Models that write their layers the ways popular vision libraries do, each with a plain twin.

Every idiom model computes exactly what its ``plain`` twin computes once the weights are
copied (``load_plain``): the canonical front end must make the passes and analyses see
the same layers in both. Inputs are ``(2, 3, 8, 8)`` images unless the entry says
otherwise. Nothing here depends on the libraries the idioms come from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# -- building blocks written the "library" way -------------------------------------------------


class BatchNormAct2d(nn.BatchNorm2d):
    """A fused norm + activation layer: ``F.batch_norm`` on its own parameters, then ``act``.

    Like the fused layers of popular vision libraries: a ``nn.BatchNorm2d`` subclass
    with its own forward (so torch.fx traces through it), the counter update written out.
    """

    def __init__(self, num_features: int, act: bool = True) -> None:
        super().__init__(num_features)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        x = F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,
            self.momentum,
            self.eps,
        )
        return self.act(x)


class FConv2d(nn.Module):
    """A conv written as ``F.conv2d`` on the module's own ``weight`` and ``bias``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, k, k) * (2 / (cin * k * k)) ** 0.5)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.stride, self.padding = stride, k // 2

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


class FLinear(nn.Module):
    """``F.linear`` on the module's own parameters."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        self.bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class FBatchNorm2d(nn.Module):
    """``F.batch_norm`` on the module's own affine parameters and running statistics.

    Written like ``nn.BatchNorm2d`` (the same state names) but not a subclass of it.
    """

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
            0.1, 1e-5,
        )  # fmt: skip


class FGroupNorm(nn.Module):
    """``F.group_norm`` on the module's own affine parameters."""

    def __init__(self, groups: int, c: int) -> None:
        super().__init__()
        self.groups = groups
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.groups, self.weight, self.bias, 1e-5)


class FLayerNorm(nn.Module):
    """``F.layer_norm`` over the last dimension on the module's own parameters."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)


# -- the idiom models and their plain twins ----------------------------------------------------


class FusedBlock(nn.Module):
    """A basic residual block built from fused norm-act layers."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(c, act=False)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + x)


class FusedNormActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = BatchNormAct2d(8)
        self.block = FusedBlock(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.bn(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class PlainBlock(nn.Module):
    """The plain twin of :class:`FusedBlock` (and of the in-place and drop-path blocks)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn1_act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn2(self.conv2(self.bn1_act(self.bn1(self.conv1(x))))) + x)


class PlainNet(nn.Module):
    """stem conv/bn/relu, one basic residual block, pool, linear: the twin of most idioms."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.bn_act = nn.ReLU()
        self.block = PlainBlock(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.bn_act(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FunctionalBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = FConv2d(c, c, 3)
        self.bn1 = FBatchNorm2d(c)
        self.bn1_act = nn.ReLU()
        self.conv2 = FConv2d(c, c, 3)
        self.bn2 = FBatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn2(self.conv2(self.bn1_act(self.bn1(self.conv1(x))))) + x)


class FunctionalNet(nn.Module):
    """Convs, BatchNorms and the linear head all written as functional calls."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = FConv2d(3, 8, 3)
        self.bn = FBatchNorm2d(8)
        self.bn_act = nn.ReLU()
        self.block = FunctionalBlock(8)
        self.fc = FLinear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(self.bn_act(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InplaceBlock(PlainBlock):
    """In-place activations and ``out += identity``, as torchvision-style code writes them."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        out = self.bn1(out)
        out = F.relu(out, inplace=True)
        out = self.bn2(self.conv2(out))
        out += x
        return out.relu_()


class InplaceNet(PlainNet):
    def __init__(self) -> None:
        super().__init__()
        self.block = InplaceBlock(8)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.stem(x))
        x = torch.relu_(x)
        x = self.block(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DropPath(nn.Module):
    """Stochastic depth: each sample's branch is kept with probability ``1 - p``, rescaled."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class DropPathBlock(PlainBlock):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.drop_path = DropPath(0.2)

    def forward(self, x: Tensor) -> Tensor:
        branch = self.bn2(self.conv2(self.bn1_act(self.bn1(self.conv1(x)))))
        return self.act(x + self.drop_path(branch))


class DropPathNet(PlainNet):
    """Drop-path on the residual branch; traced in training mode it is a per-sample multiply."""

    def __init__(self) -> None:
        super().__init__()
        self.block = DropPathBlock(8)


class ViewFlattenNet(PlainNet):
    """``x.view(x.size(0), -1)`` before the classifier, and an optional ``scale`` argument."""

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        x = self.block(self.bn_act(self.bn(self.stem(x))))
        x = F.adaptive_avg_pool2d(x, 1)
        x = self.fc(x.view(x.size(0), -1))
        if scale is not None:
            x = x * scale
        return x


class NormAnywhereBlock(nn.Module):
    """Functional norms whose input's rank nothing in the graph tells: a GroupNorm closing
    the branch, and a BatchNorm (not a BatchNorm subclass) after the residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.bn1_act = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.gn = FGroupNorm(2, c)
        self.post = FBatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        branch = self.gn(self.conv2(self.bn1_act(self.bn1(self.conv1(x)))))
        return self.act(self.post(branch + x))


class NormAnywhereNet(nn.Module):
    """``F.batch_norm`` on a pooled tensor and after a residual add, ``F.group_norm`` and
    ``F.layer_norm`` (on the pooled features) on the modules' own parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = FBatchNorm2d(8)
        self.bn_act = nn.ReLU()
        self.block = NormAnywhereBlock(8)
        self.ln = FLayerNorm(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn_act(self.bn(F.max_pool2d(self.stem(x), 2)))
        x = torch.flatten(F.adaptive_avg_pool2d(self.block(x), 1), 1)
        return self.fc(self.ln(x))


class PlainNormAnywhereBlock(NormAnywhereBlock):
    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.gn = nn.GroupNorm(2, c)  # type: ignore[assignment]
        self.post = nn.BatchNorm2d(c)  # type: ignore[assignment]


class PlainNormAnywhereNet(NormAnywhereNet):
    """The plain twin of :class:`NormAnywhereNet`: ``nn.BatchNorm2d``/``nn.GroupNorm``/
    ``nn.LayerNorm`` modules at the same names."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8)  # type: ignore[assignment]
        self.block = PlainNormAnywhereBlock(8)
        self.ln = nn.LayerNorm(8)  # type: ignore[assignment]


class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class MHAViT(nn.Module):
    """A small ViT whose attention is ``nn.MultiheadAttention`` (packed in-projection)."""

    def __init__(self, dim: int = 16, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(*(MHABlock(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.blocks(x)
        return self.head(self.norm(x).mean(dim=1))


@dataclass(frozen=True)
class Idiom:
    """An idiom model factory, its plain twin, and how many of each layer both have."""

    name: str
    make: Callable[[], nn.Module]
    plain: Callable[[], nn.Module]
    train_trace: bool = False  # trace in training mode (drop-path's random branch)


IDIOMS = [
    Idiom("fused_norm_act", FusedNormActNet, PlainNet),
    Idiom("functional", FunctionalNet, PlainNet),
    Idiom("inplace", InplaceNet, PlainNet),
    Idiom("drop_path", DropPathNet, PlainNet, train_trace=True),
    Idiom("view_flatten", ViewFlattenNet, PlainNet),
    Idiom("norm_anywhere", NormAnywhereNet, PlainNormAnywhereNet),
]


def make(name: str, seed: int = 0) -> nn.Module:
    """The idiom model ``name`` with seeded weights and non-trivial BN statistics, eval mode."""
    idiom = next(i for i in IDIOMS if i.name == name)
    torch.manual_seed(seed)
    model = idiom.make()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_var") and m.running_var is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def plain_twin(model: nn.Module, name: str) -> nn.Module:
    """The plain twin of an idiom model, holding the same weights under the canonical names."""
    idiom = next(i for i in IDIOMS if i.name == name)
    twin = idiom.plain()
    state = {k.replace(".act.", "_act.") if k.endswith(".act.weight") else k: v
             for k, v in model.state_dict().items()}  # fmt: skip
    twin.load_state_dict(state, strict=True)
    return twin.train(model.training)


def inputs(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def vit_inputs(batch: int = 2, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


class ResNet50(nn.Module):
    """A ResNet-50-sized bottleneck ResNet for 224x224 images: 7x7 stem, stages (3, 4, 6, 3),
    widths 64..512 (expansion 4), 53 BatchNorms, about 25.6 M parameters."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        from rewriter.zoo import Bottleneck

        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages, cin = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True)):
            blocks = []
            for j in range(count):
                blocks.append(Bottleneck(cin, planes, 2 if i > 0 and j == 0 else 1))
                cin = planes * 4
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet50(seed: int = 0) -> nn.Module:
    """:class:`ResNet50` with seeded weights, non-trivial BN statistics and logits of the
    magnitude a trained net gives (tens), in eval mode."""
    torch.manual_seed(seed)
    model = ResNet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(40.0)  # logits of magnitude ~50, as a trained ResNet-50 gives
    return model.eval()


class ExplicitAttention(nn.Module):
    """What tracing makes of ``nn.MultiheadAttention``: q/k/v/out linears and visible heads."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        from rewriter.canonical import HeadAttention

        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.attention = HeadAttention(heads)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.attention(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class PlainMHABlock(MHABlock):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__(dim, heads)
        self.attn = ExplicitAttention(dim, heads)  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def plain_vit(model: MHAViT) -> MHAViT:
    """The plain twin of an :class:`MHAViT`, holding the same weights (in_proj split in three)."""
    twin = MHAViT()
    twin.blocks = nn.Sequential(*(PlainMHABlock(16, 4) for _ in range(len(model.blocks))))
    state = {}
    for key, value in model.state_dict().items():
        if "in_proj" in key:
            prefix, kind = key.rsplit(".", 1)
            for i, which in enumerate("qkv"):
                state[f"{prefix}.{which}_proj.{kind.removeprefix('in_proj_')}"] = value[i * 16 : (i + 1) * 16]
        else:
            state[key] = value
    twin.load_state_dict(state, strict=True)
    return twin.train(model.training)
