"""A gate in front of ``torch.export.load``: a ``.pt2`` archive is checked as data first.

``torch.export.load`` trusts its input: symbolic shape expressions in the archive's
JSON reach ``sympy.sympify`` (which evaluates them with ``eval``), guard strings are
compiled into Python by ``ExportedProgram.module()``, node targets are looked up by
name under ``torch``, some entries are unpickled, and its zip reader may pick a
different copy of a duplicated entry than Python's ``zipfile`` does. :func:`check`
refuses, before torch reads anything:

* anything that is not a regular file, or not a zip archive with one root folder;
* entry names that are duplicated (also ignoring case, as torch's reader matches
  names case-insensitively), absolute, contain ``..``, backslashes or control
  characters, or are not part of the layout ``torch.export.save`` writes;
* compressed entries (``torch.export.save`` stores entries uncompressed; a
  compressed one could be a zip bomb) and JSON entries above :data:`MAX_JSON_BYTES`;
* entries torch would unpickle beyond plain tensors (legacy ``.pt`` weights,
  ``use_pickle`` configs, custom objects, AOTInductor code, the pre-2.8 layout);
  sample inputs are accepted only when ``torch.load(weights_only=True)`` reads them;
* every symbolic expression (``expr_str``) that is not in a strict grammar: calls
  of the sympy/torch functions torch writes (``Symbol``, ``Integer``, ``Mul``,
  ``Add``, ``FloorDiv``, ``Mod``, ``CeilDiv``, ``Max``, ``Min``, ``PythonMod``, ...),
  symbol names, integer and float literals, arithmetic and comparisons, with
  bounded size, depth and exponents;
* every guard (``guards_code``) outside a grammar of comparisons and arithmetic on
  ``L['name'].size()[i]``, ``.stride()[i]``, ``.storage_offset()``, ``max``/``min``
  and ``math.isnan`` (Python syntax, checked with :mod:`ast`);
* node targets other than ``torch.ops.<namespace>.<op>.<overload>`` in the
  namespaces torch's own programs use, the ``_operator`` and ``math`` functions on
  shapes, and torch's ``sym_*`` functions.

``trust_pickle=True`` (CLI ``--trust-pickle``) trusts the whole archive: only the
structural checks that protect the checker itself (regular file, zip, duplicates)
still run. Failures raise :class:`~rewriter.errors.UnsafeFileError` naming the
entry.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ArtifactError, UnsafeFileError

MAX_JSON_BYTES = 256 << 20
MAX_ENTRIES = 1_000_000
MAX_EXPR_CHARS = 10_000
MAX_EXPR_DEPTH = 64
MAX_LITERAL = 1 << 64
MAX_EXPONENT = 64

_TOP_FILES = {"archive_format", "archive_version", "byteorder", ".data/version"}
_LAYOUT = [
    re.compile(p)
    for p in (
        r"archive_format",
        r"archive_version",
        r"byteorder",
        r"\.data/version",
        r"\.data/serialization_id",
        r"models/\w+\.json",
        r"data/weights/weight_\d+",
        r"data/weights/\w+_weights_config\.json",
        r"data/constants/tensor_\d+",
        r"data/constants/\w+_constants_config\.json",
        r"data/sample_inputs/\w+\.pt",
    )
]

# The functions torch 2.13 writes into expr_str (sympy's srepr plus
# torch.utils._sympy.functions, as listed by the deserializer).
SYMPY_FUNCTIONS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min",
        "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "StrictLessThan", "LessThan",
        "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "And", "Or", "Not",
        "Piecewise", "ExprCondPair", "true", "false", "BooleanTrue", "BooleanFalse",
        "oo", "zoo", "nan", "Infinity", "NegativeInfinity", "IntInfinity",
        "NegativeIntInfinity", "floor", "ceiling",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt",
        "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow",
        "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat",
        "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
    }
)  # fmt: skip
_POWERS = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift", "RShift"})
_ASSUMPTIONS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero"}
)
_SYMBOL = re.compile(r"[a-z]{1,8}\d{0,12}")
_OP_NAMESPACES = frozenset(
    {"aten", "prims", "higher_order", "_c10d_functional", "c10d_functional", "quantized_decomposed"}
)
_OPERATOR = frozenset(
    {
        "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "pos",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs",
    }
)  # fmt: skip
_DUNDER_OPS = frozenset(
    f"__{i}{name}__" for name in ("and", "or", "xor", "lshift", "rshift") for i in ("", "i")
)  # aten operators named like Python's bitwise dunders
_MATH = frozenset({"ceil", "floor", "sqrt", "trunc", "isnan"})
_TORCH_SYM = frozenset(
    {"sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum"}
)
_GUARD_CALLS = frozenset({"max", "min", "abs", "len"})
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_OPERATOR_NODES: tuple[type, ...] = (
    ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div, ast.USub, ast.UAdd, ast.Not,
    ast.And, ast.Or, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
)  # fmt: skip


def check(path: str | Path, *, trust_pickle: bool = False) -> None:
    """Raise :class:`UnsafeFileError` (or :class:`ArtifactError`) unless ``path`` is a
    ``.pt2`` archive that ``torch.export.load`` can read without running anything
    from it. See the module docstring for what is checked."""
    from .io import regular_file

    path = regular_file(path, ".pt2 file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ArtifactError(f"{path} is not a readable .pt2 archive: {exc}") from exc
    with archive:
        infos = archive.infolist()
        if len(infos) > MAX_ENTRIES:
            raise UnsafeFileError(
                f"refusing to load {path}: {len(infos):,} entries (a .pt2 program has a few "
                f"per tensor; limit {MAX_ENTRIES:,})"
            )
        _check_names(path, [i.filename for i in infos])
        if trust_pickle:
            return
        root = infos[0].filename.split("/", 1)[0] + "/"
        rel = {i.filename[len(root) :]: i for i in infos}
        if "version" in rel or "data.pkl" in rel:
            _refuse(
                path, "version", "uses the pre-2.8 archive layout, which torch loads with pickle"
            )
        for name, info in rel.items():
            if not any(p.fullmatch(name) for p in _LAYOUT):
                what = (
                    "is compiled AOTInductor code"
                    if name.startswith("data/aotinductor/")
                    else "holds pickled custom objects"
                    if "custom_obj" in name
                    else "is not part of the layout torch.export.save writes"
                )
                _refuse(path, name, what)
            if info.compress_type != zipfile.ZIP_STORED:
                _refuse(path, name, "is compressed (torch.export.save stores entries uncompressed)")
        if archive.read(rel["archive_format"]) != b"pt2" if "archive_format" in rel else True:
            raise ArtifactError(f"{path} is not a torch.export archive (no archive_format 'pt2')")
        for name, info in rel.items():
            if name.endswith(".json"):
                _check_json(path, name, _load_json(path, name, archive, info))
            elif name.startswith("data/sample_inputs/"):
                _check_sample_inputs(path, name, archive.read(info))


def _refuse(path: Path, entry: str, what: str) -> None:
    raise UnsafeFileError(
        f"refusing to load {path}: entry {entry!r} {what}. Loading it could run code "
        "from the file. If you trust the file, pass --trust-pickle (Python: trust_pickle=True)"
    )


def _check_names(path: Path, names: list[str]) -> None:
    if not names:
        raise ArtifactError(f"{path} is an empty archive, not a .pt2 program")
    if "version" in names or "data.pkl" in names:
        _refuse(path, "version", "uses the pre-2.8 archive layout, which torch loads with pickle")
    seen: dict[str, str] = {}
    for name in names:
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or "\\" in name
            or any(ord(c) < 32 or ord(c) == 127 for c in name)
            or any(p in ("", ".", "..") for p in parts[:-1])
            or parts[-1] in (".", "..")
        ):
            raise UnsafeFileError(f"refusing {path}: malformed entry name {name!r}")
        key = name.casefold()
        if key in seen:
            raise UnsafeFileError(
                f"refusing {path}: entry {name!r} appears twice"
                + (f" (as {seen[key]!r})" if seen[key] != name else "")
                + "; readers may disagree on which copy counts"
            )
        seen[key] = name
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or any("/" not in n for n in names):
        raise ArtifactError(f"{path} is not a torch.export archive (no single root folder)")


def _load_json(path: Path, name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Any:
    if info.file_size > MAX_JSON_BYTES:
        _refuse(path, name, f"has {info.file_size:,} bytes of JSON (limit {MAX_JSON_BYTES:,})")
    try:
        return json.loads(archive.read(info))
    except RecursionError:
        _refuse(path, name, "holds JSON nested too deeply")
    except (ValueError, UnicodeDecodeError) as exc:
        _refuse(path, name, f"is not valid JSON ({exc})")


def _walk(value: Any, where: str = "") -> Iterator[tuple[str, str, Any]]:
    """(key path, key, value) of every dict entry, depth first, without recursion."""
    stack = [(where, value)]
    while stack:
        here, item = stack.pop()
        if isinstance(item, dict):
            for key, sub in item.items():
                yield f"{here}.{key}", key, sub
                stack.append((f"{here}.{key}", sub))
        elif isinstance(item, list):
            stack.extend((f"{here}[{i}]", sub) for i, sub in enumerate(item))


def _check_json(path: Path, name: str, document: Any) -> None:
    for where, key, value in _walk(document):
        if key == "expr_str":
            problem = expression_problem(value)
            if problem:
                _refuse(
                    path,
                    name,
                    f"holds a symbolic expression outside the grammar at {where} ({problem})",
                )
        elif key == "guards_code":
            for guard in value if isinstance(value, list) else [value]:
                problem = guard_problem(guard)
                if problem:
                    _refuse(path, name, f"holds a guard outside the grammar at {where} ({problem})")
        elif key == "range_constraints" and isinstance(value, dict):
            for symbol, bounds in value.items():
                if not _SYMBOL.fullmatch(str(symbol)) or not _bounds_ok(bounds):
                    _refuse(path, name, f"holds a malformed range constraint {symbol!r}")
        elif key == "target" and isinstance(value, str):
            problem = target_problem(value)
            if problem:
                _refuse(path, name, f"holds a node target {value!r} at {where} ({problem})")
        elif key in ("use_pickle",) and value:
            _refuse(path, name, f"holds pickled data (use_pickle at {where})")
        elif key == "path_name" and isinstance(value, str):
            if not re.fullmatch(r"(weight|tensor)_\d+", value):
                _refuse(path, name, f"holds pickled data (a tensor stored as {value!r} at {where})")


def _bounds_ok(bounds: Any) -> bool:
    if not isinstance(bounds, dict):
        return False
    return all(
        v is None or (isinstance(v, int) and not isinstance(v, bool) and abs(v) <= MAX_LITERAL)
        for v in bounds.values()
    )


def _check_sample_inputs(path: Path, name: str, data: bytes) -> None:
    import io as _io

    import torch

    try:  # the restricted unpickler: what torch tries first, and safe
        torch.load(_io.BytesIO(data), weights_only=True)
    except Exception:
        _refuse(path, name, "holds pickled data beyond plain tensors")


# -- grammars ---------------------------------------------------------------------------------


def _parse(text: Any) -> ast.Expression | str:
    if not isinstance(text, str):
        return f"not a string: {type(text).__name__}"
    if len(text) > MAX_EXPR_CHARS:
        return f"{len(text)} characters, limit {MAX_EXPR_CHARS}"
    if text.count("(") > MAX_EXPR_DEPTH * 8:
        return "too many parentheses"
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "not a well-formed expression"


def _depth_ok(tree: ast.AST) -> bool:
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_EXPR_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return True


def _int_literal(node: ast.AST) -> int | None:
    """The value of ``5``, ``-5`` or ``Integer(5)``, else ``None``."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _int_literal(node.operand)
        return None if inner is None else -inner
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "Integer"
        and len(node.args) == 1
    ):
        return _int_literal(node.args[0])
    return None


