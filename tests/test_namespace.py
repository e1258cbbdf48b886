"""One import namespace beside the ecosystem (docs/ARCHITECTURE.md, Layers): every `gpu_workbench` module
imports in the same process as Hugging Face's `transformers` (which needs Hugging Face's own `kernels`),
from the repository root and from elsewhere; no module of the project is importable under two names; and a
regular `pip install` of the project leaves Hugging Face's `kernels` files untouched."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers.cli import ROOT, env

pytest.importorskip("transformers", reason="transformers is a test dependency (pyproject [test])")

# Imports every module of the package, then transformers; builds a model with each; reports what it saw.
PROBE = r"""
import importlib, json, pkgutil, sys
import gpu_workbench
names = sorted(m.name for m in pkgutil.walk_packages(gpu_workbench.__path__, "gpu_workbench.")
               if not m.name.endswith("__main__"))
for name in names:
    importlib.import_module(name)
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1))
from gpu_workbench.parallel import RunConfig
from gpu_workbench.parallel.models.transformer import GPT
ours = GPT(RunConfig.from_toml(sys.argv[1], []).model)
import kernels as hf_kernels
package = str(gpu_workbench.__path__[0])
twice = sorted(k for k, m in sys.modules.items() if getattr(m, "__file__", None) and
               str(m.__file__).startswith(package) and not k.startswith("gpu_workbench"))
print(json.dumps({"modules": len(names), "hf_kernels": hf_kernels.__file__, "twice": twice,
                  "logits": list(hf(torch.zeros(1, 3, dtype=torch.long)).logits.shape),
                  "ours": sum(p.numel() for p in ours.parameters())}))
"""


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_every_module_beside_transformers(where, tmp_path):
    import json

    cwd = ROOT if where == "root" else tmp_path
    done = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "configs" / "tiny.toml")], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["modules"] > 50 and seen["twice"] == [], seen
    assert not Path(seen["hf_kernels"]).is_relative_to(ROOT / "gpu_workbench"), seen   # Hugging Face's own
    assert seen["logits"] == [1, 3, 32] and seen["ours"] > 0


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.slow
def test_pip_install_leaves_hugging_face_kernels_untouched(tmp_path):
    """A fresh venv holding Hugging Face's `kernels` (copied from the test venv: tests never download), then
    a regular, non-editable `pip install` of a wheel built from this checkout, offline and without deps."""
    import kernels as hf_kernels

    source = tmp_path / "src"   # a copy: building in the checkout would write build/ and *.egg-info into it
    shutil.copytree(ROOT / "gpu_workbench", source / "gpu_workbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "w"),
                    str(source)], check=True, capture_output=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    hf_dir = Path(hf_kernels.__file__).parent
    assert hf_dir != ROOT / "kernels" and "site-packages" in hf_dir.parts, hf_dir   # Hugging Face's, installed
    dist_info = next(Path(sysconfig.get_paths()["purelib"]).glob("kernels-*.dist-info"))
    shutil.copytree(hf_dir, site / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(dist_info, site / dist_info.name)
    before = _hashes(site / "kernels")
    wheel = next((tmp_path / "w").glob("gpu_workbench-*.whl"))
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    assert (site / "gpu_workbench" / "kernels" / "__init__.py").is_file()
    assert _hashes(site / "kernels") == before
    assert not any((site / name).exists() for name in ("parallel", "profiling", "cluster", "workbench"))
