"""The simulated GPU of ``benchmarks/night_scale.py`` (never on the product's code path).

``night_scale.py`` puts this folder first on the PYTHONPATH of its Prefect process workers. In a flow
-run process (``PREFECT__FLOW_RUN_ID`` set) with ``PRCORE_NIGHT_STANDIN`` set, Python imports this
module at start-up and it replaces only the model's GPU work, by sleeps of stated length:

- loading the base model (``prcore.pipeline.models.load_run_pipeline``): ``load_s`` once per process;
- DCO training (``prcore.method.dco.train_subject_lora``): ``steps x s_per_step``; writes a small
  weights file and ``training.json`` (with the fingerprint prcore computes) that the product uploads,
  hashes and verifies as usual;
- activating / removing the LoRA (``prcore.method.lora_io.load_subject_lora`` / ``unload_subject_lora``);
- sampling (``prcore.method.sampler.sample_batch``): ``images x s_per_image``; returns small real PIL
  images that the product encodes and writes (PNG + sidecar), catalogues and puts on contact sheets.

With ``PRCORE_NIGHT_PROFILE`` (a folder) set, the process is profiled (``cProfile``, main thread) and
its statistics written there at exit (``shard-{pid}.prof``). Every duration is multiplied by ``scale``. Each process appends one JSON line per event to
``{out}/events-{pid}.jsonl``: its start, the first GPU work, and the seconds slept.
"""

from __future__ import annotations

import os
import time

_STARTED = time.time()  # this interpreter's start (site runs before anything else)
_CONFIG = os.environ.get("PRCORE_NIGHT_STANDIN")

if _CONFIG and os.environ.get("PREFECT__FLOW_RUN_ID"):
    from night_standin_gpu import install

    install(_CONFIG, _STARTED)
    if os.environ.get("PRCORE_NIGHT_PROFILE"):  # a folder: this flow-run process's cProfile, written at exit
        import atexit
        import cProfile

        _PROFILE = cProfile.Profile()
        _PROFILE.enable()
        atexit.register(lambda: (_PROFILE.disable(), _PROFILE.dump_stats(
            os.path.join(os.environ["PRCORE_NIGHT_PROFILE"], f"shard-{os.getpid()}.prof"))))
