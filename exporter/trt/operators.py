"""Which operators of an ONNX graph TensorRT's ONNX parser takes: checked here, before anyone rents a GPU.

    check = check_graph("artifact/model.onnx")   # or a loaded onnx.ModelProto
    check.ok, check.unsupported                   # {"com.microsoft::MatMulNBits": "why", ...}
    check.to_dict()                               # for the manifest (BuildPlan.operators)
    check.table()                                 # for the log

The table is onnx_trt_operators.txt beside this module: the operator support matrix of onnx-tensorrt,
TensorRT's ONNX parser (onnx-tensorrt's docs/operators.md of TensorRT 11.1; the file's
header gives the commit, the TensorRT version it documents and the date it was copied).

An operator is unsupported when
- its domain is not ONNX's ("" or "ai.onnx"). The parser has importers for ONNX operators only (it looks a
  node up by type alone and tries a TensorRT plugin of that name when none matches), so ONNX Runtime's
  com.microsoft operators (MatMulNBits, SkipSimplifiedLayerNormalization, ...) are not parsed; one that
  shares a name with an ONNX operator would be imported with the ONNX operator's meaning, so it is
  reported too;
- it is not in the table (not an ONNX operator, e.g. SimplifiedLayerNormalization, which ONNX Runtime
  registers in the ONNX domain, or one newer than the table);
- or the table marks it N.

The main graph, every subgraph (If, Loop, Scan) and the bodies of the model's local functions (the parser
imports them) are walked. The table's restrictions (e.g. "`axes` must be an initializer") are reported for
the operators present, not checked; neither are element types. The weights are not read.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

TABLE_PATH = Path(__file__).parent / "onnx_trt_operators.txt"
ONNX_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class OpSupport:
    """One row of the table."""

    name: str
    supported: bool
    types: tuple[str, ...]
    restrictions: str


def load_table(path: str | Path | None = None) -> dict[str, OpSupport]:
    """The table (by default the one shipped beside this module): operator name -> OpSupport."""
    path = Path(path) if path is not None else TABLE_PATH
    table: dict[str, OpSupport] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) != 4 or fields[1] not in ("Y", "N") or fields[0] in table:
            raise ValueError(f"{path}:{number}: expected a new operator, Y or N, its types and its restrictions, "
                             f"separated by tabs; got {line!r}")
        name, flag, types, restrictions = fields
        table[name] = OpSupport(name, flag == "Y", tuple(t.strip() for t in types.split(",") if t.strip()),
                                restrictions.strip())
    return table


def table_source(path: str | Path | None = None) -> dict[str, str]:
    """The table's provenance from its header ("# key: value" lines): source, commit, tensorrt, opsets, copied."""
    path = Path(path) if path is not None else TABLE_PATH
    header = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = re.match(r"# (source|commit|tensorrt|opsets|copied): (.*)", line)
        if match:
            header[match[1]] = match[2].strip()
    return header


