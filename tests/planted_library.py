"""Plant a bug in a copy of an outside library's module and run the property that names it (tests/test_ecosystem.py).

    python tests/planted_library.py loralib|torchtune

Runs inside an environment holding the library (the test picks it through tools/envs.py). For each backend it
runs the named property twice through harness.engine.run_property: on the library as installed, and with the
backend's layer class taken from a copy of the library's file in which one line was rewritten (the bug). Prints
one JSON line: {"library", "property", "planted", "clean": Result, "bug": Result}.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# library -> (backend, variant, property, class attribute of the backend's module holder, (line as shipped, planted))
PLANTS = {
    # loralib's Linear.forward without its alpha / r scale
    "loralib": ("loralib", "lora", "oracle", "Linear",
                ("self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)) * self.scaling",
                 "self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1))")),
    # torchtune's LoRALinear.forward without its alpha / rank scale
    "torchtune": ("torchtune", "lora", "oracle", "LoRALinear",
                  ("lora_out = (self.alpha / self.rank) * self.lora_b(lora_out)", "lora_out = self.lora_b(lora_out)")),
}


def planted_module(cls: type, line: tuple[str, str], folder: Path):
    """The module of `cls` from a copy of its file with `line[0]` rewritten as `line[1]` (absolute imports of the copy
    resolve to the installed library)."""
    src = Path(inspect.getsourcefile(cls)).read_text()
    if line[0] not in src:
        raise SystemExit(f"the planted line is not in {inspect.getsourcefile(cls)}: {line[0]!r}")
    f = folder / f"planted_{Path(inspect.getsourcefile(cls)).stem}.py"
    f.write_text(src.replace(line[0], line[1], 1))
    spec = importlib.util.spec_from_file_location(f.stem, f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(library: str) -> int:
    from harness import PROPERTIES
    from harness.backends import make
    from harness.engine import run_property
    from spec import SPECS

    backend, variant, prop, attr, line = PLANTS[library]
    be = make(backend)
    spec = SPECS.get(variant)
    clean = run_property(PROPERTIES[prop], spec, be, profile="ci").to_json()
    holder = be.lora if library == "loralib" else be.peft
    with tempfile.TemporaryDirectory() as d:
        bad = planted_module(getattr(holder, attr), line, Path(d))
        fake = SimpleNamespace(**{n: getattr(holder, n) for n in dir(holder) if not n.startswith("__")})
        for name in (attr, "LoRALayer"):  # loralib's isinstance checks take the copy's base class
            if hasattr(bad, name):
                setattr(fake, name, getattr(bad, name))
        if library == "loralib":
            be.lora = fake
        else:
            be.peft = fake
        bug = run_property(PROPERTIES[prop], spec, be, profile="ci").to_json()
    print(json.dumps({"library": library, "property": prop, "planted": line[1], "clean": clean, "bug": bug}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
