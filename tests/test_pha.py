"""PHA: pooling, prototypes and task order, adapter generation, retrieval, parameter accounting."""

from __future__ import annotations

import json

import pytest
import torch

from hypertrain.losses import prototype_info_nce, supervised_info_nce
from hypertrain.models.pha import (
    AdapterGenerator,
    AdapterHyperNetwork,
    BatchedAdapter,
    PrototypeBank,
    Retriever,
    SharedAdapter,
    appendix_b_formula,
    masked_mean_pool,
    nearest_prototypes,
    retrieve,
    task_list_from_manifests,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is faster and immune to oversubscription on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# components
# --------------------------------------------------------------------------------------------------


def test_masked_mean_pool_ignores_padding():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    pooled = masked_mean_pool(hidden, mask)
    assert torch.allclose(pooled[0], hidden[0, :3].mean(0))
    assert torch.allclose(pooled[1], hidden[1].mean(0))
    assert torch.allclose(pooled[2], hidden[2, 0])
    garbage = hidden.masked_fill(~mask.bool().unsqueeze(-1), 1e4)
    assert torch.allclose(masked_mean_pool(garbage, mask), pooled)
    assert torch.isfinite(masked_mean_pool(hidden, torch.zeros(3, 5))).all()  # all-padding rows: no NaN


def test_task_list_is_sorted_and_read_from_manifests(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"tasks": {"task_z": 3, "task_b": 1}}))
    (tmp_path / "b.json").write_text(json.dumps({"tasks": {"task_a": 2, "task_b": 5}}))
    assert task_list_from_manifests([tmp_path / "a", tmp_path / "b.json"]) == ["task_a", "task_b", "task_z"]
    bank = PrototypeBank({"c", "a", "b"}, 4)
    assert bank.tasks == ["a", "b", "c"]
    assert bank.ids(["c", "a"]).tolist() == [2, 0]
    with pytest.raises(KeyError):
        bank.index("zzz")


def test_task_order_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    bank = PrototypeBank(["mnli", "cola", "sst2", "rte"], 6)
    by_name = {t: bank.weight[bank.index(t)].detach().clone() for t in bank.tasks}
    torch.save(bank.state_dict(), tmp_path / "pha.pt")
    # a fresh run lists the same tasks in another order (e.g. a set's order): rows must still match names
    fresh = PrototypeBank(["sst2", "rte", "mnli", "cola"], 6)
    fresh.load_state_dict(torch.load(tmp_path / "pha.pt"))
    for task, vec in by_name.items():
        assert torch.equal(fresh.weight[fresh.index(task)], vec)

    # a checkpoint whose rows were saved in another order (the reference code's bug) is re-sorted on load
    saved_order = ["sst2", "cola", "rte", "mnli"]
    state = {"weight": torch.stack([by_name[t] for t in saved_order]), "_extra_state": {"tasks": saved_order}}
    fresh.load_state_dict(state)
    for task, vec in by_name.items():
        assert torch.equal(fresh.weight[fresh.index(task)], vec)
    with pytest.raises(ValueError, match="other tasks"):
        fresh.load_state_dict({"weight": state["weight"], "_extra_state": {"tasks": ["a", "b", "c", "d"]}})


def test_shared_adapter_starts_at_zero():
    adapter = SharedAdapter(8, 4)
    assert torch.equal(adapter(torch.randn(2, 3, 8)), torch.zeros(2, 3, 8))