@dataclass
class OperatorCheck:
    """The operators of one graph against the table. Operators outside ONNX's domain are named domain::type."""

    counts: dict[str, int]  # operator -> nodes, most frequent first
    unsupported: dict[str, str]  # operator -> why TensorRT's parser does not take it
    restrictions: dict[str, str] = field(default_factory=dict)  # supported operator present -> the doc's restriction
    opset: int | None = None  # the graph's ONNX (default domain) opset
    notes: list[str] = field(default_factory=list)
    source: dict[str, str] = field(default_factory=dict)  # the table's provenance

    @property
    def ok(self) -> bool:
        return not self.unsupported

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def table(self) -> str:
        width = max([len(op) for op in self.counts] + [len("operator")])
        lines = [f"{'operator':<{width}}  {'nodes':>5}  TensorRT {_version(self.source)}"]
        for op, count in self.counts.items():
            if op in self.unsupported:
                status = f"UNSUPPORTED: {self.unsupported[op]}"
            else:
                status = "ok" + (f" ({self.restrictions[op]})" if op in self.restrictions else "")
            lines.append(f"{op:<{width}}  {count:>5}  {status}")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def check_graph(model: str | Path | onnx.ModelProto, table: dict[str, OpSupport] | None = None) -> OperatorCheck:
    """Check every operator of `model` (a path to an .onnx file or a ModelProto) against the table."""
    if not isinstance(model, onnx.ModelProto):
        model = _load(Path(model))
    table = table if table is not None else load_table()
    source = table_source()
    functions = {(_domain(f.domain), f.name): f for f in model.functions}
    counts: Counter = Counter()
    _count(model.graph.node, functions, counts, set())

    unsupported, restrictions = {}, {}
    for (domain, op_type), _ in counts.most_common():
        key = _key(domain, op_type)
        row = table.get(op_type)
        if domain == "com.microsoft":
            unsupported[key] = ("an ONNX Runtime contrib operator (domain com.microsoft): TensorRT parses ONNX "
                                "operators only; export with --target trt")
        elif domain:
            unsupported[key] = f"domain {domain}: TensorRT parses ONNX operators only (or a TensorRT plugin by name)"
        elif row is None:
            unsupported[key] = "not in TensorRT's ONNX operator table (not a standard ONNX operator, or a newer one)"
        elif not row.supported:
            unsupported[key] = "marked N (unsupported) in TensorRT's ONNX operator table"
        elif row.restrictions:
            restrictions[key] = row.restrictions

    opset = next((o.version for o in model.opset_import if _domain(o.domain) == ""), None)
    notes = []
    low, _, high = source.get("opsets", "").partition("-")
    if opset is not None and low.isdigit() and high.isdigit() and not int(low) <= opset <= int(high):
        notes.append(f"ONNX opset {opset} is outside opsets {low}..{high} that the table documents for TensorRT "
                     f"{_version(source)}; the parser does not refuse a newer opset, but an operator's newer form "
                     "may not import")
    check = OperatorCheck({_key(*k): n for k, n in counts.most_common()}, unsupported, restrictions, opset, notes,
                          source)
    if check.unsupported:
        log.warning("operators TensorRT's ONNX parser does not support: %s",
                    "; ".join(f"{op} ({check.counts[op]} nodes): {why}" for op, why in unsupported.items()))
    else:
        log.info("all %d operator types (%d nodes) are in TensorRT's ONNX operator table",
                 len(check.counts), sum(check.counts.values()))
    for note in notes:
        log.warning(note)
    return check


def _load(path: Path) -> onnx.ModelProto:
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass the ONNX file itself (e.g. {path / 'model.onnx'})")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the model.onnx of an exported artifact")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise ValueError(f"{path} is not an ONNX model ({type(e).__name__}: {e}); pass the model.onnx that "
                         "gemma-export wrote") from e
    if not model.ir_version or not model.HasField("graph"):
        raise ValueError(f"{path} is not an ONNX model (no IR version or graph in it); pass the model.onnx that "
                         "gemma-export wrote")
    return model


def _count(nodes, functions: dict, counts: Counter, calling: set) -> None:
    """Count (domain, op_type) over `nodes`, their subgraphs and the local functions they call."""
    for node in nodes:
        key = (_domain(node.domain), node.op_type)
        function = functions.get(key)
        if function is not None and key not in calling:  # the parser imports the body of a local function
            _count(function.node, functions, counts, calling | {key})
            continue
        counts[key] += 1
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                _count(attribute.g.node, functions, counts, calling)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for graph in attribute.graphs:
                    _count(graph.node, functions, counts, calling)


def _version(source: dict[str, str]) -> str:
    return (source.get("tensorrt") or "?").split()[0]


def _domain(domain: str) -> str:
    return "" if domain in ONNX_DOMAINS else domain


def _key(domain: str, op_type: str) -> str:
    return f"{domain}::{op_type}" if domain else op_type
