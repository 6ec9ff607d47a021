"""How to generate, typed: `SamplingParams` is the one home of every generation option's default and bounds.

    params = SamplingParams(max_new_tokens=32, temperature=0.7, seed=1)   checked on construction (ParamError)
    params.sampler()                                                       runtime.sampling's sampler for them
    SamplingParams.fields()                                                the table: name, type, default, bounds

The command line's options (`gemma-run generate --temperature ...`), the Python API, the OpenAI protocol's fields
(runtime/serving/protocol.py), the serving scheduler, Triton's inputs and Ray all read this table: a bound is
written once, here, and `check` is the one place a value is refused, with a `ParamError` that names the field
(`param`) and what it accepts. What differs between entry points is only what a caller who leaves a field out
gets (`ENTRY_DEFAULTS`): the OpenAI API's documented defaults for its endpoints, transformers' greedy elsewhere.

Imports the standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_LOGPROBS = 20  # OpenAI's limit on top alternatives
GREEDY_BELOW = 1e-5  # a temperature this small is a point mass at float32's precision: sampled greedily (as vLLM)
MAX_SEED = 2**63 - 1


class ParamError(ValueError):
    """An option out of range or of the wrong type; `param` names it as its table does. The message may name it
    as "{param}": `named(other)` spells it as a caller does (the OpenAI API's max_tokens for max_new_tokens)."""

    code = "invalid_value"

    def __init__(self, param: str, message: str):
        super().__init__(message.replace("{param}", param))
        self.param, self.template = param, message

    def named(self, name: str) -> str:
        return self.template.replace("{param}", name)


@dataclass(frozen=True)
class Bound:
    """What a field accepts: its type, an inclusive or open range, whether None is allowed, and what the
    value that turns it off is (for help texts)."""

    kind: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False
    help: str = ""
    choices: tuple = ()

    def accepts(self) -> str:
        """The accepted values in words: 'a number 0 <= x <= 2'."""
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices)) + (" or null" if self.optional else "")
        what = {int: "an integer", float: "a number", bool: "true or false", tuple: "a list"}.get(
            self.kind, self.kind.__name__)
        low = (">=", self.ge) if self.ge is not None else (">", self.gt) if self.gt is not None else None
        high = ("<=", self.le) if self.le is not None else ("<", self.lt) if self.lt is not None else None
        if low and high:
            flip = {">=": "<=", ">": "<"}[low[0]]
            what += f" {_number(low[1])} {flip} x {high[0]} {_number(high[1])}"
        elif low or high:
            what += f" {(low or high)[0]} {_number((low or high)[1])}"
        return what + (" or null" if self.optional else "")

    def check(self, name: str, value) -> None:
        if value is None:
            if not self.optional:
                raise ParamError(name, f"{{param}} must be {self.accepts()}, got null")
            return
        numeric = self.kind in (int, float)
        if isinstance(value, bool) != (self.kind is bool) or (
                numeric and not isinstance(value, (int, float) if self.kind is float else int)) or (
                self.kind not in (int, float, bool) and not isinstance(value, self.kind)):
            raise ParamError(name, f"{{param}} {value!r} must be {self.accepts()}")
        if self.choices and value not in self.choices:
            raise ParamError(name, f"{{param}} {value!r} is not supported; expected {self.accepts()}")
        if numeric:
            if not math.isfinite(value) or (self.ge is not None and value < self.ge) or (
                    self.gt is not None and value <= self.gt) or (self.le is not None and value > self.le) or (
                    self.lt is not None and value >= self.lt):
                raise ParamError(name, f"{{param}} {value!r} is out of range; expected {self.accepts()}"
                                 + (f" ({self.help})" if self.help else ""))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def option(default, bound: Bound):
    """A dataclass field with its bound as metadata."""
    return field(default=default, metadata={"bound": bound})


