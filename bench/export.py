"""Benchmark: `stalwart checkpoints export` to DCP and safetensors, against the reads and writes it is made of.

Prints ONE JSON line. Run from the repository root:
    python bench/export.py            # ~200 MB of state, 3 repetitions
    python bench/export.py --quick    # 1 repetition

Set-up (one process, no cluster): a stack of Linear(dim, dim) layers and AdamW after one step (params,
exp_avg, exp_avg_sq: 3x the weights), saved by `CheckpointEngine` at world size 1 into a local
directory, as a DDP rank saves it. Then, per repetition, in turns:

  load                 engine.load of the checkpoint (what export reads, and what `checkpoints verify` does)
  export_dcp           formats.export(..., "dcp"): load + convert + dcp.save of model and optimizer
  export_safetensors   formats.export(..., "safetensors"): load + convert + the model's weights
  dcp_save_direct      dcp.save(no_dist) of the same state dicts from memory (the write alone)
  safetensors_direct   safetensors save_file of the model's weights from memory (the write alone)

Each export's ratio is against load + its direct write: what converting and the temporary folder add.
Also: what recording the optimizer's parameter names (for export) adds to each DDP save, as the time of
`DDPStrategy.state()` against the same call without them (200 calls each, medians), next to the stall.
The files are in the page cache (just written), so these are costs of copying, checksumming and
serializing, not of a disk.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit, median, note, ratio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    args = parser.parse_args()
    reps = 1 if args.quick else 3

    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from stalwart.checkpointing import engine, formats
    from stalwart.checkpointing.storage import FileStorage
    from stalwart.launchers.strategies import DDPStrategy

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.dim, args.dim) for _ in range(args.layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, args.dim)).sum().backward()
    optimizer.step()
    strategy = DDPStrategy()
    strategy.model, strategy.optimizer = model, optimizer
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    root = Path(tempfile.mkdtemp(prefix="stalwart-bench-export-"))
    try:
        storage = FileStorage(root / "ckpt")
        eng = engine.CheckpointEngine(storage, rank=0, world_size=1)
        eng.save(1, strategy.state())
        result = eng.wait()
        note(f"checkpoint: {result.bytes / 1e6:.0f} MB (weights {weights_bytes / 1e6:.0f} MB)")
        model_sd, optim_sd = formats.standard_state(engine.load(storage, 1, 0))
        times: dict[str, list[float]] = {k: [] for k in
                                         ("load", "export_dcp", "export_safetensors", "dcp_save_direct",
                                          "safetensors_direct")}

        def timed(name, fn):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

        for rep in range(reps):
            out = root / f"rep{rep}"
            phases = [
                ("load", lambda: engine.load(storage, 1, 0)),
                ("export_dcp", lambda: formats.export(storage, 1, "dcp", out / "dcp")),
                ("export_safetensors", lambda: formats.export(storage, 1, "safetensors", out / "st")),
                ("dcp_save_direct", lambda: dcp.save({"model": model_sd, "optim": optim_sd},
                                                     storage_writer=dcp.FileSystemWriter(str(out / "dcp2")),
                                                     no_dist=True)),
                ("safetensors_direct", lambda: (out / "st2").mkdir(parents=True) or save_file(
                    {k: v.contiguous().clone() for k, v in model_sd.items()}, str(out / "st2" / "model.safetensors"))),
            ]
            for name, fn in (phases if rep % 2 == 0 else phases[::-1]):
                timed(name, fn)
            shutil.rmtree(out)
            note(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        # What the export's names cost each DDP save: state() now walks the parameters for them.
        def old_state():
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

        state_us = {"state": [], "state_without_names": []}
        for _ in range(200):
            for name, fn in (("state", strategy.state), ("state_without_names", old_state)):
                t0 = time.perf_counter()
                fn()
                state_us[name].append((time.perf_counter() - t0) * 1e6)
        med = {k: median(v) for k, v in times.items()}
        emit({"benchmark": "export", "reps": reps, "checkpoint_mb": result.bytes / 1e6,
              "weights_mb": weights_bytes / 1e6, "median_s": med,
              "export_dcp_vs_load_plus_write": ratio(med["export_dcp"], med["load"] + med["dcp_save_direct"]),
              "export_safetensors_vs_load_plus_write": ratio(med["export_safetensors"],
                                                             med["load"] + med["safetensors_direct"]),
              "export_dcp_mb_per_s": result.bytes / 1e6 / med["export_dcp"],
              "ddp_state_us": median(state_us["state"]),
              "ddp_state_without_names_us": median(state_us["state_without_names"]),
              "ddp_state_ratio": ratio(median(state_us["state"]), median(state_us["state_without_names"])),
              "save_stall_ms": result.stall_s * 1e3})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
