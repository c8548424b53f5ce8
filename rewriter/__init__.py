"""rewriter: training-time network-structure methods as declarative torch.fx rewrites.

Three lines::

    import rewriter as rw
    net = rw.rewrite(model, passes=["masks", "rbn"], example_inputs=(x,))
    compiled = torch.compile(net, fullgraph=True)
"""

from .api import rewrite
from .context import RewriteContext
from .errors import ArtifactError, OptionError, PassError, RewriterError, TraceError
from .io import export, load, read_pipeline, save
from .lift import LiftError, lift, load_pt2
from .losses import aux_losses
from .manager import Checks, PassRecord, Report, report
from .modules import RewriterModule
from .patterns import Match, P, Pattern, Rule
from .pipeline import PipelineError
from .registry import (
    Pass,
    get_pass,
    make_pass,
    option,
    option_limits,
    option_specs,
    register,
    registered,
)
from .slim import SlimReport, group_masks, mask_channels, slim
from .tracing import opaque_modules, trace

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "Checks",
    "LiftError",
    "Match",
    "OptionError",
    "P",
    "Pass",
    "PassError",
    "PassRecord",
    "PipelineError",
    "Pattern",
    "Report",
    "RewriteContext",
    "RewriterError",
    "RewriterModule",
    "Rule",
    "TraceError",
    "aux_losses",
    "export",
    "get_pass",
    "lift",
    "load",
    "load_pt2",
    "make_pass",
    "opaque_modules",
    "option",
    "option_limits",
    "option_specs",
    "register",
    "registered",
    "report",
    "read_pipeline",
    "rewrite",
    "save",
    "slim",
    "SlimReport",
    "group_masks",
    "mask_channels",
    "trace",
]
