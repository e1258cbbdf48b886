"""One measurement of tests/bench/test_hf_load.py, in a process of its own (so its peak RSS is its own):

    python tests/bench/hf_load_probe.py ours|transformers|export HF_DIR [OUT_DIR]

ours          the model `single` builds from checkpoint.load_from=hf:HF_DIR (fp32, uninitialised, then every
              tensor read through the adapter: parallel/checkpoint/hf_load.py), as the Trainer does it
transformers  AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32): the same fp32 model
export        ours, then the Hugging Face directory OUT_DIR written from it (tools/hf_export.write_dir, bf16)
Prints one JSON line: {"what", "seconds" (the load, or the export alone; imports done before the clock
starts, on both sides), "peak_rss_gib" (ru_maxrss)}.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path


def ours(hf_dir: Path):
    from gpu_workbench.parallel.checkpoint import hf_load
    from gpu_workbench.parallel.config import RunConfig
    from gpu_workbench.parallel.models.transformer import build

    cfg = RunConfig.from_toml(None, [f"checkpoint.load_from=hf:{hf_dir}", "model.seq_len=2048"])
    model = build(cfg.model, init=False)
    hf_load.load_module(model, hf_dir, cfg.model)
    return model, cfg


def main(what: str, hf_dir: Path, out: Path | None = None) -> None:
    import torch

    torch.set_num_threads(1)
    if what == "transformers":
        import transformers as T
        from transformers.models.llama import modeling_llama  # noqa: F401  (imported before the clock)
    else:
        from gpu_workbench.parallel.checkpoint import hf_load  # noqa: F401
    start = time.perf_counter()
    if what == "transformers":
        T.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    else:
        model, cfg = ours(hf_dir)
    seconds = time.perf_counter() - start
    if what == "export":
        from gpu_workbench.parallel.tools import hf_export

        start = time.perf_counter()
        hf_export.write_dir(cfg.model, model.state_dict(), out, "bf16", 5 * 10**9)
        seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux
    print(json.dumps({"what": what, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 2)}))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
