"""Weighted data mixtures: the slot plan (exact shares over every prefix, schedules, the ledger) and
the checks that refuse a bad mixture before training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cgpt.config import ConfigError
from cgpt.data.mixture import MixturePlan, WeightChange, check_source_folders, parse_mixture


def _shares_plan(global_batch: int = 32) -> MixturePlan:
    return MixturePlan(["web", "code", "books"], [0.6, 0.3, 0.1], global_batch)


def test_shares_stay_within_a_tenth_of_a_percent_and_one_sample_of_every_prefix() -> None:
    # Sources of very different sizes: the plan depends on the weights only, the ledger on the sizes.
    plan = _shares_plan(32)
    batches = -(-10_000 // 32)
    got = plan.consumed(batches)
    shares = got / got.sum()
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.001, shares
    per_batch = np.stack([plan.slots(b) for b in range(batches)])
    assert (per_batch.sum(axis=1) == 32).all() and (per_batch >= 0).all()
    realised = np.cumsum(per_batch, axis=0)
    target = np.cumsum(np.full((batches, 3), 32.0) * [0.6, 0.3, 0.1], axis=0)
    assert np.abs(realised - target).max() < 1.0  # every prefix, not just the end
    ledger = plan.ledger(batches, epoch_samples=[100_000, 2_000, 50])
    assert ledger.epochs.tolist() == [0, got[1] // 2_000, got[2] // 50]
    assert ledger.epochs[2] == 20 and ledger.position[2] == got[2] - 20 * 50


def test_blocks_tile_the_global_batch_in_source_order() -> None:
    plan = _shares_plan(10)
    for b in range(5):
        blocks = plan.blocks(b)
        assert blocks[0][1] == 0 and blocks[-1][2] == 10
        assert all(a[2] == b_[1] for a, b_ in zip(blocks, blocks[1:]))
        assert [n for n, _, _ in blocks] == [n for n, k in zip(plan.names, plan.slots(b)) if k]


def test_plan_does_not_depend_on_how_it_was_computed() -> None:
    # a resumed run computes the plan afresh, straight to its position: it must agree batch for batch
    once = _shares_plan(7).consumed(500)
    stepwise = _shares_plan(7)
    for b in range(1, 501, 37):
        stepwise.consumed(b)
    assert stepwise.consumed(500).tolist() == once.tolist()


def test_schedule_switches_weights_at_the_given_step() -> None:
    change = WeightChange(step=40, weights={"web": 0.2, "books": 0.8})  # code: 0 from step 40
    plan = MixturePlan(["web", "code", "books"], [0.6, 0.3, 0.1], 16, [change])
    assert np.allclose(plan.weights_at(39), [0.6, 0.3, 0.1])
    assert np.allclose(plan.weights_at(40), [0.2, 0.0, 0.8])
    before, after = plan.consumed(40), plan.consumed(140) - plan.consumed(40)
    assert abs(before[1] - 40 * 16 * 0.3) < 1
    assert after[1] == 0  # no code sample once its weight is zero
    assert abs(after[2] / after.sum() - 0.8) < 0.01
    assert np.abs(plan.consumed(140) - plan.targets(140)).max() <= 1.0


def test_epoch_rollover_is_counted_per_source() -> None:
    plan = MixturePlan(["big", "small"], [0.5, 0.5], 8)
    ledger = plan.ledger(10, epoch_samples=[1000, 15])  # small: 40 samples = 2 epochs + 10
    assert ledger.samples.tolist() == [40, 40]
    assert ledger.epochs.tolist() == [0, 2] and ledger.position.tolist() == [40, 10]
    assert ledger.as_dict()["small"] == {"samples": 40, "epochs": 2, "position": 10}


@pytest.mark.parametrize(
    ("sources", "schedule", "data_dir", "message"),
    [
        ([{"name": "a", "dir": "x", "weight": -1}], None, None, "must be a finite number >= 0"),
        ([{"name": "a", "dir": "x", "weight": 0}, {"name": "b", "dir": "y", "weight": 0}], None, None, "sum to zero"),
        ([{"name": "a", "dir": "x"}, {"name": "a", "dir": "y"}], None, None, "duplicate source name"),
        ([{"name": "a", "dir": "x"}], [{"step": 5, "weights": {"b": 1}}], None, "unknown source name(s) ['b']"),
        ([{"name": "a", "dir": "x"}], [{"step": 5, "weights": {"a": 0}}], None, "sum to zero"),
        ([{"name": "a", "dir": "x"}], None, "data/prepared/mine", "data.dir and data.sources are both set"),
        ([{"name": "a"}], None, None, "needs a name, a dir and a weight"),
        ([{"name": "a", "dir": "x", "shard_url": "s3://b/x.tar"}], None, None, "has no {name}"),
        (None, None, None, "no training data"),
    ],
)
def test_bad_mixture_configs_are_refused(sources, schedule, data_dir, message) -> None:
    with pytest.raises(ConfigError) as e:
        parse_mixture(sources, schedule, data_dir)
    assert message in str(e.value)


def test_data_dir_alone_is_a_one_source_mixture() -> None:
    sources, schedule = parse_mixture(None, None, "data/prepared/shakespeare")
    assert [(s.name, s.dir, s.weight) for s in sources] == [("shakespeare", "data/prepared/shakespeare", 1.0)]
    assert schedule == []


def _copy_meta(src: Path, dst: Path, **changes: object) -> Path:
    dst.mkdir()
    meta = json.loads((src / "meta.json").read_text())
    (dst / "meta.json").write_text(json.dumps({**meta, **changes}))
    return dst


def test_bad_source_folders_are_refused(tiny_data_dir: Path, tmp_path: Path) -> None:
    good = dict(name="a", dir=str(tiny_data_dir), weight=1)
    other_seq = _copy_meta(tiny_data_dir, tmp_path / "seq", seq_len=128)
    other_tok = _copy_meta(tiny_data_dir, tmp_path / "tok", tokenizer="llama")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_data_dir, unfinished)
    (unfinished / "meta.json").unlink()
    cases = {
        str(tmp_path / "absent"): "not found; prepare it with data/prepare.py",
        str(unfinished): "has no meta.json",
        str(other_seq): "sequence lengths 64 and 128",
        str(other_tok): "different tokenizers",
    }
    for folder, message in cases.items():
        sources, _ = parse_mixture([good, dict(name="b", dir=folder, weight=1)])
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            check_source_folders(sources)
    sources, _ = parse_mixture([good, dict(name="b", dir=str(tiny_data_dir), weight=2)])
    assert len(check_source_folders(sources)) == 2


# --- validation per source ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Other Shakespeare works than tiny_data_dir's, prepared the same way: a second source."""
    import gzip

    from conftest import CORPUS

    from cgpt.data.prepare import prepare

    src = tmp_path_factory.mktemp("corpus2") / "other.jsonl"
    with gzip.open(CORPUS, "rt") as f, open(src, "w") as out:
        for i, line in zip(range(9), f):
            if i >= 6:
                out.write(line)
    out_dir = tmp_path_factory.mktemp("prepared2")
    prepare([str(src)], out_dir, seq_len=64, val_every=3, shard_size_mb=0.1, log=lambda m: None)
    return out_dir


