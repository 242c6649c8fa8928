"""The running service: the state directory claimed and locked, the job store, the trainer and the
HTTP server answering beside it."""

from __future__ import annotations

import threading

from lorafusion.runtime.engine_imports import deepspeed_left_unimported
from lorafusion.runtime.output_dir import BASE_MODEL_DIR, CHECKPOINTS_DIR, OutputDirError
from lorafusion.runtime.run_directory import RunDirectory, read_marker

from .config import ServerConfig
from .http_api import ServiceHTTPServer
from .store import DATABASE_FILE, JobStore
from .trainer import ADAPTERS_DIR, ServiceTrainer

STATE_ENTRIES = [DATABASE_FILE, f"{DATABASE_FILE}-journal", CHECKPOINTS_DIR, ADAPTERS_DIR, BASE_MODEL_DIR]


class Service:
    def __init__(self, directory: RunDirectory, store: JobStore, trainer: ServiceTrainer, http: ServiceHTTPServer):
        self.directory, self.store, self.trainer, self.http = directory, store, trainer, http

    @classmethod
    def start(cls, config: ServerConfig, device: str | None = None) -> Service:
        """Listen (first: a port in use or refused is found before anything else is touched, and
        requests are answered 503 meanwhile), claim the state directory (a new or empty one, or this
        service's own from an earlier start: it then continues every accepted job), load the base
        model, answer."""
        http = ServiceHTTPServer((config.host, config.port), config.token)
        threading.Thread(target=http.serve_forever, name="lorafusion-http", daemon=True).start()
        directory = store = trainer = None
        try:
            state_dir = config.state_dir
            marker = read_marker(state_dir)
            if marker is not None and DATABASE_FILE not in marker["entries"]:
                raise OutputDirError(f"{state_dir} holds a lorafusion train run, not a service's state; choose another state_dir")
            directory = RunDirectory.claim(state_dir, STATE_ENTRIES, resume=marker is not None, overwrite=False)
            store = JobStore(state_dir / DATABASE_FILE)
            with deepspeed_left_unimported():  # saving an inline base model would import it, for nothing
                trainer = ServiceTrainer(config, store, device)
        except BaseException:
            http.shutdown()
            http.server_close()
            if trainer is not None:
                trainer.close()
            if store is not None:
                store.close()
            if directory is not None:
                directory.release()
            raise
        http.trainer = trainer
        return cls(directory, store, trainer, http)

    @property
    def url(self) -> str:
        host, port = self.http.server_address[:2]
        return f"http://{host}:{port}"

    def train_until_stopped(self) -> None:
        """Train in this thread until trainer.stop_requested is set; then close everything."""
        try:
            self.trainer.run()
        finally:
            self.close()

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.store.close()
        self.directory.release()
