"""Tests for ``rewriter.analysis.flops``: MAC and parameter counts, channel_keep scaling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small_models import Net
from torch import Tensor, nn

import rewriter as rw
from rewriter import zoo
from rewriter.analysis.flops import NORM_MACS, SOFTMAX_MACS, FlopsReport, flops
from rewriter.errors import RewriterError


class One(nn.Module):
    """Wraps one layer so that it is the only computing node of the graph."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def only_row(report: FlopsReport, name: str = "layer"):
    return report.row(name)


# -- single layers, hand-computed -------------------------------------------------------------


def test_grouped_conv_with_bias() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True)
    report = flops(One(conv), torch.randn(2, 4, 5, 5))
    row = only_row(report)
    # out 2x6x5x5 = 300 elements, each (4 / 2) * 3 * 3 = 18 MACs, plus one bias add.
    assert row.kind == "conv" and row.shape == (2, 6, 5, 5)
    assert row.macs == 300 * 18 + 300 == report.total_macs
    assert row.params == 6 * 2 * 9 + 6 == report.total_params
    assert report.per_sample_macs == report.total_macs / 2
    assert report.flops == 2 * report.total_macs


def test_strided_conv_without_bias() -> None:
    conv = nn.Conv2d(3, 8, (3, 1), stride=(2, 1), bias=False)
    report = flops(One(conv), torch.randn(1, 3, 9, 9))
    # out 1x8x4x9 = 288 elements, 3 * 3 * 1 MACs each.
    assert only_row(report).macs == 288 * 9


def test_depthwise_conv() -> None:
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
    report = flops(One(conv), torch.randn(1, 6, 4, 4))
    assert only_row(report).macs == 96 * 1 * 9


def test_transposed_conv() -> None:
    conv = nn.ConvTranspose2d(4, 6, 2, stride=2, bias=True)
    report = flops(One(conv), torch.randn(1, 4, 3, 3))
    # every input element (36) is multiplied into 6 * 2 * 2 outputs; bias on 6x6x6 outputs.
    assert only_row(report).macs == 36 * 6 * 4 + 216


def test_linear_with_batched_leading_dims() -> None:
    report = flops(One(nn.Linear(8, 5)), torch.randn(2, 3, 7, 8))
    # 2 * 3 * 7 * 5 = 210 outputs, 8 MACs each, plus the bias.
    assert only_row(report).macs == 210 * 8 + 210
    assert report.total_params == 45


class MatMuls(nn.Module):
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        x = torch.matmul(a, b)  # (2, 3, 4, 6), K = 5
        y = a @ b
        z = torch.bmm(a.flatten(0, 1), b.flatten(0, 1))  # (6, 4, 6)
        return x + y + z.view(2, 3, 4, 6)


def test_matmul_family() -> None:
    report = flops(MatMuls(), (torch.randn(2, 3, 4, 5), torch.randn(2, 3, 5, 6)))
    matmuls = [r for r in report.rows if r.kind == "matmul"]
    assert [r.macs for r in matmuls] == [144 * 5] * 3
    adds = [r for r in report.rows if r.target == "operator.add"]
    assert [r.macs for r in adds] == [144, 144]
    assert report.total_macs == 3 * 720 + 2 * 144
    assert report.batch == 2


def test_batchnorm_and_layernorm() -> None:
    report = flops(One(nn.BatchNorm2d(6)), torch.randn(2, 6, 4, 4))
    row = only_row(report)
    assert row.kind == "norm" and row.macs == NORM_MACS * 192
    assert row.params == 12 and row.buffers == 6 + 6 + 1 == report.total_buffers
    report = flops(One(nn.LayerNorm(8)), torch.randn(2, 5, 8))
    assert only_row(report).macs == NORM_MACS * 80


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(x) * 2.0  # 1 + 1 per element
        p = self.pool(y)  # 2x3x2x2 outputs, 4 reads each
        q = F.avg_pool2d(y, 2)  # same
        s = torch.softmax(p + q, dim=1)  # add: 1, softmax: SOFTMAX_MACS per element
        return self.gap(s).flatten(1) + x.mean(dim=(2, 3))  # gap and mean: input numel


