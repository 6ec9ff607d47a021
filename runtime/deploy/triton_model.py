"""A Triton Inference Server model (Python backend, decoupled) over gemma-deploy's scheduler.

`gemma-run triton-repo` copies this file to REPO/NAME/1/model.py, beside the artifact (REPO/NAME/1/artifact).
Triton imports it in a stub process whose Python must have gemma-deploy's runtime installed
(docs/deployment.md). Each request's inputs (text_input; max_tokens, temperature, top_p, top_k, min_p,
repetition_penalty, seed, stop, stream) are read in `execute`, which queues the request with the scheduler and
returns at once; the scheduler's thread sends the text back through the request's response sender: one response
with the whole completion and the final flag (what /generate needs), or with `stream` a response per piece and
then the final flag (/generate_stream, gRPC streaming). A cancelled request (the client went away, a gRPC
stream cancelled) is cancelled in the scheduler, which frees its row. Bad inputs answer INVALID_ARG, a full queue
UNAVAILABLE, each with the final flag: the stub never dies of a request.
"""

import json
import site
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_SECONDS = 0.05  # sender.is_cancelled() is a round trip to the server: at most this often
# the generate extension's input names that SamplingParams (runtime/params.py) spells otherwise
NAMES = {"max_tokens": "max_new_tokens"}
SAMPLING_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed")


def _parameters(args) -> dict:
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def _value(request, name):
    """The single value of an input, or None when the request leaves it out."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if name == "stop":
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
    if values.size != 1:
        raise ValueError(f"{name} takes one value, got {values.size}")
    value = values[0]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def _response(text: str):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))])


def _error(message: str, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class _Reply:
    """One request's answer, sent from the scheduler's thread as its events come."""

    def __init__(self, sender, stream: bool, scheduler):
        self.sender, self.stream, self.scheduler = sender, stream, scheduler
        self.pieces, self.job, self.checked = [], None, 0.0

    def __call__(self, event) -> None:
        from runtime.serving.scheduler import Failed, Finished, Piece

        try:
            if isinstance(event, Piece):
                self._cancelled()
                if self.stream:
                    self.sender.send(_response(event.text))
                else:
                    self.pieces.append(event.text)
            elif isinstance(event, Finished):
                if event.reason == "cancelled":
                    self.sender.send(_error("the request was cancelled", pb_utils.TritonError.CANCELLED), flags=FINAL)
                elif self.stream:
                    self.sender.send(flags=FINAL)
                else:
                    self.sender.send(_response("".join(self.pieces)), flags=FINAL)
            elif isinstance(event, Failed):
                self.sender.send(_error(event.message, pb_utils.TritonError.INTERNAL), flags=FINAL)
        except Exception as e:  # the sender is closed (the server let the request go): nothing more to send
            pb_utils.Logger.log_warn(f"gemma: a response could not be sent ({e}); cancelling the request")
            if self.job is not None:
                self.scheduler.cancel(self.job)

    def _cancelled(self) -> None:
        now = time.monotonic()
        if now - self.checked >= CANCEL_CHECK_SECONDS:
            self.checked = now
            if self.sender.is_cancelled() and self.job is not None:
                self.scheduler.cancel(self.job)


class TritonPythonModel:
    def initialize(self, args):
        parameters = _parameters(args)
        if parameters.get("site_packages"):  # another environment's packages (runtime), after this one's
            site.addsitedir(parameters["site_packages"])
        from runtime import load
        from runtime.deploy.triton import options_from
        from runtime.serving.scheduler import Scheduler

        artifact = Path(pb_utils.get_model_dir()) / parameters.get("artifact", "artifact")
        options = options_from(parameters)
        self.model = load(artifact, options.load)  # every file's sha256 checked
        self.scheduler = Scheduler(self.model, options).start()
        pb_utils.Logger.log_info(f"gemma: serving {artifact} with {type(self.model.backend).__name__}")

    def execute(self, requests):
        from runtime import SamplingParams
        from runtime.serving.scheduler import QueueFull

        for request in requests:
            sender = request.get_response_sender()
            try:
                text = _value(request, "text_input")
                if not isinstance(text, str) or not text:
                    raise ValueError("text_input must be a non-empty string")
                given = {NAMES.get(name, name): value for name in SAMPLING_INPUTS
                         if (value := _value(request, name)) is not None}
                params = SamplingParams(**given, stop=tuple(_value(request, "stop") or ()))
                reply = _Reply(sender, bool(_value(request, "stream")), self.scheduler)
                reply.job = self.scheduler.submit(self.model.tokenizer.encode(text), params, reply)
            except QueueFull as e:
                sender.send(_error(str(e), pb_utils.TritonError.UNAVAILABLE), flags=FINAL)
            except (ValueError, TypeError) as e:  # an option out of range, a prompt over the context, a bad input
                sender.send(_error(str(e), pb_utils.TritonError.INVALID_ARG), flags=FINAL)
        return None  # decoupled: the scheduler's thread answers

    def finalize(self):
        self.scheduler.stop()
