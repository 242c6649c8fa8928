"""Keep DeepSpeed out of runs that do not use it.

With DeepSpeed and accelerate both installed (the `pipeline` and `dev` extras), transformers'
`save_pretrained` asks accelerate to unwrap the model, and accelerate imports DeepSpeed only to
test `isinstance(model, DeepSpeedEngine)`. That import takes seconds and prints DeepSpeed's
"Setting accelerator to CPU" warning in runs that never chose DeepSpeed. A model can only be
wrapped in a DeepSpeedEngine once DeepSpeed has been imported, so until then the test is skipped.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def deepspeed_left_unimported() -> Iterator[None]:
    """Within this block, accelerate does not import DeepSpeed to unwrap a model (see the module
    docstring); an engine that imports DeepSpeed itself is unaffected."""
    if "deepspeed" in sys.modules or importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("deepspeed") is None:
        yield
        return
    import accelerate.utils.other as accelerate_other

    original = accelerate_other.is_deepspeed_available

    def is_deepspeed_available() -> bool:
        return "deepspeed" in sys.modules and original()

    accelerate_other.is_deepspeed_available = is_deepspeed_available
    try:
        yield
    finally:
        accelerate_other.is_deepspeed_available = original
