"""`convert-jax` speed and peak memory on an ELF-sized random JAX checkpoint.

Writes a full training state of random float32 weights (`params`, `ema_params1`, and an
`opt_state` holding two more copies, like Adam/Muon moments, plus `step`) in the Orbax
OCDBT layout (zarr v2 leaves, zstd, written with tensorstore exactly as Orbax lays them
out) and/or as a Flax msgpack file, then runs the conversion in a fresh subprocess and
reports its wall time and peak resident memory, beside the peak of a subprocess that only
imports the same modules (so the difference is the conversion's own memory). Only
`ema_params1` is read: the output alone is ~4 bytes x parameters.

Peak memory is read two ways in the child: `ru_maxrss` and `VmHWM` (/proc/self/status).
Linux carries `ru_maxrss` across fork/vfork + exec, so a child started by a process that
once held gigabytes reports the parent's peak; the sources are therefore written by a
separate child too, and this parent stays small.

    .venv/bin/python bench/convert_speed.py                      # ELF-B, Orbax + msgpack
    .venv/bin/python bench/convert_speed.py --size M --layouts orbax
    .venv/bin/python bench/convert_speed.py --dtype bfloat16 --keep /tmp/elf-b-jax
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from elfctl.config import ModelConfig
from elfctl.convert import expected_jax_shapes, parameter_count

SIZES = {
    "B": ModelConfig(hidden_size=768, depth=12, num_heads=12),
    "M": ModelConfig(hidden_size=1056, depth=24, num_heads=16),
    "L": ModelConfig(hidden_size=1280, depth=32, num_heads=16),
}

MEASURE = """
import json, resource, sys, time
start = time.perf_counter()
from elfctl.convert import convert_checkpoint
imported = time.perf_counter()
mode = sys.argv[1]
if mode == "convert":
    r = convert_checkpoint(sys.argv[2], sys.argv[3], weights="ema", fmt=sys.argv[4])
    extra = {"tensors": r.tensors, "parameters": r.parameters, "step": r.step,
             "convert_seconds": r.seconds, "source_dtype": "+".join(r.source_dtypes)}
else:
    import msgpack, tensorstore, torch  # what a conversion imports, nothing converted
    extra = {}
end = time.perf_counter()
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")]
extra.update(import_seconds=imported - start, total_seconds=end - start,
             maxrss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             hwm_mib=int(hwm[0]) / 1024 if hwm else float("nan"))
print(json.dumps(extra))
"""


def random_tree(cfg: ModelConfig, rng: np.random.Generator, dtype) -> dict[str, np.ndarray]:
    return {
        name: (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
        for name, shape in expected_jax_shapes(cfg).items()
    }


def training_state(cfg: ModelConfig, dtype, seed: int = 0) -> dict[tuple[str, ...], object]:
    """{key path: leaf} of a full training state, as the official JAX code saves it."""
    rng = np.random.default_rng(seed)
    leaves: dict[tuple[str, ...], object] = {}
    for prefix in (
        ("params",),
        ("ema_params1",),
        ("opt_state", "0", "mu"),
        ("opt_state", "0", "nu"),
    ):
        for name, array in random_tree(cfg, rng, dtype).items():
            leaves[prefix + tuple(name.split("/"))] = array
    leaves[("step",)] = np.int64(95000)
    return leaves


def write_orbax(path: Path, leaves: dict) -> None:
    import ml_dtypes
    import tensorstore as ts

    path.mkdir(parents=True)
    context, txn = ts.Context(), ts.Transaction()
    tree = {}
    for keys, value in leaves.items():
        array = np.asarray(value)
        dotted = ".".join(keys)
        dtype = "bfloat16" if array.dtype == ml_dtypes.bfloat16 else array.dtype.str
        spec = {
            "driver": "zarr",
            "kvstore": {"driver": "ocdbt", "base": f"file://{path}/", "path": dotted + "/"},
            "metadata": {
                "shape": list(array.shape),
                "chunks": list(array.shape),
                "dtype": dtype,
                "compressor": {"id": "zstd", "level": 1},
            },
        }
        ts.open(spec, create=True, context=context, transaction=txn).result().write(array).result()
        tree[str(keys)] = {
            "key_metadata": [{"key": k, "key_type": 2} for k in keys],
            "value_metadata": {
                "value_type": "scalar" if array.ndim == 0 else "np.ndarray",
                "skip_deserialize": False,
            },
        }
    txn.commit_sync()
    (path / "_METADATA").write_text(json.dumps({"tree_metadata": tree, "use_ocdbt": True}))
    (path / "_CHECKPOINT_METADATA").write_text("{}")


def write_msgpack(path: Path, leaves: dict) -> None:
    """Flax's encoding: ExtType 1 arrays, ExtType 3 numpy scalars (no array here > 2^30 B)."""
    import msgpack

    def payload(a: np.ndarray) -> bytes:
        return msgpack.packb((a.shape, a.dtype.name, a.tobytes("C")), use_bin_type=True)

    def default(x):
        if isinstance(x, np.ndarray):
            return msgpack.ExtType(1, payload(x))
        if isinstance(x, np.generic):
            return msgpack.ExtType(3, payload(np.asarray(x)))
        raise TypeError(type(x))

    tree: dict = {}
    for keys, value in leaves.items():
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    path.write_bytes(msgpack.packb(tree, default=default, strict_types=True))


