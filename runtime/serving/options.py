"""How `gemma-run serve` runs an artifact: the one home of the server's options, their defaults and bounds.

`gemma-run serve`'s flags, `runtime.serving.serve(...)`, Triton's model repository (`gemma-run triton-repo`) and the
Ray deployment all read ServeOptions; its `load` section is the runtime's LoadOptions. Imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..params import Bound, LoadOptions, Options, ParamError, option

API_KEY_ENV = "GEMMA_DEPLOY_API_KEY"


@dataclass(frozen=True)
class ServeOptions(Options):
    max_batch_size: int = option(8, Bound(int, ge=1, help="requests decoded together: rows of the KV buffers"))
    max_queue: int = option(64, Bound(int, ge=0, help="requests waiting for a row beyond them; one more gets 429"))
    prefill_chunk: int = option(256, Bound(int, ge=1, help="prompt tokens a step prefills while rows decode: they "
                                                         "wait for one chunk at most"))
    prefix_cache: bool = option(True, Bound(bool, help="reuse the KV of a prompt prefix a row holds (off: every "
                                                     "prompt computed whole, for comparison)"))
    speculative: str | None = option(None, Bound(str, optional=True, help="draft tokens for each decoding "
                                                  "request, verified in one run: ngram (prompt lookup in the "
                                                  "request's own tokens) or DIR (a draft artifact, static layout, "
                                                  "the same tokenizer)"))
    num_speculative_tokens: int = option(4, Bound(int, ge=1, le=16, help="draft tokens a step at most (fewer as "
                                                                         "rows fill the batch)"))
    api_key: str | None = option(None, Bound(str, optional=True, help=f"require Authorization: Bearer KEY on /v1/ "
                                                                      f"(also {API_KEY_ENV})"))
    model_name: str | None = option(None, Bound(str, optional=True, help="the model's name in the API "
                                                                         "(default: the artifact folder's name)"))
    max_body_bytes: int = option(1 << 20, Bound(int, ge=1, help="a request body over this many bytes is a 413"))
    header_timeout: float = option(10.0, Bound(float, gt=0, help="seconds a connection has to send a request's "
                                                                "headers"))
    body_timeout: float = option(10.0, Bound(float, gt=0, help="seconds a request has to send its whole body "
                                                              "(408 after)"))
    keep_alive: float = option(5.0, Bound(float, gt=0, help="seconds an idle connection stays open"))
    max_connections: int = option(512, Bound(int, ge=1, help="connections and requests at once; one more gets "
                                                            "503"))
    load: LoadOptions = field(default_factory=LoadOptions)
    response_headers: tuple[tuple[str, str], ...] = ()  # added to every response (Ray's x-gemma-replica)

    def check(self) -> None:
        super().check()
        if self.api_key == "":
            raise ParamError("api_key", "api_key '' would turn authentication off: pass a key, or leave --api-key "
                                        "out to serve without one")