def test_per_source_validation_losses_equal_evaluate_py(
    tiny_data_dir: Path, other_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import lightning as L

    from cgpt.callbacks import ProgressPrinter, RunSummary
    from cgpt.cli.evaluate import main as evaluate
    from cgpt.data.datamodule import PackedDataModule
    from cgpt.lit_module import CerebrasGPTModule
    from cgpt.training import training_sources

    data = {"dir": str(tiny_data_dir), "val_sources": [{"name": "other", "dir": str(other_data_dir)}]}
    train_dir, extra, mixture, _ = training_sources(data)
    assert mixture == []
    L.seed_everything(0)
    module = CerebrasGPTModule({"name": "cerebras-gpt-tiny", "block_size": 64}, fused_loss=False)
    datamodule = PackedDataModule(train_dir, micro_batch_size=4, val_batches=3, val_sources=extra)
    assert datamodule.val_names == [None, "other"]
    module.set_val_sources(["main", "other"], [0.75, 0.25])  # name the training folder too, and mix
    summary, progress = RunSummary(str(tmp_path / "summary.json")), ProgressPrinter(bar=False)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[summary, progress],
    )  # fmt: skip
    trainer.validate(module, datamodule=datamodule, verbose=False)
    line = capsys.readouterr().out.strip().splitlines()[-1]  # the progress line names every source
    assert line.startswith("step 0: val loss") and " | main " in line and ", other " in line, line
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    m = trainer.callback_metrics
    for name, folder in (("main", tiny_data_dir), ("other", other_data_dir)):
        ref = evaluate(["--model", str(ckpt), "--data", str(folder), "--batch-size", "4", "--max-batches", "3"])
        assert float(m[f"val/loss/{name}"]) == pytest.approx(ref["validation"]["loss"], rel=1e-5)
    mixture = 0.75 * float(m["val/loss/main"]) + 0.25 * float(m["val/loss/other"])
    assert float(m["val/loss"]) == pytest.approx(mixture, rel=1e-6)
    assert float(m["val/loss/main"]) != pytest.approx(float(m["val/loss/other"]), rel=1e-3)  # two sources indeed
    written = summary.write(trainer, module)
    assert set(written["val_loss_per_source"]) == {"main", "other"}


