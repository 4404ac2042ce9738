"""Training on several processes, proven on the CPU: `torchrun` with 2 processes over gloo (the code path of several
GPUs with NCCL) against the same run on 1 process. The runs go through `if-diffusers train` on a saved tiny
stage-I pipeline and the synthetic shapes; `training_processes_worker.py` records each process's first gradients,
learning rates and final weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_processes_worker import record_run

from if_diffusers import IFPipeline

WORKER = Path(__file__).with_name("training_processes_worker.py")
# 4 steps of 16 samples (2 processes x batch 4 x 2 accumulated micro-steps, or 1 x 16), a decaying rate, EMA, a
# checkpoint at step 2, validation images and the embedding cache, all written by the main process
COMMON = ["--stage", "I", "--synthetic-shapes", "24", "--resolution", "16", "--max-train-steps", "4",
          "--checkpointing-steps", "2", "--learning-rate", "1e-3", "--lr-scheduler", "linear", "--lr-warmup-steps", "1",
          "--ema-decay", "0.9", "--seed", "5"]  # fmt: skip
TWO_PROCESSES = ["--train-batch-size", "4", "--gradient-accumulation-steps", "2"]  # against one: --train-batch-size 16


@pytest.fixture(scope="module")
def model_folder(pipeline_components, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("training_processes") / "stage_1"
    IFPipeline(**pipeline_components("I")).save_pretrained(folder)
    return folder


def _torchrun(records: Path, *runs: list) -> subprocess.CompletedProcess:
    """The worker's `runs` in turn on 2 processes (`--standalone`: a free port, so that concurrent tests do not
    collide)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(records)]  # fmt: skip
    for run in runs:
        command += ["--", *map(str, run)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _record(records: Path, rank: int = 0) -> dict:
    return torch.load(records / f"rank-{rank}.pt", weights_only=False)


def _assert_close(actual: list[torch.Tensor], expected: list[torch.Tensor], rtol: float) -> None:
    """All tensors within `rtol` of the largest magnitude among them (float32 sums in another order: a gradient of
    1e-12 differs in its own first digit)."""
    actual, expected = torch.cat([a.flatten() for a in actual]), torch.cat([e.flatten() for e in expected])
    assert (actual - expected).abs().max() <= rtol * expected.abs().max(), (actual - expected).abs().max()


def test_two_processes_train_as_one(model_folder, pipeline_components, tmp_path):
    """2 processes x batch 4 x 2 accumulated micro-steps against 1 process x batch 16: the same samples with the same
    draws (each sample's from its position in the data stream), so the same first gradient up to float32 summation
    order, and the same rates. Both processes end with identical weights; the output folder is written once and
    loads; the 2-process checkpoint resumes on 2 processes to the same weights and on 1 to the 1-process run's. A
    LoRA of stage II (only the adapter trains) the same way: 2 x 2 against 1 x 4, its file written once; it loads.
    The 2-process runs share one torchrun (each a fresh `if-diffusers train` call in the same processes)."""
    from if_diffusers import IFSuperResolutionPipeline

    one, two, again, alone = (tmp_path / name for name in ("one", "two", "again", "alone"))
    stage_2 = tmp_path / "stage_2"
    IFSuperResolutionPipeline(**pipeline_components("II")).save_pretrained(stage_2)
    lora = ["--stage", "II", "--synthetic-shapes", "8", "--resolution", "32", "--max-train-steps", "2",
            "--checkpointing-steps", "2", "--lora-rank", "2", "--learning-rate", "1e-3", "--model", stage_2]  # fmt: skip
    checkpoint = two / "out" / "checkpoints" / "checkpoint-2"
    run = _torchrun(
        tmp_path / "records",
        [*COMMON, *TWO_PROCESSES, "--model", model_folder, "--output-dir", two / "out", "--validation-steps", "2",
         "--validation-prompt", "a red circle", "--embedding-cache-dir", tmp_path / "cache"],
        [*COMMON, *TWO_PROCESSES, "--model", model_folder, "--output-dir", again / "out",
         "--resume-from-checkpoint", checkpoint],
        [*lora, "--output-dir", tmp_path / "lora_out", "--train-batch-size", "2"],
    )  # fmt: skip
    ranks, resumed, lora_ranks = ([_record(tmp_path / "records" / f"run-{i}", r) for r in (0, 1)] for i in range(3))

    assert record_run(one / "records", [*COMMON, "--model", model_folder, "--output-dir", one / "out",
                                        "--train-batch-size", "16"]) == 0  # fmt: skip
    single = _record(one / "records")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    _assert_close(ranks[0]["gradients"], single["gradients"], rtol=1e-5)  # measured 1.7e-6
    assert ranks[0]["rates"] == ranks[1]["rates"] == pytest.approx(single["rates"], rel=1e-12)
    assert len(single["rates"]) == 4
    _assert_close(ranks[0]["params"], single["params"], rtol=2e-4)  # measured 5e-5; a step moves 1e-3
    # written once, by the main process, and nothing half-written beside it
    for folder in (two / "out" / "pipeline", again / "out" / "pipeline", tmp_path / "lora_out" / "lora"):
        assert run.stdout.count(f"wrote {folder}\n") == 1, run.stdout
    # one progress bar a run (a bar's first frame has no rate yet)
    assert run.stdout.count("wrote ") == 3 and len(re.findall(r"training: [^\r\n]*\?it/s\]", run.stderr)) == 3
    assert sorted(p.name for p in (two / "out").iterdir()) == ["checkpoints", "pipeline", "validation"]
    assert sorted(p.name for p in (two / "out" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (two / "out" / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    loaded = IFPipeline.from_pretrained(two / "out" / "pipeline").unet
    _assert_close(list(loaded.parameters()), ranks[0]["params"], rtol=0)

    # the checkpoint of 2 processes, resumed on 2 (the same weights, bit for bit) and on 1 (the 1-process run's)
    assert resumed[0]["checksum"] == resumed[1]["checksum"] == ranks[0]["checksum"]
    assert resumed[0]["rates"] == ranks[0]["rates"][2:]
    assert record_run(alone / "records", [*COMMON, "--model", model_folder, "--output-dir", alone / "out",
                                          "--train-batch-size", "16", "--resume-from-checkpoint", checkpoint]) == 0  # fmt: skip
    resumed_alone = _record(alone / "records")
    assert resumed_alone["rates"] == pytest.approx(single["rates"][2:], rel=1e-12)
    _assert_close(resumed_alone["params"], single["params"], rtol=2e-4)

    # LoRA of stage II
    assert record_run(tmp_path / "lora_one", [*lora, "--output-dir", tmp_path / "lora_one_out",
                                              "--train-batch-size", "4"]) == 0  # fmt: skip
    lora_single = _record(tmp_path / "lora_one")
    assert lora_ranks[0]["checksum"] == lora_ranks[1]["checksum"]
    assert len(lora_ranks[0]["gradients"]) == len(lora_single["gradients"]) > 0  # the adapter's weights only
    _assert_close(lora_ranks[0]["gradients"], lora_single["gradients"], rtol=1e-5)  # measured 3.6e-6
    assert sorted(p.name for p in (tmp_path / "lora_out").iterdir()) == ["checkpoints", "lora"]
    pipeline = IFSuperResolutionPipeline.from_pretrained(stage_2)
    pipeline.load_lora_weights(tmp_path / "lora_out" / "lora")
    assert pipeline.get_active_adapters()
