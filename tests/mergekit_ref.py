"""mergekit as a reference implementation: write tiny llama checkpoints, run ``mergekit-yaml`` on them, read back.

Everything runs offline on CPU. ``mergekit-yaml`` on local folders makes no network calls at all (checked with
strace and in a network-less namespace); the HF_*_OFFLINE variables set in ``mergekit_env`` are a guard, not a need.

Flags (``MERGEKIT_FLAGS``):
  --no-copy-tokenizer      the checkpoints have no tokenizer; without it mergekit logs an ERROR traceback
                           ("Failed to copy tokenizer") yet still exits 0 and writes the model
  --no-write-model-card    skip README.md
  --quiet                  no tqdm bars
CPU is the default (``--no-cuda``); ``--lazy-unpickle`` only matters for .bin pickles; ``--allow-crimes`` only for
mixed architectures. Pass ``random_seed`` for DARE/DELLA-style methods.

Output folder: ``config.json`` (the base's, re-serialized by transformers 5: ``dtype`` replaces ``torch_dtype``,
defaults filled in), ``mergekit_config.yml`` (the YAML as given), and ``model.safetensors`` (metadata
``{"format": "pt"}``) or, above ``--out-shard-size`` (default 5B parameters), ``model-0000K-of-0000N.safetensors``
plus ``model.safetensors.index.json``.

Cost: ``import mergekit`` alone is ~0.1 s, but the CLI imports transformers + peft + torch: ~5 s of CPU
(``mergekit-yaml --help`` ~7 s wall); a merge of these tiny models adds well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
import yaml
from checkpoints import DTYPES, fine_tune, llama_config, llama_tensors, save_checkpoint
from safetensors.torch import load_file

MERGEKIT_FLAGS = ("--no-copy-tokenizer", "--no-write-model-card", "--quiet")

LLAMA_TENSOR_NAMES_PER_LAYER = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight",
)


def llama_tensor_names(layers: int = 2) -> list[str]:
    """Every tensor name of a LlamaForCausalLM with untied embeddings."""
    names = ["model.embed_tokens.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(layers) for n in LLAMA_TENSOR_NAMES_PER_LAYER]
    return names + ["model.norm.weight", "lm_head.weight"]


def write_llama_checkpoint(folder: str | os.PathLike, seed: int = 0, dtype: str | torch.dtype = "float32", *,
                           base: dict[str, torch.Tensor] | None = None, noise: float = 0.01, hidden: int = 16,
                           intermediate: int = 32, layers: int = 2, heads: int = 2, kv_heads: int | None = None,
                           vocab: int = 64, shards: int = 1) -> dict[str, torch.Tensor]:
    """Write a llama-shaped transformers folder (config.json + safetensors) and return its tensors.

    Without ``base``: random weights from ``seed``. With ``base`` (a dict such as this function returns): a
    fine-tune, ``base`` plus Gaussian noise of std ``noise`` seeded by ``seed``, cast to ``dtype``.
    ``shards > 1`` writes ``model-0000K-of-0000N.safetensors`` and the index.
    """
    if isinstance(dtype, torch.dtype):
        dtype = next(name for name, d in DTYPES.items() if d == dtype)
    cfg = llama_config(hidden, intermediate, layers, vocab, heads)
    cfg["num_key_value_heads"] = kv_heads or heads
    cfg["torch_dtype"] = dtype
    if base is None:
        tensors = llama_tensors(cfg, seed, DTYPES[dtype])
    else:
        tensors = {n: t.to(DTYPES[dtype]) for n, t in fine_tune(base, seed, noise).items()}
    save_checkpoint(Path(folder), tensors, cfg, shards)
    return tensors


def mergekit_executable() -> list[str]:
    """The ``mergekit-yaml`` console script of this interpreter (else the one on PATH)."""
    exe = shutil.which("mergekit-yaml", path=os.path.dirname(sys.executable)) or shutil.which("mergekit-yaml")
    return [exe] if exe else [sys.executable, "-m", "mergekit.scripts.run_yaml"]


def mergekit_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    })
    return env


def run_mergekit(config_yaml_path: str | os.PathLike, out_dir: str | os.PathLike, *extra_args: str,
                 random_seed: int | None = None, timeout: float = 240) -> Path:
    """Run ``mergekit-yaml CONFIG OUT`` offline on CPU; returns ``out_dir``. Raises with mergekit's output on failure."""
    cmd = [*mergekit_executable(), str(config_yaml_path), str(out_dir), *MERGEKIT_FLAGS, *extra_args]
    if random_seed is not None:
        cmd += ["--random-seed", str(random_seed)]
    proc = subprocess.run(cmd, env=mergekit_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return Path(out_dir)


_BATCH_RUNNER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
jobs, flags = json.loads(sys.argv[1]), json.loads(sys.argv[2])
failed = {}
for name, config, out, extra in jobs:
    try:
        main.main([config, out, *flags, *extra], standalone_mode=False)
    except BaseException as exc:
        failed[name] = traceback.format_exc()
print("FAILED-JSON " + json.dumps(failed))
"""


@contextmanager
def mergekit_batch(jobs: list[tuple[str, str, str, list[str]]], flags=MERGEKIT_FLAGS, timeout: float = 500):
    """Many ``mergekit-yaml CONFIG OUT`` in the background, one Python process per core (mergekit's imports cost
    seconds each time, so each process takes a share of the jobs), while the block runs our own merges of the same
    configs: ``jobs`` are (name, config path, output folder, extra flags). Yields a function that waits for the
    batch and returns {name: traceback} for the jobs that failed; processes still running when the block ends (it
    raised) are killed."""
    import json

    env = {**mergekit_env(), "OMP_NUM_THREADS": "1"}  # tiny models: one thread is several times faster
    cores = max(1, os.cpu_count() or 1)
    with ExitStack() as files:
        procs = []
        for share in (jobs[k::cores] for k in range(cores)):
            if share:  # output to files, not pipes: a pipe nobody reads for a minute stalls its writer
                out, err = files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(
                    tempfile.TemporaryFile("w+"))
                procs.append((subprocess.Popen([sys.executable, "-c", _BATCH_RUNNER, json.dumps([list(j) for j in share]),
                                                json.dumps(list(flags))], env=env, stdout=out, stderr=err, text=True),
                              out, err))

        def failed() -> dict[str, str]:
            found: dict[str, str] = {}
            deadline = time.monotonic() + timeout
            for proc, out, err in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                out.seek(0)
                err.seek(0)
                stdout, stderr = out.read(), err.read()
                marker = [line for line in stdout.splitlines() if line.startswith("FAILED-JSON ")]
                if proc.returncode != 0 or not marker:
                    raise RuntimeError(f"mergekit batch failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
                found.update(json.loads(marker[-1].removeprefix("FAILED-JSON ")))
            return found

        try:
            yield failed
        finally:
            for proc, _, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def write_config(path: str | os.PathLike, config: dict) -> Path:
    """Write a merge config as YAML (paths quoted safely); returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def load_output(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder, single file or sharded."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
