"""The papers' training-curve claims at small scale, on the demo tasks (a benchmark: numbers and a PNG, not a test).

    python benchmarks/curves.py --out runs/curves [--seeds 2] [--steps 200] [--main-steps 1200]

1. The demo's 34 training tasks (``data_prep.demo``, seed 0) are prepared; the tiny main model is fully fine-tuned on
   their bare queries (FT-Zero-Shot, as ``hypertrain demo`` does) and frozen; it is kept in ``--out`` and reused.
2. HART Figure 3: training loss (main-model cross-entropy, ``loss/lm``) of the autoregressive and the parallel
   generator, both without consistency (alpha 0), per seed.
3. HART Figure 4: loss variability with and without local consistency, for each ``hart.consistency`` mode at
   alpha 1 and 10: the standard deviation of ``loss/lm`` around its 20-step moving mean, and the number of spikes
   (steps whose loss exceeds the mean of the 20 before by more than 3 of their standard deviations).
4. PHA: trained on the same tasks; for instances of the training tasks drawn with another seed (inputs never seen
   in training), how often the retriever's nearest prototype is the instance's own task (per instance, and per
   task from the mean of 10 instances, as ``pha.retrieval: mean`` does for a new task).

Everything runs in one process (:mod:`hypertrain.quick`: the methods, collator and evaluation harness without
DeepSpeed), so that the grid fits a CPU. Results: ``--out/curves.json``, ``--out/curves.png``; the figures measured
on the development machine are in ``docs/models.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.shards import read_episodes  # noqa: E402
from hypertrain import quick  # noqa: E402
from hypertrain.config import Config, load_config  # noqa: E402

BASE = ["model.dtype=float32", "data.max_input_tokens=64", "data.max_target_tokens=48",
        "data.max_hyper_input_tokens=320", "train.optimizer=adamw", "train.warmup_steps=20",
        "train.global_batch_size=16", "train.lr=1e-3", "hart.prefix_length=4", "hart.hyper_decoder_layers=2"]
WINDOW = 20


def prepare_data(out: Path) -> tuple[Path, Path]:
    from data_prep.demo import DemoTasksConfig, generate, split_tasks
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    train_dir, probe_dir = out / "data" / "train", out / "data" / "probe"
    if not (train_dir / "manifest.json").is_file():
        generate(DemoTasksConfig(out=str(out / "tasks"), seed=0))
        prepare(SNIPrepConfig(src=str(out / "tasks"), out=str(train_dir), split="train", max_instances_per_task=100))
    if not (probe_dir / "manifest.json").is_file():  # the training tasks again, instances from another seed
        names, _ = split_tasks(DemoTasksConfig(out=""))
        generate(DemoTasksConfig(out=str(out / "probe_tasks"), seed=1, instances_per_task=30, test_names=tuple(names)))
        prepare(SNIPrepConfig(src=str(out / "probe_tasks"), out=str(probe_dir), split="test", max_instances_per_task=30))
    return train_dir, probe_dir


def main_model(out: Path, train: list, steps: int) -> Path:
    path = out / "main_model"
    if not (path / "config.json").is_file():
        cfg = load_config(Config, None, [*BASE, "model.name=tiny", "method=finetune", f"train.total_steps={steps}",
                                         "train.lr=3e-3", "train.global_batch_size=32", "train.seed=0"])
        started = time.perf_counter()
        run = quick.train(cfg, train)
        quick.save_main_model(run.method, cfg, path)
        print(f"main model: {steps} steps in {time.perf_counter() - started:.0f} s, final loss "
              f"{statistics.mean(run.losses[-WINDOW:]):.3f}", flush=True)
    return path


def variability(losses: list[float]) -> dict[str, float]:
    """Std of the loss around its moving mean, and spikes (> mean + 3 std of the previous window)."""
    residuals, spikes = [], 0
    for t in range(WINDOW, len(losses)):
        before = losses[t - WINDOW : t]
        mean, std = statistics.mean(before), statistics.pstdev(before)
        residuals.append(losses[t] - mean)
        spikes += losses[t] > mean + 3 * std
    return {"std": statistics.pstdev(residuals) if residuals else float("nan"), "spikes": float(spikes)}


def hart_run(main: Path, train: list, steps: int, seed: int, *overrides: str) -> dict[str, object]:
    cfg = load_config(Config, None, [*BASE, "method=hart", f"model.name={main}", f"train.total_steps={steps}",
                                     f"train.seed={seed}", *overrides])
    started = time.perf_counter()
    run = quick.train(cfg, train)
    lm = run.parts["lm"]
    return {"overrides": list(overrides), "seed": seed, "lm": lm, "final_lm": statistics.mean(lm[-WINDOW:]),
            "seconds": time.perf_counter() - started, **variability(lm)}


def pha_retrieval(main: Path, train: list, probe: list, steps: int, seed: int) -> dict[str, float]:
    from hypertrain.models.pha import nearest_prototypes

    cfg = load_config(Config, None, [*BASE, "method=pha", f"model.name={main}", f"train.total_steps={steps}",
                                     f"train.seed={seed}"])
    run = quick.train(cfg, train)
    method = run.method
    collate = quick.collator_for(cfg, method.tasks, method)
    hits, task_hits, tasks = 0, 0, 0
    with torch.no_grad():
        by_task: dict[str, list] = {}
        for episode in probe:
            by_task.setdefault(episode.task, []).append(episode)
        for task, episodes in by_task.items():
            batch = collate(episodes[:10])
            z = method.encode(batch["input_ids"], batch["attention_mask"])[1].float()
            protos = method.prototypes.weight.float()
            nearest = nearest_prototypes(z, protos)
            truth = method.tasks.index(task)
            hits += int((nearest == truth).sum())
            task_hits += int(nearest_prototypes(z.mean(0, keepdim=True), protos)[0] == truth)
            tasks += 1
    instances = sum(min(10, len(v)) for v in by_task.values())
    return {"seed": seed, "instance_accuracy": 100.0 * hits / instances, "task_accuracy": 100.0 * task_hits / tasks,
            "tasks": tasks, "chance": 100.0 / len(method.tasks)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("autoregressive", "tab:blue"), ("parallel", "tab:orange")):
        for i, run in enumerate(results["figure3"][name]):
            left.plot(run["lm"], color=color, alpha=0.8, linewidth=1, label=name if i == 0 else None)
    left.set_title("HART Fig. 3 at tiny scale: generators, alpha 0")
    left.set_xlabel("step")
    left.set_ylabel("training loss (main-model cross-entropy)")
    left.legend()
    labels = list(results["figure4"])
    stds = [statistics.mean(r["std"] for r in results["figure4"][k]) for k in labels]
    right.bar(range(len(labels)), stds)
    right.set_xticks(range(len(labels)))
    right.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    right.set_ylabel(f"std of loss around its {WINDOW}-step mean")
    right.set_title("HART Fig. 4 at tiny scale: consistency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/curves")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="steps of every HART/PHA run")
    parser.add_argument("--main-steps", type=int, default=1200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    train_dir, probe_dir = prepare_data(out)
    train = read_episodes(train_dir)
    seen = {(e.task, e.input) for e in train}
    probe = [e for e in read_episodes(probe_dir) if (e.task, e.input) not in seen]
    main = main_model(out, train, args.main_steps)
    seeds = range(args.seeds)
    results: dict = {"steps": args.steps, "seeds": args.seeds, "figure3": {}, "figure4": {}}
    for generator in ("autoregressive", "parallel"):
        method = "hart" if generator == "autoregressive" else "hypertuning"
        results["figure3"][generator] = [
            hart_run(main, train, args.steps, s, f"method={method}", f"hart.generator={generator}", "hart.alpha=0")
            for s in seeds
        ]
        print(f"fig3 {generator}: final loss " + ", ".join(f"{r['final_lm']:.3f}" for r in results["figure3"][generator]),
              flush=True)
    results["figure4"]["no consistency"] = results["figure3"]["autoregressive"]
    for mode in ("batch_mean", "per_example", "per_task"):
        for alpha in (1, 10):
            key = f"{mode} alpha {alpha}"
            results["figure4"][key] = [hart_run(main, train, args.steps, s, f"hart.consistency={mode}",
                                                f"hart.alpha={alpha}") for s in seeds]
            rows = results["figure4"][key]
            print(f"fig4 {key}: std " + ", ".join(f"{r['std']:.3f}" for r in rows) + "; spikes "
                  + ", ".join(f"{r['spikes']:.0f}" for r in rows) + "; final loss "
                  + ", ".join(f"{r['final_lm']:.3f}" for r in rows), flush=True)
    results["pha"] = [pha_retrieval(main, train, probe, args.steps, s) for s in seeds]
    print("pha retrieval: " + "; ".join(f"per instance {r['instance_accuracy']:.1f}%, per task {r['task_accuracy']:.1f}% "
                                        f"(chance {r['chance']:.1f}%)" for r in results["pha"]), flush=True)
    (out / "curves.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    plot(results, out / "curves.png")
    print(f"wrote {out / 'curves.json'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
