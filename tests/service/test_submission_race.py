"""Two submissions of one name at once: the one accepted trains as it was accepted; the one
refused (409) changes nothing, even when the trainer admits the job between the refused
submission's check and its refusal."""

from __future__ import annotations

import threading

from lorafusion.service import trainer as trainer_module
from lorafusion.service.config import parse_server_config
from lorafusion.service.server import Service
from lorafusion.service.trainer import SubmissionError
from service_fixtures import job_entry, server_dict


def test_a_refused_duplicate_never_replaces_the_accepted_job(tmp_path, monkeypatch):
    service = Service.start(parse_server_config(server_dict(tmp_path), tmp_path), device="cpu")
    trainer = service.trainer  # its training thread is not started: the test admits by hand
    try:
        first, second = job_entry(tmp_path, "add", lr=1e-3), job_entry(tmp_path, "add", lr=5e-3)
        both_checked, first_added = threading.Barrier(2, timeout=60), threading.Event()
        digest, add = trainer_module.job_data_digest, trainer.store.add
        calls = []

        def digest_after_both_checks(spec, opener):  # each submission calls it once its name is checked free
            calls.append(spec)
            if len(calls) <= 2:  # the submissions' calls (a third is the admission's revalidation)
                both_checked.wait()
                if threading.current_thread().name == "second":
                    assert first_added.wait(60)
            return digest(spec, opener)

        def add_with_admission_between(name, entry, data_digest):
            if entry["lr"] == second["lr"]:
                trainer._admit_and_cancel()  # the training thread's turn comes before the second add
                return add(name, entry, data_digest)
            record = add(name, entry, data_digest)
            first_added.set()
            return record

        monkeypatch.setattr(trainer_module, "job_data_digest", digest_after_both_checks)
        monkeypatch.setattr(trainer.store, "add", add_with_admission_between)
        answers = {}

        def submit(entry, label):
            try:
                answers[label] = trainer.submit(entry)["state"]
            except SubmissionError as error:
                answers[label] = error.status

        threads = [threading.Thread(target=submit, args=(e, n), name=n) for e, n in ((first, "first"), (second, "second"))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert answers == {"first": "queued", "second": 409}
        assert trainer.jobs["add"].spec.lr == first["lr"]
        assert trainer._validated == {}  # nothing left behind for a later admission
    finally:
        trainer.stop_requested.set()
        trainer.close()
        service.close()