def test_training_sources_from_the_data_config(tiny_data_dir: Path, other_data_dir: Path) -> None:
    from cgpt.training import training_sources

    two = [{"name": "a", "dir": str(tiny_data_dir), "weight": 2}, {"name": "b", "dir": str(other_data_dir)}]
    first, extra, mixture, schedule = training_sources({"dir": None, "sources": two})
    assert (first, extra, [m.name for m in mixture], schedule) == (str(tiny_data_dir), [], ["a", "b"], [])
    with pytest.raises(ConfigError, match="already name data.sources"):
        training_sources({"dir": None, "sources": two, "val_sources": [{"name": "b", "dir": str(other_data_dir)}]})
    one = training_sources(
        {"dir": None, "sources": two[:1], "val_sources": [{"name": "b", "dir": str(other_data_dir)}]}
    )
    assert one == (str(tiny_data_dir), [("b", str(other_data_dir))], [], [])  # one source is data.dir
    with pytest.raises(ConfigError, match="two or more data.sources"):
        training_sources({"dir": None, "sources": two[:1], "schedule": [{"step": 3, "weights": {"a": 1}}]})


def test_pile_config_has_the_published_weights(tmp_path: Path) -> None:
    from test_configs import _compose

    from cgpt.training import training_sources

    cfg = _compose(tmp_path, ["data=pile"])
    sources, _ = parse_mixture(list(cfg.data.sources), None, cfg.data.dir)
    assert len(sources) == 22 and len({s.dir for s in sources}) == 22
    assert sum(s.weight for s in sources) == pytest.approx(100.0, abs=1e-9)  # Table 1's column adds up
    assert [s.weight for s in sources][:3] == [18.11, 14.40, 12.07]
    with pytest.raises(ConfigError, match="pile_cc.*prepare it with data/prepare.py"):  # not prepared here
        training_sources(dict(cfg.data))


# --- the mixture stream ---------------------------------------------------------------------------
def _mixture_stream(dirs: list[Path], weights: list[float], G: int, **kw):
    from cgpt.data.datamodule import PackedDataModule
    from cgpt.data.stream import MixtureStream

    shards = [PackedDataModule(str(d))._shards("train") for d in dirs]
    plan = MixturePlan([f"s{k}" for k in range(len(dirs))], weights, G)
    return MixtureStream(shards, plan, 65, **kw)


def _take(stream, n: int) -> list[dict]:
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_mixture_stream_is_the_same_at_any_world_size_and_worker_count(tiny_data_dir: Path, other_data_dir: Path):
    from cgpt.data.datamodule import PackedLoader

    dirs, w = [tiny_data_dir, other_data_dir], [0.7, 0.3]
    one = _take(_mixture_stream(dirs, w, 8, micro_batch_size=8), 6)  # 6 global batches, 1 rank, 1 micro-batch each
    ranks = []  # 2 ranks x 2 accumulation steps of 2; rank 1 through a DataLoader with 2 workers
    for rank in (0, 1):
        stream = _mixture_stream(dirs, w, 8, micro_batch_size=2, rank=rank, world_size=2)
        items = (
            _take(stream, 12)
            if rank == 0
            else list(zip(range(12), PackedLoader(stream, batch_size=None, num_workers=2)))
        )
        ranks.append([x[1] if isinstance(x, tuple) else x for x in items])
    for g in range(6):
        joined = [item for r in (0, 1) for item in ranks[r][2 * g : 2 * g + 2]]  # rank 0's slots, then rank 1's
        assert torch.equal(torch.cat([x["tokens"] for x in joined]), one[g]["tokens"])
        assert torch.cat([torch.as_tensor(x["sample_keys"]) for x in joined]).tolist() == one[g]["sample_keys"]
        assert {x["global_batch"] for x in joined} == {g}


