"""Fuzzing the config and CLI layer: bad `key=value` overrides of every kind (unknown keys, wrong types,
out-of-range values, malformed items) always end as ONE line on stderr, exit 2, and no run directory.

Most examples run `gpu_workbench.cli.app.main` in this process (`wb train` and `wb compare`); a handful go
through the real CLI in a subprocess. Every generated item is bad on its own, whatever else is set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_workbench.cli.app import main
from gpu_workbench.parallel import RunConfig, recipes
from gpu_workbench.parallel.runtime.errors import UserError
from gpu_workbench.parallel.runtime.toml_compat import tomllib
from tests.helpers.runs import TINY, wb


def _leaves(cls: type = RunConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every settable key of RunConfig with its type, e.g. {'optim.lr': float, 'precision': Literal[...]}."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out.update(_leaves(hint, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = hint
    return out


LEAVES = _leaves()
SECTIONS = {k.rsplit(".", 1)[0] for k in LEAVES if "." in k}
BOOLS = [k for k, h in LEAVES.items() if h is bool]
LITERALS = {k: typing.get_args(h) for k, h in LEAVES.items() if typing.get_origin(h) is typing.Literal}
INTS = [k for k, h in LEAVES.items() if h is int]
FLOATS = [k for k, h in LEAVES.items() if h is float]
BOOL_WORDS = {"true", "1", "yes", "on", "false", "0", "no", "off"}

# Out of range whatever the other fields are (bounds as RunConfig.validate and check_layout set them;
# the world size is at most 4 here, so a fault rank of 64 never exists). (low, high): bad below low
# or above high; None = no bound on that side.
INT_BAD = {**{k: (1, None) for k in ("steps", "global_batch", "micro_batch", "log_every", "model.vocab_size",
                                     "model.seq_len", "model.d_model", "model.n_layers", "model.n_heads",
                                     "checkpoint.keep", "ps.shards", "local_sgd.sync_every", "pp.virtual_stages",
                                     "tp.degree", "cp.degree", "checkpoint.full_every")},
           **{k: (0, None) for k in ("model.d_ff", "optim.warmup_steps", "checkpoint.every", "checkpoint.keep_every",
                                     "ps.staleness", "pp.microbatches", "pp.degree")},
           "zero.stage": (-1, 3), "straggler.rank": (-1, None),
           "fault.kill_rank": (None, 63), "fault.hang_rank": (None, 63)}
FLOAT_BAD = {  # (low, high, low_open): bad below low (or at it, when low_open) or at/above high
    "optim.lr": (0.0, None, True), "optim.beta1": (0.0, 1.0, False), "optim.beta2": (0.0, 1.0, False),
    "optim.weight_decay": (0.0, None, False), "optim.grad_clip": (0.0, None, False),
    "optim.min_lr_ratio": (0.0, math.nextafter(1.0, math.inf), False), "data.noise": (0.0, 1.0, False),
    "fault.collective_timeout_s": (0.0, None, True), "target_loss": (0.0, None, False),
    "local_sgd.outer_lr": (0.0, None, True), "local_sgd.outer_momentum": (0.0, 1.0, False),
    "straggler.factor": (1.0, None, False), "fault.checkpoint_write_delay_s": (0.0, None, False),
}
HARMLESS = ["progress=false", "seed=7", "name=fuzz", "log_every=2", "checkpoint.every=0"]   # valid fillers


def test_the_tables_name_real_keys():
    assert set(INT_BAD) <= set(INTS) and set(FLOAT_BAD) <= set(FLOATS)


def _toml(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return ValueError


# One line of printable text (no control characters: a newline in a value is another line; see below).
TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=12)
KEY_TEXT = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_.0123456789"), min_size=1, max_size=16)


def _unknown_key():
    return KEY_TEXT.filter(lambda k: k.strip() not in LEAVES and k.strip() not in SECTIONS).map(
        lambda k: (k, f"{k}=1"))


# Values of every TOML type (and none): whichever a field's type is not, is a wrong type for it.
ANY_VALUE = st.one_of(
    TEXT,
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()).map(repr),
    st.integers().map(str),
    st.sampled_from(["true", "false", "[1, 2]", "[]", '["a"]', "{a = 1}", "1979-05-27", "2.0", "1e3", '""', "'x'"]),
    TEXT.map(json.dumps),
)


def _wrong_type():
    def for_key(key):
        hint = LEAVES[key]
        if hint is bool:
            return ANY_VALUE.filter(lambda t: t.strip().lower() not in BOOL_WORDS)
        if key in LITERALS:
            return ANY_VALUE.filter(lambda t: t.strip() not in LITERALS[key])
        if hint is int:
            return ANY_VALUE.filter(lambda t: type(_toml(t.strip())) is not int)
        if hint is float:   # not a number at all (non-finite numbers: see the xfail test below)
            return ANY_VALUE.filter(lambda t: type(_toml(t.strip())) not in (int, float))
        return ANY_VALUE.filter(lambda t: not isinstance(_toml(t.strip()), list))   # pp.layers_per_stage
    keys = [k for k, h in LEAVES.items() if h is not str]
    return st.sampled_from(keys).flatmap(lambda k: for_key(k).map(lambda t: (k, f"{k}={t}")))


def _out_of_range_int():
    def for_key(key):
        low, high = INT_BAD[key]
        sides = ([st.integers(max_value=low - 1)] if low is not None else []) + \
                ([st.integers(min_value=high + 1)] if high is not None else [])
        return st.one_of(*sides)
    return st.sampled_from(sorted(INT_BAD)).flatmap(lambda k: for_key(k).map(lambda v: (k, f"{k}={v}")))


def _out_of_range_float():
    def for_key(key):
        low, high, low_open = FLOAT_BAD[key]
        below = st.floats(max_value=low, exclude_max=not low_open, allow_nan=False, allow_infinity=False)
        sides = [below] + ([st.floats(min_value=high, allow_nan=False, allow_infinity=False)] if high is not None
                           else [])
        return st.one_of(*sides).filter(math.isfinite)
    return st.sampled_from(sorted(FLOAT_BAD)).flatmap(lambda k: for_key(k).map(lambda v: (k, f"{k}={v!r}")))


def _malformed():
    no_equals = TEXT.filter(lambda t: "=" not in t and not t.startswith("-"))   # a leading '-' is an option
    empty_key = TEXT.map(lambda t: f" ={t}")
    return st.one_of(no_equals, empty_key).map(lambda item: ("", item))


KINDS = {"unknown key": _unknown_key(), "wrong type": _wrong_type(), "int out of range": _out_of_range_int(),
         "float out of range": _out_of_range_float(), "malformed item": _malformed()}
BAD_ITEM = st.one_of(*KINDS.values())


@st.composite
def bad_overrides(draw, bad_item=BAD_ITEM) -> list[str]:
    """1-2 bad items among valid fillers whose keys none of them sets (a later good value would fix it)."""
    bad = draw(st.lists(bad_item, min_size=1, max_size=2))
    keys = {k.strip() for k, _ in bad}
    fillers = [f for f in HARMLESS if f.split("=")[0] not in keys]
    items = [item for _, item in bad] + draw(st.lists(st.sampled_from(fillers), max_size=2))
    return draw(st.permutations(items))


def _assert_one_line_exit_2(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (args, err[-3000:])
    assert err.count("\n") == 1 and err.startswith("wb: error: "), (args, err[-3000:])
    return err


# The same examples on every run (a CI failure reproduces); no example database left in the checkout.
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", list(KINDS))
@settings(FUZZ, max_examples=25)
@given(data=st.data())
def test_train_bad_overrides(kind, data, capsys):
    items = data.draw(bad_overrides(KINDS[kind]), label="overrides")
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        _assert_one_line_exit_2(["train", "--config", TINY, "--run-dir", str(run_dir), *items], capsys)
        assert not run_dir.exists()


def _just_out_of_range() -> list[str]:
    """Each bound of INT_BAD / FLOAT_BAD crossed by the smallest step (a fuzz may miss a single key)."""
    items = []
    for key, (low, high) in INT_BAD.items():
        items += ([f"{key}={low - 1}"] if low is not None else []) + ([f"{key}={high + 1}"] if high is not None else [])
    for key, (low, high, low_open) in FLOAT_BAD.items():
        items += [f"{key}={low if low_open else math.nextafter(low, -math.inf)!r}"]
        items += [f"{key}={high!r}"] if high is not None else []
    return items


@pytest.mark.parametrize("item", _just_out_of_range())
def test_every_bound(item, tmp_path, capsys):
    err = _assert_one_line_exit_2(["train", "--config", TINY, "--run-dir", str(tmp_path / "run"), item], capsys)
    assert item.split("=")[0] in err, err
    assert not (tmp_path / "run").exists()


@FUZZ
@given(items=bad_overrides(), recipes=st.lists(st.sampled_from(["single", "ddp", "zero2", "fsdp", "local-sgd"]),
                                               min_size=1, max_size=3, unique=True), nproc=st.integers(1, 4))
def test_compare_bad_overrides_launch_nothing(items, recipes, nproc, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cmp"
        _assert_one_line_exit_2(["compare", "--recipes", ",".join(recipes), "--nproc", str(nproc), "--out", str(out),
                                 *items], capsys)
        assert not out.exists()


# Through the real CLI: one example of each kind, as hypothesis would draw them.
REAL = [
    ["model.d_modle=32", "seed=1"],                          # unknown key
    ["progress=false", "micro_batch=2.5"],                   # wrong type
    ["local_sgd.outer_momentum=1.0", "zero.stage=-7"],       # out of range (two)
    ["steps 10"],                                            # malformed
]


@pytest.mark.parametrize("items", REAL, ids=[" ".join(i) for i in REAL])
def test_real_cli_bad_overrides(items, tmp_path):
    run_dir = tmp_path / "run"
    done = wb("train", "--config", TINY, "--run-dir", str(run_dir), *items)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wb: error: "), done.stderr[-3000:]
    assert not run_dir.exists()


# Non-finite hyper-parameters: every float field refuses nan and +-inf, naming the field.
NON_FINITE = [
    *[f"{key}=nan" for key in (
        "optim.lr", "optim.weight_decay", "optim.grad_clip", "optim.min_lr_ratio", "optim.eps",
        "fault.collective_timeout_s", "target_loss", "local_sgd.outer_lr", "straggler.factor")],
    *[f"{key}=inf" for key in (
        "optim.lr", "optim.weight_decay", "optim.eps", "target_loss", "local_sgd.outer_lr", "straggler.factor")],
    "optim.lr=-inf", "optim.beta1=nan", "optim.beta2=inf", "data.noise=nan", "local_sgd.outer_momentum=nan",
    "optim.min_lr_ratio=inf", "fault.collective_timeout_s=-inf",
]


@pytest.mark.parametrize("item", NON_FINITE)
def test_non_finite_hyper_parameters(item):
    """At the config layer (an accepted value would train; the CLI's handling of a UserError is the fuzz's)."""
    with pytest.raises(UserError, match=re.escape(item.split("=")[0])):
        recipes.resolve(RunConfig.from_toml(TINY, [item]), 1)


def test_negative_eps():
    with pytest.raises(UserError, match="optim.eps"):
        recipes.resolve(RunConfig.from_toml(TINY, ["optim.eps=-1e-8"]), 1)