def test_generated_adapters_differ_per_task_and_apply_per_example():
    torch.manual_seed(0)
    d, b, layers = 8, 4, 3
    gen = AdapterGenerator(d, layers, embed_dim=6, mixed_dim=5, bottleneck=b, init_scale=1.0)
    tasks = torch.randn(2, 6)
    params = gen(tasks)
    assert len(params) == layers
    p0 = params[0]
    assert p0.down_weight.shape == (2, d, b) and p0.up_weight.shape == (2, b, d)
    assert p0.down_bias.shape == (2, b) and p0.up_bias.shape == (2, d)
    # initialise the head bias too, so biases are task-dependent and non-trivial
    torch.nn.init.normal_(gen.hypernet.heads.bias)
    params = gen(tasks)
    assert not torch.allclose(params[0].down_weight[0], params[0].down_weight[1])  # per task
    assert not torch.allclose(params[0].down_weight[0], params[1].down_weight[0])  # per layer

    per_example = params[1].select(torch.tensor([1, 0, 1]))  # example → task row
    x = torch.randn(3, 5, d)
    out = BatchedAdapter(per_example)(x)
    for i, row in enumerate([1, 0, 1]):
        p = params[1]
        h = torch.relu(x[i] @ p.down_weight[row] + p.down_bias[row])
        assert torch.allclose(out[i], h @ p.up_weight[row] + p.up_bias[row], atol=1e-5)
    assert not torch.allclose(out[0], out[1])
    # beam search repeats each example: rows are reused for their copies
    beams = BatchedAdapter(per_example)(x.repeat_interleave(2, dim=0))
    assert torch.allclose(beams[::2], out, atol=1e-6) and torch.allclose(beams[1::2], out, atol=1e-6)


def test_hypernetwork_init_is_small_and_trainable():
    hyper = AdapterHyperNetwork(16, 4, 8, init_scale=1e-3)
    params = hyper(torch.randn(2, 8))
    assert params.down_weight.abs().max() < 1e-2 and params.up_bias.abs().max() < 1e-2
    assert sum(p.numel() for p in hyper.parameters()) == 8 * (2 * 16 * 4 + 4 + 16) + (2 * 16 * 4 + 4 + 16)


# --------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------


def test_top1_equals_argmax_and_topk_mixes():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(5, 6, generator=g)
    z = torch.randn(4, 6, generator=g)
    best = int(nearest_prototypes(z.mean(0, keepdim=True), protos))
    r1 = retrieve(z, protos, top_k=1, tasks=list("abcde"))
    assert r1.indices.tolist() == [best] and r1.weights.tolist() == [1.0]
    assert torch.equal(r1.embedding, protos[best]) and r1.tasks == ["abcde"[best]]
    r3 = retrieve(z, protos, top_k=3, temperature=0.1)
    assert r3.indices[0] == best and torch.isclose(r3.weights.sum(), torch.tensor(1.0))
    assert (r3.weights[:-1] >= r3.weights[1:]).all()  # best first, heaviest first
    want = (r3.weights[:, None] * protos[r3.indices]).sum(0)
    assert torch.allclose(r3.embedding, want)
    assert not torch.allclose(r3.embedding, protos[best])
    with pytest.raises(ValueError):
        retrieve(z, protos, top_k=6)


def test_vote_follows_the_majority():
    protos = torch.eye(3)
    # three instances near prototype 0, one far out along prototype 1 dominating the mean
    z = torch.tensor([[1.0, 0.1, 0.0], [1.0, 0.0, 0.1], [1.0, 0.05, 0.0], [0.0, 50.0, 0.0]])
    assert retrieve(z, protos, mode="mean").indices.tolist() == [1]
    vote = retrieve(z, protos, mode="vote")
    assert vote.indices.tolist() == [0] and vote.scores.tolist() == [0.75, 0.25, 0.0]


