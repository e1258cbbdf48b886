"""`wb compare` and `wb report` show compiled vs eager, the checkpointing modes and the precisions side by side:
each run's label says how its step ran, and the table has the compile time and the activation bytes."""

from __future__ import annotations

from pathlib import Path

from gpu_workbench.cli.report import Run, runs_table


def _run(**fields) -> Run:
    summary = {"recipe": "single", "precision": "fp32", "compiled": False, "activation_checkpointing": "none",
               "compile_s": None, "activation_bytes_saved": 1 << 20, **fields}
    return Run(Path("x"), summary, {})


def test_labels_and_columns_side_by_side():
    runs = [_run(), _run(compiled=True, compile_s=12.5), _run(activation_checkpointing="selective"),
            _run(precision="fp16"), _run(compiled=True, precision="fp8", activation_checkpointing="full")]
    assert [r.label for r in runs] == ["single", "single compiled", "single ac=selective", "single fp16",
                                       "single compiled ac=full fp8"]
    header, *rows = runs_table(runs)
    compile_col = header.index("compile s (first step over median)")
    assert [row[compile_col] for row in rows] == ["—", "12.5", "—", "—", "—"]
    assert rows[0][header.index("activations MiB kept (1 micro-batch)")] == "1.0000"
