"""A user-defined pass in 25 lines: a learnable per-channel scale after every BatchNorm2d.

Run: python examples/custom_pass.py (no options; ``--help`` says so)
"""

from dataclasses import dataclass

import torch
from torch import nn

import rewriter as rw
from rewriter import zoo
from rewriter.testing import check_pass, random_model


class ChannelScale(rw.RewriterModule):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.scale


@rw.register
@dataclass(frozen=True)
class ScaleAfterBN(rw.Pass):
    """bn(x) => scale(bn(x)): a learnable per-channel scale, initialised to 1."""

    name = "scale_after_bn"
    preserves_outputs = True
    suffix: str = rw.option("scale", "name suffix of the inserted modules")

    def rules(self):
        return [(rw.P.module(nn.BatchNorm2d, name="bn"), self.insert)]  # bn(x) -> scale(bn(x))

    def insert(self, ctx, m):
        bn = m["bn"]
        if any(u.op == "call_module" and isinstance(ctx.module(u), ChannelScale) for u in bn.users):
            return None  # already scaled: running the pass twice is a no-op
        name = ctx.add_module(bn, self.suffix, ChannelScale(ctx.module(bn).num_features))
        return ctx.call_module(name, (bn,))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help works
    model = zoo.create("resnet8")
    net = rw.rewrite(model, ["masks", "scale_after_bn"])
    print(rw.report(net).table())
    print("new parameters:", [n for n, _ in net.named_parameters() if n.endswith("scale")][:3])
    check_pass("scale_after_bn", random_model(seed=1))  # the standard property suite
    print("property suite: ok")
