"""Serve a model, OpenAI-compatible, with a web page: `python -m svlm.serve
[ckpt=<folder>] [port=8000] [serve.image_root=<folder>]` (settings: conf/serve.yaml)."""

import sys

from omegaconf import DictConfig

import svlm  # noqa: F401  (sets the OpenMP wait policy before torch loads)
from svlm.cli import command


@command("serve", free_text=("ckpt", "serve.image_root", "model_name"))
def main(cfg: DictConfig) -> None:
    import logging

    import uvicorn

    from svlm.serve import build_app, load_serve_config
    from svlm.serve.app import exposure_warning

    serve_cfg = load_serve_config(cfg)
    if warning := exposure_warning(serve_cfg.host, serve_cfg.serve.api_key):
        logging.getLogger("svlm.serve").warning(warning)
    app, folder = build_app(serve_cfg)
    where = f"http://{serve_cfg.host}:{serve_cfg.port}"
    logging.getLogger("svlm.serve").info(
        "serving %s as %r: web page %s/ , API %s/v1", folder, serve_cfg.model_name, where, where
    )
    # log_config=None: uvicorn's loggers go through the logging Hydra set up (console and the run folder's log)
    try:
        uvicorn.run(app, host=serve_cfg.host, port=serve_cfg.port, log_config=None, timeout_graceful_shutdown=5)
    except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down cleanly; some versions raise it again after
        pass


if __name__ == "__main__":
    sys.exit(main())