def run(mode: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, mode, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_source(layout: str, path: Path, size: str, dtype_name: str) -> None:
    import ml_dtypes

    dtype = np.float32 if dtype_name == "float32" else ml_dtypes.bfloat16
    leaves = training_state(SIZES[size], dtype)
    (write_orbax if layout == "orbax" else write_msgpack)(path, leaves)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="B")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--layouts", default="orbax,msgpack")
    parser.add_argument("--format", default="official", choices=["official", "elfctl"])
    parser.add_argument("--keep", type=Path, help="Keep the sources in this folder.")
    parser.add_argument(
        "--write-source", nargs=2, metavar=("LAYOUT", "PATH"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.write_source:  # child mode: build one source, then exit (keeps the parent small)
        write_source(args.write_source[0], Path(args.write_source[1]), args.size, args.dtype)
        return

    cfg = SIZES[args.size]
    work = args.keep or Path(tempfile.mkdtemp(prefix="convert-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"ELF-{args.size}: {parameter_count(cfg):,} parameters per set, {args.dtype} leaves")
    baseline = run("imports")
    print(
        f"imports only: peak RSS {baseline['hwm_mib']:.0f} MiB (VmHWM), "
        f"{baseline['maxrss_mib']:.0f} MiB (ru_maxrss)"
    )
    try:
        for layout in args.layouts.split(","):
            name = "checkpoint_95000" if layout == "orbax" else "checkpoint_95000.msgpack"
            src = work / f"{args.size}-{args.dtype}" / name
            if not src.exists():
                src.parent.mkdir(parents=True, exist_ok=True)
                started = time.perf_counter()
                cmd = [sys.executable, __file__, "--size", args.size, "--dtype", args.dtype]
                subprocess.run(cmd + ["--write-source", layout, str(src)], check=True)
                print(f"wrote the {layout} source in {time.perf_counter() - started:.1f} s")
            files = src.rglob("*") if src.is_dir() else [src]
            size = sum(p.stat().st_size for p in files if p.is_file())
            dst = work / f"out-{layout}"
            shutil.rmtree(dst, ignore_errors=True)
            r = run("convert", str(src), str(dst), args.format)
            print(
                f"{layout:8s} source {size / 2**20:,.0f} MiB ({r['source_dtype']}) -> "
                f"{r['tensors']} tensors: conversion {r['convert_seconds']:.2f} s "
                f"(whole process {r['total_seconds']:.2f} s), peak RSS {r['hwm_mib']:,.0f} MiB "
                f"VmHWM / {r['maxrss_mib']:,.0f} MiB ru_maxrss "
                f"(+{r['hwm_mib'] - baseline['hwm_mib']:,.0f} MiB over imports; float32 output "
                f"{4 * r['parameters'] / 2**20:,.0f} MiB)"
            )
            shutil.rmtree(dst, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