def expression_problem(text: Any) -> str | None:
    """``None`` when ``text`` is a symbolic shape expression in the grammar, else why not."""
    tree = _parse(text)
    if isinstance(tree, str):
        return tree
    if not _depth_ok(tree):
        return f"nested deeper than {MAX_EXPR_DEPTH}"
    for node in ast.walk(tree.body):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_FUNCTIONS:
                return f"call of {ast.unparse(node.func)!r}"
            for keyword in node.keywords:
                if keyword.arg not in _ASSUMPTIONS or not (
                    isinstance(keyword.value, ast.Constant)
                    and isinstance(keyword.value.value, bool)
                ):
                    return f"keyword {keyword.arg!r}"
            if node.func.id == "Symbol" and not (
                node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and _SYMBOL.fullmatch(node.args[0].value)
            ):
                return "Symbol without a plain symbol name"
            if node.func.id in _POWERS and len(node.args) == 2:
                exponent = _int_literal(node.args[1])
                base = _int_literal(node.args[0])
                if base is not None and (exponent is None or abs(exponent) > MAX_EXPONENT):
                    return f"{node.func.id} of a constant with a large or unknown exponent"
        elif isinstance(node, ast.Name):
            known = node.id in SYMPY_FUNCTIONS or _SYMBOL.fullmatch(node.id)
            if not known or hasattr(builtins, node.id):
                return f"name {node.id!r}"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, str):
                if not (_SYMBOL.fullmatch(value) or re.fullmatch(r"[-+0-9.e]{1,40}", value)):
                    return f"string {value!r}"
            elif isinstance(value, int):
                if abs(value) > MAX_LITERAL:
                    return "integer literal too large"
            elif not isinstance(value, float):
                return f"literal {value!r}"
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                exponent = _int_literal(node.right)
                if exponent is None or abs(exponent) > MAX_EXPONENT:
                    return "power with a large or unknown exponent"
            elif isinstance(node.op, (ast.LShift, ast.RShift)):
                return "shift operator"
            elif not isinstance(node.op, _OPERATOR_NODES):
                return f"operator {type(node.op).__name__}"
        elif isinstance(node, (ast.UnaryOp, ast.BoolOp, ast.Compare)):
            ops = node.ops if isinstance(node, ast.Compare) else [node.op]
            if not all(isinstance(op, _OPERATOR_NODES) for op in ops):
                return "operator outside the grammar"
        elif isinstance(node, (ast.keyword, ast.Load, *_OPERATOR_NODES, ast.Pow)):
            continue
        else:
            return f"{type(node).__name__} syntax"
    return None


