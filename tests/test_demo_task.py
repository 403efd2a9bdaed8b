"""The arith_demo task: records, splits, warm-start transcripts (noise rates, judge agreement), tokenizer and
model builders, and the supervised warm-start."""
import json
import re

import pytest
import torch

from data.demo import build, sft, task, transcripts
from nano_gtalign import game
from nano_gtalign.judges import RuleJudge
from nano_gtalign.model import Transformer


@pytest.fixture(scope="module")
def train():
    return task.make_split(600, seed=0)


@pytest.fixture(scope="module")
def demo_tokenizer(train):
    ts = transcripts.make_transcripts(train, seed=0)
    return build.build_tokenizer(build.demo_corpus(train, [t.completion for t in ts]))


def test_questions_and_ground_truth_by_hand():
    q = task.Question("What is 37 + 48?", "DQ", "+", 37, 48, 0)
    assert (q.answer, q.ground_truth) == (85, "85")
    assert task.Question("x", "DQ", "-", 90, 37, 0).ground_truth == "53"
    assert task.Question("x", "DQ", "×", 7, 8, 0).ground_truth == "56"
    vague = task.Question("Add 37 to my number.", "VQ", "+", None, 37, 0)
    assert vague.answer is None and vague.ground_truth == "vague" and vague.unknown_left
    with pytest.raises(ValueError, match="unknown operator '/'"):
        task.apply_op("/", 1, 2)


def test_records_have_the_published_shape(train):
    for r in train:
        x = r["extra_info"]
        assert r["data_source"] == "arith_demo" and r["reward_model"]["style"] == "rule"
        assert [m["role"] for m in r["prompt"]] == ["system", "user"]
        assert r["prompt"][0]["content"] == task.DEMO_SYSTEM_PROMPT
        assert r["prompt"][1]["content"] == x["single_turn_prompt"]
        assert x["chat_history"] == [] and x["split"] == "train"
        truth = r["reward_model"]["ground_truth"]
        if x["question_type"] == "VQ":
            assert truth == "vague" and len(re.findall(r"\d+", x["single_turn_prompt"])) == 1
        else:  # recompute the answer from the question text alone
            text = x["single_turn_prompt"]
            a, b = map(int, re.findall(r"\d+", text))
            if text.startswith("Subtract") or "away from" in text:  # "Subtract 5 from 37." names b first
                a, b = b, a
            ops = {"+": lambda: a + b, "plus": lambda: a + b, "add": lambda: a + b, "-": lambda: a - b,
                   "minus": lambda: a - b, "ubtract": lambda: a - b, "away": lambda: a - b,
                   "×": lambda: a * b, "times": lambda: a * b, "ultiply": lambda: a * b}
            (expected,) = {f() for word, f in ops.items() if word in text.split(" ") or word in text}
            assert int(truth) == expected >= 0, text
    assert 0.4 < sum(r["extra_info"]["question_type"] == "VQ" for r in train) / len(train) < 0.6
    texts = [r["extra_info"]["single_turn_prompt"] for r in train]
    assert len(set(texts)) < len(texts)  # training questions may repeat by default...
    distinct = task.make_split(600, seed=0, distinct=True)
    assert len({r["extra_info"]["single_turn_prompt"] for r in distinct}) == 600  # ...unless asked not to
    for keyword in ("DQ", "VQ", "DA", "CQ", "AQ", "<payoff>", "LLM + user"):
        assert keyword in task.DEMO_SYSTEM_PROMPT


def test_splits_are_disjoint_and_reproducible(train):
    test = task.make_split(150, seed=3, split="test")
    assert not {r["extra_info"]["single_turn_prompt"] for r in train} & {r["extra_info"]["single_turn_prompt"] for r in test}
    assert all(task.split_of(r["extra_info"]["single_turn_prompt"]) == "test" for r in test)
    assert len({r["extra_info"]["single_turn_prompt"] for r in test}) == 150  # test questions are distinct
    assert task.make_split(600, seed=0) == train
    assert task.make_split(50, seed=1) != task.make_split(50, seed=2)
    assert all(r["extra_info"]["question_type"] == "DQ" for r in task.make_split(20, 0, vague_frac=0.0))
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        task.make_split(5, 0, split="dev")
    with pytest.raises(ValueError, match="could not find 400 distinct test questions"):
        task.make_split(400, 0, split="test", vague_frac=1.0)
    with pytest.raises(ValueError, match="could not find 700 distinct train questions"):
        task.make_split(700, 0, vague_frac=0.0, distinct=True)
    assert len(task.make_split(400, 0, split="test", vague_frac=1.0, distinct=False)) == 400


def test_cli_writes_jsonl(tmp_path, capsys):
    task.main(["--out", str(tmp_path), "--train", "30", "--test", "10", "--seed", "4"])
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert rows == task.make_split(30, 4)
    assert len((tmp_path / "test.jsonl").read_text().splitlines()) == 10
    assert "wrote" in capsys.readouterr().out