def test_mixture_stream_shares_epochs_and_exact_resume(tiny_data_dir: Path, other_data_dir: Path):
    from cgpt.data.stream import KEY_SHIFT, SOURCE_SHIFT

    stream = _mixture_stream([tiny_data_dir, other_data_dir, tiny_data_dir], [0.6, 0.3, 0.1], 32, micro_batch_size=32)
    n = -(-10_000 // 32)
    keys = np.concatenate([stream.keys(i) for i in range(n)])
    source = keys >> SOURCE_SHIFT
    shares = np.bincount(source) / len(keys)
    assert np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.001, shares  # token shares: every sample is seq_len tokens
    assert np.bincount(source).tolist() == stream.plan.consumed(n).tolist()
    # source 0 (0.6 of 32 a batch) rolls over every ~139 batches: each epoch serves distinct samples, and
    # the next epoch the same samples again (but for each epoch's small drop) in another order
    per_epoch, total = stream.epoch_samples[0], stream.orders[0].total
    first = keys[source == 0][:per_epoch] & ((1 << SOURCE_SHIFT) - 1)
    second = keys[source == 0][per_epoch : 2 * per_epoch] & ((1 << SOURCE_SHIFT) - 1)
    assert len(np.unique(first)) == len(np.unique(second)) == per_epoch
    assert len(set(first.tolist()) & set(second.tolist())) >= per_epoch - (total - per_epoch)
    assert not np.array_equal(first, second)
    assert first.max() >> KEY_SHIFT < 30  # shard ids of that source's own list
    ledger = stream.plan.ledger(n, stream.epoch_samples)
    assert ledger.epochs[0] == stream.plan.consumed(n)[0] // per_epoch >= 2
    # a stream started at micro-batch 150 serves what the uninterrupted one served from there
    resumed = _mixture_stream(
        [tiny_data_dir, other_data_dir, tiny_data_dir], [0.6, 0.3, 0.1], 32, micro_batch_size=32, start_batch=150
    )
    again = _take(resumed, 3)
    assert [x["batch_index"] for x in again] == [150, 151, 152]
    for x in again:
        assert x["sample_keys"] == stream.keys(x["batch_index"]).tolist()


@pytest.mark.slow
def test_mixture_run_logs_sources_and_resumes_exactly(tiny_data_dir: Path, other_data_dir: Path, tmp_path: Path):
    """train/pretrain.py on a two-source mixture whose weights change at step 3: per-source
    validation (val/loss weighted by the weights in force), the ledger in summary.json, and a run
    resumed from the step-4 checkpoint consumes exactly the samples the uninterrupted run consumed
    from there."""
    from conftest import STEPS, pretrain_args, run_script

    def train(out: Path, *extra: str, trace: Path):
        args = pretrain_args(tiny_data_dir, out, "auto", 1, *mix, *extra)
        return run_script(args, timeout=400, env={"CGPT_DATA_TRACE": str(trace)})

    mix = [
        "data.dir=null",
        f"data.sources=[{{name: a, dir: {tiny_data_dir}, weight: 0.7}},"
        f" {{name: b, dir: {other_data_dir}, weight: 0.3}}]",
        "data.schedule=[{step: 3, weights: {a: 0.2, b: 0.8}}]",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = train(whole, trace=tmp_path / "trace-whole")
    assert "data epochs: a " in proc.stdout and "| a " in proc.stdout
    summary = json.loads((whole / "summary.json").read_text())
    per_source = summary["val_loss_per_source"]
    assert set(per_source) == {"a", "b"} and per_source["a"] != pytest.approx(per_source["b"], rel=1e-3)
    assert summary["val_loss"] == pytest.approx(0.2 * per_source["a"] + 0.8 * per_source["b"], rel=1e-6)
    ledger = summary["data_sources"]
    plan = MixturePlan(["a", "b"], [0.7, 0.3], 8, [WeightChange(3, {"a": 0.2, "b": 0.8})])
    assert [ledger[n]["samples"] for n in "ab"] == plan.consumed(STEPS).tolist()
    # The run stopped at step 4: the uninterrupted run's step-4 checkpoint as the last.ckpt of a folder
    # the same command then resumes in.
    (split / "checkpoints").mkdir(parents=True)
    shutil.copy2(whole / "checkpoints" / "step0000004.ckpt", split / "checkpoints" / "last.ckpt")
    train(split, trace=tmp_path / "trace-split")
    lines = [(tmp_path / f"trace-{name}.rank0").read_text().splitlines() for name in ("whole", "split")]
    assert len(lines[0]) == STEPS * 2  # 2 micro-batches a step
    assert lines[1] == lines[0][4 * 2 :]  # from step 4 on (a re-run from step 0 would trace 12), the same samples


def test_a_resume_may_change_the_schedule_only_after_its_position(tiny_data_dir: Path, other_data_dir: Path) -> None:
    """The samples already consumed per source follow the weights then in force, so a schedule
    edited before the resume point is refused; one edited after it (e.g. to anneal) is followed."""
    from types import SimpleNamespace

    from cgpt.data.datamodule import DataMismatchError, PackedDataModule
    from cgpt.training import training_sources

    def module(schedule: list[dict]) -> PackedDataModule:
        two = [{"name": "a", "dir": str(tiny_data_dir), "weight": 0.7}, {"name": "b", "dir": str(other_data_dir)}]
        first, extra, mixture, changes = training_sources({"dir": None, "sources": two, "schedule": schedule})
        dm = PackedDataModule(first, micro_batch_size=4, global_batch_size=4, mixture=mixture, schedule=changes)
        dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)
        return dm

    saved = module([{"step": 3, "weights": {"a": 1}}])
    saved.train_dataloader()
    saved.consumed_global_batches = saved.consumed_micro_batches = 5  # the position of a run after 5 steps
    state = saved.state_dict()
    assert state["mixture_schedule"] == [[3, {"a": 1.0}]]
    for past in ([], [{"step": 3, "weights": {"a": 1, "b": 1}}], [{"step": 2, "weights": {"a": 1}}]):
        with pytest.raises(DataMismatchError, match="before step 5, which the checkpoint has already trained"):
            module(past).load_state_dict(state)
    later = module([{"step": 3, "weights": {"a": 1}}, {"step": 5, "weights": {"b": 1}}])
    with pytest.warns(UserWarning, match="follows the new changes from there"):
        later.load_state_dict(state)
    module([{"step": 3, "weights": {"a": 1}}]).load_state_dict(state)  # unchanged: silent


def test_a_source_reads_its_shards_from_its_own_shard_url(
    tiny_data_dir: Path, other_data_dir: Path, tmp_path: Path
) -> None:
    """A source whose folder holds only meta.json and whose shards live elsewhere (its shard_url)
    yields the batches it yields from its own folder; data.shard_url with data.sources is refused."""
    from types import SimpleNamespace

    from cgpt.data.datamodule import DataMismatchError, PackedDataModule
    from cgpt.training import training_sources

    moved, store = tmp_path / "b", tmp_path / "store"
    moved.mkdir()
    shutil.copytree(other_data_dir, store)
    shutil.copy(other_data_dir / "meta.json", moved / "meta.json")

    def batches(b: dict, n: int = 4) -> list[dict]:
        a = {"name": "a", "dir": str(tiny_data_dir), "weight": 0.5}
        first, _, mixture, _ = training_sources({"dir": None, "sources": [a, b]})
        dm = PackedDataModule(first, micro_batch_size=4, global_batch_size=4, mixture=mixture)
        dm.validate(None, 50257)
        dm.trainer = SimpleNamespace(training=True, global_rank=0, world_size=1)
        return [x for _, x in zip(range(n), dm.train_dataloader().dataset)]

    here = batches({"name": "b", "dir": str(other_data_dir)})
    there = batches({"name": "b", "dir": str(moved), "shard_url": f"{store}/{{name}}"})
    assert any(int(k) >> 48 == 1 for x in there for k in x["sample_keys"])  # source b is in these batches
    for x, y in zip(here, there, strict=True):
        assert torch.equal(x["tokens"], y["tokens"]) and x["sample_keys"] == y["sample_keys"]
    with pytest.raises(DataMismatchError, match="source 'b': none of its .* train shards is in .* shard_url"):
        batches({"name": "b", "dir": str(moved)})  # no shard_url: b's shards are not in its folder
    two = [{"name": "a", "dir": str(tiny_data_dir)}, {"name": "b", "dir": str(other_data_dir)}]
    with pytest.raises(ConfigError, match="give each source its own shard_url"):
        training_sources({"dir": None, "sources": two, "shard_url": "s3://x/{name}"})
