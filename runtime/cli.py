"""gemma-run: generate, chat and bench on an artifact. Exit codes: 0 ok, 1 runtime failure, 2 usage or
load error, 3 TensorRT or a GPU missing for --backend tensorrt (one line on stderr, no traceback)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import exit_codes
from .manifest import ArtifactError
from .params import LoadOptions, SamplingParams

log = logging.getLogger("gemma-run")


def _table(cls, skip=(), short=None, only=None):
    """click options for the fields of a runtime.params table (SamplingParams, LoadOptions, ServeOptions): each
    field's flag, type, default and help from the table, where its bounds are checked (ParamError) when the command
    makes the options."""
    short = short or {}

    def apply(f):
        for name, (default, bound) in reversed(list(cls.fields().items())):
            if name in skip or (only is not None and name not in only):
                continue
            flags = ["--" + name.replace("_", "-"), *([short[name]] if name in short else [])]
            help = bound.help[:1].upper() + bound.help[1:] + "." if bound.help else None
            if bound.kind is bool and not default:
                f = click.option(*flags, name, is_flag=True, help=help)(f)
            elif bound.kind is bool:
                f = click.option(f"{flags[0]}/--no-{flags[0][2:]}", name, default=True, show_default=True,
                                 help=help)(f)
            elif bound.kind is tuple:
                f = click.option(*flags, name, multiple=True, help=help)(f)
            else:
                kind = click.Choice(bound.choices) if bound.choices else bound.kind
                f = click.option(*flags, name, type=kind, default=default, show_default=default is not None,
                                 help=help)(f)
        return f

    return apply


_sampling_options = _table(SamplingParams, skip=("logprobs",), short={"max_new_tokens": "-n", "temperature": "-t"})
_load_options = _table(LoadOptions, skip=("verify",))


SPECULATIVE = ("speculative", "num_speculative_tokens")


def _speculative_options(f):
    from .serving.options import ServeOptions

    return _table(ServeOptions, only=SPECULATIVE)(f)


def _speculative(kw: dict) -> dict:
    """--speculative and --num-speculative-tokens, checked by ServeOptions' table, as stream() takes them."""
    from .serving.options import ServeOptions

    given = {name: kw.pop(name) for name in SPECULATIVE}
    ServeOptions(**given)
    return given if given["speculative"] else {}


def _pick(cls, kw: dict, **fixed):
    """The table's options out of a command's keyword arguments (removed from them), checked."""
    return cls(**{name: kw.pop(name) for name in cls.fields() if name in kw}, **fixed)


def _load(artifact, kw):
    from .model import load

    return load(artifact, _pick(LoadOptions, kw))


def _fail(message: str, code: int) -> None:
    click.echo(f"gemma-run: {message}", err=True)
    sys.exit(code)


def _guard(run):
    """Bad input and unusable artifacts (ValueError, ArtifactError, ProviderError, a missing file) exit 2 with
    their message, one line; a failure while running exits 1, its traceback in the log before the message."""
    from .backends.onnxruntime_backend import ProviderError
    from .trt_device import EngineMismatch, TensorRTUnavailable

    try:
        return run()
    except TensorRTUnavailable as e:
        _fail(f"{e}; or run the ONNX graph with --backend onnxruntime", exit_codes.NO_TENSORRT)
    except (ArtifactError, ValueError, FileNotFoundError, FileExistsError, ProviderError, EngineMismatch) as e:
        # ValueError includes ParamError: an option out of range, named as its table names it
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__, exit_codes.USAGE)
    except KeyboardInterrupt:
        _fail("interrupted", exit_codes.FAILED)
    except Exception as e:  # a failure while running: the traceback for whoever debugs it, then what failed
        log.error("unexpected failure", exc_info=True)
        _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", exit_codes.FAILED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", "-v", is_flag=True)