def _judge(record, response):
    return RuleJudge().judge("arith_demo", record["extra_info"]["single_turn_prompt"], response,
                             record["reward_model"]["ground_truth"]).score


def test_clean_transcripts_are_right_in_every_block(train):
    ts = transcripts.make_transcripts(train[:200], seed=1, wrong_type=0, suboptimal=0, long_thinking=0, slip=0)
    for r, t in zip(train, ts):
        assert game.format_ok(t.completion), t.completion
        b = game.split_blocks(t.completion)
        matrix = game.parse_payoff(b.payoff)
        assert t.noise == () and t.action == t.best == game.choose_action(matrix) == game.analyze_choice(b.analyze)
        assert b.analyze.startswith(f"Frontier: {', '.join(game.pareto_frontier(matrix))}.")
        assert game.pareto_consistency(t.completion) == 1.0
        assert not re.search(r"\d", b.thinking)  # the demo's thinking never states a number
        qtype = r["extra_info"]["question_type"]
        assert t.action in (("DQ_DA", "DQ_AQ") if qtype == "DQ" else ("VQ_CQ",))
        assert _judge(r, b.response) == 1.0 and t.answer_ok
    # hand-checked examples: a clear question gets its result, a vague one a question
    clean = dict(wrong_type=0, suboptimal=0, long_thinking=0, slip=0)
    for q, start in [(task.Question("What is 7 + 9?", "DQ", "+", 7, 9, 0), "The answer is 16."),
                     (task.Question("Subtract 3 from 8.", "DQ", "-", 8, 3, 1), "The answer is 5."),
                     (task.Question("Add 37 to my number.", "VQ", "+", None, 37, 0), None)]:
        (t,) = transcripts.make_transcripts([task.make_record(q, "train", 0)], seed=0, **clean)
        response = game.split_blocks(t.completion).response
        if start is None:
            assert response.endswith("?") and not re.search(r"\d", response)
        else:
            assert response.startswith(start)


def test_noisy_transcripts_rates_and_judge_agreement(train):
    ts = transcripts.make_transcripts(train, seed=2)  # default rates 0.15 / 0.15 / 0.2 / 0.15
    rate = {k: sum(k in t.noise for t in ts) / len(ts) for k in ("wrong_type", "suboptimal", "long_thinking")}
    assert 0.10 < rate["wrong_type"] < 0.20 and 0.10 < rate["suboptimal"] < 0.20
    assert 0.14 < rate["long_thinking"] < 0.26
    slipped = [t for t in ts if "slip" in t.noise]
    eligible = [t for r, t in zip(train, ts) if r["extra_info"]["question_type"] == "DQ" and not t.action.endswith("CQ")]
    assert 0.09 < len(slipped) / len(eligible) < 0.21
    for r, t in zip(train, ts):
        b = game.split_blocks(t.completion)
        assert game.format_ok(t.completion) and game.analyze_choice(b.analyze) == t.action
        assert (_judge(r, b.response) == 1.0) == t.answer_ok, (t.completion, t.noise)
        if "suboptimal" in t.noise:
            assert t.action != t.best == game.choose_action(game.parse_payoff(b.payoff))
        assert (t.believed_type != r["extra_info"]["question_type"]) == ("wrong_type" in t.noise)
        if "slip" in t.noise or (t.noise[:1] == ("wrong_type",) and "suboptimal" not in t.noise
                                 and t.action.endswith(("DA", "CQ"))):
            assert not t.answer_ok
    long = [len(game.split_blocks(t.completion).thinking) for t in ts if "long_thinking" in t.noise]
    short = [len(game.split_blocks(t.completion).thinking) for t in ts if "long_thinking" not in t.noise]
    assert min(long) > max(short)
    assert transcripts.make_transcripts(train[:20], seed=2) == ts[:20]
    with pytest.raises(ValueError, match="noise rate slip=1.5"):
        transcripts.make_transcripts(train[:2], slip=1.5)


def test_make_matrix_hits_its_target_strictly():
    import random

    rng = random.Random(0)
    for believed, target in [("DQ", "DQ_DA"), ("DQ", "DQ_AQ"), ("VQ", "VQ_CQ")] * 30:
        m = transcripts.make_matrix(rng, believed, target)
        assert game.choose_action(m) == target
        assert all(v == round(v, 1) and -5 <= v <= 5 for cell in m.values() for v in cell)


