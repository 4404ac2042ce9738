"""Training on several processes, proven on the CPU: `torchrun` with 2 processes over gloo (the code path of several
GPUs with NCCL) against the same run on 1 process. The runs go through `if-diffusers train` on a saved tiny
stage-I pipeline and the synthetic shapes; `training_processes_worker.py` records each process's first gradients,
learning rates and final weights."""

from __future__ import annotations

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


def _torchrun(records: Path, *arguments: str) -> subprocess.CompletedProcess:
    """The worker on 2 processes (`--standalone`: a free port, so that concurrent tests do not collide)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(records), "--", *map(str, arguments)]  # fmt: skip
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


def test_two_processes_train_as_one(model_folder, tmp_path):
    """2 processes x batch 4 x 2 accumulated micro-steps against 1 process x batch 16: the same samples with the same
    draws (each sample's from its position in the data stream), so the same first gradient up to float32 summation
    order, and the same rates.
    Both processes end with identical weights; the output folder is written once and loads; the 2-process
    checkpoint resumes on 2 processes to the same weights and on 1 to the 1-process run's."""
    one = tmp_path / "one"
    assert record_run(one / "records", [*COMMON, "--model", model_folder, "--output-dir", one / "out",
                                        "--train-batch-size", "16"]) == 0  # fmt: skip
    two = tmp_path / "two"
    run = _torchrun(two / "records", *COMMON, *TWO_PROCESSES, "--model", model_folder, "--output-dir", two / "out",
                    "--validation-steps", "2", "--validation-prompt", "a red circle",
                    "--embedding-cache-dir", tmp_path / "cache")  # fmt: skip
    ranks, single = [_record(two / "records", r) for r in (0, 1)], _record(one / "records")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    _assert_close(ranks[0]["gradients"], single["gradients"], rtol=1e-5)  # measured 1.4e-6
    assert (
        ranks[0]["rates"] == ranks[1]["rates"] == pytest.approx(single["rates"], rel=1e-12)
        and len(single["rates"]) == 4
    )
    _assert_close(ranks[0]["params"], single["params"], rtol=2e-4)  # measured 2e-5; a step moves 1e-3
    # written once, by the main process, and nothing half-written beside it
    assert run.stdout.count("wrote ") == 1 and f"wrote {two / 'out' / 'pipeline'}" in run.stdout
    assert sorted(p.name for p in (two / "out").iterdir()) == ["checkpoints", "pipeline", "validation"]
    assert sorted(p.name for p in (two / "out" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (two / "out" / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    assert run.stderr.count("training:   0%") == 1  # one progress bar
    loaded = IFPipeline.from_pretrained(two / "out" / "pipeline").unet
    _assert_close(list(loaded.parameters()), ranks[0]["params"], rtol=0)

    checkpoint = two / "out" / "checkpoints" / "checkpoint-2"
    again = tmp_path / "again"
    _torchrun(again / "records", *COMMON, *TWO_PROCESSES, "--model", model_folder, "--output-dir", again / "out",
              "--resume-from-checkpoint", checkpoint)  # fmt: skip
    resumed = [_record(again / "records", r) for r in (0, 1)]
    assert resumed[0]["checksum"] == resumed[1]["checksum"] == ranks[0]["checksum"]
    assert resumed[0]["rates"] == ranks[0]["rates"][2:]
    alone = tmp_path / "alone"
    assert record_run(alone / "records", [*COMMON, "--model", model_folder, "--output-dir", alone / "out",
                                          "--train-batch-size", "16", "--resume-from-checkpoint", checkpoint]) == 0  # fmt: skip
    resumed_alone = _record(alone / "records")
    assert resumed_alone["rates"] == pytest.approx(single["rates"][2:], rel=1e-12)
    _assert_close(resumed_alone["params"], single["params"], rtol=2e-4)


def test_two_processes_train_a_lora_of_stage_ii_as_one(pipeline_components, tmp_path):
    """LoRA (only the adapter's weights train) on the super-resolution stage: 2 processes x batch 2 match 1 x 4 in the
    first gradient, end identical, and write the adapter file once; it loads into the pipeline."""
    from if_diffusers import IFSuperResolutionPipeline

    model = tmp_path / "stage_2"
    IFSuperResolutionPipeline(**pipeline_components("II")).save_pretrained(model)
    common = ["--stage", "II", "--synthetic-shapes", "8", "--resolution", "32", "--max-train-steps", "2",
              "--checkpointing-steps", "2", "--lora-rank", "2", "--learning-rate", "1e-3", "--model", model]  # fmt: skip
    assert (
        record_run(tmp_path / "one", [*common, "--output-dir", tmp_path / "one_out", "--train-batch-size", "4"]) == 0
    )
    run = _torchrun(tmp_path / "two", *common, "--output-dir", tmp_path / "out", "--train-batch-size", "2")
    ranks, single = [_record(tmp_path / "two", r) for r in (0, 1)], _record(tmp_path / "one")
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert len(ranks[0]["gradients"]) == len(single["gradients"]) > 0  # the adapter's weights only
    _assert_close(ranks[0]["gradients"], single["gradients"], rtol=1e-5)
    assert run.stdout.count("wrote ") == 1 and sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "checkpoints", "lora"]  # fmt: skip
    pipeline = IFSuperResolutionPipeline.from_pretrained(model)
    pipeline.load_lora_weights(tmp_path / "out" / "lora")
    assert pipeline.get_active_adapters()