def main(verbose):
    """Run exported Gemma artifacts (gemma-export writes them)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@_sampling_options
@_speculative_options
@_load_options
@click.option("--stream", is_flag=True, help="Print text as it is generated.")
@click.option("--chat", is_flag=True, help="Apply the artifact's chat template to the prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print {prompt, generated_text, tokens, timings}.")
def generate(artifact, prompt, stream, chat, as_json, **kw):
    """Complete PROMPT (or standard input when PROMPT is absent)."""
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            _fail("no prompt: pass PROMPT or pipe text on standard input", exit_codes.USAGE)
        prompt = sys.stdin.read().rstrip("\n")
    if not prompt:
        _fail("the prompt is empty", exit_codes.USAGE)

    def run():
        options = _pick(SamplingParams, kw)
        speculative = _speculative(kw)
        model = _load(artifact, kw)
        text = model.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        if stream and not as_json:
            for piece in model.stream(text, options, chat=chat, **speculative):
                click.echo(piece, nl=False)
            click.echo()
            return
        completion = model.generate_text(text, options, chat=chat, **speculative)
        if as_json:
            t = model.last_timings
            timings = {"seconds": round(t["seconds"], 4), "run_seconds": round(t["run_seconds"], 4),
                       "tokens_per_s": round(t["tokens_per_s"], 2)}
            click.echo(json.dumps({"prompt": prompt, "generated_text": completion, "tokens": t["new_tokens"],
                                   "timings": timings}, ensure_ascii=False))
        else:
            click.echo(completion)

    _guard(run)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@_sampling_options
@_speculative_options
@_load_options
@click.option("--system", default=None, help="System prompt.")
def chat(artifact, system, **kw):
    """Interactive multi-turn chat; /reset starts over, /exit (or end of input) quits."""

    def run():
        options = _pick(SamplingParams, kw)
        speculative = _speculative(kw)
        session = _load(artifact, kw).chat_session(options, system=system, **speculative)
        interactive = sys.stdin is not None and sys.stdin.isatty()
        while True:
            if interactive:
                click.echo("> ", nl=False)
            line = sys.stdin.readline()
            if not line or line.strip() == "/exit":
                return
            line = line.strip()
            if not line:
                continue
            if line == "/reset":
                session.reset()
                click.echo("(conversation reset)")
                continue
            for piece in session.send(line):
                click.echo(piece, nl=False)
            click.echo()

    _guard(run)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt-length", type=click.IntRange(1), default=128, show_default=True)
@click.option("--new-tokens", type=click.IntRange(2), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True)
@_speculative_options
@_load_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw decode tokens/s against context length to this PNG (needs matplotlib).")
def bench(artifact, prompt_length, new_tokens, batch_size, runs, warmup, as_json, plot, **kw):
    """Prefill ms, decode tokens/s, per-token overhead and peak RSS (median of runs after warm-up)."""
    from .bench import benchmark, context_sweep, format_report

    def run():
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib: pip install 'gemma-deploy[plot]'") from None
        speculative = _speculative(kw)
        model = _load(artifact, kw)
        report = benchmark(model, prompt_length, new_tokens, batch_size, runs, warmup, **speculative)
        if plot is not None:
            report["context_sweep"] = context_sweep(model, plot, new_tokens=16)
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))

    _guard(run)


def _serve_options(kw: dict):
    from .serving.options import ServeOptions

    return _pick(ServeOptions, kw, load=_pick(LoadOptions, kw))


def _serve_table(skip=()):
    from .serving.options import ServeOptions

    return _table(ServeOptions, skip=("load", "response_headers", *skip))


# what an HTTP server of our own takes and a Triton model does not
HTTP_ONLY = ("api_key", "model_name", "max_body_bytes", "header_timeout", "body_timeout", "keep_alive",
             "max_connections")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@_serve_table()
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="Seconds the requests under way get to finish after SIGTERM.")
@click.option("--ray", "on_ray", is_flag=True, help="Deploy on Ray Serve (pip install 'gemma-deploy[ray]').")
@click.option("--replicas", type=click.IntRange(1), default=None, help="--ray: replicas of the server [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="--ray: replicas between MIN and MAX, on load.")
@click.option("--ray-address", default=None,
              help="--ray: an existing cluster (auto, or host:port) [default: a local one for this command].")
@click.option("--cpus-per-replica", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--gpus-per-replica", type=click.FloatRange(0), default=0.0, show_default=True)
@_load_options
def serve(artifact, host, port, grace, on_ray, replicas, autoscale, ray_address, cpus_per_replica, gpus_per_replica,
          **kw):
    """Serve ARTIFACT (static KV layout) with the OpenAI API and continuous batching, until SIGTERM."""

    def run():
        try:
            from .serving import serve as serve_app
        except ImportError as e:
            raise ValueError(f"gemma-run serve needs the serve extra: pip install 'gemma-deploy[serve]' ({e})") from None
        from .manifest import read_manifest
        from .serving.scheduler import check_servable

        options = _serve_options(kw)
        check_servable(read_manifest(artifact, verify=False), options)  # refused now, with its reason, not in a log
        ray_only = {"--replicas": replicas, "--autoscale": autoscale, "--ray-address": ray_address}
        if not on_ray:
            if any(v is not None for v in ray_only.values()):
                raise ValueError(f"{', '.join(k for k, v in ray_only.items() if v is not None)} go with --ray")
            return serve_app(artifact, host, port, options, grace)
        from .deploy.ray_serve import serve_on_ray

        serve_on_ray(artifact, host, port, options, replicas, _min_max(autoscale), ray_address, cpus_per_replica,
                     gpus_per_replica)

    _guard(run)


def _min_max(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit():
        raise ValueError(f"--autoscale {text!r} must be MIN:MAX, e.g. 1:4")
    return int(low), int(high)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompts", nargs=-1)
@click.option("--color/--no-color", default=None, help="Color the diagonal [default: when stdout is a terminal].")
def mask(artifact, prompts, color):
    """Print which tokens each token attends to, per layer type (causal, sliding window, padding; the static
    layout's ring slots), for PROMPTS (or standard input): what the artifact's graph masks."""
    if not prompts:
        if sys.stdin is None or sys.stdin.isatty():
            _fail("no prompt: pass PROMPTS or pipe text on standard input", exit_codes.USAGE)
        prompts = (sys.stdin.read().rstrip("\n"),)
    if not all(prompts):
        _fail("a prompt is empty", exit_codes.USAGE)

    def run():
        from .manifest import read_manifest
        from .mask import describe
        from .tokenizer import Tokenizer

        manifest = read_manifest(artifact, verify=False)
        tokenizer = Tokenizer.for_artifact(manifest)
        rows = [[tokenizer.tokenizer.id_to_token(i) for i in tokenizer.encode(p)] for p in prompts]
        click.echo(describe(manifest, rows, color=sys.stdout.isatty() if color is None else color), nl=False)

    _guard(run)


@main.command("triton-repo")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="The model repository to write.")
@click.option("--name", default="gemma", show_default=True, help="The model's name in Triton.")
@click.option("--instances", type=click.IntRange(1), default=1, show_default=True,
              help="Model instances (stub processes), each with its own copy of the model.")
@_serve_table(skip=HTTP_ONLY)
@_load_options
def triton_repo(artifact, output, name, instances, **kw):
    """Write a Triton Inference Server model repository serving ARTIFACT (Python backend, decoupled, the generate
    extension's text_input/text_output); the serving options go to its config.pbtxt."""

    def run():
        from .deploy.triton import write_repository

        folder = write_repository(artifact, output, name, instances, _serve_options(kw))
        click.echo(f"wrote {folder}: tritonserver --model-repository {output}")

    _guard(run)


if __name__ == "__main__":  # python -m runtime.cli (the tests start servers this way)
    main()