def guard_problem(text: Any) -> str | None:
    """``None`` when ``text`` is a guard in the grammar torch writes, else why not."""
    tree = _parse(text)
    if isinstance(tree, str):
        return tree
    if not _depth_ok(tree):
        return f"nested deeper than {MAX_EXPR_DEPTH}"
    allowed_children: set[int] = set()
    for node in ast.walk(tree.body):
        if id(node) in allowed_children:
            continue
        if isinstance(node, ast.Subscript):
            if not _input_access(node):
                return f"subscript {ast.unparse(node)!r}"
        elif isinstance(node, ast.Call):
            func = node.func
            if node.keywords:
                return "keyword arguments"
            if isinstance(func, ast.Name) and func.id in _GUARD_CALLS:
                continue
            if (
                isinstance(func, ast.Attribute)
                and isinstance(func.value, ast.Name)
                and func.value.id == "math"
                and func.attr in _MATH
            ):
                allowed_children.update({id(func), id(func.value)})
                continue
            if (
                isinstance(func, ast.Attribute)
                and func.attr in _GUARD_METHODS
                and not node.args
                and _input_access(func.value)
            ):
                allowed_children.add(id(func))
                continue
            return f"call of {ast.unparse(func)!r}"
        elif isinstance(node, ast.Attribute):
            return f"attribute {ast.unparse(node)!r}"
        elif isinstance(node, ast.Name):
            if node.id not in ("L", *_GUARD_CALLS, "inf"):
                return f"name {node.id!r}"
        elif isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, int) and abs(value) > MAX_LITERAL:
                return "integer literal too large"
            if not isinstance(value, (int, float, str, bool)):
                return f"literal {value!r}"
        elif isinstance(node, ast.BinOp):
            if isinstance(node.op, ast.Pow):
                exponent = _int_literal(node.right)
                if exponent is None or abs(exponent) > MAX_EXPONENT:
                    return "power with a large or unknown exponent"
            elif not isinstance(node.op, _OPERATOR_NODES):
                return f"operator {type(node.op).__name__}"
        elif isinstance(node, (ast.UnaryOp, ast.BoolOp, ast.Compare)):
            ops = node.ops if isinstance(node, ast.Compare) else [node.op]
            if not all(isinstance(op, _OPERATOR_NODES) for op in ops):
                return "operator outside the grammar"
        elif isinstance(node, (ast.Load, ast.Pow, *_OPERATOR_NODES)):
            continue
        else:
            return f"{type(node).__name__} syntax"
    return None