class Options:
    """A frozen dataclass of `option` fields, checked when made: the one place its values are refused."""

    def __post_init__(self):
        self.check()

    @classmethod
    def fields(cls) -> dict[str, tuple[object, Bound]]:
        """name -> (default, bound), in declaration order: what the CLI and the protocol build their options from."""
        return {f.name: (f.default, f.metadata["bound"]) for f in dataclasses.fields(cls) if "bound" in f.metadata}

    def check(self) -> None:
        """ParamError for the first field out of range (its name in `param`)."""
        for name, (_, bound) in self.fields().items():
            bound.check(name, getattr(self, name))

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SamplingParams(Options):
    """Greedy unless temperature > 0; top_k 0 (or -1), top_p 1, min_p 0 and repetition_penalty 1 disable their filter.
    Generation ends at an end token (unless ignore_eos), before the first stop string, or after max_new_tokens
    (None: at the end of the context)."""

    max_new_tokens: int | None = option(64, Bound(int, ge=1, optional=True, help="tokens generated at most "
                                                                             "(None: to the end of the context)"))
    temperature: float = option(0.0, Bound(float, ge=0.0, le=2.0, help="0 is greedy"))
    top_k: int = option(0, Bound(int, ge=-1, help="0 or -1 disables it"))
    top_p: float = option(1.0, Bound(float, gt=0.0, le=1.0, help="1 disables it"))
    min_p: float = option(0.0, Bound(float, ge=0.0, lt=1.0, help="0 disables it"))
    repetition_penalty: float = option(1.0, Bound(float, gt=0.0, help="1 disables it"))
    seed: int | None = option(None, Bound(int, ge=0, le=MAX_SEED, optional=True, help="makes sampling repeatable"))
    stop: tuple[str, ...] = option((), Bound(tuple, help=f"up to {MAX_STOP_STRINGS} non-empty strings"))
    ignore_eos: bool = option(False, Bound(bool, help="go on past end tokens, to max_new_tokens"))
    logprobs: int | None = option(None, Bound(int, ge=0, le=MAX_LOGPROBS, optional=True,
                                              help="top alternatives reported per token (None: no log-probabilities)"))

    def __post_init__(self):
        if isinstance(self.stop, list):  # a list, as JSON and most callers give it
            object.__setattr__(self, "stop", tuple(self.stop))
        super().__post_init__()

    def check(self) -> None:
        super().check()
        stop = self.stop
        if len(stop) > MAX_STOP_STRINGS or any(not isinstance(s, str) or not s for s in stop):
            raise ParamError("stop", f"{{param}} {stop!r} must be up to {MAX_STOP_STRINGS} non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def use_history(self) -> bool:
        """Whether the sampler needs the tokens so far (the repetition penalty)."""
        return self.repetition_penalty != 1.0

    def sampler(self):
        """`sample(logits [B, V], history [B, n] | None) -> tokens [B]` (runtime/sampling.py)."""
        from .sampling import Sampler

        return Sampler(self)

    @classmethod
    def from_transformers(cls, max_new_tokens: int | None, do_sample: bool = False, temperature: float = 1.0,
                          top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                          seed: int | None = None, stop_strings=None) -> "SamplingParams":
        """transformers' arguments: greedy unless do_sample (the sampling options are then ignored)."""
        sampled = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p} if do_sample else {}
        return cls(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty, seed=seed,
                   stop=tuple(stop_strings or ()), **sampled)


# What a caller who leaves a field out gets, where it is not SamplingParams' own default: the OpenAI API's documented
# defaults (temperature 1; max_tokens 16 on /v1/completions, the rest of the context in a chat).
ENTRY_DEFAULTS = {
    "completions": {"temperature": 1.0, "max_new_tokens": 16},
    "chat": {"temperature": 1.0, "max_new_tokens": None},
}


BACKENDS = ("auto", "onnxruntime", "tensorrt")  # auto: the TensorRT engine when the artifact has one
PROVIDERS = ("cpu", "cuda", "tensorrt")  # ONNX Runtime's execution providers


@dataclass(frozen=True)
class LoadOptions(Options):
    """How an artifact is opened: `runtime.load(DIR, backend=..., provider=...)`, and every command that loads one."""

    backend: str = option("auto", Bound(str, choices=BACKENDS,
                                        help="auto: the TensorRT engine when the artifact has one, else ONNX Runtime"))
    provider: str = option("cpu", Bound(str, choices=PROVIDERS, help="ONNX Runtime's execution provider (tensorrt: "
                                        "its TensorRT provider, engine cache in the artifact)"))
    allow_cpu_fallback: bool = option(False, Bound(bool, help="run on the CPU if the provider is not usable"))
    threads: int | None = option(None, Bound(int, ge=1, optional=True,
                                             help="ONNX Runtime's intra-op threads (default: one per core)"))
    spin: bool = option(True, Bound(bool, help="ONNX Runtime's threads spin between runs (off: they sleep, so "
                                             "that a draft artifact and its target, run in turn, share the cores)"))
    verify: bool = option(True, Bound(bool, help="check every file's sha256 (about a second per GB)"))
