"""`hypertrain generate` / `predict`: a user's task → an adapter directory → answers identical to evaluation's.

The hypernetworks are tiny random-weight ones written as exports (what `hypertrain export` writes): the checks are
about formats and paths being exactly those of training and evaluation, which any weights show.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hypertrain import adapter
from hypertrain.config import Config, load_config
from hypertrain.generate import generate, read_task
from hypertrain.models.build import build_method
from hypertrain.predict import predict

REPO = Path(__file__).resolve().parents[1]


def write_export(method: torch.nn.Module, cfg: Config, out: Path, tasks: list[str] = ()) -> Path:
    """An export directory of ``method`` as `hypertrain export` writes it (weights, config, tasks, checksums)."""
    from safetensors.torch import save_file

    from hypertrain.checkpoint import TRAINABLE_FILE, write_checksums

    out.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in method.named_parameters() if p.requires_grad},
              str(out / TRAINABLE_FILE))
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    (out / "tasks.json").write_text(json.dumps(list(tasks)))
    write_checksums(out)
    return out


def hypernetwork(kind: str, data: Path, out: Path, *overrides: str) -> tuple[Path, torch.nn.Module, Config]:
    torch.manual_seed(0)
    cfg = load_config(Config, REPO / "configs" / f"{kind}_tiny.yaml", [f"data.train=[{data}]", *overrides])
    method = build_method(cfg, device="cpu").eval()
    if kind == "hart":
        for name, head in method.heads.items():  # generated LoRA's B heads start at zero: give them weights
            if name.endswith("_b"):
                torch.nn.init.normal_(head.weight, std=0.05)
    return write_export(method, cfg, out, getattr(method, "tasks", [])), method, cfg


@pytest.fixture(scope="module")
def eval_task(tiny_data, sni_sample):
    """One S-NI test task as evaluation reads it, and its task file."""
    from hypertrain.evaluation.data import load_eval_set

    eval_set = load_eval_set(tiny_data)
    task = next(iter(eval_set.task_ranges()))
    return eval_set, task, sni_sample / "tasks" / f"{task}.json"


def test_predict_answers_exactly_as_evaluation_does(eval_task, tiny_data, tmp_path):
    from hypertrain.evaluation.runner import evaluate
    from hypertrain.models.registry import load_tokenizer

    eval_set, task, task_file = eval_task
    export, method, cfg = hypernetwork("hart", tiny_data, tmp_path / "export", "eval.max_new_tokens=12")
    results = evaluate(method, cfg, load_tokenizer("tiny"), "cpu", sets=[eval_set])
    episodes = eval_set.episodes[eval_set.task_ranges()[task].start : eval_set.task_ranges()[task].stop]
    expected = [row["prediction"] for row in results[0].rows if row["task"] == task]

    out, config = generate(export, read_task(str(task_file), None, None), tmp_path / "adapter")
    assert config["hypernetwork_input"]["text"] == episodes[0].hyper_input  # Def+2Pos exactly as the prep wrote it
    assert config["fusion"] and config["peft"] == "prefix"
    assert config["hypernetwork"]["sha256"] == json.loads((export / "checksums.json").read_text())["files"][
        "trainable.safetensors"]["sha256"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter.safetensors", "hypertrain_adapter.json"]
    got = predict(out, [{"input": e.input} for e in episodes])
    assert [r["prediction"] for r in got] == expected and len(expected) == 2

    loaded = adapter.load(out)  # from Python in one call
    assert loaded.peft.fusion_states.shape[-1] == 64 and len(loaded.peft.encoder_prefix) == 2


def test_generated_lora_exports_as_a_peft_adapter_with_the_same_logits(tiny_data, tmp_path, sni_sample):
    from peft import PeftModel

    from hypertrain.models.registry import load_t5

    export, method, cfg = hypernetwork("hart", tiny_data, tmp_path / "export", "hart.peft=lora", "hart.fusion=false",
                                       "hart.lora_targets=[q,k,v,o]", "hart.lora_rank=4")
    task_file = sorted((sni_sample / "tasks").glob("*.json"))[0]
    out, config = generate(export, read_task(str(task_file), None, None), tmp_path / "adapter")
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["task_type"] == "SEQ_2_SEQ_LM" and peft_config["base_model_name_or_path"] == "tiny"

    generated = adapter.load(out)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = generated.main_model()(ids, labels=labels, peft=generated.peft).logits
        plain = load_t5("tiny", dtype=torch.float32, seed=cfg.train.seed).eval()
        base = plain(input_ids=ids, labels=labels).logits
        theirs = PeftModel.from_pretrained(plain, str(out)).eval()(input_ids=ids, labels=labels).logits
    assert (ours - base).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_pha_retrieves_a_prototype_and_tunes_it_on_the_examples(tiny_data, tmp_path):
    export, method, _ = hypernetwork("pha", tiny_data, tmp_path / "export", "pha.hyper_init_scale=1.0")
    examples = tmp_path / "my_task.jsonl"
    examples.write_text("".join(json.dumps({"input": f"Is {n} even?", "output": "yes" if n % 2 == 0 else "no"}) + "\n"
                                for n in range(6)))
    task = read_task(None, None, str(examples))
    out, config = generate(export, task, tmp_path / "zero_shot")
    assert config["retrieval"]["prototypes"][0] in method.tasks and "tuning" not in config["retrieval"]
    out, config = generate(export, task, tmp_path / "tuned", tune_steps=15, tune_lr=0.05, top_k=2)
    tuning = config["retrieval"]["tuning"]
    assert tuning["last_loss"] < tuning["first_loss"] and len(config["retrieval"]["prototypes"]) == 2
    got = predict(out, [{"input": "Is 7 even?"}, {"input": "Is 8 even?", "choices": ["yes", "no"]}],
                  max_new_tokens=4)
    assert isinstance(got[0]["prediction"], str) and got[1]["prediction"] in ("yes", "no")
    assert len(got[1]["scores"]) == 2
    assert len(adapter.load(out).peft.decoder_adapters) == 2


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypertrain.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_the_commands_and_their_one_line_errors(tiny_data, tmp_path, sni_sample, capsys):
    from hypertrain.cli import main

    export, _, _ = hypernetwork("hart", tiny_data, tmp_path / "export")
    task_file = sorted((sni_sample / "tasks").glob("*.json"))[0]
    made = _cli("generate", "--checkpoint", str(export), "--task", str(task_file), "--out", str(tmp_path / "a"))
    assert made.returncode == 0 and "hypertrain predict --adapter" in made.stdout, made.stderr
    answered = _cli("predict", "--adapter", str(tmp_path / "a"), "--input", "Hello", "--max-new-tokens", "3")
    assert answered.returncode == 0, answered.stderr
    assert json.loads(answered.stdout)["input"] == "Hello"

    no_definition = tmp_path / "no_def.json"
    record = json.loads(task_file.read_text())
    del record["Definition"]
    no_definition.write_text(json.dumps(record))
    one_example = tmp_path / "one.jsonl"
    one_example.write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    finetune = write_export(build_method(load_config(Config, REPO / "configs" / "hart_tiny.yaml", ["method=finetune"])),
                            load_config(Config, REPO / "configs" / "hart_tiny.yaml", ["method=finetune"]),
                            tmp_path / "finetune")
    other_main = tmp_path / "other_main"
    from hypertrain.models.registry import build_t5

    build_t5("tiny", device="cpu", num_layers=1, num_decoder_layers=1).save_pretrained(other_main)
    cases = {
        f"{no_definition}: field 'Definition' is missing": [
            "generate", "--checkpoint", str(export), "--task", str(no_definition), "--out", str(tmp_path / "x")],
        f"{one_example}: 1 example(s), the hypernetwork was trained with Def+2Pos": [
            "generate", "--checkpoint", str(export), "--examples", str(one_example), "--definition", "Copy.",
            "--out", str(tmp_path / "x")],
        "a finetune run has no hypernetwork": [
            "generate", "--checkpoint", str(finetune), "--task", str(task_file), "--out", str(tmp_path / "x")],
        "does not match the adapter: encoder_layers 1 (adapter: 2)": [
            "predict", "--adapter", str(tmp_path / "a"), "--input", "x", "--main-model", str(other_main)],
    }
    for message, args in cases.items():  # the command's own code, in this process (a subprocess each is 4 s)
        capsys.readouterr()
        code = main(args)
        stderr = capsys.readouterr().err
        errors = [line for line in stderr.splitlines() if line.startswith(f"{args[0]}: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (args, stderr)
    assert not (tmp_path / "x").exists()


def test_the_runs_manifests_say_how_a_task_is_written(tmp_path, tiny_data):
    from hypertrain.demonstrations import render
    from hypertrain.generate import InputFormat, UserTask, hypernetwork_text, run_input_format

    p3 = tmp_path / "p3_train"
    p3.mkdir()
    (p3 / "manifest.json").write_text(json.dumps({
        "format_version": 1, "source": "p3", "options": {"shots": 3},
        "filters": {"demonstrations": {"drawn_by": "loader", "shots": 3}}}))
    hart = REPO / "configs" / "hart_tiny.yaml"
    assert run_input_format(load_config(Config, hart, [f"data.train=[{p3}]"])) == InputFormat("demonstrations", 3)
    assert run_input_format(load_config(Config, hart, [f"data.train=[{tiny_data}]"])) == InputFormat("def_pos", 2)
    with pytest.raises(adapter.AdapterError, match="pass --format def_pos"):
        run_input_format(load_config(Config, hart, [f"data.train=[{tmp_path / 'gone'}]"]))
    task = UserTask("mine", None, [{"input": f"x{i}", "output": f"y{i}"} for i in range(4)], "mine.jsonl")
    assert hypernetwork_text(task, InputFormat("demonstrations", 3)) == render([("x0", "y0"), ("x1", "y1"), ("x2", "y2")])