def _input_access(node: ast.AST) -> bool:
    """``L['x']``, ``L['x']['k']``, ``L['x'][0]`` or a method result indexed: ``.size()[2]``."""
    while isinstance(node, ast.Subscript):
        key = node.slice
        if not (
            isinstance(key, ast.Constant)
            and (
                (type(key.value) is int and abs(key.value) < 1 << 16)
                or (isinstance(key.value, str) and re.fullmatch(r"\w{1,200}", key.value))
            )
        ):
            return False
        node = node.value
    if isinstance(node, ast.Name):
        return node.id == "L"
    if isinstance(node, ast.Call):
        func = node.func
        return (
            isinstance(func, ast.Attribute)
            and func.attr in _GUARD_METHODS
            and not node.args
            and not node.keywords
            and _input_access(func.value)
        )
    return False


def target_problem(target: str) -> str | None:
    """``None`` for a node target torch's own programs use, else why it is refused."""
    parts = target.split(".")
    if not all(re.fullmatch(r"[A-Za-z_]\w*", p) for p in parts):
        return "not a dotted name"
    if parts[:2] == ["torch", "ops"] and len(parts) in (4, 5) and parts[3] in _DUNDER_OPS:
        parts = [*parts[:3], "op", *parts[4:]]  # aten's bitwise operators (__and__, ...)
    if any(p.startswith("__") for p in parts):
        return "a dunder name"
    if parts[:2] == ["torch", "ops"]:
        if len(parts) not in (4, 5) or parts[2] not in _OP_NAMESPACES:
            return f"operators are torch.ops.<{'|'.join(sorted(_OP_NAMESPACES))}>.<op>.<overload>"
        return None
    if parts[0] == "_operator" and len(parts) == 2 and parts[1] in _OPERATOR:
        return None
    if parts[0] == "math" and len(parts) == 2 and parts[1] in _MATH:
        return None
    if parts[0] == "torch" and len(parts) == 2 and parts[1] in _TORCH_SYM:
        return None
    return "not an operator torch.export writes for these programs"


__all__ = ["check", "expression_problem", "guard_problem", "target_problem"]