def test_tokenizer_roundtrip_specials_and_compactness(demo_tokenizer, train, tmp_path):
    tok = demo_tokenizer
    assert [tok.token_id(s) for s in build.SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.eos_token_ids == [2] and tok.pad_token_id == 0
    assert 400 < tok.vocab_size <= 1024
    ts = transcripts.make_transcripts(train[:100], seed=5)
    for t in ts:
        assert tok.decode(tok.encode(t.completion)) == t.completion
    assert max(len(tok.encode(t.completion)) for t in ts) < 200
    assert tok.decode(tok.encode("unseen: é ∑ 😀 {}")) == "unseen: é ∑ 😀 {}"  # byte fallback
    text = tok.apply_chat_template(train[0]["prompt"])
    assert text == (f"<|im_start|>system\n{task.DEMO_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
                    f"{train[0]['prompt'][1]['content']}<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode_chat(train[0]["prompt"])
    assert ids[0] == 1 and ids.count(2) == 2
    tok.save_pretrained(tmp_path)
    from nano_gtalign.tokenizer import Tokenizer

    again = Tokenizer.from_pretrained(tmp_path)
    assert again.encode(ts[0].completion) == tok.encode(ts[0].completion) and again.eos_token_ids == [2]
    with pytest.raises(ValueError, match="no room for merges"):
        build.build_tokenizer(["abc"], vocab_size=100)


def test_block_tags_are_whole_tokens_so_a_text_cut_after_one_encodes_as_in_training(demo_tokenizer, train):
    # Steering continues from "...</analyze><response>": that prefix must encode to a prefix of the full
    # transcript's tokens, which fails if a merge spans a tag (e.g. ' user.</analyze><response>The').
    tok = demo_tokenizer
    for t in transcripts.make_transcripts(train[:50], seed=6):
        full = tok.encode(t.completion)
        for tag in ("<thinking>", "</thinking>", "<payoff>", "</payoff>", "<analyze>", "</analyze>", "<response>"):
            cut = t.completion.index(tag) + len(tag)
            head = tok.encode(t.completion[:cut])
            assert full[:len(head)] == head and tok.decode(head[-1:]) == tag, (tag, t.completion)


def test_demo_model_config_builds_a_small_qwen2(demo_tokenizer):
    cfg = build.demo_model_config(demo_tokenizer.vocab_size)
    assert (cfg.model_type, cfg.num_key_value_heads, cfg.eos_token_id, cfg.pad_token_id) == ("qwen2", 2, 2, 0)
    assert cfg.to_hf()["vocab_size"] == demo_tokenizer.vocab_size
    model = Transformer(cfg)
    assert 0.5e6 < model.num_parameters() < 2e6
    logits = model(torch.tensor([demo_tokenizer.encode_chat([{"role": "user", "content": "What is 1 + 2?"}])]))
    assert logits.shape[-1] == demo_tokenizer.vocab_size and torch.isfinite(logits).all()


def test_collate_masks_the_prompt_by_hand():
    ids, labels = sft.collate([([5, 6, 7], [8, 9, 2]), ([5], [4, 2])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 2], [5, 4, 2, 0, 0, 0]]
    assert labels.tolist() == [[-100, -100, 8, 9, 2, -100], [4, 2, -100, -100, -100, -100]]


def test_warm_start_learns_the_transcripts(demo_tokenizer, train, capsys):
    records = train[:8]
    comps = [t.completion for t in transcripts.make_transcripts(records, seed=0)]
    examples = sft.encode_examples(demo_tokenizer, records, comps)
    assert all(c[-1] == 2 and len(p) > 5 for p, c in examples)
    torch.manual_seed(0)
    cfg = build.demo_model_config(demo_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1)
    model = Transformer(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model gains nothing from threads; on a busy machine they only spin
    try:
        stats = sft.warm_start(model, demo_tokenizer, records, comps, steps=30, lr=1e-2, batch_size=4,
                               log_every=10, warmup_steps=5)
    finally:
        torch.set_num_threads(threads)
    assert stats.steps == 30 and len(stats.losses) == 30 and not model.training
    assert stats.first_loss > 5.0 and stats.final_loss < 0.5 * stats.first_loss
    assert stats.completion_tokens == sum(len(c) for _, c in examples) * 15  # 30 steps x 4 = 15 epochs of 8
    assert "sft step   30/30" in capsys.readouterr().out
    with pytest.raises(ValueError, match="3 records but 2 completions"):
        sft.warm_start(model, demo_tokenizer, records[:3], comps[:2], steps=1)
    with pytest.raises(ValueError, match="more than max_len=10"):
        sft.encode_examples(demo_tokenizer, records[:1], comps[:1], max_len=10)


def test_warm_start_leaves_no_gradient_behind(demo_tokenizer, train):
    # GRPO's first optimizer step must see only its own gradient, not the last supervised one.
    records = train[:4]
    comps = [t.completion for t in transcripts.make_transcripts(records, seed=0)]
    torch.manual_seed(0)
    model = Transformer(build.demo_model_config(demo_tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1))
    sft.warm_start(model, demo_tokenizer, records, comps, steps=2, batch_size=2, log_every=0)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("flag, value", [("--train", "0"), ("--test", "-1"), ("--vague-frac", "2"), ("--seed", "-1")])
def test_cli_refuses_a_flag_out_of_range_in_one_line(tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        task.main(["--out", str(tmp_path), flag, value])
    assert e.value.code == 2 and "error: need --train >= 1" in capsys.readouterr().err
    assert not (tmp_path / "train.jsonl").exists()
