#!/usr/bin/env bash
# CI's throw-away check of the README's route on a bare Debian 12: the system's own python3, externally managed
# (PEP 668), and no `python` command. A copy of this working tree (tracked files plus untracked, not ignored ones) in
# a temporary folder runs `bash scripts/install.sh` with only the system PATH, then checks that the packages went into
# the copy's .venv and not into the system's Python, and runs one fast test file and `train.py --help` through
# scripts/python. The folder is removed afterwards. HOME (and IBFT_CACHE, if set) are kept, so the default model that
# install.sh converts is the one already in the cache. Skipped where python3 on the system PATH is not externally
# managed, and with IBFT_SKIP_SYSTEM_CHECK=1.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "check_system_install: $*"; }
die() { echo "check_system_install: FAILED: $*" >&2; exit 1; }
[ "${IBFT_SKIP_SYSTEM_CHECK:-}" = 1 ] && { say "skipped (IBFT_SKIP_SYSTEM_CHECK=1)"; exit 0; }

SYSPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
sys_py=$(PATH=$SYSPATH command -v python3) || { say "skipped: no python3 on $SYSPATH"; exit 0; }
managed='import os, sys, sysconfig
sys.exit(not (sys.prefix == sys.base_prefix
              and os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'
"$sys_py" -c "$managed" || { say "skipped: $sys_py is not externally managed (PEP 668)"; exit 0; }
command -v git >/dev/null && git rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "needs git and a git work tree"

# What the system interpreter can see, before and after: every entry of its site-packages folders (user site too).
site_listing() {
    "$sys_py" -c 'import os, site
for d in site.getsitepackages() + [site.getusersitepackages()]:
    if os.path.isdir(d):
        for e in sorted(os.listdir(d)):
            s = os.lstat(os.path.join(d, e))
            print(d, e, s.st_mtime_ns)'
}
before=$(site_listing)

work=$(mktemp -d "${TMPDIR:-/tmp}/ibft-system-install.XXXXXX")
trap 'rm -rf "$work"' EXIT
git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done |
    tar --null -T - -cf - | tar -xf - -C "$work"
# A `python` that fails loudly, first on PATH: nothing in the route may rely on a `python` command.
mkdir "$work/.nopython"
printf '#!/bin/sh\necho "check_system_install: something ran a bare python: python $*" >&2\nexit 127\n' \
    >"$work/.nopython/python"
chmod +x "$work/.nopython/python"
# A clean environment: the system PATH, HOME, and what configures pip and the network.
keep=(HOME="$HOME" PATH="$work/.nopython:$SYSPATH" LANG=C.UTF-8)
while IFS='=' read -r name _; do
    case $name in PIP_*|IBFT_CACHE|http_proxy|https_proxy|no_proxy|HTTP_PROXY|HTTPS_PROXY|NO_PROXY|TMPDIR)
        keep+=("$name=${!name}");; esac
done < <(env)
run() { (cd "$work" && env -i "${keep[@]}" "$@"); }

say "python3 on the system PATH: $sys_py (externally managed); working in $work"
t0=$SECONDS
run bash scripts/install.sh || die "bash scripts/install.sh"
t1=$SECONDS
[ -x "$work/.venv/bin/python3" ] || die "install.sh made no .venv"
[ "$(cat "$work/.ibft-python")" = "$work/.venv/bin/python3" ] || die ".ibft-python is not the .venv's python3"
torch_at=$(run scripts/python -c 'import torch; print(torch.__file__)') || die "scripts/python cannot import torch"
case $torch_at in "$work/.venv/"*) ;; *) die "torch came from $torch_at, not from the .venv";; esac
after=$(site_listing)
[ "$after" = "$before" ] || { diff <(echo "$before") <(echo "$after") >&2; die "the system interpreter's site-packages changed"; }
run scripts/python -m pytest -q -p no:cacheprovider tests/test_passk.py || die "scripts/python -m pytest -q tests/test_passk.py"
run scripts/python train.py --help >/dev/null || die "scripts/python train.py --help"
say "ok: install.sh ${t1}s into .venv (torch from $torch_at), checks $((SECONDS - t1))s; system site-packages unchanged"
