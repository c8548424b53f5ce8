"""Pass ``distill``: knowledge distillation as a rewrite (Hinton KD, Tf-KD self/reg, IE-KD).

``student(x) => student(x)``, with a frozen teacher evaluated on the same input inside the
same graph: the pass inserts one :class:`Distiller` module (named ``<logits node>_distill``,
``fc_distill`` on the zoo CNNs) that receives the model's inputs, the student's logits and,
for the feature methods, the student's tapped feature map; it runs the teacher and returns
the logits unchanged (``preserves_outputs``). The losses of the last forward come through
the library-wide protocol, so a training step reads::

    out = gm(x)
    loss = F.cross_entropy(out, y) + rewriter.aux_losses(gm, targets=y)

Methods (``docs/methods/distill.md``; ``alpha``, ``temperature``, ``multiplier`` and ``reduction``
default per method, shown in brackets):

* ``hinton`` [0.9, 4, 1, batchmean]: ``(1 - a) CE + a T^2 m KL(softmax(t/T) || softmax(s/T))``.
* ``tf_self`` [0.95, 6, 50, mean]: the same formula with a teacher that is a trained copy of
  the student's own architecture (:func:`self_teacher`); the defaults are the Tf-KD authors'
  ResNet-18 CIFAR-100 settings, with their reduction (KL averaged over batch x classes) and
  multiplier (their MobileNetV2 setting is ``temperature=20, multiplier=1``).
* ``tf_reg`` [0.1, 20, 1, batchmean]: no teacher module; the virtual teacher puts 0.99 on the
  true class and spreads the rest evenly, softened by ``softmax(p_d / T)``; the student is not
  temperature-scaled and there is no ``T^2``: ``(1 - a) CE + a m KL(p_virtual || softmax(s))``.
  These defaults are ours: with ``batchmean`` and ``m = 1`` the loss is exactly label
  smoothing (same gradient, the loss differs by a constant) at ``eps = K a q_off``, where
  ``q_off`` is the virtual teacher's probability of a wrong class (0.0995 at T=20, K=10, so
  eps = 0.0995 with a = 0.1); see ``tests/test_distill.py``. The authors' code uses
  ``reduction="mean"`` with a multiplier; set them to reproduce it.
* ``ie`` [weights 1, 1]: IE-KD. The teacher's tapped feature map goes through a frozen
  auto-encoder's encoder (pretrain it with :func:`pretrain_autoencoder` before training);
  the student's tapped map is split channel-wise (first ``C // 2`` channels: inheritance,
  the rest: exploration), each half through its own encoder into the teacher code's shape;
  ``aux = inherit_weight * L_inh + explore_weight * L_exp`` with
  ``L_inh = mean |a/||a|| - b/||b|||`` (codes flattened per sample) and ``L_exp`` either
  ``-L_inh`` of the exploration code (``exploration="neg_l1"``) or ``mean |cos|``
  (``"abs_cos"``). No logit term: add ``hinton`` separately if you want both.
* ``feature``: feature-only KD with the same machinery (one encoder over the whole student
  map, ``aux = inherit_weight * L_inh``; Factor Transfer's loss), the control of the IE
  examples.

The CE part: ``aux_losses(gm, targets=y)`` returns the method's soft term **minus**
``a * CE(s, y)`` (for ``hinton``, ``tf_self``, ``tf_reg``), so that the usual
``F.cross_entropy(out, y) + aux`` is exactly the paper's ``(1 - a) CE + ...``. It is meant to
be added to the plain, mean-reduced cross-entropy of the same logits; if you use another
task loss, subtract nothing yourself and know that ``a * CE`` is taken off it. The feature
methods do not touch the CE. KL reductions: ``batchmean`` is the KL summed over classes
(and positions) divided by the batch size; ``mean`` divides by every element.

Dict outputs and language models (``docs/methods/distill.md``, "Language models and dict
outputs"): a dict output's logits are read at ``logits_key`` (``"logits"``; a missing key is
an error listing the keys) and only that value goes through the distiller, so the graph
returns the same dict. ``class_dim`` (1 or -1; unset: -1 for a dict output unless its
logits are known to be 4-D or more, else 1) says where the classes are; with -1
(``(B, S, V)`` LM logits) the KL and the subtracted CE are averaged over the tokens and the
batch whose label is not ``ignore_index`` (-100), labels ``(B, S)`` (or flattened). Tf-KD
reg builds its virtual teacher per token; ``ie`` and ``feature`` are refused for
``class_dim=-1`` (they tap 4-D conv maps). A Hugging Face teacher module is exported and
lifted like the student (:func:`_lift_teacher`), with the student's input names as
keywords.

The teacher (given from Python with :meth:`Distill.with_teacher`, or as the ``teacher``
option: ``zoo:NAME`` (plus ``teacher_weights``, a safetensors or state-dict file), the path
of a rewriter artifact or a ``.pt2`` program) is deep-copied into the distiller and
**frozen**: its parameters become buffers (:func:`rewriter.passes.distill.ie.freeze`), so
``gm.parameters()`` and therefore the optimizer and DDP never see them, while
``state_dict()`` saves them (``<distill>.teacher.*``); it always stays in eval mode
(``gm.train()`` does not reach it) and runs under ``torch.no_grad()``, in the student's eval
mode too (so ``aux_losses`` works on validation batches; deploy :func:`strip`). Factory teachers
(``package.module:function``) are refused as options, even with ``--trust-source`` (which
covers the model source, not pass options): a pipeline file must not make us import code;
build such a teacher in Python and use :meth:`Distill.with_teacher`. The
feature methods trace the teacher and tap it by qualified node or module name
(``teacher_tap``; default, like ``student_tap``: the last 4-D feature map that feeds a
global pooling or a flatten, i.e. the last map before global pooling). IE-KD's
trainable parts (the student's encoders) *are* parameters: they train with the student and
are dropped by :func:`strip`.

Save and load: ``rewriter.save`` stores the rewritten graph as data, so the artifact holds
the distiller and the frozen teacher (its tensors and, for torch, zoo and rewriter classes,
its structure), whichever way the teacher was given; ``rewriter.load`` rebuilds it without
the original teacher. A teacher of a class of your own is not stored as data (it is user
code): load such an artifact with ``rewriter.load(path, model=gm)``, ``gm`` holding the
teacher at the same name (the distilled model of your script), or save :func:`strip` (the
plain student). DDP: the teacher's buffers are broadcast from rank 0 with the other
buffers (``broadcast_buffers=True``); they are identical on every rank anyway.

``rewriter.analysis.flops`` counts the student only, and the channel analysis does not look
inside the distiller (the channels it reads are not prunable): analyse and slim :func:`strip`.
Running the pass on a model that already has a distiller is a no-op (noted in the report).
Helpers: :func:`distiller`, :func:`strip`, :func:`self_teacher`, :func:`pretrain_autoencoder`;
IE-DML (two students, each the other's teacher) is :class:`MutualIE` in
:mod:`rewriter.passes.distill.dml`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, fx, nn

from rewriter.context import RewriteContext
from rewriter.errors import OptionError, RewriterError
from rewriter.frontends import is_hf_model
from rewriter.modules import RewriterModule
from rewriter.registry import (
    Pass,
    Range,
    anything,
    choices,
    integer,
    make_pass,
    nonnegative,
    option,
    positive,
    register,
    unit_interval,
)

from . import ie, losses
from .ie import (
    AutoEncoder,
    Encoder,
    batch_inputs,
    freeze,
    latent_channels,
    match_size,
    split_channels,
    thaw,
)
from .losses import Reduction
from .taps import default_tap, find_tap, label, shape_of, tapped

__all__ = [
    "DEFAULTS",
    "Distill",
    "Distiller",
    "default_tap",
    "distiller",
    "find_tap",
    "losses",
    "pretrain_autoencoder",
    "self_teacher",
    "strip",
]

Method = Literal["hinton", "tf_self", "tf_reg", "ie", "feature"]
Exploration = Literal["neg_l1", "abs_cos"]
LOGIT_METHODS = ("hinton", "tf_self", "tf_reg")
FEATURE_METHODS = ("ie", "feature")

DEFAULTS: dict[str, dict[str, Any]] = {
    "hinton": {"alpha": 0.9, "temperature": 4.0, "multiplier": 1.0, "reduction": "batchmean"},
    "tf_self": {"alpha": 0.95, "temperature": 6.0, "multiplier": 50.0, "reduction": "mean"},
    "tf_reg": {"alpha": 0.1, "temperature": 20.0, "multiplier": 1.0, "reduction": "batchmean"},
    "ie": {"alpha": 0.0, "temperature": 1.0, "multiplier": 1.0, "reduction": "batchmean"},
    "feature": {"alpha": 0.0, "temperature": 1.0, "multiplier": 1.0, "reduction": "batchmean"},
}
"""Per-method defaults of the options left unset (``None``)."""


class Distiller(RewriterModule):
    """``(inputs, logits, taps) -> logits``; runs the frozen teacher and keeps the last forward.

    Submodules: ``teacher`` (frozen: buffers only, eval mode; absent for ``tf_reg``); for the
    feature methods also ``autoencoder`` (frozen after :func:`pretrain_autoencoder`) and the
    student's trainable encoders ``inherit`` and ``explore`` (``ie``) or ``encoder``
    (``feature``). ``aux_loss(targets=y)`` is the method's loss of the last forward.
    """

    AUX_LOSS_KEYS: ClassVar[frozenset[str]] = frozenset({"targets"})

    def __init__(
        self,
        method: str,
        teacher: nn.Module | None,
        *,
        alpha: float,
        temperature: float,
        multiplier: float,
        reduction: Reduction,
        inherit_weight: float = 1.0,
        explore_weight: float = 1.0,
        exploration: str = "neg_l1",
        teacher_channels: int = 0,
        student_channels: int = 0,
        latent_ratio: float = 0.5,
        class_dim: int = 1,
        ignore_index: int = losses.IGNORE_INDEX,
        logits_key: str = "logits",
    ) -> None:
        super().__init__()
        losses.check_class_dim(class_dim)
        self.method = method
        self.class_dim = class_dim
        self.ignore_index = ignore_index
        self.logits_key = logits_key
        self.alpha = alpha
        self.temperature = temperature
        self.multiplier = multiplier
        self.reduction = reduction
        self.inherit_weight = inherit_weight
        self.explore_weight = explore_weight
        self.exploration = exploration
        self.teacher = freeze(teacher) if teacher is not None else None
        self.split: tuple[int, int] = (0, 0)
        if method in FEATURE_METHODS:
            latent = latent_channels(teacher_channels, latent_ratio)
            self.autoencoder = freeze(AutoEncoder(teacher_channels, latent))
            self.register_buffer("autoencoder_trained", torch.zeros((), dtype=torch.bool))
            if method == "ie":
                self.split = split_channels(student_channels)
                if min(self.split) < 1:
                    raise RewriterError(
                        f"IE-KD splits the student's tapped map into two halves; it has only "
                        f"{student_channels} channel(s). Tap a wider feature map (student_tap=...)"
                    )
                self.inherit = Encoder(self.split[0], latent)
                self.explore = Encoder(self.split[1], latent)
            else:
                self.encoder = Encoder(student_channels, latent)
        self.last_logits: Tensor | None = None
        self.last_teacher_logits: Tensor | None = None
        self.last_teacher_code: Tensor | None = None
        self.last_codes: tuple[Tensor, ...] | None = None

    def train(self, mode: bool = True) -> Distiller:
        """Train or eval the student's parts; the teacher and the auto-encoder stay in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        if hasattr(self, "autoencoder"):
            self.autoencoder.eval()
        return self

    def forward(
        self, inputs: tuple[Tensor, ...], logits: Tensor, taps: tuple[Tensor, ...]
    ) -> Tensor:
        if self.teacher is not None:
            with torch.no_grad():
                out = self.teacher(*inputs)
            if self.method in FEATURE_METHODS:
                out, teacher_feature = out
                with torch.no_grad():
                    code = self.autoencoder.encoder(teacher_feature)
                self.last_teacher_code = code
                self.last_codes = self._student_codes(taps[0], code)
            self.last_teacher_logits = _first(out, self.logits_key)
        self.last_logits = logits
        return logits

    def _student_codes(self, feature: Tensor, teacher_code: Tensor) -> tuple[Tensor, ...]:
        if self.method == "ie":
            inherit, explore = torch.split(feature, list(self.split), dim=1)
            return (
                match_size(self.inherit(inherit), teacher_code),
                match_size(self.explore(explore), teacher_code),
            )
        return (match_size(self.encoder(feature), teacher_code),)

    # -- losses (the library-wide protocol) ------------------------------------------------
    def aux_loss(self, **context: Any) -> Tensor:
        """The method's loss of the last forward (see the module docstring for each formula)."""
        logits = self._last("last_logits")
        if self.method in FEATURE_METHODS:
            return self._feature_loss()
        targets = context.get("targets")
        if targets is None:
            raise RewriterError(
                f"distill ({self.method}) needs the labels: rewriter.aux_losses(gm, targets=y)"
            )
        a, m = self.alpha, self.multiplier
        dims = {"class_dim": self.class_dim, "ignore_index": self.ignore_index}
        try:
            if self.method == "tf_reg":
                soft = losses.tf_reg_term(logits, targets, self.temperature, self.reduction, **dims)
            else:
                teacher = self._last("last_teacher_logits")
                soft = losses.kd_term(
                    logits, teacher, self.temperature, self.reduction, targets=targets, **dims
                )
            ce = losses.cross_entropy(logits, targets, **dims)
        except ValueError as exc:  # labels that do not fit the logits
            raise RewriterError(f"distill ({self.method}): {exc}") from exc
        return a * m * soft - a * ce

    def _feature_loss(self) -> Tensor:
        if not torch.compiler.is_compiling() and not bool(self.autoencoder_trained):
            raise RewriterError(
                f"distill ({self.method}): the teacher's auto-encoder is untrained; call "
                "rewriter.passes.distill.pretrain_autoencoder(gm, batches) before training"
            )
        codes = self._last("last_codes")
        teacher = self._last("last_teacher_code")
        loss = self.inherit_weight * losses.normalized_l1(codes[0], teacher)
        if self.method == "ie":
            loss = loss + self.explore_weight * losses.exploration_loss(
                codes[1], teacher, self.exploration
            )
        return loss

    def _last(self, attr: str) -> Any:
        value = getattr(self, attr)
        if value is None:
            raise RewriterError(
                "the distilled model has not run a forward yet; call it on a batch before "
                "asking for its losses"
            )
        return value

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()  # last_* carry autograd graphs: neither copied nor pickled
        for attr in ("last_logits", "last_teacher_logits", "last_teacher_code", "last_codes"):
            state[attr] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, alpha={self.alpha}, temperature={self.temperature}, "
            f"multiplier={self.multiplier}, reduction={self.reduction!r}, "
            f"class_dim={self.class_dim}"
        )


