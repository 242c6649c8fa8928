"""`import lorafusion.scheduler` stays a numpy/scipy import (a cluster front end plans without torch)."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_scheduler_does_not_import_torch():
    # A fresh interpreter: in this one, other tests may already have imported torch.
    code = (
        "import sys, lorafusion.scheduler as s; "
        "s.plan_schedule([s.Job('a', 2, [10, 20, 30, 40])], stages=2, capacity=64); "
        "print(sorted(m for m in ('torch', 'triton', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_package_still_exports_its_names_on_first_use():
    code = "import lorafusion; from lorafusion import LoRAConfig, qlora; print(LoRAConfig.__name__, qlora.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["LoRAConfig", "lorafusion.qlora"]