def test_retriever_and_prototypes_learn_to_retrieve_known_tasks():
    """A few hundred steps of L_IR + L_Pro on clustered synthetic encoder states: held-out instances of known
    tasks retrieve their own prototype (per instance > 90%, and 4-shot mean retrieval)."""
    torch.manual_seed(0)
    num_tasks, d, seq, per_task = 6, 64, 10, 8
    centers = torch.randn(num_tasks, d)

    def sample(n_per_task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.arange(num_tasks).repeat_interleave(n_per_task)
        n = labels.numel()
        # task signal is weak next to instance content and token noise
        hidden = 0.6 * centers[labels, None, :] + torch.randn(n, 1, d) + torch.randn(n, seq, d)
        lengths = torch.randint(3, seq + 1, (n,))
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        hidden = hidden.masked_fill(~mask.bool().unsqueeze(-1), 30.0)  # padding must not leak
        return hidden, mask, labels

    retriever = Retriever(d, hidden=128, out=128)
    bank = PrototypeBank([f"task{i}" for i in range(num_tasks)], 128)
    opt = torch.optim.Adam([*retriever.parameters(), *bank.parameters()], lr=3e-3)
    test_hidden, test_mask, test_labels = sample(40)

    def accuracy() -> float:
        with torch.no_grad():
            z = retriever(test_hidden, test_mask)
            return (nearest_prototypes(z, bank.weight) == test_labels).float().mean().item()

    before = accuracy()
    for _ in range(250):
        hidden, mask, labels = sample(per_task)
        z = retriever(hidden, mask)
        loss = supervised_info_nce(z, labels) + prototype_info_nce(z, bank.weight, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after > 0.9, (before, after)
    assert before < 0.6
    with torch.no_grad():
        z = retriever(test_hidden, test_mask)
    hits = 0
    for task in range(num_tasks):
        shots = z[test_labels == task][:4]
        hits += int(retrieve(shots, bank.weight).indices[0] == task)
    assert hits == num_tasks


# --------------------------------------------------------------------------------------------------
# parameter accounting
# --------------------------------------------------------------------------------------------------


def test_appendix_b_formula_t5_base_glue():
    # d=768, d'=128, τ=8, L=12, d_h=32, b=64; adapter = 2·768·64 + 64 + 768 = 99,136
    want = 768 * 128 + 128**2 + 8 * 128 + 12 * 128 + 2 * 128 * 32 + 32 * 99_136 + 12 * 99_136
    assert appendix_b_formula(768, 128, 8, 12, 32, 64) == want == 4_487_424


# --------------------------------------------------------------------------------------------------
# the method on the tiny main model
# --------------------------------------------------------------------------------------------------

TASKS = ["task_c", "task_a", "task_b"]  # deliberately unsorted: the method sorts them


def _method(**cfg):
    from hypertrain.config import PhaConfig
    from hypertrain.models.pha import PhaMethod
    from hypertrain.models.registry import build_t5
    from hypertrain.models.t5_main import FrozenT5

    main = FrozenT5(build_t5("tiny", device="cpu", seed=0, dropout_rate=0.0))
    torch.manual_seed(1)
    return PhaMethod(main, TASKS, PhaConfig(**cfg))


def _batch(n: int = 4, same_input: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (1 if same_input else n, 12), generator=g).expand(n, -1).clone()
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.randint(3, 250, (n, 5), generator=g),
        "task_ids": torch.arange(n) % len(TASKS),
    }


def test_zeroed_adapters_equal_the_frozen_t5():
    from hypertrain.models.registry import build_t5

    method = _method(hyper_init_scale=1.0).eval()
    plain = build_t5("tiny", device="cpu", seed=0, dropout_rate=0.0).eval()
    batch = _batch()
    with torch.no_grad():
        want = plain(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        )
        torch.nn.init.zeros_(method.hypernetwork.hypernet.heads.weight)
        torch.nn.init.zeros_(method.hypernetwork.hypernet.heads.bias)  # generated adapters are exactly zero
        got = method(batch)  # encoder adapters start at zero (Up = 0)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert got.parts["lm"].item() == pytest.approx(want.loss.item(), abs=1e-5)
    with torch.no_grad():
        method.hypernetwork.hypernet.reset_parameters(1.0)
        assert not torch.allclose(method(batch).logits, want.logits, atol=1e-4)  # decoder adapters act
        torch.nn.init.zeros_(method.hypernetwork.hypernet.heads.weight)
        torch.nn.init.normal_(method.encoder_adapters[0].up.weight)
        assert not torch.allclose(method(batch).logits, want.logits, atol=1e-4)  # encoder adapters act
    assert not any(p.requires_grad for p in method.main.parameters())


def test_generated_adapters_are_applied_per_example_in_the_model():
    method = _method(hyper_init_scale=1.0).eval()
    batch = _batch(3, same_input=True)
    batch["attention_mask"][:] = 1
    batch["labels"] = batch["labels"][:1].expand(3, -1).clone()
    batch["task_ids"] = torch.tensor([0, 1, 0])
    with torch.no_grad():
        logits = method(batch).logits
        alone = method({k: v[1:2] for k, v in batch.items()}).logits
    assert torch.allclose(logits[0], logits[2], atol=1e-6)
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)  # same input, other task → other adapter
    assert torch.allclose(logits[1], alone[0], atol=1e-5)  # example 1 gets its own adapter inside the batch


