#!/usr/bin/env bash
# The fast tier of the suite on each supported stack, each in a side venv of its own (`make test-stacks`).
#
#   scripts/test_stacks.sh                  # every stack: gpu-image, newest, oldest
#   scripts/test_stacks.sh gpu-image        # one stack (or several, by name)
#   scripts/test_stacks.sh --install [...]  # build the venvs only (downloads and installs, no tests)
#
# Stacks (README.md, "Supported stacks"):
#   gpu-image  the GPU machine's image: Python 3.12, torch 2.11, Triton 3.6, transformers, no deepspeed/ray/nvtx
#   newest     Python 3.12, the newest torch the declared range admits (2.13.x), its Triton, every dependency
#   oldest     Python 3.10, the oldest torch the declared range admits (2.11.x), its Triton, every dependency
#
# torch comes from PyPI (the CUDA build: several GB per venv the first time; it runs on CPU). A venv is built
# once and kept: its stamp file (.venv-stack-<name>/.installed) holds what was installed, and pip runs again
# only when that changes or pyproject.toml is newer than the stamp. Logs: results/stacks/<name>.log.
# Python interpreters: PY310 / PY312 (default: pyenv's 3.10.13 / 3.12.1, else python3.10 / python3.12).
# Exit status: 0 when every stack ran and passed, 1 otherwise. One summary line per stack at the end.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOG_DIR=$ROOT/results/stacks
PYTEST_ARGS=(tests -q -n "${PYTEST_JOBS:-auto}" --dist loadfile -m "not slow and not timing" -p no:cacheprovider)
TEST_TOOLS=(pytest pytest-xdist pytest-timeout pytest-benchmark hypothesis)
ALL_STACKS=(gpu-image newest oldest)

find_python() {   # find_python 3.12 -> path of an interpreter of that version
    local version=$1 candidate
    for candidate in "$HOME"/.pyenv/versions/"$version".*/bin/python "$(command -v "python$version" || true)"; do
        if [[ -x $candidate ]]; then
            echo "$candidate"
            return
        fi
    done
    echo "test_stacks.sh: no Python $version found (set PY${version//./})" >&2
    exit 1
}

# The project's runtime dependencies from pyproject.toml, less torch/triton (pinned per stack) and less the
# names given: one requirement a line.
runtime_deps_except() {
    "$1" - "${@:2}" <<'EOF'
import re, sys, tomllib
skip = {"torch", "triton", *sys.argv[1:]}
for req in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]:
    if re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() not in skip:
        print(req)
EOF
}

# install_stack NAME PYTHON: create the venv if missing, then pip install what the stack holds unless the
# stamp already records exactly that.
install_stack() {
    local name=$1 python=$2 venv=$ROOT/.venv-stack-$name
    local pip=$venv/bin/pip spec
    case $name in
        gpu-image)
            local deps
            mapfile -t deps < <(runtime_deps_except "$python" deepspeed ray nvtx)
            spec="torch==2.11.* triton==3.6.0 transformers ${deps[*]} ${TEST_TOOLS[*]} | --no-deps -e ." ;;
        newest) spec="torch==2.13.* | -e .[test]" ;;
        oldest) spec="torch==2.11.* | -e .[test]" ;;
        *) echo "test_stacks.sh: unknown stack '$name' (one of: ${ALL_STACKS[*]})" >&2; exit 2 ;;
    esac
    if [[ -f $venv/.installed && $(cat "$venv/.installed") == "$spec" && $venv/.installed -nt pyproject.toml ]]; then
        return
    fi
    echo "== $name: installing into $venv ($spec)"
    [[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
    # setuptools >= 70.1 builds wheels itself (tests/test_namespace.py runs `pip wheel --no-build-isolation`;
    # Python 3.10's venv ships setuptools 65, which needs the `wheel` package for that)
    "$pip" install -q --upgrade pip "setuptools>=70.1,<82"   # <82: torch 2.11 requires it
    # Two steps: the stack's torch (and Triton) first, then the project, whose range (torch>=2.5) keeps it.
    local first=${spec%% | *} second=${spec##* | }
    # Word splitting of the requirement lists is wanted, pathname expansion (of `.[test]`) is not.
    set -f
    # shellcheck disable=SC2086
    "$pip" install -q $first
    # shellcheck disable=SC2086
    "$pip" install -q $second
    set +f
    echo "$spec" > "$venv/.installed"
}

stack_python() {   # the interpreter a stack's venv is built from
    case $1 in
        oldest) echo "${PY310:-$(find_python 3.10)}" ;;
        *) echo "${PY312:-$(find_python 3.12)}" ;;
    esac
}

# run_stack NAME: install, run the fast tier, append the summary line to SUMMARY.
run_stack() {
    local name=$1
    install_stack "$name" "$(stack_python "$name")"
    local venv=$ROOT/.venv-stack-$name log=$LOG_DIR/$name.log
    local versions
    versions=$("$venv/bin/python" -c 'import platform, torch, triton
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {triton.__version__}")')
    echo "== $name: $versions: pytest ${PYTEST_ARGS[*]} (log: ${log#"$ROOT"/})"
    local start=$SECONDS status=0
    # --import-mode default; the venv's python runs pytest so that `python -m ...` in tests finds its packages.
    PATH=$venv/bin:$PATH VIRTUAL_ENV=$venv "$venv/bin/python" -m pytest "${PYTEST_ARGS[@]}" > "$log" 2>&1 || status=$?
    local minutes last
    minutes=$(awk "BEGIN { printf \"%.1f\", ($SECONDS - $start) / 60 }")
    last=$(tail -n 1 "$log")
    tail -n 3 "$log"
    count() { grep -oE "[0-9]+ $1" <<< "$last" | grep -oE '^[0-9]+' || echo 0; }
    # "3 errors" matches "error" too
    SUMMARY+=("$(printf '%-10s %s  passed %s  failed %s  errors %s  skipped %s  %s min  (pytest exit %s)' \
        "$name" "$versions" "$(count passed)" "$(count failed)" "$(count error)" "$(count skipped)" "$minutes" \
        "$status")")
    [[ $status -eq 0 ]] || OVERALL=1
}

main() {
    local install_only=0
    if [[ ${1:-} == --install ]]; then
        install_only=1
        shift
    fi
    local stacks=("$@")
    [[ ${#stacks[@]} -gt 0 ]] || stacks=("${ALL_STACKS[@]}")
    mkdir -p "$LOG_DIR"
    SUMMARY=()
    OVERALL=0
    local name
    for name in "${stacks[@]}"; do
        if (( install_only )); then
            local start=$SECONDS
            install_stack "$name" "$(stack_python "$name")"
            echo "== $name: venv ready ($(( SECONDS - start )) s)"
        else
            run_stack "$name"
        fi
    done
    (( ! install_only )) || return 0
    echo
    echo "== stacks ($(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs)"
    printf '%s\n' "${SUMMARY[@]}"
    return $OVERALL
}

main "$@"
