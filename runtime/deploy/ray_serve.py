"""Scale-out on Ray Serve: `gemma-run serve DIR --ray` deploys the serving app (runtime/serving/app.py) as a Ray
Serve deployment, on an existing cluster (`--ray-address auto` or host:port) or on a local one started for the
command.

    replicas        --replicas N (`num_replicas`) or --autoscale MIN:MAX (`autoscaling_config`, on ongoing requests)
    placement       `ray_actor_options`: --cpus-per-replica, --gpus-per-replica
    backpressure    each replica takes --max-batch-size requests at once (`max_ongoing_requests`: its rows); the
                    proxy queues --max-queue more and answers 429 with Retry-After past them (`max_queued_requests`)
    identity        every response carries `x-gemma-replica`, the replica's id

Each replica builds the app itself (`serve.ingress` of a builder: nothing is pickled but the artifact's path) and
loads the model before it reports ready, so Serve sends it requests only once it can answer them. A replica that
dies is replaced by Serve (its health is checked every HEALTH_CHECK_SECONDS); the requests it had accepted fail
(500), the ones after it go to the others. `pip install "gemma-deploy[ray]"` brings Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading

log = logging.getLogger(__name__)

APP_NAME = "gemma"
HEALTH_CHECK_SECONDS = 2.0
RETRY_AFTER_SECONDS = 1
# a local cluster for the command: on 127.0.0.1 (Ray would pick the routable address), no auth token, no usage
# reports, random worker ports (docs/deployment.md)
LOCAL_CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                     "RAY_USAGE_STATS_ENABLED": "0", "RAY_USE_RANDOM_PORTS": "1"}


def application(artifact, options, replicas: int | None = None, autoscale: tuple[int, int] | None = None,
                cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0):
    """The Serve application: one deployment of the OpenAI app, replicated."""
    from ray import serve

    from ..serving import create_app

    artifact = os.path.abspath(artifact)

    def build():  # inside each replica
        replica = serve.get_replica_context().replica_id.unique_id
        served = options.replace(response_headers=(*options.response_headers, ("x-gemma-replica", replica)))
        return create_app(artifact, served, load_now=True)

    @serve.ingress(build)
    class GemmaDeployment:
        pass

    scaling = ({"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1],
                                       "initial_replicas": autoscale[0],
                                       "target_ongoing_requests": options.max_batch_size}}
               if autoscale else {"num_replicas": replicas or 1})
    deployment = serve.deployment(
        GemmaDeployment, name="gemma", **scaling,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        max_ongoing_requests=options.max_batch_size, max_queued_requests=options.max_queue,
        health_check_period_s=HEALTH_CHECK_SECONDS,
    )
    try:  # 429 with Retry-After past the queue, as gemma-run serve alone answers (Ray's default is a bare 503)
        deployment = deployment.options(backpressure_config={"status_code": 429,
                                                             "retry_after_s": RETRY_AFTER_SECONDS})
    except TypeError:
        log.warning("this Ray has no backpressure_config: a full queue answers 503")
    return deployment.bind()


def serve_on_ray(artifact, host: str, port: int, options, replicas: int | None = None,
                 autoscale: tuple[int, int] | None = None, address: str | None = None,
                 cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0) -> None:
    """Deploy and serve until SIGTERM or SIGINT; then remove the application (and the local cluster)."""
    if autoscale and replicas:
        raise ValueError("pass --replicas or --autoscale MIN:MAX, not both")
    if autoscale and not 1 <= autoscale[0] <= autoscale[1]:
        raise ValueError(f"--autoscale {autoscale[0]}:{autoscale[1]} must be MIN:MAX with 1 <= MIN <= MAX")
    if address is None:
        for key, value in LOCAL_CLUSTER_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise ValueError(f"--ray needs Ray Serve: pip install 'gemma-deploy[ray]' ({e})") from None

    if address is None:
        cpus = max(os.cpu_count() or 1, (autoscale[1] if autoscale else replicas or 1) * cpus_per_replica)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=256 * 2**20,
                 _temp_dir=tempfile.mkdtemp(prefix="gemma-ray-"), namespace=APP_NAME, log_to_driver=False)
    else:
        ray.init(address=address, namespace=APP_NAME, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs a SIGTERM handler of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(artifact, options, replicas, autoscale, cpus_per_replica, gpus_per_replica),
                  name=APP_NAME, route_prefix="/", blocking=False)
        log.warning("serving %s on http://%s:%d through Ray Serve", artifact, host, port)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            if address is not None:
                serve.delete(APP_NAME)  # an existing cluster keeps running; only this application goes
        finally:
            ray.shutdown()  # a local cluster goes with it, replicas and all