@register
@dataclass(frozen=True)
class Distill(Pass):
    """student(x) => student(x) with a frozen teacher inside; KD losses via aux_losses(gm, targets=y).

    Options: ``method`` (``hinton``, ``tf_self``, ``tf_reg``, ``ie``, ``feature``), the
    teacher (``teacher`` string or :meth:`with_teacher`), ``alpha``, ``temperature``,
    ``multiplier``, ``reduction`` (``None``: the method's default, :data:`DEFAULTS`), the
    taps and the IE-KD weights. Outputs preserved; adds ``<logits>_distill``.
    """

    name = "distill"
    preserves_outputs = True

    method: Method = option(
        "hinton", "hinton | tf_self | tf_reg | ie | feature", choices(*get_args(Method))
    )
    teacher: str = option(
        "",
        "teacher model: zoo:NAME, or an artifact/.pt2 path; empty: given from Python "
        "(Distill.with_teacher) or none (tf_reg)",
        anything(),
    )
    teacher_weights: str = option(
        "", "weights file (safetensors or state dict) for a zoo teacher", anything()
    )
    alpha: float | None = option(
        None,
        "weight a of the soft term; default by method (0.9, 0.95, 0.1)",
        unit_interval(),
    )
    temperature: float | None = option(
        None, "softmax temperature T; default by method (4, 6, 20)", positive()
    )
    multiplier: float | None = option(
        None,
        "Tf-KD multiplier m on the soft term; default by method (1, 50, 1)",
        nonnegative(),
    )
    reduction: Literal["batchmean", "mean"] | None = option(
        None,
        "KL reduction: batchmean (per sample) or mean (over batch x classes); default by method",
        choices("batchmean", "mean"),
    )
    student_tap: str = option(
        "", "student feature map (node or module name); empty: last map before pooling", anything()
    )
    teacher_tap: str = option(
        "", "teacher feature map (node or module name); empty: last map before pooling", anything()
    )
    inherit_weight: float = option(1.0, "IE-KD / feature: weight of L_inh", nonnegative())
    explore_weight: float = option(1.0, "IE-KD: weight of L_exp", nonnegative())
    exploration: Exploration = option(
        "neg_l1",
        "IE-KD L_exp: neg_l1 (-L_inh) or abs_cos (mean |cos|)",
        choices(*get_args(Exploration)),
    )
    latent_ratio: float = option(
        0.5,
        "IE-KD / feature: code channels = round(ratio * teacher channels)",
        Range(0, 4, low_open=True),
    )
    logits_key: str = option(
        "logits",
        "the logits' key when the model returns a dict (Hugging Face ModelOutput); "
        "a tuple output's logits are its first element",
        anything(),
    )
    class_dim: int | None = option(
        None,
        "the logits' class dim: 1 for (N, C, ...), -1 for (B, S, V) language-model logits; "
        "empty: -1 for a dict output (unless its logits are 4-D or more), else 1",
        choices(1, -1),
    )
    ignore_index: int = option(
        -100,
        "labels of positions that do not count (class_dim=-1; the CE ignores them always)",
        integer(),
    )

    def __post_init__(self) -> None:
        if self.method not in DEFAULTS:
            raise ValueError(f"method must be one of {list(DEFAULTS)}, got {self.method!r}")
        for key, value in DEFAULTS[self.method].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        for key in ("multiplier", "inherit_weight", "explore_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if not 0.0 < self.latent_ratio <= 4.0:
            raise ValueError(f"latent_ratio must be in (0, 4], got {self.latent_ratio}")
        if self.class_dim is not None and self.class_dim not in (1, -1):
            raise ValueError(f"class_dim must be 1 or -1, got {self.class_dim!r}")
        if self.reduction not in ("batchmean", "mean"):
            raise ValueError(f"reduction must be 'batchmean' or 'mean', got {self.reduction!r}")
        if self.method == "tf_reg" and self.teacher:
            raise ValueError("tf_reg uses a virtual teacher; do not give a teacher")
        if self.teacher and _is_factory(self.teacher):
            raise ValueError(_FACTORY_REFUSED.format(spec=self.teacher))
        if self.teacher and _unknown_zoo_name(self.teacher):
            raise ValueError(f"teacher {self.teacher!r} is not a zoo model (rewriter.zoo.names())")
        if self.teacher_weights and not self.teacher:
            raise ValueError("teacher_weights needs a teacher option (zoo:NAME)")

    @classmethod
    def with_teacher(cls, teacher: nn.Module, /, **options: Any) -> Distill:
        """This pass with a teacher module from Python (deep-copied and frozen at rewrite time).

        ``rewriter.save`` stores the teacher with the graph when its class is a torch, zoo
        or rewriter class; a teacher of your own class needs ``rewriter.load(path, model=gm)``.
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"with_teacher expects an nn.Module, got {type(teacher).__name__}")
        if options.get("teacher"):
            raise OptionError(
                "give the teacher either as a module or as the 'teacher' option, not both"
            )
        if options.get("method") == "tf_reg":
            raise OptionError(
                "tf_reg uses a virtual teacher; use ('distill', {'method': 'tf_reg'})"
            )
        the_pass = make_pass((cls.name, options))
        object.__setattr__(the_pass, "_teacher_module", teacher)
        return the_pass  # type: ignore[return-value]

    # -- the rewrite ----------------------------------------------------------------------
    def apply(self, gm: fx.GraphModule, ctx: RewriteContext) -> None:
        if any(isinstance(m, Distiller) for m in gm.modules()):
            ctx.note("the model already has a distill module: nothing done")
            return
        teacher = self._teacher()
        nodes = list(gm.graph.nodes)
        inputs = [n for n in nodes if n.op == "placeholder"]
        output = next(n for n in nodes if n.op == "output")
        logits = _logits_node(output, self.logits_key)
        class_dim = self._class_dim(output.args[0], logits)
        if self.method in FEATURE_METHODS and class_dim == -1:
            raise RewriterError(
                f"distill ({self.method}) taps a 4-D conv feature map (N, C, H, W) and has no "
                "form for classes-last logits (class_dim=-1, e.g. language-model logits "
                "(B, S, V)); use method='hinton', 'tf_self' or 'tf_reg' there"
            )
        dummy = _dummy_inputs(inputs)
        if teacher is not None and is_hf_model(teacher):
            teacher = _lift_teacher(teacher, inputs, dummy)
            ctx.note("teacher: a Hugging Face model, exported and lifted like the student")
        taps: tuple[fx.Node, ...] = ()
        sizes: dict[str, Any] = {}
        if self.method in FEATURE_METHODS:
            if dummy is None:
                raise RewriterError(
                    f"distill ({self.method}) needs example inputs to size its encoders: "
                    "give example_inputs to rewrite()"
                )
            student_tap = find_tap(gm, self.student_tap)
            teacher, teacher_tap_shape = tapped(teacher, self.teacher_tap, dummy)
            taps = (student_tap,)
            sizes = {
                "teacher_channels": teacher_tap_shape[1],
                "student_channels": shape_of(student_tap)[1],
                "latent_ratio": self.latent_ratio,
            }
            ctx.note(
                f"taps: student {label(student_tap)} {tuple(shape_of(student_tap))}, teacher "
                f"{tuple(teacher_tap_shape)}"
            )
        elif teacher is not None and dummy is not None:
            _check_teacher_output(teacher, dummy, logits, self.logits_key)
        module = Distiller(
            self.method,
            teacher,
            alpha=self.alpha,
            temperature=self.temperature,
            multiplier=self.multiplier,
            reduction=self.reduction,
            inherit_weight=self.inherit_weight,
            explore_weight=self.explore_weight,
            exploration=self.exploration,
            class_dim=class_dim,
            ignore_index=self.ignore_index,
            logits_key=self.logits_key,
            **sizes,
        )
        name = ctx.add_module(logits, "distill", module)
        with gm.graph.inserting_before(output):
            node = ctx.call_module(name, (tuple(inputs), logits, taps))
        out = output.args[0]
        if out is logits:
            new_out: Any = node
        elif isinstance(out, Mapping):  # same keys, same order; only the logits go through
            new_out = {k: node if k == self.logits_key else v for k, v in out.items()}
        else:
            new_out = type(out)([node, *out[1:]])
        output.args = (new_out,)
        if isinstance(out, Mapping):
            ctx.note(f"logits: output key {self.logits_key!r}, class dim {class_dim}")
        ctx.matches["distill"] += 1

    def _class_dim(self, out: Any, logits: fx.Node) -> int:
        if self.class_dim is not None:
            return self.class_dim
        if not isinstance(out, Mapping):
            return 1
        shape = getattr(logits.meta.get("tensor_meta"), "shape", None)
        return 1 if shape is not None and len(shape) >= 4 else -1

    def _teacher(self) -> nn.Module | None:
        module = getattr(self, "_teacher_module", None)
        if module is not None:
            return copy.deepcopy(module)
        if self.teacher:
            return load_teacher(self.teacher, self.teacher_weights)
        if self.method == "tf_reg":
            return None
        raise RewriterError(
            f"distill ({self.method}) needs a teacher: in Python use "
            "Distill.with_teacher(teacher_module, ...) as the pass; in a pipeline or on the "
            "command line give teacher = 'zoo:NAME' (with teacher_weights) or an artifact path"
        )


_FACTORY_REFUSED = (
    "teacher {spec!r} names a factory; a pass option cannot import code. Build the teacher "
    "in Python and use Distill.with_teacher(teacher, ...), or save it as an artifact "
    "(rewriter.save) and give its path"
)


def _is_factory(spec: str) -> bool:
    from rewriter import io

    spec = spec.strip()
    return not (spec.startswith("zoo:") or ":" not in spec or io.is_file_source(spec))


def _unknown_zoo_name(spec: str) -> bool:
    from rewriter import io, zoo

    spec = spec.strip()
    if not spec.startswith("zoo:") and (":" in spec or io.is_file_source(spec)):
        return False
    return spec.removeprefix("zoo:") not in zoo.names()


def load_teacher(spec: str, weights: str = "") -> nn.Module:
    """The teacher named by a ``teacher`` option: a zoo model or a model file, never a factory."""
    from rewriter import io

    spec = spec.strip()
    if _is_factory(spec):
        raise RewriterError(_FACTORY_REFUSED.format(spec=spec))
    teacher = io.resolve_source(spec)
    if weights:
        state = io.load_weights(weights)
        try:
            teacher.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise RewriterError(f"teacher weights {weights} do not fit {spec}: {exc}") from exc
    return teacher


# -- helpers on the graph ------------------------------------------------------------------


def _logits_node(output: fx.Node, key: str = "logits") -> fx.Node:
    out = output.args[0]
    if isinstance(out, fx.Node):
        return out
    if isinstance(out, Mapping):
        if key not in out:
            raise RewriterError(
                f"distill reads the logits at key {key!r} of the model's dict output; it has "
                f"the keys {list(out)}: set logits_key to one of them"
            )
        node = out[key]
        if not isinstance(node, fx.Node):
            raise RewriterError(f"the model's output {key!r} is not a tensor ({node!r})")
        return node
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], fx.Node):
        return out[0]
    raise RewriterError(
        "distill needs a model that returns its logits (a tensor, a tuple whose first "
        f"element is the logits, or a dict with them at logits_key); this one returns "
        f"{type(out).__name__}"
    )


def _first(out: Any, key: str = "logits") -> Any:
    """A model's logits: its output, its dict output's ``key``, or a tuple's first element."""
    if isinstance(out, Mapping):  # dict or Hugging Face ModelOutput
        if key not in out:
            raise RewriterError(
                f"the teacher's dict output has no {key!r} (keys: {list(out)}); the teacher "
                "must return its logits under the student's logits_key"
            )
        return out[key]
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _lift_teacher(
    teacher: nn.Module, inputs: Sequence[fx.Node], dummy: tuple[Tensor, ...] | None
) -> nn.Module:
    """A Hugging Face teacher exported and lifted with the student's inputs as keywords.

    The distiller calls the teacher with the student graph's positional inputs; a Hugging
    Face ``forward`` takes keywords in its own order, so the teacher is exported with the
    student's placeholder names as keywords (``input_ids``, ``attention_mask``...), which
    fixes its input order to the student's. Token inputs are filled with ones. The export
    is dynamic (batch, sequence length) unless the student's own export was static (its
    placeholders' recorded shapes hold no symbolic sizes).
    """
    from rewriter.frontends import export_graph

    if dummy is None:
        raise RewriterError(
            "distill needs example inputs to export a Hugging Face teacher: give "
            "example_inputs to rewrite()"
        )
    names = [n.name for n in inputs]
    example = {
        name: x if x.is_floating_point() else torch.ones_like(x)
        for name, x in zip(names, dummy, strict=True)
    }
    vals = [n.meta.get("val") for n in inputs]
    static = all(
        v is not None and not any(isinstance(d, torch.SymInt) for d in getattr(v, "shape", ()))
        for v in vals
    )
    lifted, _ = export_graph(teacher, (), example, dynamic=not static)
    got = [n.name for n in lifted.graph.nodes if n.op == "placeholder"]
    if got != names:
        raise RewriterError(
            f"the lifted teacher takes the inputs {got}, the student {names}; they must match"
        )
    return lifted


def _dummy_inputs(inputs: Sequence[fx.Node]) -> tuple[Tensor, ...] | None:
    metas = [n.meta.get("tensor_meta") for n in inputs]
    if not metas or any(m is None or not hasattr(m, "shape") for m in metas):
        return None
    return tuple(torch.zeros(m.shape, dtype=m.dtype) for m in metas)


def _check_teacher_output(
    teacher: nn.Module, inputs: tuple[Tensor, ...], logits: fx.Node, key: str = "logits"
) -> None:
    meta = logits.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return
    teacher.eval()
    with torch.no_grad():
        out = _first(teacher(*inputs), key)
    if not isinstance(out, Tensor) or out.shape != meta.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RewriterError(
            f"the teacher returns {got} on the example inputs, the student's logits are "
            f"{tuple(meta.shape)}; they must match"
        )


# -- training-time functions ---------------------------------------------------------------


def distiller(gm: nn.Module) -> Distiller:
    """The :class:`Distiller` the ``distill`` pass inserted into ``gm``."""
    found = [m for m in gm.modules() if isinstance(m, Distiller)]
    if not found:
        raise RewriterError("this model has no distill module; rewrite it with the 'distill' pass")
    return found[0]


def strip(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` without the distiller: the plain student (teacher and encoders dropped)."""
    work = copy.deepcopy(gm)
    for node in list(work.graph.nodes):
        if node.op == "call_module" and isinstance(work.get_submodule(str(node.target)), Distiller):
            node.replace_all_uses_with(node.args[1])
            work.graph.erase_node(node)
            work.delete_submodule(str(node.target))
    work.graph.lint()
    work.recompile()
    return work


def self_teacher(trained: nn.Module) -> nn.Module:
    """Tf-KD self's teacher: a frozen eval-mode copy of a normally trained student."""
    if isinstance(trained, fx.GraphModule) and any(
        isinstance(m, Distiller) for m in trained.modules()
    ):
        trained = strip(trained)
    return freeze(copy.deepcopy(trained))


def pretrain_autoencoder(
    gm: nn.Module, batches: Iterable[Any], *, epochs: int = 20, lr: float = 1e-3
) -> list[float]:
    """Train the IE-KD teacher's auto-encoder to reconstruct the teacher's tapped map; freeze it.

    ``batches`` are input tensors or ``(x, y)`` tuples. Returns the mean reconstruction
    loss (MSE) of each epoch. The trained weights are copied into the distiller's frozen
    auto-encoder (buffers), which then stays fixed while the student trains.
    """
    d = distiller(gm)
    if d.method not in FEATURE_METHODS:
        raise RewriterError(f"distill ({d.method}) has no auto-encoder; only 'ie' and 'feature' do")
    with torch.no_grad():
        features = [d.teacher(*batch_inputs(b))[1] for b in batches]
    trainable = thaw(d.autoencoder)
    history = ie.train_autoencoder(trainable, features, epochs=epochs, lr=lr)
    d.autoencoder.load_state_dict(trainable.state_dict())
    d.autoencoder_trained.fill_(True)
    return history
