"""``advshield deploy``: Triton model repositories from pipeline files.

* ``advshield deploy triton PIPELINE --out DIR``: write the repository (``advshield.deploy.triton``);
  ``--serve`` then starts the local tritonserver of the nvidia-pytriton wheel on it (loopback)
  until SIGINT/SIGTERM.
* ``advshield deploy tritonserver REPOSITORY --model NAME``: that local server on any repository
  (e.g. one holding a classifier its team deployed, before and after the ensemble is generated).
* ``advshield deploy triton-env``: set-up step for that local server: the overlay environment whose
  numpy < 2 the wheel's Python backend stub needs (``advshield.deploy.tritonserver``).
"""

from __future__ import annotations

import argparse
import json

from advshield.core.errors import ConfigError
from advshield.deploy.triton import generate_repository, serve_repository
from advshield.deploy.tritonserver import make_stub_env, start_triton
from advshield.plugin import protocol as P


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="deployment: generate a Triton model repository from a pipeline file")
    dsub = p.add_subparsers(dest="target", metavar="TARGET")

    t = dsub.add_parser("triton", help="write a Triton model repository (ensemble + defense/post-processing models)",
                        description="Settings come from the pipeline's [deploy] section; flags override them.")
    t.add_argument("pipeline")
    t.add_argument("--out", required=True, help="model repository folder (other pipelines' models there are kept)")
    t.add_argument("--classifier-backend", choices=("onnxruntime", "python"), default=None,
                   help="onnxruntime: Triton's backend (GPU servers); python: ONNX Runtime inside the Python backend "
                        "(servers without that backend). Default: deploy.classifier_backend, onnxruntime "
                        "(python with --serve)")
    t.add_argument("--gpu", action="store_true", default=None, help="target server has GPUs: KIND_GPU instances")
    t.add_argument("--gpus", default=None, help="comma-separated GPU ids for the instance groups (with --gpu)")
    t.add_argument("--max-batch-size", type=int, default=None)
    t.add_argument("--max-queue-delay-us", type=int, default=None)
    t.add_argument("--instances", type=int, default=None, help="instances of each Python model")
    t.add_argument("--classifier-instances", type=int, default=None)
    t.add_argument("--threads", type=int, default=None, help="threads per Python-model instance")
    t.add_argument("--force", action="store_true", help="replace this pipeline's models if they exist")
    t.add_argument("--serve", action="store_true", help="then serve the repository with the local tritonserver "
                                                         "(nvidia-pytriton wheel) until interrupted")
    t.add_argument("--host", default="127.0.0.1", help="with --serve: listen address (default: %(default)s)")
    t.add_argument("--grpc-port", type=int, default=8001, help="with --serve (0: any free port; default %(default)s)")
    t.add_argument("--http-port", type=int, default=8000, help="with --serve (0: any free port; default %(default)s)")
    t.add_argument("--metrics-port", type=int, default=8002, help="with --serve (0: any free port; default %(default)s)")
    t.set_defaults(func=cmd_triton)

    r = dsub.add_parser("tritonserver", help="serve an existing model repository (any models, e.g. one holding a "
                                             "classifier you deployed yourself) with the local tritonserver",
                        description="The nvidia-pytriton wheel's tritonserver (Python backend, ensembles; no "
                                    "onnxruntime backend) on REPOSITORY with --model loaded, until interrupted.")
    r.add_argument("repository")
    r.add_argument("--model", action="append", required=True, help="a model to load (repeat for several)")
    r.add_argument("--host", default="127.0.0.1", help="listen address (default: %(default)s)")
    r.add_argument("--grpc-port", type=int, default=8001, help="0: any free port (default %(default)s)")
    r.add_argument("--http-port", type=int, default=8000, help="0: any free port (default %(default)s)")
    r.add_argument("--metrics-port", type=int, default=8002, help="0: any free port (default %(default)s)")
    r.add_argument("--threads", type=int, default=1, help="threads per Python-model instance (default %(default)s)")
    r.set_defaults(func=cmd_tritonserver)

    e = dsub.add_parser("triton-env", help="set-up for --serve: numpy < 2 for the wheel's Python backend stub "
                                           "(an overlay venv; uses the package index)")
    e.add_argument("--dest", default=None, help="folder (default: $ADVSHIELD_TRITON_STUB_ENV or <venv>/triton-stub-env)")
    e.set_defaults(func=cmd_triton_env)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _gpus(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(g) for g in text.split(",") if g.strip())
    except ValueError:
        raise ConfigError(f"--gpus: expected comma-separated GPU ids, got {text!r}") from None


def cmd_triton(args: argparse.Namespace) -> int:
    backend = args.classifier_backend or ("python" if args.serve else None)
    repo = generate_repository(
        args.pipeline, args.out, overwrite=args.force, classifier_backend=backend, gpu=args.gpu,
        gpus=_gpus(args.gpus), max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        instances=args.instances, classifier_instances=args.classifier_instances, threads=args.threads)
    print(f"wrote {len(repo.files)} files for pipeline {repo.ensemble!r} into {repo.root}")
    for m in repo.models:
        c = repo.config(m)
        kind = c.platform or c.backend
        public = not c.max_batch_size and P.CONFIG_MAX_BATCH in c.parameters  # the ensemble: not batching, its limit a parameter
        limit = c.parameters[P.CONFIG_MAX_BATCH].string_value if public else c.max_batch_size
        print(f"  {m:<32} {kind:<12} max_batch_size {limit}")
    served = json.loads((repo.root / repo.ensemble / "advshield-manifest.json").read_text()).get("served_model")
    if served:
        print(f"  {served['name']:<32} {served['platform']:<12} max_batch_size {served['max_batch_size']}  (already in "
              f"the repository: called by name, not copied; input {served['input']}, output {served['output']})")
    print(f"manifest: {repo.root / repo.ensemble / 'advshield-manifest.json'}")
    print("serve it with NVIDIA's Triton container (see docs/deploy.md), e.g.\n"
          f"  tritonserver --model-repository={repo.root} --model-control-mode=explicit --load-model={repo.ensemble}")
    if not args.serve:
        return 0

    server = serve_repository(repo, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                              metrics_port=args.metrics_port, threads=repo.spec.threads)
    return _serve_until_interrupted(server, [repo.ensemble])


def _serve_until_interrupted(server, models: list[str]) -> int:
    print(f"tritonserver (pid {server.pid}) ready: gRPC {server.url}, HTTP {server.http_url}, "
          f"metrics {server.metrics_url}; models {', '.join(map(repr, models))}. Ctrl-C stops it.", flush=True)
    code = server.wait_until_interrupted()
    print(f"tritonserver stopped (exit status {code})" if code >= 0 else
          f"tritonserver exited on its own with status {-code}; log: {server.log_path}")
    return 0 if code == 0 else 1


def cmd_tritonserver(args: argparse.Namespace) -> int:
    server = start_triton(args.repository, args.model, host=args.host, grpc_port=args.grpc_port,
                          http_port=args.http_port, metrics_port=args.metrics_port, threads=args.threads)
    return _serve_until_interrupted(server, args.model)


def cmd_triton_env(args: argparse.Namespace) -> int:
    path = make_stub_env(args.dest)
    print(f"stub environment ready: {path} (numpy < 2 for the Python backend stub; the venv's packages via a .pth)")
    return 0
