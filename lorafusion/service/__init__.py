"""`lorafusion serve`: a long-running multi-tenant fine-tuning service on one base model.

Jobs are submitted, listed, cancelled and followed over an HTTP JSON API (http_api.py; the
`lorafusion submit/jobs/cancel/logs` commands use it through client.py). The queue and every job's
state live in SQLite in the state directory (store.py), committed before the API answers; the
trainer (trainer.py) trains whatever jobs are live in planning windows (windows.py) on the
runtime's training loop, and resumes every accepted job from its checkpoint after a restart.

This package sits above lorafusion.runtime: it imports the runtime, never the reverse.
"""