def test_elementwise_pooling_softmax_and_reductions() -> None:
    report = flops(Mixed(), torch.randn(2, 3, 4, 4))
    by_name = {r.name: r for r in report.rows}
    assert by_name["relu"].macs == 96 and by_name["relu"].kind == "elementwise"
    assert by_name["mul"].macs == 96
    assert by_name["pool"].macs == by_name["avg_pool2d"].macs == 24 * 4
    assert by_name["pool"].kind == "pool"
    assert by_name["softmax"].macs == SOFTMAX_MACS * 24
    assert by_name["gap"].macs == 24 and by_name["mean"].macs == 96
    assert by_name["mean"].kind == "reduce"
    assert by_name["flatten"].macs == 0 and by_name["flatten"].kind == "free"
    expected = 96 + 96 + 96 + 96 + 24 + SOFTMAX_MACS * 24 + 24 + 96 + 6
    assert report.total_macs == expected
    assert report.unknown == []


# -- whole models -----------------------------------------------------------------------------


def resnet20_macs(batch: int) -> tuple[int, int]:
    """(conv + linear MACs, all MACs) of zoo resnet20 on 32x32 inputs, by hand."""
    e1, e2, e3 = 16 * 32 * 32, 32 * 16 * 16, 64 * 8 * 8  # elements per stage output
    conv = 32 * 32 * 16 * 3 * 9  # stem
    conv += 6 * 32 * 32 * 16 * 16 * 9  # layer1: 3 blocks x 2 convs
    conv += 16 * 16 * 32 * 16 * 9 + 5 * 16 * 16 * 32 * 32 * 9 + 16 * 16 * 32 * 16  # layer2
    conv += 8 * 8 * 64 * 32 * 9 + 5 * 8 * 8 * 64 * 64 * 9 + 8 * 8 * 64 * 32  # layer3
    conv += 64 * 10 + 10  # fc with bias
    norms = NORM_MACS * (7 * e1 + 7 * e2 + 7 * e3)  # stem BN + 6 per stage + shortcut BNs
    relus = 7 * e1 + 6 * e2 + 6 * e3
    adds = 3 * (e1 + e2 + e3)
    pool = e3
    return batch * conv, batch * (conv + norms + relus + adds + pool)


def test_resnet20_against_hand_formula() -> None:
    model = zoo.create("resnet20")
    report = flops(rw.trace(model), zoo.example_inputs("resnet20", batch=2))
    conv_linear, total = resnet20_macs(2)
    assert sum(r.macs for r in report.rows if r.kind in ("conv", "linear")) == conv_linear
    assert report.total_macs == total
    assert report.per_sample_macs == total / 2
    # The same sum from the modules' own attributes (spatial sizes from the stage).
    by_layer = {r.target: r for r in report.rows}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            h = by_layer[name].shape[-1]
            kernel = m.kernel_size[0] * m.kernel_size[1]
            expected = 2 * m.out_channels * h * h * (m.in_channels // m.groups) * kernel
            assert by_layer[name].macs == expected, name


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_params_and_no_unknown_ops(name: str) -> None:
    model = zoo.create(name)
    report = flops(model, zoo.example_inputs(name, batch=2))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.total_buffers == sum(b.numel() for b in model.buffers())
    assert sum(r.params for r in report.rows) == report.total_params
    assert sum(r.buffers for r in report.rows) == report.total_buffers
    assert report.unknown == []
    assert report.total_macs > 0 and report.expected_macs == report.total_macs
    assert torch.allclose(report.per_sample, torch.full((2,), report.total_macs / 2.0).double())


def test_rewritten_layers_count_as_their_base_classes() -> None:
    model = zoo.create("resnet8")
    x = zoo.example_inputs("resnet8")
    gm = rw.rewrite(model, ["masks", "rbn"], x)  # MaskedConv2d, RepresentativeBatchNorm2d
    before, after = flops(model, x), flops(gm, x)
    assert after.total_macs == before.total_macs and after.unknown == []
    assert [r.kind for r in after.rows] == [r.kind for r in before.rows]
    assert after.total_params == sum(p.numel() for p in gm.parameters()) > before.total_params


def test_batch_scales_totals_not_per_sample() -> None:
    model = zoo.create("digits_cnn")
    one = flops(model, zoo.example_inputs("digits_cnn", batch=1))
    four = flops(model, zoo.example_inputs("digits_cnn", batch=4))
    assert four.total_macs == 4 * one.total_macs
    assert four.per_sample_macs == one.per_sample_macs == one.total_macs


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.fc(x)) * self.scale


