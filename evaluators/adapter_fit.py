"""Does an adapter fit the base it is evaluated on? Checked on the safetensors headers alone."""
from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from tunelens.errors import TunelensError


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_adapter_fits(base_dir: Path, adapter_dir: Path) -> None:
    """Every LoRA pair of the adapter must sit on a base weight of matching shape, else raise."""
    base_files = sorted(Path(base_dir).glob("*.safetensors"))
    adapter_file = Path(adapter_dir) / "adapter_model.safetensors"
    if not base_files or not adapter_file.is_file():
        return  # .bin checkpoints are not opened here (never unpickled); the backend checks them
    base = _tensor_shapes(base_files)
    base_keys = {key.removesuffix(".weight"): shape for key, shape in base.items()}
    for key, shape in _tensor_shapes([adapter_file]).items():
        part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
        if part is None:
            continue
        module = re.sub(r"^base_model\.model\.", "", key.split(part)[0])
        base_shape = base_keys.get(module) or base_keys.get(module.removeprefix("model."))
        if base_shape is None:
            raise TunelensError(f"adapter {adapter_dir} does not fit base {base_dir}: the base "
                                f"has no module {module}; pass the base it was trained on (--base)")
        # lora_A is (r, in), lora_B (out, r); GPT-2's Conv1D stores its weight as (in, out).
        size = shape[1] if part == ".lora_A." else shape[0]
        if size not in base_shape:
            raise TunelensError(f"adapter {adapter_dir} does not fit base {base_dir}: {module} "
                                f"is {size} wide in the adapter but the base weight is "
                                f"{'x'.join(map(str, base_shape))}; pass the base it was trained on")