def test_training_step_loss_parts_and_gradients():
    method = _method(hyper_init_scale=1.0).train()
    batch = _batch(6)
    out = method(batch)
    assert set(out.parts) == {"lm", "ir", "pro"}
    p = out.parts
    assert out.loss.item() == pytest.approx((p["lm"] + 0.1 * (p["ir"] + p["pro"])).item(), rel=1e-6)
    assert p["ir"].item() != 0 and p["pro"].item() != 0
    out.loss.backward()
    for name, params in method.components().items():
        grads = [q.grad for q in params if q.grad is not None]
        if name == "main model":
            assert not grads
        else:
            assert grads and any(g.abs().sum() > 0 for g in grads), name
    opt = torch.optim.Adam([q for q in method.parameters() if q.requires_grad], lr=1e-2)
    first = out.loss.item()
    for _ in range(5):
        opt.zero_grad()
        loss = method(batch).loss
        loss.backward()
        opt.step()
    assert method(batch).loss.item() < first


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames gradient_checkpointing_enable
def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        method = _method(hyper_init_scale=1.0).train()
        with torch.no_grad():
            torch.nn.init.normal_(method.encoder_adapters[0].up.weight)  # so Down gets a gradient
        if checkpointing:  # what train.activation_checkpointing=main does
            method.main.t5.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        method(_batch(4)).loss.backward()
        grads.append(
            [method.encoder_adapters[0].down.weight.grad, method.hypernetwork.hypernet.heads.weight.grad]
        )
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))
    assert grads[0][0].abs().sum() > 0


def test_unknown_tasks_retrieve_their_adapter():
    method = _method(hyper_init_scale=1.0, eval_task_source="retrieve").eval()
    batch = _batch(4)
    with torch.no_grad():
        z = method.encode(batch["input_ids"], batch["attention_mask"])[1]
        nearest = nearest_prototypes(z, method.prototypes.weight)
        retrieved = method(batch).logits  # eval + "retrieve": task_ids are ignored for the adapters
        method.config.eval_task_source = "task_id"
        by_id = method({**batch, "task_ids": nearest}).logits
        unknown = method(
            {**batch, "task_ids": torch.full((4,), -1)}
        ).logits  # collator's id for unknown tasks
        method.config.top_k = 3
        mixed = method({**batch, "task_ids": torch.full((4,), -1)}).logits
    assert torch.allclose(retrieved, by_id, atol=1e-6) and torch.allclose(unknown, by_id, atol=1e-6)
    assert not torch.allclose(mixed, by_id, atol=1e-4)


def test_new_task_zero_shot_and_few_shot_tuning(tmp_path):
    from hypertrain.models.pha import PhaMethod

    method = _method(hyper_init_scale=1.0)
    support = _batch(4, seed=5)
    del support["task_ids"]
    trainable_before = {n for n, p in method.named_parameters() if p.requires_grad}

    result = method.start_new_task(support["input_ids"], support["attention_mask"], tune=False)  # zero-shot
    assert result.tasks == [method.tasks[int(result.indices[0])]]
    assert not any(p.requires_grad for p in method.parameters())
    method.eval()
    with torch.no_grad():
        zero_shot = method(support)
        as_known = _method(hyper_init_scale=1.0).eval()(
            {**support, "task_ids": result.indices.expand(4)}
        )  # the same weights (same seeds) with the retrieved task given as a known task
    assert set(zero_shot.parts) == {"lm", "ir", "pro"} and zero_shot.parts["ir"] == 0
    assert torch.allclose(zero_shot.logits, as_known.logits, atol=1e-5)

    method.train()
    method.start_new_task(support["input_ids"], support["attention_mask"], tune=True)  # few-shot
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert trainable == ["new_task_embedding"]
    protos = method.prototypes.weight.detach().clone()
    opt = torch.optim.Adam([method.new_task_embedding], lr=0.05)
    first = method(support).loss.item()
    for _ in range(8):
        opt.zero_grad()
        loss = method(support).loss
        loss.backward()
        opt.step()
    assert method(support).loss.item() < first
    assert torch.equal(method.prototypes.weight, protos)
    assert not torch.equal(method.new_task_embedding.detach(), protos[int(result.indices[0])])

    torch.save(method.state_dict(), tmp_path / "adapted.pt")
    fresh = _method(hyper_init_scale=1.0)
    assert isinstance(fresh, PhaMethod)
    fresh.load_state_dict(torch.load(tmp_path / "adapted.pt"))
    assert torch.equal(fresh.new_task_embedding, method.new_task_embedding)

    method.end_new_task()
    assert method.new_task_embedding is None
    assert {n for n, p in method.named_parameters() if p.requires_grad} == trainable_before