def test_shared_module_params_counted_once_macs_per_call() -> None:
    report = flops(Shared(), torch.randn(3, 4))
    fc_rows = [r for r in report.rows if r.target == "fc"]
    assert [r.macs for r in fc_rows] == [3 * 4 * 4 + 12] * 2
    assert [r.params for r in fc_rows] == [20, 0]
    assert report.row("scale").params == 4 and report.row("scale").kind == "param"
    assert report.total_params == 24 == sum(r.params for r in report.rows)


# -- unknown ops and custom modules -----------------------------------------------------------


class Opaque(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * 2


class Costed(nn.Module):
    def rewriter_macs(self, input_shapes: list[tuple[int, ...]], output_shape) -> int:
        return 7 * input_shapes[0][0]

    def forward(self, x: Tensor) -> Tensor:
        return x + 1


class WithUnknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.opaque = Opaque()
        self.costed = Costed()

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("bi,bj->bij", x, x).sum(dim=2)
        return self.costed(self.opaque(y))


def test_unknown_ops_are_listed_and_custom_macs_used() -> None:
    gm = rw.trace(WithUnknown(), leaves=["opaque", "costed"])
    report = flops(gm, torch.randn(3, 4))
    assert report.unknown == ["einsum (torch.einsum)", "opaque (opaque)"]
    assert report.row("einsum").kind == "unknown" and report.row("einsum").macs == 0
    assert report.row("costed").kind == "custom" and report.row("costed").macs == 21
    assert "not counted (unknown op): einsum (torch.einsum)" in report.table()


def test_table_lists_rows_and_totals() -> None:
    report = flops(Net(), torch.randn(2, 3, 8, 8))
    text = report.table()
    assert text.splitlines()[0].split() == ["node", "target", "kind", "output", "MACs", "params"]
    assert "block_conv1" in text and "block.conv1" in text
    assert f"total: {report.total_macs:,} MACs for batch 2" in text
    assert str(report) == text


# -- state is left alone ----------------------------------------------------------------------


class Counter(nn.Module):
    """Counts its calls in a buffer, like a gate accumulating statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x + torch.rand_like(x) * 0


def test_model_state_training_flags_and_rng_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Counter(), nn.Dropout(0.5))
    model.train()
    model[1].eval()  # a mixed-mode model keeps its exact flags
    gm = rw.trace(model, leaves=[Counter])
    flags = {n: m.training for n, m in gm.named_modules()}
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    x = torch.randn(2, 3, 6, 6)
    rng = torch.get_rng_state()
    report = flops(gm, x)
    assert report.total_macs > 0
    assert {n: m.training for n, m in gm.named_modules()} == flags
    assert torch.equal(torch.get_rng_state(), rng)
    after = gm.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_plain_module_is_traced_not_mutated() -> None:
    model = zoo.create("resnet8")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = flops(model, zoo.example_inputs("resnet8"))
    assert report.total_macs == flops(rw.trace(model), zoo.example_inputs("resnet8")).total_macs
    assert model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- channel_keep -----------------------------------------------------------------------------


class Chain(nn.Module):
    """conv1-bn-relu-conv2 (+ skip) * scale -> conv3 -> depthwise -> conv4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.skip = nn.Conv2d(3, 8, 1, bias=False)
        self.scale = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.conv3 = nn.Conv2d(8, 4, 1, bias=True)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.conv4 = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv2(self.relu(self.bn(self.conv1(x))))
        y = (y + self.skip(x)) * self.scale
        return self.conv4(self.dw(self.conv3(y) + 1.0))


def test_channel_keep_scales_layer_followers_and_next_conv() -> None:
    x = torch.randn(2, 3, 4, 4)
    dense = flops(Chain(), x)
    report = flops(Chain(), x, channel_keep={"conv1": 0.5, "conv3": 0.25})
    keep = {r.name: r.keep for r in report.rows}
    # conv1's output fraction flows through bn and relu into conv2's input channels...
    assert keep["conv1"] == keep["bn"] == keep["relu"] == keep["conv2"] == 0.5
    # ...and stops at the residual add; conv3 keeps a quarter of its outputs, the
    # scalar add, the depthwise conv and conv4's inputs follow.
    assert keep["add"] == keep["mul"] == keep["skip"] == 1.0
    assert keep["conv3"] == keep["add_1"] == keep["dw"] == keep["conv4"] == 0.25
    assert report.total_macs == dense.total_macs
    expected = sum(r.macs * keep[r.name] for r in dense.rows)
    assert report.expected_macs == pytest.approx(expected)
    assert report.per_sample_macs == pytest.approx(expected / 2)
    assert report.reduction == pytest.approx(1 - expected / dense.total_macs)
    assert "kept" in report.table() and "saved" in report.table()


def test_channel_keep_multiplies_input_and_output_fractions() -> None:
    report = flops(Chain(), torch.randn(2, 3, 4, 4), channel_keep={"conv1": 0.5, "conv2": 0.5})
    assert report.row("conv2").keep == 0.25  # half of its inputs, half of its outputs
    assert report.row("add").keep == 1.0


def test_channel_keep_flows_through_broadcast_scale() -> None:
    report = flops(Chain(), torch.randn(2, 3, 4, 4), channel_keep={"add": 0.5})
    # y * scale (1, 8, 1, 1) acts per channel: conv3 reads half of its input channels;
    # its bias (one addition per output, 8 multiply-adds before it) is added in full
    assert report.row("mul").keep == 0.5
    assert report.row("conv3").keep == pytest.approx((0.5 * 8 + 1) / (8 + 1))


def test_channel_keep_per_sample_fractions() -> None:
    x = torch.randn(2, 3, 4, 4)
    dense = flops(Chain(), x)
    fractions = torch.tensor([1.0, 0.25])
    report = flops(Chain(), x, channel_keep={"conv1": fractions})
    scaled = {"conv1", "bn", "relu", "conv2"}
    fixed = sum(r.macs for r in dense.rows if r.name not in scaled) / 2
    gated = sum(r.macs for r in dense.rows if r.name in scaled) / 2
    assert report.per_sample.dtype == torch.float64
    assert torch.allclose(
        report.per_sample, torch.tensor([fixed + gated, fixed + 0.25 * gated], dtype=torch.float64)
    )
    assert report.row("conv1").keep == pytest.approx(0.625)
    assert report.expected_macs == pytest.approx(float(report.per_sample.sum()))


def test_channel_keep_on_resnet_block() -> None:
    model = zoo.create("resnet8")
    x = zoo.example_inputs("resnet8", batch=2)
    report = flops(model, x, channel_keep={"layer1.0.conv1": 0.5})
    halved = {r.name for r in report.rows if r.keep == 0.5}
    assert halved == {"layer1_0_conv1", "layer1_0_bn1", "layer1_0_relu1", "layer1_0_conv2"}
    assert all(r.keep == 1.0 for r in report.rows if r.name not in halved)


def test_channel_keep_flows_through_custom_gate_but_does_not_scale_it() -> None:
    class Gate(nn.Module):
        def rewriter_macs(self, input_shapes, output_shape) -> int:
            return 5

        def forward(self, x: Tensor) -> Tensor:
            return x * 1.0

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Gate(), nn.Conv2d(4, 2, 1))
    gm = rw.trace(model, leaves=[Gate])
    report = flops(gm, torch.randn(1, 3, 2, 2), channel_keep={"0": 0.5})
    assert report.row("_1").kind == "custom" and report.row("_1").keep == 1.0
    assert report.row("_2").keep == pytest.approx((0.5 * 4 + 1) / (4 + 1))  # bias kept whole


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({"nope": 0.5}, "neither a called module nor a node"),
        ({"conv1": 1.5}, "must lie in"),
        ({"conv1": torch.ones(3)}, "per-sample fractions of shape"),
    ],
)
def test_channel_keep_errors(keep: dict, message: str) -> None:
    with pytest.raises(RewriterError, match=message):
        flops(Chain(), torch.randn(2, 3, 4, 4), channel_keep=keep)
