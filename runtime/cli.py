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
from .model import BACKENDS

log = logging.getLogger("gemma-run")


def _sampling_options(f):
    options = [
        click.option("--max-new-tokens", "-n", type=int, default=64, show_default=True),
        click.option("--temperature", "-t", type=float, default=0.0, show_default=True, help="0 means greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 disables it."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Makes sampling repeatable."),
        click.option("--stop", "stop_strings", multiple=True, help="Stop string (repeatable)."),
    ]
    return _apply(options, _backend_options(f))


def _backend_options(f):
    options = [
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     help="auto: the TensorRT engine when the artifact has one, else ONNX Runtime."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="ONNX Runtime's execution provider (tensorrt: its TensorRT provider, engine cache in the artifact)."),
        click.option("--allow-cpu-fallback", is_flag=True, help="Run on the CPU if the provider is not usable."),
        click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads."),
    ]
    return _apply(options, f)


def _apply(options, f):
    for option in reversed(options):
        f = option(f)
    return f


def _options(kw):
    from .model import GenerationOptions

    return GenerationOptions(
        max_new_tokens=kw["max_new_tokens"], temperature=kw["temperature"], top_k=kw["top_k"], top_p=kw["top_p"],
        min_p=kw["min_p"], repetition_penalty=kw["repetition_penalty"], seed=kw["seed"],
        stop_strings=list(kw["stop_strings"]),
    )


def _load(artifact, kw):
    from .model import load

    return load(artifact, provider=kw["provider"], allow_cpu_fallback=kw["allow_cpu_fallback"], threads=kw["threads"],
                backend=kw["backend"])


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
        options = _options(kw)
        options.check()
        model = _load(artifact, kw)
        text = model.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
        if stream and not as_json:
            for piece in model.stream(text, options, chat=chat):
                click.echo(piece, nl=False)
            click.echo()
            return
        completion = model.generate_text(text, options, chat=chat)
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
@click.option("--system", default=None, help="System prompt.")
def chat(artifact, system, **kw):
    """Interactive multi-turn chat; /reset starts over, /exit (or end of input) quits."""

    def run():
        options = _options(kw)
        options.check()
        session = _load(artifact, kw).chat_session(options, system=system)
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
@click.option("--prompt-length", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--runs", type=int, default=5, show_default=True)
@click.option("--warmup", type=int, default=1, show_default=True)
@_backend_options
@click.option("--json", "as_json", is_flag=True)
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw decode tokens/s against context length to this PNG (needs matplotlib).")
def bench(artifact, prompt_length, new_tokens, batch_size, runs, warmup, threads, backend, provider,
          allow_cpu_fallback, as_json, plot):
    """Prefill ms, decode tokens/s, per-token overhead and peak RSS (median of runs after warm-up)."""
    from .bench import benchmark, context_sweep, format_report

    def run():
        for name, value, least in (("prompt-length", prompt_length, 1), ("new-tokens", new_tokens, 2),
                                   ("batch-size", batch_size, 1), ("runs", runs, 1), ("warmup", warmup, 0)):
            if value < least:
                raise ValueError(f"--{name} {value} must be >= {least}")
        if plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib: pip install 'gemma-deploy[plot]'") from None
        from .model import load

        model = load(artifact, provider=provider, allow_cpu_fallback=allow_cpu_fallback, threads=threads,
                     backend=backend)
        report = benchmark(model, prompt_length, new_tokens, batch_size, runs, warmup)
        if plot is not None:
            report["context_sweep"] = context_sweep(model, plot, new_tokens=16)
        click.echo(json.dumps(report, indent=2) if as_json else format_report(report))

    _guard(run)


def _serve_default(name: str):
    from .serving.options import ServeOptions

    return ServeOptions.__dataclass_fields__[name].default


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(1), default=None, show_default=str(_serve_default("max_batch_size")),
              help="Requests decoded together (rows of the KV buffers).")
@click.option("--max-queue", type=click.IntRange(1), default=None, show_default=str(_serve_default("max_queue")),
              help="Requests waiting for a row; one more gets 429.")
@click.option("--prefill-chunk", type=click.IntRange(1), default=None, show_default=str(_serve_default("prefill_chunk")),
              help="Prompt tokens prefilled a step: the running requests wait for one chunk at most.")
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY on /v1/ (also GEMMA_DEPLOY_API_KEY).")
@click.option("--model-name", default=None, help="The model's name in the API [default: the artifact folder's name].")
@click.option("--grace", type=float, default=30.0, show_default=True,
              help="Seconds the requests under way get to finish after SIGTERM.")
@click.option("--ray", "on_ray", is_flag=True, help="Deploy on Ray Serve (pip install 'gemma-deploy[ray]').")
@click.option("--replicas", type=click.IntRange(1), default=None, help="--ray: replicas of the server [default: 1].")
@click.option("--autoscale", default=None, metavar="MIN:MAX", help="--ray: replicas between MIN and MAX, on load.")
@click.option("--ray-address", default=None,
              help="--ray: an existing cluster (auto, or host:port) [default: a local one for this command].")
@click.option("--cpus-per-replica", type=click.FloatRange(0, min_open=True), default=1.0, show_default=True)
@click.option("--gpus-per-replica", type=click.FloatRange(0), default=0.0, show_default=True)
@_backend_options
def serve(artifact, host, port, max_batch_size, max_queue, prefill_chunk, api_key, model_name, grace, on_ray, replicas,
          autoscale, ray_address, cpus_per_replica, gpus_per_replica, backend, provider, allow_cpu_fallback, threads):
    """Serve ARTIFACT (static KV layout) with the OpenAI API and continuous batching, until SIGTERM."""

    def run():
        try:
            from .serving import serve as serve_app
            from .serving.options import ServeOptions
        except ImportError as e:
            raise ValueError(f"gemma-run serve needs the serve extra: pip install 'gemma-deploy[serve]' ({e})") from None
        from .manifest import read_manifest
        from .serving.scheduler import check_servable

        check_servable(read_manifest(artifact, verify=False))  # refused now, with its reason, not in a server log
        given = dict(max_batch_size=max_batch_size, max_queue=max_queue, prefill_chunk=prefill_chunk,
                     api_key=api_key, model_name=model_name, backend=backend, provider=provider, threads=threads,
                     allow_cpu_fallback=allow_cpu_fallback)
        options = ServeOptions(**{k: v for k, v in given.items() if v is not None})
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
@click.option("--max-batch-size", type=click.IntRange(1), default=None, show_default=str(_serve_default("max_batch_size")),
              help="Requests each instance decodes together.")
@click.option("--max-queue", type=click.IntRange(1), default=None, show_default=str(_serve_default("max_queue")))
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto", show_default=True,
              help="auto: TensorRT on a GPU instance when the artifact has an engine, else ONNX Runtime on the CPU.")
def triton_repo(artifact, output, name, instances, max_batch_size, max_queue, backend):
    """Write a Triton Inference Server model repository serving ARTIFACT (Python backend, decoupled, the generate
    extension's text_input/text_output)."""

    def run():
        from .deploy.triton import write_repository

        folder = write_repository(artifact, output, name, instances,
                                  max_batch_size or _serve_default("max_batch_size"),
                                  max_queue or _serve_default("max_queue"), backend)
        click.echo(f"wrote {folder}: tritonserver --model-repository {output}")

    _guard(run)


if __name__ == "__main__":  # python -m runtime.cli (the tests start servers this way)
    main()