def test_method_state_dict_keeps_the_sorted_task_list():
    method = _method()
    state = method.state_dict()
    assert state["prototypes._extra_state"] == {"tasks": ["task_a", "task_b", "task_c"]}
    assert method.tasks == sorted(TASKS)


def test_generate_with_beams():
    method = _method(hyper_init_scale=1.0).eval()
    batch = _batch(2)
    greedy = method.generate(batch, max_new_tokens=4, do_sample=False)
    beams = method.generate(batch, max_new_tokens=4, num_beams=2, do_sample=False)
    assert greedy.shape[0] == 2 and beams.shape[0] == 2


def test_parameter_accounting_t5_base_on_meta():
    from hypertrain.models.pha import PhaMethod
    from hypertrain.models.registry import build_t5
    from hypertrain.models.t5_main import FrozenT5

    method = PhaMethod(FrozenT5(build_t5("base", device="meta")), [f"glue_{i}" for i in range(8)])
    acc = method.appendix_b()
    assert acc["formula"] == 4_487_424
    # + retriever biases (2·128) + project bias (32) + hypernetwork head bias (2·768·64 + 64 + 768)
    assert acc["actual"] == 4_487_424 + 256 + 32 + 99_136 == 4_586_848
    assert sum(acc["explained"].values()) == acc["difference"]


# --------------------------------------------------------------------------------------------------
# configs, builder, `hypertrain params`
# --------------------------------------------------------------------------------------------------


def test_configs_and_builder(tmp_path):
    from pathlib import Path

    from hypertrain.config import Config, ConfigError, load_config
    from hypertrain.models.build import build_method
    from hypertrain.models.pha import PhaMethod
    from hypertrain.params import count_method, format_counts

    configs = Path(__file__).resolve().parents[1] / "configs"
    glue = load_config(Config, configs / "pha_t5base_glue.yaml")
    assert glue.method == "pha" and glue.train.lr == 3e-4 and glue.train.warmup_steps == 500
    assert (glue.pha.retrieval_dim, glue.pha.mixed_dim, glue.pha.adapter_bottleneck) == (128, 32, 64)
    assert glue.train.global_batch_size == 128 and glue.pha.loss_weight == 0.1
    counts = count_method(glue)
    assert counts["trainable"] == counts["appendix_b"]["actual"] == 4_586_848
    assert "appendix-B formula" in format_counts(counts) and "616K" in format_counts(counts)
    xl = load_config(Config, configs / "pha_t5xl.yaml")
    assert xl.model.name == "google/t5-xl-lm-adapt" and xl.pha.mixed_dim == 64

    # a run reads its tasks from the data.train manifests, sorted; pha.tasks must then agree with them
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"tasks": {"t_b": 2, "t_a": 1}}))
    tiny = load_config(Config, configs / "pha_tiny.yaml", [f"data.train=[{tmp_path / 'd'}]"])
    method = build_method(tiny, device="cpu")
    assert isinstance(method, PhaMethod) and method.tasks == ["t_a", "t_b"]
    assert method.hypernetwork.hypernet.bottleneck == 8
    with pytest.raises(ConfigError, match="differs"):
        build_method(
            load_config(
                Config, configs / "pha_tiny.yaml", [f"data.train=[{tmp_path / 'd'}]", "pha.tasks=[x]"]
            )
        )
    with pytest.raises(ConfigError, match="no task list"):
        build_method(load_config(Config, configs / "pha_tiny.yaml"), device="cpu")
    assert (
        build_method(load_config(Config, configs / "pha_tiny.yaml"), device="meta").prototypes.num_tasks == 4
    )
    with pytest.raises(ConfigError):
        load_config(Config, configs / "pha_tiny.yaml", ["pha.top_k=0"])
