"""Run a benchmark module against another copy of the engine, for an A/B in one GPU call:

    git archive <commit> engine | tar -x -C /tmp/base
    python bench/with_engine.py /tmp/base bench.bench_offline --shape ... --out base.json

imports ``engine`` from ``/tmp/base/engine`` and everything else from this tree. (``python -m
bench.bench_offline`` puts the working directory ahead of PYTHONPATH, so a copy put first on
PYTHONPATH is not what it runs.) Result files record which engine ran (``environment()["engine"]``).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python bench/with_engine.py ENGINE_PARENT_DIR MODULE [ARGS...]")
    engine_parent, module, *args = argv
    if not (Path(engine_parent) / "engine" / "__init__.py").is_file():
        raise SystemExit(f"{engine_parent} holds no engine/ package")
    sys.path[0:0] = [str(Path(engine_parent).resolve()), str(ROOT)]
    import engine

    print(f"engine from {Path(engine.__file__).parent}", flush=True)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
