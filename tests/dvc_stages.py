"""Run every dvc.yaml stage's command on tiny data and record what it really reads (used by tests/test_dvc.py).

    python tests/dvc_stages.py WORKDIR OUT.json

For each stage, in dvc.yaml order, in WORKDIR (the commands' relative paths land there):
1. params.yaml is loaded and validated once (this imports every model module, to check constructor arguments);
2. every project module is dropped from sys.modules, so step 3 imports afresh exactly the code the step runs;
3. the stage's `cmd` runs through the real `ctrflow` click command, with the params as a dict that records every
   key read (`params["train"]["epochs"]`, `.get`, iteration = the whole subtree) and `ctrflow.config.section`
   replaced by one that records each typed attribute read (`section(params, "data").split` -> `data.split`).
Written: {stage: {"params": [dotted keys read], "modules": [project files imported], "ok": bool, "error": str}}.
Validation in step 1 is left out of a stage's modules on purpose: it either passes, leaving the values DVC already
tracks as params, or stops the stage.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shlex
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("ctrflow", "components", "pipelines", "serving", "monitoring", "benchmarks", "feature_repo")


class Reads:
    def __init__(self) -> None:
        self.keys: set[str] = set()

    def add(self, path: tuple[str, ...]) -> None:
        if path:
            self.keys.add(".".join(path))


class TrackingDict(dict):
    """A params dict that records the dotted keys read from it (a read of a mapping is recorded on its leaves)."""

    def __init__(self, data: Mapping[str, Any], reads: Reads, path: tuple[str, ...] = ()):
        super().__init__(data)
        self._reads, self._path = reads, path

    def _wrap(self, key: str, value: Any) -> Any:
        if isinstance(value, Mapping):
            return TrackingDict(value, self._reads, (*self._path, str(key)))
        self._reads.add((*self._path, str(key)))
        return value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self._reads.add((*self._path, str(key)))  # asked for and absent: the step still depends on it
        return default

    # reading the whole mapping (dict(x), {**x}, copy.deepcopy, iteration) depends on all of it
    def __iter__(self) -> Iterator[str]:
        self._reads.add(self._path)
        return super().__iter__()

    def keys(self):  # noqa: ANN201
        self._reads.add(self._path)
        return super().keys()

    def items(self):  # noqa: ANN201
        self._reads.add(self._path)
        return super().items()

    def values(self):  # noqa: ANN201
        self._reads.add(self._path)
        return super().values()

    def __copy__(self) -> TrackingDict:  # a copy reads nothing yet; reads from it count
        return TrackingDict(dict(super().items()), self._reads, self._path)

    def __deepcopy__(self, memo: dict) -> TrackingDict:
        return TrackingDict(copy.deepcopy(dict(super().items()), memo), self._reads, self._path)


class RecordedSection:
    """A typed section whose field reads are recorded (`model_dump()` reads all of it)."""

    def __init__(self, model: Any, path: tuple[str, ...], reads: Reads):
        object.__setattr__(self, "_m", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        model, path, reads = self._m, self._path, self._reads
        if name in type(model).model_fields:
            value = getattr(model, name)
            if hasattr(type(value), "model_fields"):
                return RecordedSection(value, (*path, name), reads)
            reads.add((*path, name))
            return value
        if name in ("model_dump", "model_dump_json", "__iter__", "__dict__"):
            reads.add(path)
        return getattr(model, name)


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in PROJECT_PACKAGES:
            del sys.modules[name]


def _project_files() -> list[str]:
    out = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file).resolve()
        if REPO_ROOT not in path.parents:
            continue
        parts = path.relative_to(REPO_ROOT).parts
        # a virtualenv inside the checkout (make's .venv) holds installed packages, not project code
        if parts[0] == "tests" or parts[0].startswith(".") or "site-packages" in parts:
            continue
        out.add(str(path.relative_to(REPO_ROOT)))
    return sorted(out)


def run_stage(cmd: str) -> dict[str, Any]:
    _purge()
    from ctrflow.config import load_params

    params = load_params()  # step 1: validated once, like the CLI does (imports every model for the check)
    _purge()
    import ctrflow.config as config

    reads = Reads()
    real_section = config.section

    def recorded_section(p: Mapping[str, Any], name: str) -> RecordedSection:
        plain = dict.get(p, name) if isinstance(p, dict) else (p or {}).get(name)  # untracked: fields are recorded
        return RecordedSection(real_section({name: plain}, name), (name,), reads)

    config.section = recorded_section  # before ctrflow.steps & co. import it
    import ctrflow.cli as cli

    cli.load_params = lambda *a, **k: TrackingDict(params, reads)
    argv = shlex.split(cmd)
    if ">" in argv:  # register's `> runs/dvc/register.json`: the shell's job under DVC
        argv = argv[: argv.index(">")]
    assert argv[0] == "ctrflow", cmd
    result: dict[str, Any] = {"ok": True, "error": ""}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cli.cli.main(args=argv[1:], standalone_mode=False)
    except SystemExit as exc:
        result.update(ok=exc.code in (0, None), error=f"exit {exc.code}")
    except Exception as exc:  # noqa: BLE001 - reported to the test
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    result["params"] = sorted(reads.keys)
    result["modules"] = _project_files()
    return result


def main(workdir: str, out: str) -> None:
    import os

    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    os.chdir(workdir)
    records = {name: run_stage(stage["cmd"]) for name, stage in stages.items()}
    Path(out).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))  # the project next to this script, whatever is installed
    main(sys.argv[1], sys.argv[2])
