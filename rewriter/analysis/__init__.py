"""Analysis layer: networkx views of the graph, channel coupling, FLOPs and parameter counts.

``graph(gm)`` is the networkx view every graph algorithm of the project works on;
``channel_groups`` finds which channels of which layers must be kept or removed
together; ``flops`` counts multiply-accumulates and parameters; ``residual_blocks``
finds residual blocks by dominator analysis.
"""

from .blocks import ResidualBlock, residual_blocks
from .channels import ChannelAnalysis, ChannelGroup, ChannelSlice, LayerInfo, Member, channel_groups
from .flops import FlopsReport, FlopsRow, flops
from .view import graph

__all__ = [
    "ChannelAnalysis",
    "ChannelGroup",
    "ChannelSlice",
    "FlopsReport",
    "FlopsRow",
    "LayerInfo",
    "Member",
    "ResidualBlock",
    "channel_groups",
    "flops",
    "graph",
    "residual_blocks",
]
