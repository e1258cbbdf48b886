"""Each helper of kernels/triton_compat.py against the installed Triton (3.9 in the main venv, 3.6 in the
`make test-triton36` lane): these fail first when a release changes what a helper bridges."""

from __future__ import annotations

import os

import pytest
import torch
import triton

from gpu_workbench import kernels
from gpu_workbench.kernels import jit_loader
from gpu_workbench.kernels import triton_compat as tc
from gpu_workbench.kernels.suite.common import rel_err

SOFTMAX_SIG = {"x_ptr": "*fp16", "y_ptr": "*fp16", "n_cols": "i32", "x_row_stride": "i32", "y_row_stride": "i32",
               "LOG": "constexpr", "BLOCK_N": "constexpr"}


def test_version_is_a_supported_release():
    assert tc.version() == tuple(int(p) for p in triton.__version__.split(".")[:2])
    assert tc.OLDEST <= tc.version() <= tc.NEWEST


def test_reduction_combine_functions_work_interpreted():
    """The interpreter must recognise MAX_COMBINE / SUM_COMBINE inside tl.reduce (softmax uses both)."""
    x = torch.randn(3, 37, dtype=torch.float64)
    y = kernels.softmax(x.float(), backend="interpret")
    assert rel_err(y, torch.softmax(x, -1)) < 1e-6


def test_interpreter_takes_scalar_tensors_as_loop_bounds():
    """Causal attention loops over key blocks between bounds computed with tl.maximum / tl.minimum:
    Triton 3.6's interpreter failed on them under NumPy 2.4 until fix_interpreter_scalar_index()."""
    from triton.runtime import interpreter

    jit_loader.load("attention", interpret=True)
    assert interpreter._patch_lang_tensor.squeezes_scalars
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 37, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    out = kernels.attention(q.float(), k.float(), v.float(), causal=True, backend="interpret")
    scores = (q @ k.transpose(-1, -2) / 4).masked_fill(torch.ones(37, 37).triu(1).bool(), float("-inf"))
    assert rel_err(out, torch.softmax(scores, -1) @ v) < 1e-5


def test_default_fp_fusion_is_set_without_overriding_a_choice(monkeypatch):
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    tc.set_default_fp_fusion()
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == "1"
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    tc.set_default_fp_fusion()
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == "0"


def test_ast_source_marks_exactly_the_aligned_arguments():
    fn = jit_loader.load("softmax", interpret=False).softmax_fwd_looped
    source = tc.ast_source(fn, SOFTMAX_SIG, {"LOG": False, "BLOCK_N": 1024}, ["x_ptr", "n_cols"])
    assert source.attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}


def test_compile_for_an_absent_gpu_gives_every_stage():
    fn = jit_loader.load("softmax", interpret=False).softmax_fwd_looped
    source = tc.ast_source(fn, SOFTMAX_SIG, {"LOG": False, "BLOCK_N": 1024}, ["x_ptr", "y_ptr"])
    compiled = tc.compile_for(source, 80, num_warps=4, num_stages=2)
    for stage in tc.IR_STAGES:
        assert tc.intermediate(compiled, stage).strip(), stage
    assert ".target sm_80" in tc.intermediate(compiled, "ptx")
    assert tc.cubin(compiled)[:4] == b"\x7fELF"
    assert "softmax_fwd_looped" in tc.intermediate(compiled, "sass")
    assert isinstance(tc.shared_bytes(compiled), int) and tc.shared_bytes(compiled) >= 0


def test_bundled_tools():
    assert tc.bundled_tool("cuobjdump") is not None and tc.bundled_tool("ptxas") is not None
    assert tc.bundled_tool("no-such-tool") is None


def test_compiler_message_of_a_front_end_error_has_no_source_excerpt():
    fn = jit_loader.load("softmax", interpret=False).softmax_fwd_looped
    source = tc.ast_source(fn, SOFTMAX_SIG, {"LOG": False, "BLOCK_N": 1000}, [])
    with pytest.raises(Exception) as caught:
        tc.compile_for(source, 90, num_warps=4, num_stages=2)
    message = tc.compiler_message(caught.value)
    assert "must be a power of 2" in message
    assert "^" not in message and "def softmax_fwd_looped" not in message
    assert "(at: m_lane = tl.full([BLOCK_N]" in message  # the kernel line it points at


def _bare_assert():
    raise AssertionError  # as Triton's own `assert`s raise: no text


def test_compiler_message_of_back_end_and_bare_assertion_errors():
    err = RuntimeError("PassManager::run failed\n   ^\nerror: out of registers")
    assert tc.compiler_message(err) == "RuntimeError: PassManager::run failed | error: out of registers"
    with pytest.raises(AssertionError) as caught:
        _bare_assert()
    message = tc.compiler_message(caught.value)
    assert message.startswith("AssertionError: test_triton_compat.py:") and "raise AssertionError" in message
